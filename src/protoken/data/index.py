"""The index of a converted folder: which images there are, where, and which split each is in.

The images are those written by ``protoken convert``: ``ROOT/bin_LO_HI/ID.png``, or tar shards
with their index (``convert --format shards``, :mod:`protoken.shards`).

- :class:`ImageIndex`: id, bin and length of every image, built once from ``manifest.tsv``
  (no directory read), from the shard indexes of ``convert --format shards`` (with each
  image's shard, offset and size: :meth:`ImageIndex.read` is one ``pread``), or, for a folder
  with neither (images copied by hand, the reference design's folders), from one walk of its
  bin folders; ~30-50 bytes per image, cached beside its sources as memory-mapped arrays so
  that a restart does not parse it again.
- :meth:`ImageIndex.split_rows`: the md5 split of a split key (the path relative to the root,
  ``bin_65_128/ID.png``, so moving or copying the root keeps the split; or the first group of
  ``split_key_regex``, so near-duplicates stay on one side), minus an exclusion list
  (:func:`read_id_list`).

:mod:`protoken.data.batches` turns an index into batches.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from protoken.convert.bins import bin_range, is_bin
from protoken.convert.manifest import chain_layouts, manifest_files, ok_rows
from protoken.inputs import walk_files
from protoken.shards import SHARDS_DIR, index_files, member_key, read_index

__all__ = ["ImageIndex", "in_valid_split", "read_id_list"]

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------- split and bins


def _md5_fraction(key: str) -> int:
    digest = hashlib.md5(key.encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:8], "big")


def in_valid_split(key: str, valid_frac: float) -> bool:
    """Whether the file with relative path ``key`` (e.g. ``"bin_65_128/ID.png"``) is in the
    validation split: the first 8 bytes of md5(key), as a fraction of 2**64, < ``valid_frac``."""
    return _md5_fraction(key) < _split_cut(valid_frac)


def _split_cut(valid_frac: float) -> int:
    return min(int(round(valid_frac * 2.0**64)), 1 << 64)


def _regex_key(pattern: re.Pattern, text: str) -> str | None:
    m = pattern.search(text)
    if m is None:
        return None
    groups = [g for g in m.groups() if g is not None]
    return groups[0] if groups else (m.group(0) if not pattern.groups else None)


def read_id_list(path: str | os.PathLike) -> list[str]:
    """Ids listed one per line (first word of each line; ``#`` starts a comment)."""
    out = []
    with open(path) as fh:
        for line in fh:
            words = line.split("#", 1)[0].split()
            if words:
                out.append(words[0])
    return out


# --------------------------------------------------------------------------- the index


@dataclass(frozen=True, eq=False)
class ImageIndex:
    """The images of a folder written by ``protoken convert``: id, bin and length of each,
    in numpy arrays (about 30 bytes per image, shared by forked DataLoader workers).

    Built once (:meth:`build`) from the shard indexes of ``convert --format shards``, else
    from ``manifest.tsv`` (the ``ok`` rows; sharded conversions' ``manifest.shard-I-of-N.tsv``
    too), without reading a directory, or, for a folder with neither (images copied by hand,
    the reference design's folders), from one walk of its bin folders (lengths then unknown,
    0). Image ``i`` is ``ROOT/bins[bin_of[i]]/ID.png``, or a member of a shard.

    Attributes
    ----------
    root : str
        Absolute path of the dataset folder.
    bins : tuple of str
        The bin folder names, in order of length.
    bin_of : ndarray (N,) int16
        Each image's bin, an index into ``bins``.
    lengths : ndarray (N,) int32
        Residues (0 when unknown).
    source : str
        What it was built from: ``"shards"``, ``"manifest"`` or ``"walk"``.
    """

    root: str
    bins: tuple[str, ...]
    bin_of: np.ndarray
    lengths: np.ndarray
    names: bytes  # the ids, UTF-8, concatenated
    offsets: np.ndarray  # (N + 1,) int64: id i is names[offsets[i]:offsets[i + 1]]
    source: str = "manifest"
    # --format shards: image i is bytes data_offset[i] .. + data_size[i] of shards[shard_of[i]]
    shards: tuple[str, ...] = ()
    shard_of: np.ndarray | None = None
    data_offset: np.ndarray | None = None
    data_size: np.ndarray | None = None
    # md5 of each image's default split key (BIN/ID.png) as 64 bits: a vectorised split
    split_hash: np.ndarray | None = None
    # complexes (convert --chains complex): the rows of images of several chains, sorted, and
    # their chain lengths, chain_sizes[chain_offsets[k]:chain_offsets[k + 1]] for chain_rows[k]
    chain_rows: np.ndarray | None = None
    chain_offsets: np.ndarray | None = None
    chain_sizes: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.bin_of)

    def chain_lengths(self, i: int) -> tuple[int, ...] | None:
        """The chain lengths of image ``i`` when it is a complex (from the manifest's
        ``chains`` column), else None."""
        if self.chain_rows is None or not len(self.chain_rows):
            return None
        k = int(np.searchsorted(self.chain_rows, i))
        if k == len(self.chain_rows) or self.chain_rows[k] != i:
            return None
        return tuple(
            int(v) for v in self.chain_sizes[self.chain_offsets[k] : self.chain_offsets[k + 1]]
        )

    def id(self, i: int) -> str:
        """Image id (file name without ``.png``)."""
        name = self.names[self.offsets[i] : self.offsets[i + 1]]
        return bytes(name).decode("utf-8", "surrogateescape")

    def key(self, i: int) -> str:
        """Path relative to the root, POSIX separators: ``bin_65_128/ID.png``."""
        return f"{self.bins[self.bin_of[i]]}/{self.id(i)}.png"

    def path(self, i: int) -> str:
        """The image's file, or ``ROOT/shards/SHARD.tar::KEY.png`` for an image in a shard."""
        if self.shard_of is not None:
            shard = self.shards[self.shard_of[i]]
            return f"{os.path.join(self.root, SHARDS_DIR, shard)}::{member_key(self.id(i))}.png"
        return os.path.join(self.root, self.bins[self.bin_of[i]], self.id(i) + ".png")

    def read(self, i: int) -> bytes:
        """The PNG bytes of image ``i``: its file, or one ``pread`` from its shard.

        Raises
        ------
        OSError
            The file or shard cannot be read, or the shard is shorter than its index says.
        """
        if self.shard_of is None:
            with open(self.path(i), "rb") as fh:
                return fh.read()
        shard = os.path.join(self.root, SHARDS_DIR, self.shards[self.shard_of[i]])
        return _SHARD_FILES.pread(shard, int(self.data_offset[i]), int(self.data_size[i]))

    @classmethod
    def build(
        cls,
        root: str | os.PathLike,
        only_bins: Iterable[str] | None = None,
        skip_bins: Iterable[str] | None = None,
        cache_dir: str | os.PathLike | None = None,
    ) -> ImageIndex:
        """Index ``root`` (see the class docstring), keeping only the selected bins.

        The index is cached in ``cache_dir`` (default ``ROOT/.protoken-index``; training
        keeps it in its run folder, so read-only data works). An image listed twice (a
        repeated row of a manifest or shard index) is indexed once, and logged.

        Raises
        ------
        FileNotFoundError
            ``root`` is not a folder.
        ValueError
            A malformed bin name, or no image left in the selected bins.
        """
        root = _abs(root)
        if not os.path.isdir(root):
            raise FileNotFoundError(f"dataset root not found (or not a folder): {root}")
        skip = set(skip_bins or ())
        only = None if only_bins is None else set(only_bins)
        for name in skip | (only or set()):
            bin_range(name)  # raises on a malformed name
        shard_indexes = index_files(root)
        manifests = manifest_files(root)
        if cache_dir is None:
            cache_dir = os.path.join(root, ".protoken-index")
        # shards: the chain layouts of complexes come from the manifests beside them
        sources = shard_indexes + manifests if shard_indexes else manifests
        cache = _IndexCache(_abs(cache_dir), sources, only, skip)
        cached = cache.load()
        if cached is not None:
            return cls(root=root, **cached)
        extra: list[tuple[str, int, int]] = []
        if shard_indexes:
            rows = _shard_rows(shard_indexes, extra)
            source = "shards"
        elif manifests:
            rows = itertools.chain.from_iterable(ok_rows(p) for p in manifests)
            source = "manifest"
        else:
            rows = _walk_rows(root)
            source = "walk"
        ids: list[bytes] = []
        bin_names: list[str] = []
        bin_of: list[int] = []
        lengths: list[int] = []
        kept: list[int] = []  # rows kept (shards: their places in ``extra``)
        seen_bins: dict[str, int] = {}
        for number, (image_id, name, length) in enumerate(rows):
            if name in skip or (only is not None and name not in only):
                continue
            kept.append(number)
            b = seen_bins.get(name)
            if b is None:
                bin_range(name)
                b = seen_bins[name] = len(bin_names)
                bin_names.append(name)
            ids.append(image_id.encode("utf-8", "surrogateescape"))
            bin_of.append(b)
            lengths.append(length)
        if not ids:
            where = "bins " + ", ".join(sorted(only)) if only else "its bins"
            raise ValueError(f"no PNG image in {where} under {root} (index from the {source})")
        # bins in order of length; images in (bin, id) order: the index does not depend on the
        # order of the manifest rows or of the directory listing
        bins = sorted(bin_names, key=bin_range)
        remap = np.array([bins.index(n) for n in bin_names], dtype=np.int16)
        bin_arr = remap[np.asarray(bin_of, dtype=np.int64)]
        order = np.lexsort((np.array(ids, dtype=object), bin_arr))  # stable: file order first
        same_bin = bin_arr[order[1:]] == bin_arr[order[:-1]]
        repeated = [k + 1 for k in np.flatnonzero(same_bin).tolist()
                    if ids[order[k + 1]] == ids[order[k]]]  # fmt: skip
        if repeated:
            logger.warning("%s: %d images listed twice in its %s, indexed once", root,
                           len(repeated), source)  # fmt: skip
            order = np.delete(order, repeated)
        ids = [ids[i] for i in order.tolist()]
        offsets = np.zeros(len(ids) + 1, dtype=np.int64)
        np.cumsum([len(x) for x in ids], out=offsets[1:])
        shard_fields: dict[str, Any] = {}
        if extra:
            picked = [extra[kept[i]] for i in order.tolist()]
            shard_names = sorted({p[0] for p in picked})
            number = {name: k for k, name in enumerate(shard_names)}
            shard_fields = {
                "shards": tuple(shard_names),
                "shard_of": np.array([number[p[0]] for p in picked], dtype=np.int32),
                "data_offset": np.array([p[1] for p in picked], dtype=np.int64),
                "data_size": np.array([p[2] for p in picked], dtype=np.int64),
            }
        bin_arr = bin_arr[order].astype(np.int16)
        split_hash = np.array(
            [_md5_fraction(f"{bins[b]}/{x.decode('utf-8', 'surrogateescape')}.png")
             for b, x in zip(bin_arr.tolist(), ids, strict=True)],
            dtype=np.uint64,
        )  # fmt: skip
        fields = {
            "bins": tuple(bins),
            "bin_of": bin_arr,
            "lengths": np.asarray(lengths, dtype=np.int32)[order],
            "names": b"".join(ids),
            "offsets": offsets,
            "source": source,
            "split_hash": split_hash,
            **shard_fields,
        }
        fields.update(_chain_fields(manifests, ids))
        if source != "walk":
            cache.save(fields)
        return cls(root=root, **fields)

    def split_rows(
        self,
        split: str,
        valid_frac: float,
        split_key_regex: str | None = None,
        exclude_ids: Iterable[str] = (),
    ) -> np.ndarray:
        """Rows (image numbers, ascending) of ``split`` (``"train"``, ``"val"`` or ``"all"``).

        An image is in ``"val"`` when the md5 of its split key, read as a 64-bit fraction, is
        below ``valid_frac`` (:func:`in_valid_split`). The split key is the image's path
        relative to the root (``bin_65_128/ID.png``) or, with
        ``split_key_regex``, the first group of the regex that matched, searched in the id:
        ``^bm5__([0-9A-Za-z]{4})_`` keeps the four near-duplicate files of one BM5 complex on
        one side. Images whose id or split key is in ``exclude_ids`` (a held-out test set) are
        in no split; a listed id is mapped through the regex too, so its near-duplicates are
        excluded with it.

        Raises
        ------
        ValueError
            A bad split name or fraction, or an id the regex does not match (every image
            needs a key; add an alternative such as ``|^(.+)$`` to key the others by id).
        """
        if split not in ("train", "val", "all"):
            raise ValueError(f"split must be 'train', 'val' or 'all', not {split!r}")
        if not 0.0 <= valid_frac <= 1.0:
            raise ValueError(f"valid_frac must be in [0, 1], not {valid_frac}")
        pattern = re.compile(split_key_regex) if split_key_regex else None
        excluded = {x for x in exclude_ids if x}
        if pattern is not None:
            excluded |= {k for x in list(excluded) if (k := _regex_key(pattern, x)) is not None}
        cut = _split_cut(valid_frac)
        if pattern is None and not excluded and self.split_hash is not None:  # vectorised
            if split == "all":
                return np.arange(len(self))
            val = (
                np.ones(len(self), dtype=bool)
                if cut >= 1 << 64
                else self.split_hash < np.uint64(cut)
            )
            return np.flatnonzero(val == (split == "val"))
        keep = np.zeros(len(self), dtype=bool)
        for i in range(len(self)):
            image_id = self.id(i)
            if pattern is None:
                key = self.key(i)
            else:
                key = _regex_key(pattern, image_id)
                if key is None:
                    raise ValueError(
                        f"split_key_regex {split_key_regex!r} gives no key for image id "
                        f"{image_id!r}: make it match every id (e.g. add '|^(.+)$')"
                    )
            if image_id in excluded or key in excluded:
                continue
            if split == "all":
                keep[i] = True
            else:
                keep[i] = (_md5_fraction(key) < cut) == (split == "val")
        return np.flatnonzero(keep)

    def oversampled(self, rows: np.ndarray, factors: Mapping[str, int]) -> np.ndarray:
        """``rows`` with each image whose id matches a regex of ``factors`` listed ``N`` times
        (the first regex that matches decides): a rare kind of image (complexes among single
        chains) drawn ``N`` times per epoch. Rows stay in ascending order; with no factor or a
        factor of 1 the rows are returned as they are.

        Raises
        ------
        ValueError
            A regex that does not compile or a factor below 1.
        """
        rules = []
        for regex, n in factors.items():
            try:
                rules.append((re.compile(regex), int(n)))
            except re.error as exc:
                raise ValueError(f"oversample: bad regex {regex!r} ({exc})") from None
            if int(n) < 1:
                raise ValueError(f"oversample: factor of {regex!r} must be >= 1, not {n}")
        rows = np.asarray(rows, dtype=np.int64)
        if not rules:
            return rows
        times = np.ones(len(rows), dtype=np.int64)
        for j, i in enumerate(rows.tolist()):
            image_id = self.id(i)
            times[j] = next((n for pattern, n in rules if pattern.search(image_id)), 1)
        return np.repeat(rows, times)


