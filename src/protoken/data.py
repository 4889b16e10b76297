"""Datasets of 6D images for training at scale (millions of PNGs, DDP, many workers).

The images are the PNGs written by ``protoken convert``: ``ROOT/bin_LO_HI/ID.png``. Items
are dicts::

    {"image": FloatTensor (3, L, L), "length": L, "id": "ID", "path": "/abs/ROOT/bin_LO_HI/ID.png"}

with the image in [-1, 1] (the codec's exact inverse of the 8- or 16-bit PNG), or standardised
per channel when asked (``normalize="reference"`` or ``mean``/``std``, by
:func:`protoken.codec.standardize`; undo it with :meth:`denormalize`).
:func:`collate_with_padding` pads a list of items to a batch.

Training and evaluation (``protoken train``) use an index:

- :class:`ImageIndex`: id, bin and length of every image, built once from ``manifest.tsv``
  (no directory read), from the shard indexes of ``convert --format shards`` (with each
  image's shard, offset and size: :meth:`ImageIndex.read` is one ``pread``), or from one walk
  when there is neither; ~30-50 bytes per image, cached beside its sources as memory-mapped
  arrays so that a restart does not parse it again.
- :meth:`ImageIndex.split_rows`: the md5 split of a split key (the relative path, or the
  first group of ``split_key_regex`` so near-duplicates stay on one side), minus an
  exclusion list.
- :class:`BatchPlan`: per epoch, a seeded permutation cut into batches of one bin each
  (``shard_window``: shards read a few at a time).
- :class:`IndexedBatches`: one rank's stream, a pure function of (seed, epoch, position,
  rank, worker): O(1) to start anywhere, the same whatever the number of workers, and
  continued by any world size; finite and fixed for evaluation.

The streaming datasets below (:class:`IterableImageDataset` for one bin folder,
:class:`IterableBinnedImageDataset` for all bins under roots) need no index and hold constant
memory whatever the number of files; they suit one-off passes over a folder.

How a dataset streams (every step in constant memory, whatever the number of files):

- Discovery: ``os.scandir`` walks (:func:`protoken.inputs.walk_files`), never a listing in memory.
- Split: a file is in ``"val"`` when the md5 of its path relative to the dataset root (POSIX
  separators, e.g. ``bin_65_128/ID.png``), read as a 64-bit fraction, is below ``valid_frac``.
  Moving or copying the root keeps the split; a bin folder opened alone
  (:class:`IterableImageDataset`) splits exactly as inside its root
  (:class:`IterableBinnedImageDataset`).
- Sharding: the ``world_size * num_workers`` DataLoader workers of all ranks take disjoint shards
  of the split by a hash of the same relative path (crc32 modulo the number of shards): every file
  is read exactly once per epoch overall, whatever the order the file system lists it in on each
  node. All ranks must use the same ``num_workers``.
- Shuffle (``shuffle_buffer > 0``): each worker counts its shard, splits it into
  ``P = ceil(n / shuffle_buffer)`` (at most ``max_passes``) random passes by a per-epoch salted
  hash, interleaves the bin folders of each pass at random in proportion to their sizes, and feeds
  the result through a streaming shuffle buffer of ``shuffle_buffer`` file entries (each new entry
  replaces a random slot, whose entry is yielded). A pass never holds more files than the buffer,
  so the order is a near-uniform permutation of the shard at the cost of ``P`` directory walks
  per epoch (plus one counting walk when an iterator starts; an infinite stream reuses the
  count its previous epoch measured). The buffer holds file names, not images (~150 bytes
  each): the default 100_000 costs ~15 MB per worker and covers shards of up to 100_000 files
  in one pass; a walk costs ~1-4 us per file of the dataset, against ~0.5-5 ms to decode one.
  Seeded by ``(seed, epoch, shard)``: :meth:`~IterableImageDataset.set_epoch` re-seeds it.
- Infinite mode (``infinite=True``, for training): each worker loops over its shard epoch after
  epoch (``epoch``, ``epoch + 1``, ... re-seeding each), so every rank has a batch at every step
  and uneven shards never stall DDP. A worker whose shard is empty ends its stream; a rank with
  no data at all ends its loader, which :func:`cycle` reports as an error rather than a hang.
- Evaluation: a finite dataset through :func:`take_batches` gives exactly ``n`` batches on every
  rank (cycling over a short shard), so collective operations line up.
- Length-aware batching (``batch_size=``, ``group_by_bin=True``): the dataset itself yields
  padded batches whose images all come from one bin folder (padding stays below one bin width);
  use it with ``DataLoader(dataset, batch_size=None)``. See :func:`batch_sizes_for_budget` for a
  batch size per bin with a constant pixel budget.
- A corrupt or unreadable PNG, or one whose header is refused before decoding (not square
  RGB, not 8/16-bit, or larger than a bin may hold: a 3000 x 3000 PNG in ``bin_65_128``), is logged
  once (``logging.warning`` with its path) and skipped; the worker goes on. A missing or empty
  folder is an error at construction.

Typical use::

    from functools import partial
    ds = IterableBinnedImageDataset(root, split="train", shuffle_buffer=100_000, infinite=True,
                                 seed=0, skip_bins=["bin_961_1024"])
    dl = DataLoader(ds, batch_size=32, num_workers=8,
                    collate_fn=partial(collate_with_padding, multiple=cfg.downsample_factor))
    for step, batch in zip(range(max_steps), cycle(dl)):
        out = model(batch["image"], batch["mask"])
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import os
import re
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from protoken.codec import (
    SEED_MEAN,
    SEED_STD,
    check_png_header,
    decode_png,
    dequantize,
    standardize,
    unstandardize,
)
from protoken.inputs import walk_files
from protoken.shards import SHARDS_DIR, index_files, member_key, read_index

__all__ = [
    "BatchPlan",
    "ImageIndex",
    "IndexedBatches",
    "IterableBinnedImageDataset",
    "IterableImageDataset",
    "IterableImageDatasetUni",
    "Normalization",
    "batch_sizes_for_budget",
    "bin_range",
    "buffered_shuffle",
    "collate_with_padding",
    "cycle",
    "decode_image",
    "ignore_signals",
    "in_valid_split",
    "read_id_list",
    "take_batches",
]

logger = logging.getLogger(__name__)

_BIN_RE = re.compile(r"bin_(\d+)_(\d+)")
_MASK64 = (1 << 64) - 1
#: Default cap on the number of walks per epoch used to decorrelate a shuffled shard.
MAX_PASSES = 16


# --------------------------------------------------------------------------- normalisation


@dataclass(frozen=True)
class Normalization:
    """Per-channel standardisation of images in [-1, 1], and its inverse: the constants of
    :func:`protoken.codec.standardize` / :func:`~protoken.codec.unstandardize`, which do the
    arithmetic (``forward(x) = ((x + 1) / 2 - mean) / std``, the seed's ``ToTensor`` +
    ``Normalize``). Both accept numpy arrays or torch tensors whose channel axis is -3.

    Attributes
    ----------
    mean, std : tuple of 3 floats
        Per-channel constants, on the [0, 1] pixel scale.
    """

    mean: tuple[float, float, float] = SEED_MEAN
    std: tuple[float, float, float] = SEED_STD

    def __post_init__(self):
        mean = tuple(float(m) for m in self.mean)
        std = tuple(float(s) for s in self.std)
        if len(mean) != 3 or len(std) != 3:
            raise ValueError("mean and std need one value per channel (3)")
        if not all(s > 0 for s in std):
            raise ValueError(f"std must be positive, got {std}")
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)

    @property
    def name(self) -> str:
        """``"reference"`` for the reference design's constants
        (:class:`protoken.codec.CodecSettings`), else ``"custom"``."""
        return "reference" if (self.mean, self.std) == (SEED_MEAN, SEED_STD) else "custom"

    def forward(self, x):
        """[-1, 1] -> standardised; ``x`` of shape (..., 3, H, W)."""
        return standardize(x, self.mean, self.std)

    def inverse(self, x):
        """Standardised -> [-1, 1]; ``x`` of shape (..., 3, H, W)."""
        return unstandardize(x, self.mean, self.std)

    __call__ = forward


def _normalization(normalize, mean, std) -> Normalization | None:
    if normalize is None or normalize == "none":
        if (mean is None) != (std is None):
            raise ValueError("give both mean and std, or neither")
        return None if mean is None else Normalization(tuple(mean), tuple(std))
    if normalize in ("reference", "seed"):  # "seed": the former name
        if mean is not None or std is not None:
            raise ValueError(
                "normalize='reference' uses the reference design's mean and std; do not pass them"
            )
        return Normalization()
    raise ValueError(f"normalize must be None, 'none' or 'reference', not {normalize!r}")


# --------------------------------------------------------------------------- decoding


class _Decoder:
    """PNG pixels (L, L, 3) uint8/uint16 -> float32 image (3, L, L), optionally standardised.

    Without normalisation the result is bitwise :func:`protoken.codec.dequantize` (8-bit through
    a 256-entry table computed by it, 16-bit by it directly). With normalisation
    :func:`protoken.codec.standardize` runs in float64 (on the table for 8-bit) and the result
    is rounded once to float32.
    """

    def __init__(self, normalization: Normalization | None):
        self.normalization = normalization
        levels = np.arange(256, dtype=np.uint8)[:, None, None].repeat(3, axis=2)  # (256, 1, 3)
        lut = dequantize(levels, dtype=np.float64)  # (3, 256, 1)
        if normalization is not None:
            lut = normalization.forward(lut)
        self._lut8 = lut[:, :, 0].astype(np.float32)

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        if pixels.ndim != 3 or pixels.shape[2] != 3:
            raise ValueError(f"expected an (L, L, 3) RGB pixel array, got shape {pixels.shape}")
        if pixels.dtype == np.uint8:
            chw = pixels.transpose(2, 0, 1)
            out = np.empty(chw.shape, dtype=np.float32)
            for c in range(3):
                self._lut8[c].take(chw[c], out=out[c])
            return out
        if pixels.dtype != np.uint16:
            raise ValueError(f"expected uint8 or uint16 pixels, got {pixels.dtype}")
        if self.normalization is None:
            return dequantize(pixels, dtype=np.float32)
        return self.normalization.forward(dequantize(pixels, dtype=np.float64)).astype(np.float32)


def decode_image(data: bytes, normalization: Normalization | None = None) -> np.ndarray:
    """PNG bytes (8 or 16 bit) -> float32 image (3, L, L), as a dataset item holds it.

    Parameters
    ----------
    data : bytes
        A protoken (or seed) PNG.
    normalization : Normalization, optional
        Standardise the [-1, 1] image per channel.

    Returns
    -------
    ndarray, shape (3, L, L), float32
        In [-1, 1] (bitwise :func:`protoken.codec.read_image`) unless standardised.

    Raises
    ------
    ValueError
        Not a readable PNG, or not a square RGB image.
    """
    return _Decoder(normalization)(decode_png(data))


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


def bin_range(name: str) -> tuple[int, int]:
    """``"bin_65_128"`` -> ``(65, 128)`` (both ends inclusive).

    Raises
    ------
    ValueError
        ``name`` is not a bin folder name.
    """
    m = _BIN_RE.fullmatch(name)
    if m is None:
        raise ValueError(f"not a bin folder name (bin_LO_HI): {name!r}")
    return int(m.group(1)), int(m.group(2))


def _side_limit(folder_name: str) -> int | None:
    """The largest image side read from a folder: for a bin, the default ``--max-len`` (1024)
    or the bin's upper length if that is larger (``bin_1985_2048`` -> 2048); None (the codec's
    :data:`~protoken.codec.MAX_IMAGE_SIDE`) for a folder that is no bin."""
    m = _BIN_RE.fullmatch(folder_name)
    return max(1024, int(m.group(2))) if m else None


def _warn_once(logged: set[str], path: str, exc: Exception) -> None:
    """Log an unreadable image once per reader (not once per epoch)."""
    if path not in logged:
        logged.add(path)
        logger.warning("skipping unreadable image %s: %s", path, exc)


def batch_sizes_for_budget(
    bins: Iterable[str], pixels: int, multiple: int = 1, max_batch: int | None = None
) -> dict[str, int]:
    """A batch size per bin so that every padded batch holds about ``pixels`` pixels.

    Parameters
    ----------
    bins : iterable of str
        Bin folder names, e.g. ``dataset.bins``.
    pixels : int
        Budget of ``B * H * H`` per batch, H the bin's upper length rounded up to ``multiple``.
    multiple : int
        The padding multiple (the model's downsampling factor).
    max_batch : int, optional
        Cap on the batch size of the small bins.

    Returns
    -------
    dict
        ``{bin: batch_size}``, each at least 1; for ``batch_size=`` with ``group_by_bin=True``.
    """
    out = {}
    for name in bins:
        hi = bin_range(name)[1]
        side = -(-hi // multiple) * multiple
        size = max(1, pixels // (side * side))
        out[name] = size if max_batch is None else min(size, max_batch)
    return out


# --------------------------------------------------------------------------- shuffling


def _uniform_chunks(rng: np.random.Generator, chunk: int = 4096) -> Iterator[float]:
    while True:
        yield from rng.random(chunk).tolist()


def buffered_shuffle(
    iterable: Iterable[Any], size: int, rng: np.random.Generator | int | None = None
) -> Iterator[Any]:
    """Shuffle a stream with a bounded buffer.

    The first ``size`` items fill the buffer; then each new item replaces a uniformly chosen slot,
    whose item is yielded; at the end the buffer is yielded in random order. Every item is yielded
    exactly once and at most ``size`` are held. An item waits on average ``size`` steps, so the
    output order stays correlated with the input order unless the input is already mixed at
    scales larger than ``size`` (the datasets see to that with hashed passes).

    Parameters
    ----------
    iterable : iterable
        The stream.
    size : int
        Buffer size; 0 or 1 passes the stream through.
    rng : numpy Generator or int or None
        Random source (or a seed).
    """
    rng = np.random.default_rng(rng)
    it = iter(iterable)
    if size <= 1:
        yield from it
        return
    buf = list(itertools.islice(it, size))
    if len(buf) == size:
        while True:
            # zip() takes a slot first, so it stops without losing an item when the slots run out
            n = 0
            for j, item in zip(rng.integers(0, size, 4096).tolist(), it, strict=False):
                yield buf[j]
                buf[j] = item
                n += 1
            if n < 4096:
                break
    for j in rng.permutation(len(buf)).tolist():
        yield buf[j]


def _mix64(x: int) -> int:
    """splitmix64 finaliser: a bijective scramble of a 64-bit integer."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _random_merge(
    streams: Sequence[Iterator[Any]], sizes: Sequence[float], rng: np.random.Generator
) -> Iterator[Any]:
    """Interleave ``streams`` at random: each next item comes from stream i with probability
    proportional to its expected remaining size (``sizes[i]`` minus what it gave), so the bins
    are spread evenly along the output whatever their order on disk."""
    streams = list(streams)
    remaining = [float(s) for s in sizes]
    alive = list(range(len(streams)))
    uniforms = _uniform_chunks(rng)
    while len(alive) > 1:
        weights = [max(remaining[i], 0.5) for i in alive]
        r = next(uniforms) * sum(weights)
        pick = alive[-1]
        for i, w in zip(alive, weights, strict=True):
            r -= w
            if r < 0:
                pick = i
                break
        try:
            item = next(streams[pick])
        except StopIteration:
            alive.remove(pick)
            continue
        remaining[pick] -= 1.0
        yield item
    if alive:
        yield from streams[alive[0]]


