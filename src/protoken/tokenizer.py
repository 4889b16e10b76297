"""Structures <-> tokens: the trained VQ-VAE as a protein structure tokenizer.

>>> from protoken import Tokenizer
>>> tok = Tokenizer.from_checkpoint("runs/demo/best.pt")
>>> tokens = tok.encode("1abc.cif.gz")        # a structure file, a PNG, or an image array
>>> image = tok.decode(tokens)                 # (3, L, L) in [-1, 1]
>>> structure = tok.decode_structure(tokens)   # a protoken.reconstruct.Reconstruction

A protein of L residues gets, at level l (coarsest first, downsampling s_l), a square grid of
ceil(L / s_l) x ceil(L / s_l) codes, each one of ``codebook_size`` values.

Token files (``protoken encode --out FILE.npz``) are numpy ``.npz`` archives readable without
protoken::

    format           "protoken-tokens/1"
    meta             JSON: checkpoint id, model config, codec settings, level scales
    ids, sequences   (N,) str;   lengths (N,) int32
    level{l}_codes   all proteins' level-l grids, flattened row-major and concatenated
                     (uint16 when the codebook has <= 65536 codes)
    level{l}_offsets (N + 1,) int64: protein i's grid is codes[offsets[i]:offsets[i + 1]],
                     reshaped to (ceil(L_i / s_l), ceil(L_i / s_l))
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from protoken.codec import (
    MAX_IMAGE_SIDE,
    CodecSettings,
    dequantize,
    features_to_image,
    quantize,
    read_converted_image,
    standardize,
    unstandardize,
)
from protoken.fileio import atomic_path
from protoken.geometry import sixd
from protoken.inputs import image_id
from protoken.structure import Backbone, SkipStructure, StructureError, read_backbones

__all__ = ["INPUT_ERRORS", "TOKEN_FORMAT", "Item", "Tokenizer", "Tokens", "load_tokens",
           "save_tokens"]  # fmt: skip

#: What :meth:`Tokenizer.prepare` raises for an input it cannot use (unreadable, skipped by a
#: chain, model or length policy, not an image ...); ``on_error`` callbacks receive these.
INPUT_ERRORS = (SkipStructure, StructureError, ValueError, OSError)

TOKEN_FORMAT = "protoken-tokens/1"


@dataclass
class Tokens:
    """The tokens of one protein.

    Attributes
    ----------
    id : str
    length : int
        Residues L.
    sequence : str
        One-letter sequence ("" when encoded from an image without one).
    levels : list of ndarray
        Coarsest level first; level l is an int array (ceil(L / s_l), ceil(L / s_l)).
    """

    id: str
    length: int
    sequence: str
    levels: list[np.ndarray]

    @property
    def n_tokens(self) -> int:
        return int(sum(g.size for g in self.levels))


@dataclass
class Item:
    """An input prepared for the model: its id, image in [-1, 1] (3, L, L), sequence, and the
    backbone (L, 3, 3) when it came from a structure file."""

    id: str
    image: np.ndarray
    sequence: str = ""
    backbone: np.ndarray | None = None


def checkpoint_id(path: str) -> str:
    """First 12 hex digits of the checkpoint file's sha256: which tokenizer made some tokens."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:12]