class _IndexCache:
    """The arrays of an :class:`ImageIndex`, saved in a cache folder (``FOLDER/KEY/*.npy``;
    ``ROOT/.protoken-index`` by default) and memory-mapped when they are unchanged: the time
    to the first batch then no longer grows with the number of images (no parsing, no md5 per
    image; the pages are read as they are used, and shared by forked workers).

    KEY hashes the source files' paths, sizes and modification times and the bin selection,
    so a manifest or index that grew makes a new cache (and the older caches are removed). A
    folder that cannot be written simply has no cache.
    """

    ARRAYS = ("bin_of", "lengths", "names", "offsets", "split_hash", "shard_of", "data_offset",
              "data_size", "chain_rows", "chain_offsets", "chain_sizes")  # fmt: skip

    def __init__(self, folder: str, sources: list[str], only, skip):
        sig = []
        for path in sources:
            st = os.stat(path)
            sig.append([os.path.basename(path), st.st_size, st.st_mtime_ns])
        blob = json.dumps([sig, sorted(only) if only is not None else None, sorted(skip or ())])
        self.folder = os.path.join(folder, hashlib.sha256(blob.encode()).hexdigest()[:16])
        self.enabled = bool(sources)

    def load(self) -> dict | None:
        meta_path = os.path.join(self.folder, "meta.json")
        if not self.enabled or not os.path.isfile(meta_path):
            return None
        try:
            with open(meta_path) as fh:
                meta = json.load(fh)
            fields: dict[str, Any] = {"bins": tuple(meta["bins"]), "source": meta["source"],
                                      "shards": tuple(meta["shards"])}  # fmt: skip
            for name in self.ARRAYS:
                path = os.path.join(self.folder, f"{name}.npy")
                fields[name] = (
                    np.load(path, mmap_mode="r", allow_pickle=False)
                    if os.path.exists(path)
                    else None
                )
            n = len(fields["bin_of"])
            if len(fields["offsets"]) != n + 1 or len(fields["lengths"]) != n:
                return None
            return fields
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def save(self, fields: dict) -> None:
        if not self.enabled:
            return
        import shutil
        import tempfile

        parent = os.path.dirname(self.folder)
        try:
            os.makedirs(parent, exist_ok=True)
            tmp = tempfile.mkdtemp(dir=parent, prefix=".tmp-")
            try:
                for name in self.ARRAYS:
                    value = fields.get(name)
                    if name == "names":
                        value = np.frombuffer(value, dtype=np.uint8)
                    if value is not None:
                        np.save(os.path.join(tmp, f"{name}.npy"), value, allow_pickle=False)
                meta = {"bins": list(fields["bins"]), "source": fields["source"],
                        "shards": list(fields.get("shards", ()))}  # fmt: skip
                with open(os.path.join(tmp, "meta.json"), "w") as fh:
                    json.dump(meta, fh)
                os.rename(tmp, self.folder)  # atomic; another process may have won: fine
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            with os.scandir(parent) as it:  # caches of older manifests (mapped ones stay
                stale = [e.path for e in it if e.is_dir() and not e.name.startswith(".")
                         and e.path != self.folder]  # fmt: skip
            for path in stale:  # readable by whoever has them open: unlinking is safe)
                shutil.rmtree(path, ignore_errors=True)
        except OSError:
            pass  # a read-only data set: no cache