# --------------------------------------------------------------------------- collation


def _empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU tensor; inside a DataLoader worker it is allocated in shared memory
    (as torch's default collate does), which saves a copy when the batch goes to the main
    process."""
    if get_worker_info() is not None:
        try:
            proto = torch.empty(0, dtype=dtype)
            storage = proto._typed_storage()._new_shared(math.prod(shape), device="cpu")
            return proto.new(storage).view(shape)
        except (AttributeError, RuntimeError, TypeError):  # private API: fall back
            pass
    return torch.empty(shape, dtype=dtype)


def collate_with_padding(batch: Sequence[Mapping[str, Any]], multiple: int) -> dict[str, Any]:
    """Zero-pad dataset items to one batch.

    Parameters
    ----------
    batch : sequence of dict
        Items ``{"image": (3, L_i, L_i), "length": L_i, "id": str, ...}``.
    multiple : int
        The padded side H is the largest L_i rounded up to a multiple of this. Pass the model's
        total downsampling factor (``model.config.downsample_factor``), e.g. with
        ``functools.partial(collate_with_padding, multiple=f)``.

    Returns
    -------
    dict
        ``"image"``: FloatTensor (B, 3, H, H), zero outside each item's L_i x L_i square;
        ``"mask"``: BoolTensor (B, H, H), True on the valid top-left L_i x L_i square;
        ``"lengths"``: LongTensor (B,); ``"ids"``: list of str; ``"paths"``: list of str.
    """
    if not batch:
        raise ValueError("cannot collate an empty batch")
    multiple = int(multiple)
    if multiple < 1:
        raise ValueError(f"multiple must be a positive integer, not {multiple}")
    lengths = torch.tensor([int(item["length"]) for item in batch], dtype=torch.long)
    side = -(-int(lengths.max()) // multiple) * multiple
    first = batch[0]["image"]
    images = _empty((len(batch), first.shape[0], side, side), first.dtype)
    for i, item in enumerate(batch):
        n = int(item["length"])
        images[i, :, :n, :n] = item["image"]
        images[i, :, :n, n:] = 0.0
        images[i, :, n:, :] = 0.0
    valid = torch.arange(side)[None, :] < lengths[:, None]  # (B, H)
    mask = torch.logical_and(
        valid[:, :, None], valid[:, None, :], out=_empty((len(batch), side, side), torch.bool)
    )
    return {
        "image": images,
        "mask": mask,
        "lengths": lengths,
        "ids": [item["id"] for item in batch],
        "paths": [item.get("path", "") for item in batch],
    }


# --------------------------------------------------------------------------- datasets


class _Stream(NamedTuple):
    """One bin folder: its name, absolute path, and its path relative to the dataset root."""

    bin: str
    folder: str
    prefix: str  # "bin_65_128/" (POSIX), or "" when the folder is the root


def _dist_rank(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is None or world_size is None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            r, w = dist.get_rank(), dist.get_world_size()
        else:
            r, w = 0, 1
        rank = r if rank is None else rank
        world_size = w if world_size is None else world_size
    rank, world_size = int(rank), int(world_size)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    return rank, world_size


def _has_png(folder: str) -> bool:
    return next(walk_files(folder, (".png",)), None) is not None


class _ImageStreamDataset(IterableDataset):
    """Shared machinery of the two datasets (see the module docstring)."""

    def __init__(
        self,
        streams: list[_Stream],
        *,
        split: str = "train",
        valid_frac: float = 0.05,
        shuffle_buffer: int = 100_000,
        max_passes: int = MAX_PASSES,
        seed: int = 0,
        infinite: bool = False,
        normalize: str | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        batch_size: int | Mapping[str, int] | None = None,
        group_by_bin: bool = False,
        multiple: int | None = None,
        drop_last: bool = False,
    ):
        super().__init__()
        if split not in ("train", "val", "all"):
            raise ValueError(f"split must be 'train', 'val' or 'all', not {split!r}")
        valid_frac = float(valid_frac)
        if not 0.0 <= valid_frac <= 1.0:
            raise ValueError(f"valid_frac must be in [0, 1], not {valid_frac}")
        if (split == "val" and valid_frac == 0.0) or (split == "train" and valid_frac == 1.0):
            raise ValueError(f"split={split!r} is empty with valid_frac={valid_frac}")
        if int(shuffle_buffer) < 0 or int(max_passes) < 1:
            raise ValueError("shuffle_buffer must be >= 0 and max_passes >= 1")
        self._streams = streams
        self.split = split
        self.valid_frac = valid_frac
        self.shuffle_buffer = int(shuffle_buffer)
        self.max_passes = int(max_passes)
        self.seed = int(seed)
        self.infinite = bool(infinite)
        self.normalization = _normalization(normalize, mean, std)
        self.rank, self.world_size = _dist_rank(rank, world_size)
        self.epoch = 0
        self._batching = self._check_batching(batch_size, group_by_bin, multiple)
        self.batch_size = batch_size
        self.group_by_bin = bool(group_by_bin)
        self.multiple = multiple
        self.drop_last = bool(drop_last)

    def _check_batching(self, batch_size, group_by_bin, multiple) -> bool:
        if batch_size is None:
            if group_by_bin:
                raise ValueError("group_by_bin=True needs batch_size")
            return False
        if multiple is None or int(multiple) < 1:
            raise ValueError(
                "batch_size needs multiple= (the model's downsample_factor) to pad batches"
            )
        if isinstance(batch_size, Mapping):
            if not group_by_bin:
                raise ValueError("a batch size per bin needs group_by_bin=True")
            missing = [b for b in self.bins if b not in batch_size]
            if missing:
                raise ValueError(f"batch_size has no entry for bins {missing}")
            sizes = [batch_size[b] for b in self.bins]
        else:
            sizes = [batch_size]
        if any(int(s) < 1 for s in sizes):
            raise ValueError(f"batch sizes must be >= 1, got {batch_size}")
        return True

    # ------------------------------------------------------------------ public helpers

    @property
    def bins(self) -> list[str]:
        """The bin folder names streamed, in order of length (a name may repeat across roots)."""
        return list(dict.fromkeys(s.bin for s in self._streams))

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch: re-seeds the shuffle (infinite streams start at this epoch and count
        on). Call it before creating the DataLoader iterator; with ``persistent_workers=True``
        the workers keep the epoch they were started with (use ``infinite=True`` instead)."""
        self.epoch = int(epoch)

    def denormalize(self, image):
        """Undo the dataset's standardisation: images (..., 3, H, W) back to [-1, 1] (identity
        when the dataset does not standardise). Padding becomes meaningless; use the mask."""
        return image if self.normalization is None else self.normalization.inverse(image)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(bins={len(self.bins)}, split={self.split!r}, "
            f"valid_frac={self.valid_frac}, shuffle_buffer={self.shuffle_buffer}, "
            f"infinite={self.infinite}, rank={self.rank}/{self.world_size}, "
            f"normalization={self.normalization})"
        )

    # ------------------------------------------------------------------ discovery

    def _shard_files(self, s: int, shard: int, n_shards: int) -> Iterator[tuple[int, str, int]]:
        """Files of stream ``s`` in the split and in ``shard``: ``(s, relative path, hash)``.

        ``hash`` (64 bits of the md5, independent of the split bits) selects the passes.
        """
        stream = self._streams[s]
        start = len(stream.folder) + 1
        prefix = stream.prefix
        cut = _split_cut(self.valid_frac)
        want_val = {"train": False, "val": True, "all": None}[self.split]
        md5 = hashlib.md5
        crc32 = zlib.crc32
        sep = os.sep
        for path in walk_files(stream.folder, (".png",)):
            rel = path[start:]
            if sep != "/":
                rel = rel.replace(sep, "/")
            key = (prefix + rel).encode("utf-8", "surrogateescape")
            if n_shards > 1 and crc32(key) % n_shards != shard:
                continue
            digest = md5(key).digest()
            if want_val is not None and (int.from_bytes(digest[:8], "big") < cut) != want_val:
                continue
            yield s, rel, int.from_bytes(digest[8:], "big")

    def _pass_files(
        self, s: int, shard: int, n_shards: int, passes: int, index: int, salt: int, tally: list
    ) -> Iterator[tuple[int, str]]:
        """Files of stream ``s`` in the shard whose salted hash falls in pass ``index``; counts
        every file of the shard into ``tally[s]`` on the way."""
        for s_, rel, h in self._shard_files(s, shard, n_shards):
            tally[s] += 1
            if (_mix64(h ^ salt) * passes) >> 64 == index:
                yield s_, rel

    def _epoch_files(
        self, epoch: int, shard: int, n_shards: int, counts: list[int] | None = None
    ) -> Iterator[tuple[int, str]]:
        """This worker's files for one epoch, ``(stream index, relative path)``, each once.

        ``counts`` (files of the shard per stream, updated in place) saves the counting walk
        when the previous epoch measured them.
        """
        n_streams = len(self._streams)
        if not self.shuffle_buffer:
            for s in range(n_streams):
                for s_, rel, _ in self._shard_files(s, shard, n_shards):
                    yield s_, rel
            return
        seq = np.random.SeedSequence([self.seed, epoch, shard, n_shards])
        rng_pass, rng_merge, rng_buffer = (np.random.default_rng(c) for c in seq.spawn(3))
        if counts is None:
            counts = []
        if len(counts) != n_streams:
            counts[:] = [0] * n_streams
        if not any(counts):
            counts[:] = [
                sum(1 for _ in self._shard_files(s, shard, n_shards)) for s in range(n_streams)
            ]
        total = sum(counts)
        if total == 0:
            return
        passes = min(self.max_passes, -(-total // self.shuffle_buffer))
        salt = int(rng_pass.integers(0, 1 << 63))

        def source() -> Iterator[tuple[int, str]]:
            expected = [c / passes for c in counts]
            for k, index in enumerate(rng_pass.permutation(passes).tolist()):
                tally = [0] * n_streams
                walks = [
                    self._pass_files(s, shard, n_shards, passes, index, salt, tally)
                    for s in range(n_streams)
                ]
                yield from _random_merge(walks, expected, rng_merge)
                if k == 0:  # every walk ran to its end: the shard's size for the next epoch
                    counts[:] = tally

        yield from buffered_shuffle(source(), self.shuffle_buffer, rng_buffer)

    # ------------------------------------------------------------------ items

    def _worker_shard(self) -> tuple[int, int]:
        info = get_worker_info()
        worker, n_workers = (0, 1) if info is None else (info.id, info.num_workers)
        return self.rank * n_workers + worker, self.world_size * n_workers

    def __iter__(self) -> Iterator[dict[str, Any]]:
        shard, n_shards = self._worker_shard()
        read = _Reader(self)
        batcher = _Batcher(self, read) if self._batching else None
        epoch = self.epoch
        counts: list[int] = []  # files per stream in this shard, measured by the last epoch
        while True:
            listed = 0
            for s, rel in self._epoch_files(epoch, shard, n_shards, counts):
                listed += 1
                if batcher is not None:
                    yield from batcher.add(s, rel)
                    continue
                item = read(s, rel)
                if item is not None:
                    yield item
            if not self.infinite:
                if batcher is not None and not self.drop_last:
                    yield from batcher.flush()
                return
            # infinite: stop rather than spin when this worker can never yield again
            if listed == 0:
                logger.debug("shard %d/%d of %r is empty: worker stops", shard, n_shards, self)
                return
            if read.ok == 0 and read.failed >= listed:
                logger.error("no readable image in shard %d/%d of %r", shard, n_shards, self)
                return
            epoch += 1


class _Reader:
    """Reads and decodes one file into an item; logs and counts the unreadable ones."""

    def __init__(self, dataset: _ImageStreamDataset):
        self.streams = dataset._streams
        self.decoder = _Decoder(dataset.normalization)
        self.ok = self.failed = 0
        self.max_len = [_side_limit(st.bin) for st in self.streams]
        self.logged: set[str] = set()

    def __call__(self, s: int, rel: str) -> dict[str, Any] | None:
        path = os.path.join(self.streams[s].folder, rel)
        try:
            with open(path, "rb") as fh:
                data = fh.read()
            check_png_header(data, self.max_len[s])  # before any pixel is decoded
            image = self.decoder(decode_png(data))
        except (OSError, ValueError) as exc:
            self.failed += 1
            _warn_once(self.logged, path, exc)
            return None
        self.ok += 1
        name = os.path.basename(rel)
        return {
            "image": torch.from_numpy(image),
            "length": image.shape[-1],
            "id": name[:-4] if name.lower().endswith(".png") else name,
            "path": path,
        }


class _Batcher:
    """Groups file entries into batches (per bin with ``group_by_bin``) and pads them with
    :func:`collate_with_padding`. A batch's files are decoded only once it is complete (a pending
    entry costs ~100 bytes, not an image); the slots of unreadable files are refilled."""

    def __init__(self, dataset: _ImageStreamDataset, read: _Reader):
        self.ds = dataset
        self.read = read
        self.pending: dict[str | None, list[tuple[int, str]]] = {}
        self.ready: dict[str | None, list[dict[str, Any]]] = {}

    def _size(self, key: str | None) -> int:
        bs = self.ds.batch_size
        return int(bs[key]) if isinstance(bs, Mapping) else int(bs)

    def _decode(self, key: str | None) -> list[dict[str, Any]]:
        ready = self.ready.setdefault(key, [])
        for s, rel in self.pending.pop(key, []):
            item = self.read(s, rel)
            if item is not None:
                ready.append(item)
        return ready

    def add(self, s: int, rel: str) -> Iterator[dict[str, Any]]:
        key = self.ds._streams[s].bin if self.ds.group_by_bin else None
        pending = self.pending.setdefault(key, [])
        pending.append((s, rel))
        size = self._size(key)
        if len(pending) + len(self.ready.get(key, ())) >= size:
            ready = self._decode(key)
            if len(ready) >= size:
                self.ready[key] = []
                yield collate_with_padding(ready, self.ds.multiple)

    def flush(self) -> Iterator[dict[str, Any]]:
        for key in sorted(set(self.pending) | set(self.ready), key=str):
            ready = self._decode(key)
            self.ready[key] = []
            if ready:
                yield collate_with_padding(ready, self.ds.multiple)


def _abs(path: str | os.PathLike) -> str:
    return os.path.abspath(os.fspath(path))


class IterableImageDataset(_ImageStreamDataset):
    """Stream the PNG images of one folder (one length bin), e.g. ``OUT/bin_65_128``.

    Parameters
    ----------
    folder : path
        Folder of PNGs (walked recursively, streamed).
    root : path, optional
        The dataset root the split and shard keys are relative to. Default: the folder's parent,
        so ``OUT/bin_65_128/ID.png`` has the key ``bin_65_128/ID.png`` and splits exactly as in
        ``IterableBinnedImageDataset(OUT)``.
    split : {"train", "val", "all"}
        Which part of the md5 split to stream.
    valid_frac : float
        Fraction of files in ``"val"``.
    shuffle_buffer : int
        Number of file entries (paths, not images) in the streaming shuffle buffer; 0 streams in
        discovery order (no shuffle). A buffer at least the size of a worker's shard gives a
        uniform permutation; a smaller one adds up to ``max_passes`` walks per epoch.
    max_passes : int
        Cap on the hashed passes per epoch when the buffer is smaller than the shard.
    seed : int
        Shuffle seed; the order depends on ``(seed, epoch, rank, worker, num_workers)``.
    infinite : bool
        Loop over epochs forever (training); otherwise one epoch per iterator.
    normalize : {None, "none", "reference"}
        ``"reference"`` (formerly ``"seed"``, still read): standardise with
        :data:`protoken.codec.REFERENCE_MEAN` / ``REFERENCE_STD``.
    mean, std : 3 floats, optional
        Explicit per-channel standardisation (on the [0, 1] scale) instead.
    rank, world_size : int, optional
        DDP position; default from ``torch.distributed`` when initialised (at construction),
        else 0 and 1.
    batch_size : int or dict, optional
        Yield padded batches (dicts as :func:`collate_with_padding`) instead of items; use with
        ``DataLoader(batch_size=None)``. A dict gives a batch size per bin (needs
        ``group_by_bin=True``).
    group_by_bin : bool
        Batch only images of the same bin folder (length-aware batching).
    multiple : int
        Padding multiple of the batches (the model's ``downsample_factor``); needed with
        ``batch_size``.
    drop_last : bool
        Finite mode with ``batch_size``: drop the incomplete batches left at the end of the epoch
        (one per bin and worker at most). Infinite streams carry them over to the next epoch,
        so all their batches are full (a shard smaller than a batch repeats files in it).

    Raises
    ------
    FileNotFoundError
        ``folder`` does not exist or is not a folder.
    ValueError
        ``folder`` holds no PNG, or inconsistent options.
    """

    def __init__(
        self, folder: str | os.PathLike, *, root: str | os.PathLike | None = None, **options
    ):
        folder = _abs(folder)
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"image folder not found (or not a folder): {folder}")
        root = os.path.dirname(folder) if root is None else _abs(root)
        rel = os.path.relpath(folder, root)
        if rel == os.curdir:
            prefix = ""
        elif rel.startswith(os.pardir):
            raise ValueError(f"folder {folder} is not under root {root}")
        else:
            prefix = rel.replace(os.sep, "/") + "/"
        if not _has_png(folder):
            raise ValueError(f"no PNG image in {folder}")
        self.folder, self.root = folder, root
        super().__init__([_Stream(os.path.basename(folder), folder, prefix)], **options)


class IterableBinnedImageDataset(_ImageStreamDataset):
    """Stream the PNG images of all length bins (``bin_LO_HI`` folders) under one or more roots.

    Takes the options of :class:`IterableImageDataset` (``split``, ``valid_frac``,
    ``shuffle_buffer``, ``seed``, ``infinite``, ``normalize``/``mean``/``std``,
    ``rank``/``world_size``, ``batch_size``/``group_by_bin``/``multiple``/``drop_last``) and:

    Parameters
    ----------
    root : path or sequence of paths
        Folder(s) written by ``protoken convert``; only their ``bin_LO_HI`` sub-folders are read
        (not ``fasta/``). Split keys are relative to each root (``bin_65_128/ID.png``).
    only_bins : iterable of str, optional
        Stream only these bins (names like ``"bin_65_128"``).
    skip_bins : iterable of str, optional
        Do not stream these bins (e.g. the largest, to bound memory).

    Raises
    ------
    FileNotFoundError
        A root does not exist or is not a folder.
    ValueError
        A malformed bin name, no bin left to stream, or no PNG in the selected bins.
    """

    def __init__(
        self,
        root: str | os.PathLike | Sequence[str | os.PathLike],
        *,
        skip_bins: Iterable[str] | None = None,
        only_bins: Iterable[str] | None = None,
        **options,
    ):
        roots = [root] if isinstance(root, str | os.PathLike) else list(root)
        if not roots:
            raise ValueError("no dataset root given")
        roots = [_abs(r) for r in roots]
        skip = set(skip_bins or ())
        only = None if only_bins is None else set(only_bins)
        for name in skip | (only or set()):
            bin_range(name)  # raises on a malformed name
        streams: list[_Stream] = []
        for r in roots:
            if not os.path.isdir(r):
                raise FileNotFoundError(f"dataset root not found (or not a folder): {r}")
            with os.scandir(r) as it:
                names = [e.name for e in it if e.is_dir() and _BIN_RE.fullmatch(e.name)]
            for name in names:
                if name in skip or (only is not None and name not in only):
                    continue
                streams.append(_Stream(name, os.path.join(r, name), name + "/"))
        streams.sort(key=lambda st: (bin_range(st.bin), st.folder))
        if only is not None:
            absent = sorted(only - {st.bin for st in streams})
            if absent:
                logger.warning("only_bins: no folder %s under %s", absent, roots)
        if not streams:
            raise ValueError(f"no bin_LO_HI folder left to stream under {roots}")
        if not any(_has_png(st.folder) for st in streams):
            raise ValueError(f"no PNG image in the selected bins under {roots}")
        self.roots = roots
        super().__init__(streams, **options)


#: The former name of :class:`IterableBinnedImageDataset` (kept for old code).
IterableImageDatasetUni = IterableBinnedImageDataset


# --------------------------------------------------------------------------- index and sampling


def _manifest_files(root: str) -> list[str]:
    """``manifest.tsv`` and the ``manifest.shard-I-of-N.tsv`` of sharded conversions."""
    with os.scandir(root) as it:
        names = [e.name for e in it if e.is_file() and _MANIFEST_RE.fullmatch(e.name)]
    return [os.path.join(root, n) for n in sorted(names)]


_MANIFEST_RE = re.compile(r"manifest(\.shard-\d+-of-\d+)?\.tsv")


def _manifest_rows(path: str) -> Iterator[tuple[str, str, int]]:
    """``(id, bin, length)`` of the ``ok`` rows of a manifest written by ``protoken convert``.

    Reads the first 7 columns of each line only (``str.split`` with a limit), so the
    sequences are never split; a partial last line (a killed conversion) is skipped.
    """
    with open(path, encoding="utf-8", errors="surrogateescape") as fh:
        header = fh.readline().rstrip("\n").split("\t")
        try:
            c_id, c_status = header.index("id"), header.index("status")
            c_len, c_bin = header.index("length"), header.index("bin")
        except ValueError:
            raise ValueError(f"{path}: not a protoken manifest (header {header})") from None
        limit = max(c_id, c_status, c_len, c_bin) + 1
        for line in fh:
            cols = line.split("\t", limit)
            if len(cols) <= limit or cols[c_status] != "ok" or not line.endswith("\n"):
                continue
            yield cols[c_id], cols[c_bin], int(cols[c_len])


@dataclass(frozen=True, eq=False)
class ImageIndex:
    """The images of a folder written by ``protoken convert``: id, bin and length of each,
    in numpy arrays (about 30 bytes per image, shared by forked DataLoader workers).

    Built once (:meth:`build`) from ``manifest.tsv`` (the ``ok`` rows; sharded conversions'
    ``manifest.shard-I-of-N.tsv`` too), without reading a directory, or, for a folder without
    a manifest (images copied by hand, the seed's folders), from one walk of its bin folders
    (lengths then unknown, 0). Image ``i`` is ``ROOT/bins[bin_of[i]]/ID.png``.

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
        ``"manifest"`` or ``"walk"``.
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

    def __len__(self) -> int:
        return len(self.bin_of)

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
    ) -> ImageIndex:
        """Index ``root`` (see the class docstring), keeping only the selected bins.

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
        manifests = _manifest_files(root)
        cache = _IndexCache(root, shard_indexes or manifests, only, skip)
        cached = cache.load()
        if cached is not None:
            return cls(root=root, **cached)
        extra: list[tuple[str, int, int]] = []
        if shard_indexes:
            rows = _shard_rows(shard_indexes, extra)
            source = "shards"
        elif manifests:
            rows = itertools.chain.from_iterable(_manifest_rows(p) for p in manifests)
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
        order = np.lexsort((np.array(ids, dtype=object), bin_arr))
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
        relative to the root (``bin_65_128/ID.png``, as the streaming datasets) or, with
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


class _IndexCache:
    """The arrays of an :class:`ImageIndex`, saved beside the files it was built from
    (``ROOT/.protoken-index/KEY/*.npy``) and memory-mapped when they are unchanged: the time
    to the first batch then no longer grows with the number of images (no parsing, no md5 per
    image; the pages are read as they are used, and shared by forked workers).

    KEY hashes the source files' paths, sizes and modification times and the bin selection,
    so a manifest or index that grew makes a new cache (and the older caches are removed). A
    folder that cannot be written (read-only data) simply has no cache.
    """

    ARRAYS = ("bin_of", "lengths", "names", "offsets", "split_hash", "shard_of", "data_offset",
              "data_size")  # fmt: skip

    def __init__(self, root: str, sources: list[str], only, skip):
        sig = []
        for path in sources:
            st = os.stat(path)
            sig.append([os.path.basename(path), st.st_size, st.st_mtime_ns])
        blob = json.dumps([sig, sorted(only) if only is not None else None, sorted(skip or ())])
        self.folder = os.path.join(
            root, ".protoken-index", hashlib.sha256(blob.encode()).hexdigest()[:16]
        )
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


def _walk_rows(root: str) -> Iterator[tuple[str, str, int]]:
    """``(id, bin, 0)`` of the PNGs of the bin folders of ``root``: one directory walk."""
    with os.scandir(root) as it:
        names = sorted(e.name for e in it if e.is_dir() and _BIN_RE.fullmatch(e.name))
    for name in names:
        folder = os.path.join(root, name)
        for path in walk_files(folder, (".png",)):
            rel = os.path.relpath(path, folder).replace(os.sep, "/")
            yield rel[:-4], name, 0


class BatchPlan:
    """Which images make up each batch of an epoch: a pure function of ``(seed, epoch)``.

    Epoch ``e``: a permutation of the rows seeded by ``(seed, e)``; with ``group_by_bin`` the
    rows of each bin, in permutation order, are cut into batches of ``batch_size`` (the last
    batch of a bin may be smaller: every image once per epoch, and with the pixel-weighted
    loss a smaller batch weighs no more per pixel), and the batches of all bins are put in a
    second seeded random order. Without ``group_by_bin`` the permutation is cut as it is.
    Costs O(N) per epoch (a permutation and a stable sort), whatever the epoch number.

    With ``shard_window=G`` and an index of tar shards, each epoch also deals the shards into
    windows of ``G`` in a seeded order; images are batched (per bin, as above) in window order
    and the batches of each window are shuffled among themselves, so any stretch of the epoch
    reads ~``G`` shards (locality for parallel file systems) while mixing their images, and
    the windows differ from epoch to epoch. The number of batches per epoch is the same as
    without windows. Ignored for loose files.

    Parameters
    ----------
    index : ImageIndex
    rows : ndarray of int
        The images of the split (:meth:`ImageIndex.split_rows`).
    batch_size : int or dict
        Images per batch, or per bin name (``group_by_bin`` only).
    group_by_bin : bool
    seed : int
    shard_window : int, optional
        Shards read together (see above); None: one shuffle over all shards.
    """

    def __init__(
        self,
        index: ImageIndex,
        rows: np.ndarray,
        batch_size,
        group_by_bin: bool,
        seed: int,
        shard_window: int | None = None,
    ):
        if shard_window is not None and shard_window < 1:
            raise ValueError(f"shard_window must be >= 1, not {shard_window}")
        self.shard_window = shard_window if index.shard_of is not None else None
        self.index = index
        self.rows = np.asarray(rows, dtype=np.int64)
        if not len(self.rows):
            raise ValueError(f"no image in this split of {index.root}")
        self.group_by_bin = bool(group_by_bin)
        self.seed = int(seed)
        bins = index.bin_of[self.rows]
        if isinstance(batch_size, Mapping):
            if not self.group_by_bin:
                raise ValueError("a batch size per bin needs group_by_bin=True")
            missing = sorted({index.bins[b] for b in np.unique(bins)} - set(batch_size))
            if missing:
                raise ValueError(f"batch_size has no entry for bins {missing}")
            sizes = {index.bins.index(k): int(v) for k, v in batch_size.items() if k in index.bins}
        else:
            sizes = dict.fromkeys(range(len(index.bins)), int(batch_size))
        if any(v < 1 for v in sizes.values()):
            raise ValueError(f"batch sizes must be >= 1, got {batch_size}")
        self._sizes = sizes
        if self.group_by_bin:
            counts = np.bincount(bins, minlength=len(index.bins))
            self.batches_per_epoch = int(
                sum(-(-int(c) // sizes[b]) for b, c in enumerate(counts) if c)
            )
        else:
            self.batches_per_epoch = -(-len(self.rows) // sizes[0])
        self._cached: tuple[int, tuple, np.ndarray | None] | None = None

    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(order, bounds, batch_order)``: batch ``k`` of the epoch is
        ``order[bounds[j]:bounds[j + 1]]`` with ``j = batch_order[k]``."""
        if self._cached is not None and self._cached[0] == epoch:
            return self._cached[1]
        rng = np.random.default_rng([self.seed, epoch & _MASK64, epoch < 0])
        order = self.rows[rng.permutation(len(self.rows))]
        windows = None  # the window of each shard
        if self.shard_window is not None:  # shards dealt into windows, in a seeded order
            n_shards = len(self.index.shards)
            place = np.empty(n_shards, dtype=np.int64)
            place[rng.permutation(n_shards)] = np.arange(n_shards)
            windows = place // self.shard_window
            order = order[np.argsort(windows[self.index.shard_of[order]], kind="stable")]
        if self.group_by_bin:
            bins = self.index.bin_of[order]
            sort = np.argsort(bins, kind="stable")
            order, bins = order[sort], bins[sort]
            bounds = [0]
            starts = np.flatnonzero(np.r_[True, bins[1:] != bins[:-1]])
            ends = np.r_[starts[1:], len(order)]
            for lo, hi in zip(starts.tolist(), ends.tolist(), strict=True):
                size = self._sizes[int(bins[lo])]
                bounds.extend(range(lo + size, hi, size))
                bounds.append(hi)
            bounds = np.asarray(bounds, dtype=np.int64)
        else:
            bounds = np.r_[np.arange(0, len(order), self._sizes[0]), len(order)]
        if windows is None:
            batch_order = rng.permutation(len(bounds) - 1)
        else:  # batches in window order, shuffled within each window
            batch_window = windows[self.index.shard_of[order[bounds[:-1]]]]
            batch_order = np.lexsort((rng.random(len(batch_window)), batch_window))
        self._cached = (epoch, (order, bounds, batch_order), windows)
        return self._cached[1]

    def shard_windows(self, epoch: int) -> np.ndarray | None:
        """The window of each shard in ``epoch`` (index ``shards`` order), or None without
        ``shard_window``."""
        if self.shard_window is None:
            return None
        self._epoch(epoch)
        return self._cached[2]

    def batch(self, epoch: int, k: int) -> np.ndarray:
        """Rows of batch ``k`` (``0 <= k < batches_per_epoch``) of ``epoch``."""
        order, bounds, batch_order = self._epoch(epoch)
        j = batch_order[k]
        return order[bounds[j] : bounds[j + 1]]


class IndexedBatches(IterableDataset):
    """Padded batches of an :class:`ImageIndex` split, in the order of a :class:`BatchPlan`:
    the batch stream of one DDP rank, split among its DataLoader workers.

    The stream is a pure function of ``(seed, epoch, position, rank, world_size, worker)``:
    the ``i``-th batch of rank ``r`` is the plan's global batch ``t = position + i *
    world_size + r`` counted from the start of ``epoch`` (``t // batches_per_epoch`` epochs
    later, batch ``t % batches_per_epoch``), and worker ``w`` of ``W`` makes the batches with
    ``i % W == w``, which the DataLoader takes in turn, so the rank sees the same stream
    whatever the number of workers. Starting at any ``(epoch, position)`` costs one epoch plan
    (no replay): :meth:`position_after` says where the stream stands after each rank consumed
    ``n`` batches, which is what a checkpoint records. Resuming with another ``world_size``
    continues the same global sequence of batches (each global batch used once); only the
    grouping of batches into steps changes.

    With ``num_batches`` the stream is finite: exactly that many batches per rank, all from
    one fixed epoch (``fixed_epoch``) cycled if need be -- the same batches at every
    evaluation, every rank the same count so collectives line up, no directory read.

    Items are dicts as :func:`collate_with_padding` returns, plus ``"epoch"`` and
    ``"position"`` of the batch. A file that cannot be read is logged and left out of its
    batch; a batch none of whose files can be read is an error naming them.

    Parameters
    ----------
    plan : BatchPlan
    multiple : int
        Padding multiple (the model's ``downsample_factor``).
    epoch, position : int
        Where the stream starts.
    rank, world_size : int
    num_batches : int, optional
        Finite stream of this many batches per rank, from epoch ``epoch`` only.
    normalize, mean, std
        As :class:`IterableImageDataset`.
    crop : int, optional
        Images longer than this are cut to a random ``crop x crop`` window on the diagonal
        (residues ``s .. s + crop - 1`` against themselves: a complete, smaller 6D image). The
        window is a pure function of ``(seed, epoch, batch, row)``, so resume stays exact.
    """

    def __init__(
        self,
        plan: BatchPlan,
        multiple: int,
        *,
        epoch: int = 0,
        position: int = 0,
        rank: int = 0,
        world_size: int = 1,
        num_batches: int | None = None,
        normalize: str | None = None,
        mean=None,
        std=None,
        crop: int | None = None,
    ):
        super().__init__()
        if crop is not None and crop < 1:
            raise ValueError(f"crop must be >= 1, got {crop}")
        self.crop = crop
        self.plan = plan
        self.multiple = int(multiple)
        self.epoch, self.position = int(epoch), int(position)
        self.rank, self.world_size = _dist_rank(rank, world_size)
        self.num_batches = num_batches
        self.normalization = _normalization(normalize, mean, std)

    def position_after(self, n: int) -> tuple[int, int]:
        """``(epoch, position)`` of the stream once every rank consumed ``n`` batches."""
        t = self.position + n * self.world_size
        m = self.plan.batches_per_epoch
        return self.epoch + t // m, t % m

    def _where(self, i: int) -> tuple[int, int]:
        t = self.position + i * self.world_size + self.rank
        m = self.plan.batches_per_epoch
        if self.num_batches is not None:
            return self.epoch, t % m
        return self.epoch + t // m, t % m

    def _crop(self, image: np.ndarray, epoch: int, k: int, row: int) -> np.ndarray:
        n = image.shape[-1]
        if self.crop is None or n <= self.crop:
            return image
        rng = np.random.default_rng([self.plan.seed, epoch & _MASK64, epoch < 0, k, row])
        s = int(rng.integers(0, n - self.crop + 1))
        return np.ascontiguousarray(image[..., s : s + self.crop, s : s + self.crop])

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, n_workers = (0, 1) if info is None else (info.id, info.num_workers)
        decoder = _Decoder(self.normalization)
        index = self.plan.index
        limits = [_side_limit(name) for name in index.bins]
        logged: set[str] = set()
        i = worker
        while self.num_batches is None or i < self.num_batches:
            epoch, k = self._where(i)
            items = []
            rows = self.plan.batch(epoch, k)
            for row in rows.tolist():
                path = index.path(row)
                try:
                    data = index.read(row)
                    check_png_header(data, limits[index.bin_of[row]])  # before any pixel
                    image = decoder(decode_png(data))
                except (OSError, ValueError) as exc:
                    _warn_once(logged, path, exc)
                    continue
                image = self._crop(image, epoch, k, row)
                items.append(
                    {
                        "image": torch.from_numpy(image),
                        "length": image.shape[-1],
                        "id": index.id(row),
                        "path": path,
                    }
                )
            if not items:
                names = ", ".join(index.path(r) for r in rows[:3].tolist())
                raise RuntimeError(f"no readable image in batch {k} of epoch {epoch}: {names}")
            batch = collate_with_padding(items, self.multiple)
            batch["epoch"], batch["position"] = epoch, k
            yield batch
            i += n_workers


def ignore_signals(worker_id: int = 0) -> None:
    """DataLoader ``worker_init_fn``: workers ignore SIGTERM, SIGINT and SIGUSR1, so a signal
    sent to the whole process group (how SLURM and Kubernetes pre-empt a job, or Ctrl-C)
    reaches the main process, which stops at a step boundary, instead of killing the
    workers under it."""
    import signal

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


# --------------------------------------------------------------------------- loading loops


def cycle(loader: Iterable[Any], start_epoch: int | None = None) -> Iterator[Any]:
    """Yield the batches of ``loader`` forever, re-iterating it whenever it ends.

    Before each pass, ``loader.dataset.set_epoch(epoch)`` is called when it exists (epochs
    count from ``start_epoch``, default the dataset's current epoch), so a finite dataset is
    reshuffled on every pass. An infinite dataset never ends, so it is iterated once.

    Raises
    ------
    RuntimeError
        A pass yielded no batch (empty split or shard on this rank): rather than spin forever.
    """
    dataset = getattr(loader, "dataset", loader)
    set_epoch = getattr(dataset, "set_epoch", None)
    epoch = start_epoch if start_epoch is not None else getattr(dataset, "epoch", 0)
    while True:
        if set_epoch is not None:
            set_epoch(epoch)
        got = 0
        for batch in loader:
            got += 1
            yield batch
        if got == 0:
            raise RuntimeError(f"{loader!r} yielded no batch (empty split or shard on this rank)")
        epoch += 1


def take_batches(loader: Iterable[Any], n: int) -> Iterator[Any]:
    """Yield exactly ``n`` batches from a re-iterable ``loader`` (a DataLoader), restarting it
    from its beginning when it ends early: every DDP rank runs the same number of evaluation
    steps even when the shards are uneven. The epoch is not changed, so with a fixed seed the
    same batches come back at every evaluation. Without a shuffle buffer the bins stream in
    order of length, so the first ``n`` batches hold the shortest proteins only; a buffer with
    a fixed seed gives a representative and still deterministic selection.

    Raises
    ------
    RuntimeError
        The loader yields no batch at all.
    """
    n = int(n)
    if n < 0:
        raise ValueError(f"n must be >= 0, not {n}")
    taken = 0
    while taken < n:
        got = 0
        for batch in loader:
            yield batch
            got += 1
            taken += 1
            if taken == n:
                return
        if got == 0:
            raise RuntimeError(f"{loader!r} yielded no batch (empty split or shard on this rank)")
