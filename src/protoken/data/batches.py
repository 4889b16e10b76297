"""Batches of an :class:`~protoken.data.index.ImageIndex`: which images make each batch, and
the images themselves, decoded and padded.

Items and batches hold images in [-1, 1] (the codec's exact inverse of the 8- or 16-bit PNG),
or standardised per channel when asked (``normalize="reference"`` or ``mean``/``std``, by
:func:`protoken.codec.standardize`; :class:`Normalization` undoes it).

- :class:`BatchPlan`: per epoch, a seeded permutation cut into batches of one bin each
  (``shard_window``: shards read a few at a time); a pure function of ``(seed, epoch)``.
- :class:`IndexedBatches`: one rank's stream of padded batches, a pure function of (seed,
  epoch, position, rank, worker): O(1) to start anywhere, the same whatever the number of
  workers, and continued by any world size; finite and fixed for validation.
- :func:`collate_with_padding`: items ``{"image": (3, L, L), "length": L, "id", "path"}`` to
  one zero-padded batch with its mask.
- A corrupt or unreadable PNG, or one whose header is refused before decoding (not square
  RGB, not 8/16-bit, or larger than a bin may hold: a 3000 x 3000 PNG in ``bin_65_128``), is
  logged once (``logging.warning`` with its path) and left out of its batch.

One module of ~600 lines on purpose: the batch plan and the rank stream it drives are one
contract (exact resume and DDP sharding depend on both agreeing), read side by side.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from protoken.codec import (
    NORMALIZE_ALIASES,
    REFERENCE_MEAN,
    REFERENCE_STD,
    check_png_header,
    decode_png,
    dequantize,
    standardize,
    unstandardize,
)
from protoken.convert.bins import bin_range, side_limit
from protoken.data.index import ImageIndex

__all__ = [
    "BatchPlan",
    "IndexedBatches",
    "Normalization",
    "batch_sizes_for_budget",
    "collate_with_padding",
    "crop_complex",
    "decode_image",
    "ignore_signals",
]

logger = logging.getLogger(__name__)

_MASK64 = (1 << 64) - 1


# --------------------------------------------------------------------------- normalisation


@dataclass(frozen=True)
class Normalization:
    """Per-channel standardisation of images in [-1, 1], and its inverse: the constants of
    :func:`protoken.codec.standardize` / :func:`~protoken.codec.unstandardize`, which do the
    arithmetic (``forward(x) = ((x + 1) / 2 - mean) / std``, the reference design's ``ToTensor`` +
    ``Normalize``). Both accept numpy arrays or torch tensors whose channel axis is -3.

    Attributes
    ----------
    mean, std : tuple of 3 floats
        Per-channel constants, on the [0, 1] pixel scale.
    """

    mean: tuple[float, float, float] = REFERENCE_MEAN
    std: tuple[float, float, float] = REFERENCE_STD

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
        return "reference" if (self.mean, self.std) == (REFERENCE_MEAN, REFERENCE_STD) else "custom"

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
    if NORMALIZE_ALIASES.get(normalize, normalize) == "reference":
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
        Bin folder names, e.g. ``index.bins``.
    pixels : int
        Budget of ``B * H * H`` per batch, H the bin's upper length rounded up to ``multiple``.
    multiple : int
        The padding multiple (the model's downsampling factor).
    max_batch : int, optional
        Cap on the batch size of the small bins.

    Returns
    -------
    dict
        ``{bin: batch_size}``, each at least 1: a :class:`BatchPlan`'s ``batch_size`` with
        ``group_by_bin=True``.
    """
    out = {}
    for name in bins:
        hi = bin_range(name)[1]
        side = -(-hi // multiple) * multiple
        size = max(1, pixels // (side * side))
        out[name] = size if max_batch is None else min(size, max_batch)
    return out


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
        ``"lengths"``: LongTensor (B,); ``"ids"``: list of str; ``"paths"``: list of str;
        when an item is a complex (its ``"chains"``: the chain index of each residue),
        ``"chains"``: LongTensor (B, H), each residue's chain (0 for single chains), -1 at
        padding.
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
    out = {
        "image": images,
        "mask": mask,
        "lengths": lengths,
        "ids": [item["id"] for item in batch],
        "paths": [item.get("path", "") for item in batch],
    }
    if any(item.get("chains") is not None for item in batch):
        chains = torch.full((len(batch), side), -1, dtype=torch.long)
        for i, item in enumerate(batch):
            n = int(item["length"])
            chains[i, :n] = 0 if item.get("chains") is None else torch.as_tensor(item["chains"])
        out["chains"] = chains
    return out


def crop_complex(image: np.ndarray, sizes: Sequence[int], crop: int, rng) -> tuple:
    """A ``crop``-residue image of a complex: one contiguous window per chain, chains in order,
    each window's share of ``crop`` proportional to its chain's length and centred (give or
    take a quarter window) on the chain's residue nearest another chain, so the interface is
    in view; every residue pair of the windows keeps its pixel. Returns the image, the chain
    index of its residues and their rows in the full image. Monotone in the distance channel:
    works on standardised images too."""
    sizes = [int(v) for v in sizes]
    total = sum(sizes)
    n = image.shape[-1]
    if total != n:
        raise ValueError(f"chain lengths {sizes} do not sum to the image side {n}")
    exact = [crop * v / total for v in sizes]  # largest remainders: shares sum to crop
    share = [int(x) for x in exact]
    for c in np.argsort([int(x) - x for x in exact], kind="stable")[: crop - sum(share)]:
        share[c] += 1
    c0 = image[0]
    dist = np.where(np.tri(n, k=-1, dtype=bool), c0, c0.T)  # d from the lower triangle
    starts = np.concatenate([[0], np.cumsum(sizes)])
    chain_of = np.repeat(np.arange(len(sizes)), sizes)
    rows = []
    for c, (lo, hi) in enumerate(zip(starts[:-1], starts[1:], strict=True)):
        w = share[c]
        if w == 0:
            continue
        other = chain_of != c
        if other.any():
            centre = int(np.argmin(dist[lo:hi][:, other].min(axis=1)))
        else:
            centre = int(rng.integers(0, hi - lo))
        centre += int(rng.integers(-(w // 4), w // 4 + 1))
        start = int(np.clip(centre - w // 2, 0, hi - lo - w))
        rows.append(np.arange(lo + start, lo + start + w))
    idx = np.concatenate(rows)
    return np.ascontiguousarray(image[:, idx][:, :, idx]), chain_of[idx], idx


#: :func:`split_chain`: the shortest piece, and the range of residues left out between pieces.
SPLIT_MIN_CHAIN = 30
SPLIT_GAP = (5, 20)


def split_chain(image: np.ndarray, rng, min_chain: int = SPLIT_MIN_CHAIN,
                gap: tuple[int, int] = SPLIT_GAP, pieces: int = 2) -> tuple:  # fmt: skip
    """One chain's image as a pseudo-complex of up to ``pieces`` chains. Two pieces: residues
    ``0 .. c - 1`` are one chain, ``c + g .. L - 1`` another, the ``g`` residues between left
    out (``g`` drawn from ``gap``) so the new termini are not bonded neighbours; ``c`` is drawn
    so each piece has at least ``min_chain`` residues. With ``pieces > 2`` the number of pieces
    ``k`` is drawn from ``2 .. pieces`` and the longest piece is cut again the same way until
    there are ``k`` (or none is long enough). Every kept pair keeps its pixel, so the result is
    exactly the image of the pieces as a complex: the pieces of a folded chain pack against
    each other as the chains of a complex do, which teaches a chain-aware model to place a
    chain from its tokens on 20,000 single chains where only a few hundred real complexes
    exist (the "another chain" position bucket hides that the pieces were one chain). Returns
    the image and the chain index of its residues, or the image unchanged and None when it is
    too short to split (under ``2 * min_chain + gap[0]`` residues). ``pieces=2`` draws exactly
    what it drew before ``pieces`` existed, so a run resumed across the change is unchanged."""
    if pieces < 2:
        raise ValueError(f"pieces must be >= 2, got {pieces}")
    k = 2 if pieces == 2 else int(rng.integers(2, pieces + 1))
    segments = [(0, image.shape[-1])]  # kept residues [start, end) of the chain, in order
    while len(segments) < k:
        j = max(range(len(segments)), key=lambda i: segments[i][1] - segments[i][0])
        start, end = segments[j]
        n = end - start
        g = int(rng.integers(gap[0], gap[1] + 1))
        g = min(g, n - 2 * min_chain)
        if g < gap[0]:
            break
        c = int(rng.integers(min_chain, n - g - min_chain + 1))
        segments[j : j + 1] = [(start, start + c), (start + c + g, end)]
    if len(segments) == 1:
        return image, None
    idx = np.concatenate([np.arange(a, b) for a, b in segments])
    index = np.repeat(np.arange(len(segments)), [b - a for a, b in segments])
    return np.ascontiguousarray(image[:, idx][:, :, idx]), index


def _check_rank(rank: int, world_size: int) -> tuple[int, int]:
    rank, world_size = int(rank), int(world_size)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    return rank, world_size


# --------------------------------------------------------------------------- batches


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

    def bins_per_window(self, epoch: int = 0) -> float | None:
        """The mean number of length bins among the rows of a shard window in ``epoch`` (None
        without ``shard_window``). Shards written by ``protoken convert`` hold one bin each, so
        a window of G shards holds at most G bins, and a stretch of training sees only those:
        with few shards per bin, the last steps of a short run favour a few lengths."""
        windows = self.shard_windows(epoch)
        if windows is None:
            return None
        of_row = windows[self.index.shard_of[self.rows]]
        pairs = np.unique(np.stack([of_row, self.index.bin_of[self.rows]]), axis=1)
        return float(pairs.shape[1] / len(np.unique(pairs[0])))

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
    normalize : {None, "none", "reference"}
        ``"reference"``: standardise with :data:`protoken.codec.REFERENCE_MEAN` /
        ``REFERENCE_STD`` (:class:`Normalization`).
    mean, std : 3 floats, optional
        Explicit per-channel standardisation (on the [0, 1] scale) instead.
    crop : int, optional
        Images longer than this are cut to a random ``crop x crop`` window on the diagonal
        (residues ``s .. s + crop - 1`` against themselves: a complete, smaller 6D image); a
        complex to a window per chain around its interface (:func:`crop_complex`). The
        window is a pure function of ``(seed, epoch, batch, row)``, so resume stays exact.
    split_chains : float
        The fraction of single-chain images (after the crop) made two-chain pseudo-complexes
        (:func:`split_chain`), drawn as the window is; 0 (the default): none.
    split_pieces : int
        The most pieces such a pseudo-complex has (2, the default: always two).
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
        split_chains: float = 0.0,
        split_pieces: int = 2,
    ):
        super().__init__()
        if crop is not None and crop < 1:
            raise ValueError(f"crop must be >= 1, got {crop}")
        if not 0.0 <= split_chains <= 1.0:
            raise ValueError(f"split_chains must be in [0, 1], got {split_chains}")
        self.crop = crop
        if split_pieces < 2:
            raise ValueError(f"split_pieces must be >= 2, got {split_pieces}")
        self.split_chains = float(split_chains)
        self.split_pieces = int(split_pieces)
        self.plan = plan
        self.multiple = int(multiple)
        self.epoch, self.position = int(epoch), int(position)
        self.rank, self.world_size = _check_rank(rank, world_size)
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

    def _crop(self, image: np.ndarray, epoch: int, k: int, row: int, chains=None):
        """The image (a random diagonal window, or for a complex :func:`crop_complex`; a
        single chain then split into a pseudo-complex with probability ``split_chains``) and
        its residues' chain index (None for one chain)."""
        n = image.shape[-1]
        rng = np.random.default_rng([self.plan.seed, epoch & _MASK64, epoch < 0, k, row])
        if chains is not None:
            if self.crop is None or n <= self.crop:
                return image, np.repeat(np.arange(len(chains)), chains)
            return crop_complex(image, chains, self.crop, rng)[:2]
        if self.crop is not None and n > self.crop:
            s = int(rng.integers(0, n - self.crop + 1))
            image = np.ascontiguousarray(image[..., s : s + self.crop, s : s + self.crop])
        if self.split_chains and rng.random() < self.split_chains:
            return split_chain(image, rng, pieces=self.split_pieces)
        return image, None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, n_workers = (0, 1) if info is None else (info.id, info.num_workers)
        decoder = _Decoder(self.normalization)
        index = self.plan.index
        limits = [side_limit(name) for name in index.bins]
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
                sizes = index.chain_lengths(row)
                if sizes is not None and sum(sizes) != image.shape[-1]:
                    _warn_once(logged, path, ValueError(f"manifest chains {sizes} do not add "
                                                        "up to the image: one chain"))  # fmt: skip
                    sizes = None
                image, chains = self._crop(image, epoch, k, row, sizes)
                items.append(
                    {
                        "image": torch.from_numpy(image),
                        "length": image.shape[-1],
                        "id": index.id(row),
                        "path": path,
                        "chains": chains,
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