def _chain_fields(manifests: list[str], ids: list[bytes]) -> dict[str, np.ndarray]:
    """The index's chain arrays (see :class:`ImageIndex`) for the images (``ids``, in index
    order) that the manifests record as complexes."""
    layouts: dict[str, tuple[int, ...]] = {}
    for path in manifests:
        layouts.update(chain_layouts(path))
    rows, sizes, offsets = [], [], [0]
    if layouts:
        for i, raw in enumerate(ids):
            layout = layouts.get(raw.decode("utf-8", "surrogateescape"))
            if layout:
                rows.append(i)
                sizes.extend(layout)
                offsets.append(len(sizes))
    return {
        "chain_rows": np.asarray(rows, dtype=np.int64),
        "chain_offsets": np.asarray(offsets, dtype=np.int64),
        "chain_sizes": np.asarray(sizes, dtype=np.int32),
    }


def _shard_rows(paths: list[str], extra: list) -> Iterator[tuple[str, str, int]]:
    """``(id, bin, length)`` of every image of the shard indexes ``paths``; the shard, offset
    and size of each are appended to ``extra`` as it is yielded."""
    for path in paths:
        for shard, _member, offset, size, image_id, length, bin_ in read_index(path):
            extra.append((shard, offset, size))
            yield image_id, bin_, length