class Tokenizer:
    """A trained VQ-VAE plus the codec settings its images were made with.

    Parameters
    ----------
    model : protoken.model.VQVAE
        Put in eval mode.
    codec : CodecSettings
        dmax, bit depth and normalisation of the training images.
    checkpoint : str
        An identifier stored with the tokens (see :func:`checkpoint_id`).
    device : str or torch.device, optional
    batch_size : int
        Images per forward pass in the batched methods.
    """

    def __init__(self, model, codec: CodecSettings, checkpoint: str = "", device=None,
                 batch_size: int = 8):  # fmt: skip
        self.device = torch.device(
            device or ("cuda" if torch.cuda.is_available() else "cpu")
        )  # fmt: skip
        self.model = model.to(self.device).eval()
        self.codec = codec
        self.checkpoint = checkpoint
        self.batch_size = batch_size
        self.config = model.config

    @classmethod
    def from_checkpoint(cls, path: str, device=None, batch_size: int = 8) -> Tokenizer:
        """Load a checkpoint written by ``protoken train`` (``best.pt`` or ``last.pt``) with
        ``weights_only=True`` (see :mod:`protoken.checkpoint`)."""
        from protoken import checkpoint

        ckpt = checkpoint.load(path)
        model = checkpoint.build_model(ckpt)
        codec = CodecSettings.from_dict(ckpt["codec"])
        return cls(model, codec, checkpoint_id(path), device, batch_size)

    # ------------------------------------------------------------------ inputs

    def prepare(self, source, sequence: str = "", chains: str = "first", models: str = "first",
                min_len: int = 1, max_len: int | None = None) -> list[Item]:  # fmt: skip
        """Turn an input into model-ready items.

        ``source`` may be a structure file (every protein chain under ``chains``/``models``
        policies, as ``protoken convert``), a PNG written by ``protoken convert``, an image
        array (3, L, L) in [-1, 1], or a :class:`protoken.structure.Backbone`. Structures are
        turned into images with the checkpoint's dmax and passed through its bit depth, so the
        model sees exactly what it was trained on. Chains outside ``min_len``..``max_len`` are
        left out (``SkipStructure`` when none is left). A PNG is refused (ValueError) from its
        header when it is no square RGB image or larger than ``max_len``, and when the
        ``convert.json`` beside it records another dmax than the checkpoint's.
        """
        if isinstance(source, Backbone):
            return [self._from_backbone(source)]
        if isinstance(source, str | os.PathLike):
            path = os.fspath(source)
            if path.lower().endswith(".png"):  # header checked, convert.json's dmax must agree
                image, _ = read_converted_image(path, self.codec.dmax, max_len or MAX_IMAGE_SIDE)
                return [Item(image_id(path), image, sequence)]
            backbones = read_backbones(path, chains, models)
            kept = [bb for bb in backbones
                    if min_len <= len(bb) and (max_len is None or len(bb) <= max_len)]  # fmt: skip
            if not kept:
                n = len(backbones[0])
                raise SkipStructure(f"too short: {n} residues < {min_len}" if n < min_len
                                    else f"too long: {n} residues > {max_len}")  # fmt: skip
            return [self._from_backbone(bb) for bb in kept]
        image = np.asarray(source, dtype=np.float32)
        return [Item("image", image, sequence)]

    def _from_backbone(self, bb) -> Item:
        image = features_to_image(sixd(bb.n, bb.ca, bb.c, dmax=self.codec.dmax), self.codec.dmax)
        image = dequantize(quantize(image, self.codec.bit_depth))
        return Item(bb.id, image, bb.sequence, bb.coords)

    # ------------------------------------------------------------------ model

    def _batch(self, images: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor, list]:
        from protoken.model import mask_from_lengths

        lengths = [int(im.shape[-1]) for im in images]
        f = self.config.downsample_factor
        side = -(-max(lengths) // f) * f
        x = torch.zeros(len(images), 3, side, side)
        mean_std = self.codec.mean_std
        for i, im in enumerate(images):
            t = torch.as_tensor(np.asarray(im), dtype=torch.float32)
            if mean_std is not None:
                t = standardize(t, *mean_std)
            x[i, :, : lengths[i], : lengths[i]] = t
        mask = mask_from_lengths(lengths, side)
        return x.to(self.device), mask.to(self.device), lengths

    def _to_images(self, recon: torch.Tensor, lengths: Sequence[int]) -> list[np.ndarray]:
        out = []
        mean_std = self.codec.mean_std
        for i, n in enumerate(lengths):
            img = recon[i, :, :n, :n].float()
            if mean_std is not None:
                img = unstandardize(img, *mean_std)
            out.append(img.clamp(-1, 1).cpu().numpy())
        return out

    @torch.no_grad()
    def encode_images(self, images: Sequence[np.ndarray]) -> list[list[np.ndarray]]:
        """Images (3, L_i, L_i) -> per image, per level (coarsest first) its valid code grid."""
        out = []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start : start + self.batch_size]
            x, mask, lengths = self._batch(chunk)
            grids = self.model.encode(x, mask)
            for i, n in enumerate(lengths):
                out.append([
                    g[i, : math.ceil(n / s), : math.ceil(n / s)].cpu().numpy().astype(np.int64)
                    for g, s in zip(grids, self._scales_coarse_first(), strict=True)
                ])  # fmt: skip
        return out

    @torch.no_grad()
    def decode_levels(self, levels: Sequence[Sequence[np.ndarray]],
                      lengths: Sequence[int]) -> list[np.ndarray]:  # fmt: skip
        """Per protein code grids (coarsest first) -> images (3, L, L) in [-1, 1]."""
        out: list[np.ndarray] = []
        scales = self._scales_coarse_first()
        f = self.config.downsample_factor
        for start in range(0, len(levels), self.batch_size):
            chunk = levels[start : start + self.batch_size]
            ns = [int(n) for n in lengths[start : start + self.batch_size]]
            side = -(-max(ns) // f) * f
            grids = []
            for lv, s in enumerate(scales):
                g = torch.full((len(chunk), side // s, side // s), -1, dtype=torch.long)
                for i, per in enumerate(chunk):
                    code = torch.as_tensor(np.asarray(per[lv], dtype=np.int64))
                    k = math.ceil(ns[i] / s)
                    if code.shape != (k, k):
                        raise ValueError(f"level {lv}: expected a {k}x{k} grid, got "
                                         f"{tuple(code.shape)}")  # fmt: skip
                    g[i, :k, :k] = code
                grids.append(g.to(self.device))
            out.extend(self._to_images(self.model.decode(grids, ns), ns))
        return out

    @torch.no_grad()
    def roundtrip(self, images: Sequence[np.ndarray]) -> tuple[list, list[np.ndarray]]:
        """Encode then decode: (per image code grids, decoded images)."""
        levels = self.encode_images(images)
        decoded = self.decode_levels(levels, [im.shape[-1] for im in images])
        return levels, decoded

    def _scales_coarse_first(self) -> list[int]:
        return list(reversed(self.config.level_scales))

    # ------------------------------------------------------------------ public API

    def encode(self, source, sequence: str = "") -> Tokens:
        """One protein (structure file, PNG, image array or Backbone) -> :class:`Tokens`.
        For a file with several chains use :meth:`encode_many`."""
        items = self.prepare(source, sequence)
        if len(items) != 1:
            raise ValueError(f"{source}: {len(items)} chains; use encode_many")
        return self.tokens_of(items)[0]

    def prepare_many(self, sources: Iterable, chains: str = "skip-multi",
                     models: str = "skip-multi", min_len: int = 1, max_len: int | None = None,
                     on_error: Callable[[object, Exception], None] | None = None,
                     ) -> Iterator[Item]:  # fmt: skip
        """:meth:`prepare` over many inputs, streamed (one input read at a time).

        An input that cannot be used (:data:`INPUT_ERRORS`: unreadable, skipped by a policy or
        the length limits) raises, or with ``on_error`` is passed to ``on_error(source, error)``
        and left out.
        """
        for src in sources:
            try:
                items = self.prepare(src, chains=chains, models=models, min_len=min_len,
                                     max_len=max_len)  # fmt: skip
            except INPUT_ERRORS as exc:
                if on_error is None:
                    raise
                on_error(src, exc)
                continue
            yield from items

    def encode_many(self, sources: Iterable, chains: str = "skip-multi",
                    models: str = "skip-multi", min_len: int = 1, max_len: int | None = None,
                    on_error: Callable[[object, Exception], None] | None = None,
                    ) -> Iterator[Tokens]:  # fmt: skip
        """Tokens of many inputs, streamed, ``batch_size`` proteins per forward pass.

        Inputs and options as :meth:`prepare_many` (a file may give several chains).
        """
        batch: list[Item] = []
        for item in self.prepare_many(sources, chains, models, min_len, max_len, on_error):
            batch.append(item)
            if len(batch) == self.batch_size:
                yield from self.tokens_of(batch)
                batch = []
        if batch:
            yield from self.tokens_of(batch)

    def tokens_of(self, items: Sequence[Item]) -> list[Tokens]:
        """Tokens of prepared items (batched by :meth:`encode_images`)."""
        levels = self.encode_images([it.image for it in items])
        return [Tokens(it.id, int(it.image.shape[-1]), it.sequence, lv)
                for it, lv in zip(items, levels, strict=True)]  # fmt: skip

    def decode(self, tokens: Tokens) -> np.ndarray:
        """:class:`Tokens` -> image (3, L, L) in [-1, 1]."""
        return self.decode_levels([tokens.levels], [tokens.length])[0]

    def decode_structure(self, tokens: Tokens, backbone: bool = False):
        """:class:`Tokens` -> 3D (:class:`protoken.reconstruct.Reconstruction`)."""
        from protoken.reconstruct import reconstruct

        return reconstruct(self.decode(tokens), dmax=self.codec.dmax, backbone=backbone)

    def meta(self) -> dict:
        """What token files record about the tokenizer that made them."""
        return {
            "checkpoint": self.checkpoint,
            "model_config": self.config.to_dict(),
            "codec": self.codec.to_dict(),
            "level_scales_coarse_first": self._scales_coarse_first(),
            "codebook_size": self.config.codebook_size,
        }


# --------------------------------------------------------------------------- token files


def save_tokens(path: str, tokens: Sequence[Tokens], meta: dict) -> None:
    """Write tokens to a ``.npz`` file (format in the module docstring), atomically."""
    if not tokens:
        raise ValueError("no tokens to save")
    n_levels = len(tokens[0].levels)
    dtype = np.uint16 if meta.get("codebook_size", 1 << 16) <= (1 << 16) else np.int32
    arrays: dict[str, np.ndarray] = {
        "format": np.array(TOKEN_FORMAT),
        "meta": np.array(json.dumps(meta)),
        "ids": np.array([t.id for t in tokens]),
        "sequences": np.array([t.sequence for t in tokens]),
        "lengths": np.array([t.length for t in tokens], dtype=np.int32),
    }
    for lv in range(n_levels):
        grids = [np.asarray(t.levels[lv]).ravel() for t in tokens]
        arrays[f"level{lv}_codes"] = np.concatenate(grids).astype(dtype)
        arrays[f"level{lv}_offsets"] = np.concatenate([[0], np.cumsum([g.size for g in grids])])
    with atomic_path(path, suffix=".npz") as tmp:
        np.savez_compressed(tmp, **arrays)


def load_tokens(path: str) -> tuple[list[Tokens], dict]:
    """Read a token file: (tokens, meta)."""
    with np.load(path, allow_pickle=False) as z:
        if str(z["format"]) != TOKEN_FORMAT:
            raise ValueError(f"{path}: not a {TOKEN_FORMAT} file")
        meta = json.loads(str(z["meta"]))
        scales = meta["level_scales_coarse_first"]
        ids, seqs, lengths = z["ids"], z["sequences"], z["lengths"]
        codes = [z[f"level{lv}_codes"] for lv in range(len(scales))]
        offsets = [z[f"level{lv}_offsets"] for lv in range(len(scales))]
    out = []
    for i, n in enumerate(lengths.tolist()):
        levels = []
        for lv, s in enumerate(scales):
            k = math.ceil(n / s)
            levels.append(codes[lv][offsets[lv][i] : offsets[lv][i + 1]].astype(np.int64)
                          .reshape(k, k))  # fmt: skip
        out.append(Tokens(str(ids[i]), n, str(seqs[i]), levels))
    return out, meta
