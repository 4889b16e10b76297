"""Sharded image datasets: tar shards in the WebDataset layout, and their index.

``protoken convert --format shards`` writes, instead of one PNG per chain::

    OUT/shards/bin_65_128/TAG-000000.tar     ID.png + ID.json per image, ~1 GB each
    OUT/shards/index.TAG.tsv                 shard, member, offset, size, id, length, bin

``TAG`` is ``all`` or ``shard-I-of-N`` (one writer per tag, so the tasks of a SLURM array
write side by side). Each shard holds the images of one length bin, so a batch of one bin
reads few shards. Members follow the WebDataset convention (files sharing a key before the
first ``.`` make one sample): ``KEY.png`` is the 6D image as ``protoken convert`` writes it
and ``KEY.json`` holds ``id``, ``sequence``, ``length``, ``bin`` and ``source`` (and, for a
``--chains complex`` image, ``chains``: its layout as in the manifest, ``A:120,B:98``); ``KEY``
is the id with ``.`` written ``%2E`` (:func:`member_key`), so ids with dots stay one sample.

The index has one row per image: the shard (relative to ``OUT/shards``), the member's name,
the byte offset and size of its PNG data inside the tar, and the image's id, length and bin.
With it :class:`protoken.data.ImageIndex` reads any image with one ``pread`` (random access,
as webdataset's ``wids`` and MosaicML streaming do), so training needs no directory walk and
keeps its exact, O(1) resume. The tar reading and writing are the standard library's
(:mod:`tarfile`): webdataset, litdata and MosaicML streaming were considered, but none decodes
our 16-bit PNGs through its image decoder, and what we need of them (sequential tar writing,
random reads by offset) is a few lines here; any WebDataset reader can still read the shards.

Commit protocol (a killed run loses nothing and duplicates nothing): a shard is written as
``NAME.tar.tmp``, synced, renamed to ``NAME.tar``, then its rows are appended to the index,
then the manifest rows of its images are written. A shard is committed once it is in the
index; the next run of the same tag removes the temporary and unindexed shards a killed run
left, and converts their inputs again (they have no manifest row).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from protoken.convert_settings import read_settings
from protoken.fileio import drop_partial_last_line
from protoken.inputs import Shard, check_under, in_shard, is_safe_id

__all__ = [
    "DEFAULT_SHARD_BYTES",
    "INDEX_COLUMNS",
    "ShardImage",
    "ShardWriter",
    "index_files",
    "member_key",
    "parse_size",
    "read_index",
]

#: Default size of a shard (``--shard-size``): large enough for parallel file systems.
DEFAULT_SHARD_BYTES = 1_000_000_000
#: Columns of ``OUT/shards/index.TAG.tsv``.
INDEX_COLUMNS = ("shard", "member", "offset", "size", "id", "length", "bin")
SHARDS_DIR = "shards"
_INDEX_RE = re.compile(r"index\.([A-Za-z0-9_\-]+)\.tsv")
_BLOCK = tarfile.BLOCKSIZE


def member_key(image_id: str) -> str:
    """The WebDataset key of an image: its id with ``.`` written ``%2E``."""
    return image_id.replace(".", "%2E")


def parse_size(text: str) -> int:
    """``"1GB"``, ``"500MB"``, ``"64kB"``, ``"1e9"`` or ``"123"`` -> bytes (decimal units)."""
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([kKMGT]?)[bB]?\s*", str(text))
    if not m:
        raise ValueError(f"expected a size such as 1GB or 500MB, not {text!r}")
    scale = {"": 1, "k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}[m.group(2)]
    try:
        value = int(float(m.group(1)) * scale)
    except ValueError:
        raise ValueError(f"expected a size such as 1GB or 500MB, not {text!r}") from None
    if value < 1:
        raise ValueError(f"a shard size must be positive, not {text!r}")
    return value


def index_files(out: str) -> list[str]:
    """The shard index files of an output folder (``OUT/shards/index.*.tsv``), sorted."""
    folder = os.path.join(out, SHARDS_DIR)
    if not os.path.isdir(folder):
        return []
    with os.scandir(folder) as it:
        names = sorted(e.name for e in it if e.is_file() and _INDEX_RE.fullmatch(e.name))
    return [os.path.join(folder, n) for n in names]


def read_index(path: str) -> Iterator[tuple[str, str, int, int, str, int, str]]:
    """Rows of one shard index file (a partial last line of a killed run is skipped).

    Raises
    ------
    ValueError
        Not a shard index (header), or a row whose numbers or names are malformed.
    """
    with open(path, encoding="utf-8", errors="surrogateescape") as fh:
        header = tuple(fh.readline().rstrip("\n").split("\t"))
        if header != INDEX_COLUMNS:
            raise ValueError(f"{path}: not a protoken shard index (header {list(header)})")
        for number, line in enumerate(fh, 2):
            if not line.endswith("\n"):
                break
            cols = line.rstrip("\n").split("\t")
            try:
                shard, member, offset, size, image_id, length, bin_ = cols
                row = (shard, member, int(offset), int(size), image_id, int(length), bin_)
            except ValueError:
                raise ValueError(f"{path}: line {number} is malformed") from None
            if not is_safe_id(image_id) or ".." in shard.split("/") or shard.startswith("/"):
                raise ValueError(f"{path}: line {number} names an unsafe id or shard")
            yield row


@dataclass(frozen=True)
class ShardImage:
    """One image of a sharded output folder, read by offset (an input of ``protoken
    encode``)."""

    id: str
    shard: str  # absolute path of the tar
    member: str
    offset: int
    size: int
    settings: dict = field(default_factory=dict, compare=False)  # OUT/convert.json

    def __str__(self) -> str:
        return f"{self.shard}::{self.member}"

    def read(self) -> bytes:
        if not 0 < self.size <= 1 << 28:
            raise ValueError(f"{self}: implausible size {self.size} in the shard index")
        with open(self.shard, "rb") as fh:
            fh.seek(self.offset)
            data = fh.read(self.size)
        if len(data) != self.size:
            raise ValueError(f"{self}: the shard is shorter than its index says")
        return data


def iter_shard_images(out: str, shard: Shard | None = None) -> Iterator[ShardImage]:
    """The images of a folder written by ``convert --format shards``, in index order, as
    :class:`ShardImage` (``shard`` keeps those whose id is in shard I of N)."""
    settings = read_settings(out) or {}
    root = os.path.join(out, SHARDS_DIR)
    for index in index_files(out):
        for name, member, offset, size, image_id, _length, _bin in read_index(index):
            if in_shard(image_id, shard):
                yield ShardImage(image_id, check_under(root, name), member, offset, size, settings)


@dataclass
class _Open:
    """A shard being written."""

    name: str  # relative to OUT/shards
    tmp: str
    tar: tarfile.TarFile
    rows: list = field(default_factory=list)  # index rows
    items: list = field(default_factory=list)  # what the caller passed with each image


class ShardWriter:
    """Writes images into tar shards of at most ``max_bytes``, one open shard per bin.

    ``on_commit(items)`` is called with the ``item`` of every image of a shard once the shard
    is renamed and indexed (the caller then writes their manifest rows). Use as a context
    manager, or call :meth:`close` (commits the open shards) / :meth:`abandon` (leaves them
    as temporary files for the next run to remove).
    """

    def __init__(
        self,
        out: str,
        tag: str,
        max_bytes: int = DEFAULT_SHARD_BYTES,
        on_commit: Callable[[list], None] | None = None,
    ):
        self.root = os.path.join(out, SHARDS_DIR)
        self.tag, self.max_bytes = tag, int(max_bytes)
        self.on_commit = on_commit or (lambda items: None)
        os.makedirs(self.root, exist_ok=True)
        self.index_path = os.path.join(self.root, f"index.{tag}.tsv")
        self._repair_index()
        self.open: dict[str, _Open] = {}
        self.next_number: dict[str, int] = {}
        self.committed = 0

    # ------------------------------------------------------------------ recovery

    def _repair_index(self) -> None:
        new = not os.path.exists(self.index_path) or os.path.getsize(self.index_path) == 0
        if new:
            with open(self.index_path, "w", encoding="utf-8") as fh:
                fh.write("\t".join(INDEX_COLUMNS) + "\n")
            return
        drop_partial_last_line(self.index_path)

    def remove_uncommitted(self) -> int:
        """Remove this tag's temporary shards and the shards missing from its index (what a
        killed run leaves); returns how many files were removed."""
        indexed = {row[0] for row in read_index(self.index_path)}
        removed = 0
        prefix = f"{self.tag}-"
        with os.scandir(self.root) as it:
            bins = [e.path for e in it if e.is_dir() and e.name.startswith("bin_")]
        for folder in bins:
            with os.scandir(folder) as it:
                for e in it:
                    rel = f"{os.path.basename(folder)}/{e.name}"
                    stale = e.name.endswith(".tar.tmp") or (
                        e.name.endswith(".tar") and rel not in indexed
                    )
                    if e.name.startswith(prefix) and stale and e.is_file(follow_symlinks=False):
                        with contextlib.suppress(OSError):
                            os.unlink(e.path)
                            removed += 1
        return removed

    # ------------------------------------------------------------------ writing

    def _number(self, bin_name: str) -> int:
        """The next free shard number of this tag in a bin (continues after earlier runs)."""
        if bin_name not in self.next_number:
            folder = os.path.join(self.root, bin_name)
            last = -1
            if os.path.isdir(folder):
                pat = re.compile(re.escape(self.tag) + r"-(\d+)\.tar(\.tmp)?")
                with os.scandir(folder) as it:
                    for e in it:
                        m = pat.fullmatch(e.name)
                        if m:
                            last = max(last, int(m.group(1)))
            self.next_number[bin_name] = last + 1
        n = self.next_number[bin_name]
        self.next_number[bin_name] = n + 1
        return n

    def _start(self, bin_name: str) -> _Open:
        name = f"{bin_name}/{self.tag}-{self._number(bin_name):06d}.tar"
        final = check_under(self.root, name)
        os.makedirs(os.path.dirname(final), exist_ok=True)
        tmp = final + ".tmp"
        fileobj = open(tmp, "xb")  # noqa: SIM115 - closed in _commit / abandon
        tar = tarfile.open(fileobj=fileobj, mode="w", format=tarfile.PAX_FORMAT)
        return _Open(name=name, tmp=tmp, tar=tar)

    @staticmethod
    def _add(tar: tarfile.TarFile, name: str, data: bytes) -> int:
        """Append a member; returns the offset of its data in the tar."""
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = len(data), 0o644, 0
        tar.addfile(info, io.BytesIO(data))
        return tar.offset - -(-len(data) // _BLOCK) * _BLOCK

    def add(self, image_id: str, bin_name: str, png: bytes, meta: dict, item=None) -> None:
        """Append ``KEY.png`` and ``KEY.json`` (``meta``) to the open shard of ``bin_name``,
        starting a new shard when this one would pass ``max_bytes``."""
        if not is_safe_id(image_id):
            raise ValueError(f"unsafe image id {image_id!r}")
        key = member_key(image_id)
        blob = json.dumps(meta, sort_keys=True).encode()
        # headers (pax for long names) + data of both members, the end-of-archive blocks and
        # tarfile's padding of the archive to a whole record on close
        need = 6 * _BLOCK + len(png) + len(blob) + 2 * _BLOCK + tarfile.RECORDSIZE
        shard = self.open.get(bin_name)
        if shard is not None and shard.rows and shard.tar.offset + need > self.max_bytes:
            self._commit(bin_name)
            shard = None
        if shard is None:
            shard = self.open[bin_name] = self._start(bin_name)
        offset = self._add(shard.tar, f"{key}.png", png)
        self._add(shard.tar, f"{key}.json", blob)
        length = int(meta.get("length", 0))
        shard.rows.append((shard.name, f"{key}.png", offset, len(png), image_id, length, bin_name))
        shard.items.append(item)

    def _commit(self, bin_name: str) -> None:
        shard = self.open.pop(bin_name)
        fileobj = shard.tar.fileobj
        shard.tar.close()  # writes the end-of-archive blocks
        fileobj.flush()
        os.fsync(fileobj.fileno())
        fileobj.close()
        os.rename(shard.tmp, check_under(self.root, shard.name))
        lines = "".join("\t".join(str(v) for v in row) + "\n" for row in shard.rows)
        with open(self.index_path, "a", encoding="utf-8", errors="surrogateescape") as fh:
            fh.write(lines)
            fh.flush()
            os.fsync(fh.fileno())
        self.committed += 1
        self.on_commit(shard.items)

    def close(self) -> None:
        """Commit every open shard."""
        for bin_name in sorted(self.open):
            self._commit(bin_name)

    def abandon(self) -> None:
        """Close the open shards' files without committing them (an error or a signal): they
        stay ``.tar.tmp`` and their images have no manifest row, so the next run redoes them."""
        for shard in self.open.values():
            with contextlib.suppress(OSError):
                shard.tar.fileobj.close()
        self.open = {}

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abandon()