class _ShardFiles:
    """Open shard files of this process (a DataLoader worker opens its own after the fork),
    at most ``limit`` at once, read with ``os.pread`` (no shared file position)."""

    def __init__(self, limit: int = 64):
        self.limit = limit
        self.pid = -1
        self.fds: dict[str, int] = {}

    def pread(self, path: str, offset: int, size: int) -> bytes:
        if self.pid != os.getpid():  # forked: the parent's descriptors are not ours to use
            self.pid, self.fds = os.getpid(), {}
        if not 0 < size <= _MAX_PNG_BYTES or offset < 0:
            raise OSError(f"{path}: index gives an implausible member size {size} at {offset}")
        fd = self.fds.get(path)
        if fd is None:
            if len(self.fds) >= self.limit:
                old = next(iter(self.fds))
                os.close(self.fds.pop(old))
            fd = self.fds[path] = os.open(path, os.O_RDONLY)
        data = os.pread(fd, size, offset)
        if len(data) != size:
            raise OSError(f"{path}: shorter than its index says (truncated shard?)")
        return data


#: Largest member read from a shard (a sanity bound against a corrupt index; the PNG header is
#: then checked against its bin's side limit before any pixel is decoded).
_MAX_PNG_BYTES = 1 << 28
_SHARD_FILES = _ShardFiles()


def _walk_rows(root: str) -> Iterator[tuple[str, str, int]]:
    """``(id, bin, 0)`` of the PNGs of the bin folders of ``root``: one directory walk."""
    with os.scandir(root) as it:
        names = sorted(e.name for e in it if e.is_dir() and is_bin(e.name))
    for name in names:
        folder = os.path.join(root, name)
        for path in walk_files(folder, (".png",)):
            rel = os.path.relpath(path, folder).replace(os.sep, "/")
            yield rel[:-4], name, 0


def _abs(path: str | os.PathLike) -> str:
    return os.path.abspath(os.fspath(path))
