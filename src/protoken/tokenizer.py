"""Structures <-> tokens: a trained model as a protein structure tokenizer.

>>> from protoken import Tokenizer
>>> tok = Tokenizer.load("default")            # a bundled tokenizer, or RUN/best.pt
>>> tokens = tok.encode("1abc.cif.gz")        # a structure file, a PNG, or an image array
>>> image = tok.decode(tokens)                 # (3, L, L) in [-1, 1]
>>> structure = tok.decode_structure(tokens)   # a protoken.reconstruct.Reconstruction

A protein of L residues gets, with a per-residue tokenizer, one code per residue; with a
hierarchical one, at level l (coarsest first, downsampling s_l), a square grid of
ceil(L / s_l) x ceil(L / s_l) codes; each code one of ``codebook_size`` values.

What ``protoken encode`` and ``protoken decode`` do with many proteins is here too:
:func:`encode_to_file` (inputs streamed to a token file, unusable inputs recorded) and
:func:`decode_to_files` (tokens to PNG images and structure files). Token files themselves are
:mod:`protoken.token_files`.

One module of ~630 lines on purpose: the Tokenizer is the library's one entry point for both
model families, and encode_to_file / decode_to_files are its batch face.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from protoken.codec import (
    MAX_IMAGE_SIDE,
    CodecSettings,
    decode_converted,
    dequantize,
    features_to_image,
    quantize,
    read_converted_image,
    standardize,
    unstandardize,
)
from protoken.fileio import file_sha256
from protoken.geometry import sixd
from protoken.inputs import image_id
from protoken.structure import (
    Backbone,
    SkipStructure,
    StructureError,
    parse_chains,
    read_backbones,
    structure_to_text,
)
from protoken.token_files import STDOUT, Tokens, load_tokens, open_token_writer

__all__ = ["INPUT_ERRORS", "EncodeSummary", "Item", "Tokenizer", "Tokens", "decode_to_files",
           "encode_to_file"]  # fmt: skip

#: Adam steps of decoding by inversion (:mod:`protoken.model.inversion`), the default of
#: tokenizers whose decoder makes coordinates: +0.04 median TM-score on held-out proteins at 1
#: stage, more with more stages (README, "Bundled tokenizers"); 0 is the decoder's one pass.
REFINE_STEPS = 100

#: What :meth:`Tokenizer.prepare` raises for an input it cannot use (unreadable, skipped by a
#: chain, model or length policy, not an image ...); ``on_error`` callbacks receive these.
INPUT_ERRORS = (SkipStructure, StructureError, ValueError, OSError)


@dataclass
class Item:
    """An input prepared for the model: its id, image in [-1, 1] (3, L, L), sequence, the
    backbone (L, 3, 3) when it came from a structure file, and its chain layout
    (``(chain id, residues)`` in order; empty when unknown)."""

    id: str
    image: np.ndarray
    sequence: str = ""
    backbone: np.ndarray | None = None
    chains: tuple[tuple[str, int], ...] = ()
    res_ids: tuple[str, ...] = ()


def converted_layout(out: str, sid: str, length: int) -> tuple[tuple[str, int], ...]:
    """The chain layout ``protoken convert --chains complex`` recorded for image ``sid`` in the
    manifests of its output folder ``out`` (empty for a single chain, or when ``out`` holds no
    manifest): what lets a complex read back from PNGs or shards keep its chains.

    Raises
    ------
    ValueError
        The recorded layout is no layout, or its counts do not sum to the image's ``length``.
    """
    text = _layouts_of(os.path.abspath(out)).get(sid)
    if text is None:
        return ()
    try:
        return parse_chains(text, length)
    except ValueError as exc:
        raise ValueError(f"{sid}: the chain layout in the manifest of {out}: {exc}") from None


_LAYOUTS: dict[str, tuple[float, dict[str, str]]] = {}


def _layouts_of(out: str) -> dict[str, str]:
    """``{id: layout}`` of every manifest of ``out``, read once per folder and manifest
    change (the newest modification time of its manifests)."""
    from protoken.convert.manifest import chain_layout_texts, manifest_files

    try:
        files = manifest_files(out) if os.path.isdir(out) else []
        stamp = max((os.path.getmtime(f) for f in files), default=0.0)
    except OSError:
        return {}
    cached = _LAYOUTS.get(out)
    if cached is None or cached[0] != stamp:
        layouts: dict[str, str] = {}
        for f in files:
            layouts.update(chain_layout_texts(f))
        _LAYOUTS[out] = cached = (stamp, layouts)
    return cached[1]


def checkpoint_id(path: str) -> str:
    """First 12 hex digits of the checkpoint file's sha256: which tokenizer made some tokens."""
    return file_sha256(path)[:12]


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
        self.provenance: dict = {}
        self._stages: int | None = None
        self._refine = REFINE_STEPS if self.decodes_coordinates else 0

    @property
    def family(self) -> str:
        """The model's family: ``"residue"`` (codes per residue) or ``"hierarchical"``."""
        from protoken.model import family_of

        return family_of(self.config)

    @property
    def stages(self) -> int | None:
        """Per-residue tokenizers: how many residual stages :meth:`encode` keeps and
        :meth:`decode` reads (None: all of them); 1 stage is 12 bits per residue with the
        bundled ``residue``."""
        return self._stages

    @stages.setter
    def stages(self, k: int | None) -> None:
        if k is not None:
            n = getattr(self.model, "n_stages", None)
            if n is None:
                raise ValueError("stages apply to per-residue tokenizers only")
            if not 1 <= int(k) <= n:
                raise ValueError(f"stages must be 1 to {n} for this tokenizer, got {k}")
            k = int(k)
        self._stages = k

    @property
    def refine(self) -> int:
        """Per-residue tokenizers: Adam steps of decoding by inversion (the decoder's backbone
        refined until the encoder gives the tokens back, :func:`protoken.model.inversion.refine`)
        in :meth:`decode_atoms`, :meth:`decode_structure` and :meth:`decode`; 0: the decoder's
        one pass (10-50 times faster). Default :data:`REFINE_STEPS`."""
        return self._refine

    @refine.setter
    def refine(self, steps: int) -> None:
        steps = int(steps)
        if steps < 0:
            raise ValueError(f"refine steps must be >= 0, got {steps}")
        if steps and not self.decodes_coordinates:
            raise ValueError("refine applies to per-residue tokenizers only")
        self._refine = steps

    @property
    def bits_per_token(self) -> float:
        return math.log2(self.config.codebook_size)

    @classmethod
    def load(cls, name_or_path: str | os.PathLike, device=None, batch_size: int = 8) -> Tokenizer:
        """A bundled tokenizer by name (``"default"``, ``"residue"``: offline, see
        :mod:`protoken.pretrained`), or a checkpoint written by ``protoken train``
        (``best.pt`` or ``last.pt``), loaded with ``weights_only=True`` (see
        :mod:`protoken.checkpoint`); a path that exists wins over a name.

        Raises
        ------
        protoken.checkpoint.CheckpointError
            No such checkpoint, or an unusable one (one line naming the file).
        """
        from protoken import checkpoint, pretrained

        if pretrained.is_name(name_or_path):
            return cls.from_pretrained(os.fspath(name_or_path), device, batch_size)
        path = os.fspath(name_or_path)
        if not os.path.lexists(path):
            near = pretrained.closest(path)
            raise checkpoint.CheckpointError(
                f"no checkpoint at {path}, and no bundled tokenizer of that name (bundled: "
                f"{', '.join(pretrained.names())}" + (f"; did you mean {near!r}?)" if near else ")")
            )
        ckpt = checkpoint.load(path)
        return cls._of(ckpt, checkpoint_id(path), checkpoint.provenance(ckpt), device, batch_size)

    @classmethod
    def from_checkpoint(cls, path: str, device=None, batch_size: int = 8) -> Tokenizer:
        """:meth:`load` (its former name)."""
        return cls.load(path, device, batch_size)

    @classmethod
    def from_pretrained(cls, name: str = "default", device=None, batch_size: int = 8) -> Tokenizer:
        """A tokenizer bundled with the package, by name only (see ``protoken pretrained``)."""
        from protoken import pretrained

        ckpt = pretrained.load(name)
        return cls._of(ckpt, ckpt["checkpoint_id"], ckpt.get("provenance", {}), device,
                       batch_size)  # fmt: skip

    @classmethod
    def _of(cls, ckpt: dict, checkpoint: str, provenance: dict, device, batch_size) -> Tokenizer:
        from protoken.checkpoint import model_from_checkpoint

        model, codec = model_from_checkpoint(ckpt), CodecSettings.from_dict(ckpt["codec"])
        tok = cls(model, codec, checkpoint, device, batch_size)
        tok.provenance = provenance
        return tok

    # ------------------------------------------------------------------ inputs

    def prepare(self, source, sequence: str = "", chains: str = "skip-multi",
                models: str = "skip-multi", min_len: int = 1,
                max_len: int | None = None) -> list[Item]:  # fmt: skip
        """Turn an input into model-ready items.

        ``source`` may be a structure file (its protein chains under the ``chains`` and
        ``models`` policies, with the defaults of ``protoken convert`` and ``encode``: a file of
        several chains or models is skipped, naming the options that read it; ``"complex"``
        reads all chains as one item), a member of a tar archive or Foldcomp database
        (:class:`protoken.archives.Member`), a PNG written by ``protoken convert`` or an image
        of its tar shards (:class:`protoken.shards.ShardImage`), an image
        array (3, L, L) in [-1, 1], or a :class:`protoken.structure.Backbone`. Structures are
        turned into images with the checkpoint's dmax and passed through its bit depth, so the
        model sees exactly what it was trained on. Chains outside ``min_len``..``max_len`` are
        left out (``SkipStructure`` when none is left). A PNG is refused (ValueError) from its
        header when it is no square RGB image or larger than ``max_len``, and when the
        ``convert.json`` beside it records another dmax than the checkpoint's.
        """
        from protoken.archives import Member, read_member
        from protoken.shards import ShardImage

        if isinstance(source, Backbone):
            return [self._from_backbone(source)]
        if isinstance(source, ShardImage):  # an image of convert --format shards
            image, _ = decode_converted(source.read(), source.settings, self.codec.dmax,
                                        max_len or MAX_IMAGE_SIDE)  # fmt: skip
            out = os.path.dirname(os.path.dirname(os.path.dirname(source.shard)))
            return [
                Item(
                    source.id,
                    image,
                    sequence,
                    chains=converted_layout(out, source.id, image.shape[-1]),
                )
            ]
        if isinstance(source, Member):  # a member of a tar archive or Foldcomp database
            backbones = read_member(source.name, source.kind, source.read(), chains, models)
            return self._kept(backbones, min_len, max_len)
        if isinstance(source, str | os.PathLike):
            path = os.fspath(source)
            if path.lower().endswith(".png"):  # header checked, convert.json's dmax must agree
                image, _ = read_converted_image(path, self.codec.dmax, max_len or MAX_IMAGE_SIDE)
                sid = image_id(path)
                out = os.path.dirname(os.path.dirname(os.path.abspath(path)))  # OUT/bin_*/ID.png
                return [
                    Item(sid, image, sequence, chains=converted_layout(out, sid, image.shape[-1]))
                ]
            return self._kept(read_backbones(path, chains, models), min_len, max_len)
        image = np.asarray(source, dtype=np.float32)
        return [Item("image", image, sequence)]

    def _kept(self, backbones, min_len: int, max_len: int | None) -> list[Item]:
        kept = [bb for bb in backbones
                if min_len <= len(bb) and (max_len is None or len(bb) <= max_len)]  # fmt: skip
        if not kept:
            n = len(backbones[0])
            raise SkipStructure(f"too short: {n} residues < {min_len}" if n < min_len
                                else f"too long: {n} residues > {max_len}")  # fmt: skip
        return [self._from_backbone(bb) for bb in kept]

    def _from_backbone(self, bb) -> Item:
        image = features_to_image(sixd(bb.n, bb.ca, bb.c, dmax=self.codec.dmax), self.codec.dmax)
        image = dequantize(quantize(image, self.codec.bit_depth))
        return Item(bb.id, image, bb.sequence, bb.coords, tuple(bb.chains), tuple(bb.res_ids))

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

    def _chain_tensor(self, chains: Sequence | None, lengths: Sequence[int], side: int):
        """``(B, side)`` chain index of each residue (-1 at padding), or None when every
        protein is one chain."""
        if not chains or all(len(c) < 2 for c in chains):
            return None
        out = torch.full((len(lengths), side), -1, dtype=torch.long)
        for i, (layout, n) in enumerate(zip(chains, lengths, strict=True)):
            sizes = [k for _, k in layout] if len(layout) > 1 else [n]
            if sum(sizes) != n:
                raise ValueError(f"chain lengths {sizes} do not sum to the length {n}")
            out[i, :n] = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
        return out.to(self.device)

    def _to_device(self, codes):
        if isinstance(codes, torch.Tensor):
            return codes.to(self.device)
        return [c.to(self.device) for c in codes]

    @torch.no_grad()
    def encode_images(self, images: Sequence[np.ndarray],
                      chains: Sequence | None = None) -> list[list[np.ndarray]]:  # fmt: skip
        """Images (3, L_i, L_i) (and each one's chain layout, for complexes) -> per image its
        codes in the family's shape (:meth:`protoken.model.ResidueVQVAE.unbatch_codes`:
        ``[codes (L, K)]`` per residue, the first :attr:`stages` stages; grids per level,
        coarsest first, for the hierarchical family)."""
        out = []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start : start + self.batch_size]
            x, mask, lengths = self._batch(chunk)
            part = chains[start : start + self.batch_size] if chains else None
            codes = self.model.encode(x, mask, self._chain_tensor(part, lengths, x.shape[-1]))
            per = self.model.unbatch_codes(codes, lengths)
            if self.stages is not None:
                per = [[p[0][:, : self.stages]] for p in per]
            out.extend(per)
        return out

    @torch.no_grad()
    def decode_levels(self, levels: Sequence[Sequence[np.ndarray]], lengths: Sequence[int],
                      chains: Sequence | None = None) -> list[np.ndarray]:  # fmt: skip
        """Per protein codes (as :meth:`encode_images` gives; the first k stages of per-residue
        codes are enough) -> images (3, L, L) in [-1, 1]."""
        out: list[np.ndarray] = []
        for start in range(0, len(levels), self.batch_size):
            chunk = levels[start : start + self.batch_size]
            ns = [int(n) for n in lengths[start : start + self.batch_size]]
            codes = self._to_device(self.model.batch_codes(chunk, ns))
            side = max(ns)
            part = chains[start : start + self.batch_size] if chains else None
            recon = self.model.decode(codes, ns, self._chain_tensor(part, ns, side))
            out.extend(self._to_images(recon, ns))
        return out

    @torch.no_grad()
    def roundtrip(self, images: Sequence[np.ndarray]) -> tuple[list, list[np.ndarray]]:
        """Encode then decode: (per image code grids, decoded images)."""
        levels = self.encode_images(images)
        decoded = self.decode_levels(levels, [im.shape[-1] for im in images])
        return levels, decoded

    def _scales_coarse_first(self) -> list[int]:
        if self.family == "residue":
            return [1]
        return list(reversed(self.config.level_scales))

    # ------------------------------------------------------------------ public API

    def encode(self, source, sequence: str = "", chains: str = "skip-multi",
               models: str = "skip-multi") -> Tokens:  # fmt: skip
        """One protein (structure file, PNG, image array or Backbone) -> :class:`Tokens`.

        A file of several chains is skipped as by ``protoken encode`` (SkipStructure, naming
        the options): ``chains="first"`` takes the first, ``chains="complex"`` all of them as
        one complex; for every chain apart (``chains="split"``) use :meth:`encode_many`."""
        items = self.prepare(source, sequence, chains, models)
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
        levels = self.encode_images([it.image for it in items], [it.chains for it in items])
        return [Tokens(it.id, int(it.image.shape[-1]), it.sequence, lv, it.chains, it.res_ids)
                for it, lv in zip(items, levels, strict=True)]  # fmt: skip

    def _check_family(self, tokens: Tokens) -> None:
        if tokens.family != self.family:
            raise ValueError(f"{tokens.id}: {tokens.family} tokens, but this tokenizer is of the "
                             f"{self.family} family")  # fmt: skip

    def decode(self, tokens: Tokens) -> np.ndarray:
        """:class:`Tokens` -> image (3, L, L) in [-1, 1] (per-residue tokens: from their first
        :attr:`stages` stages; with :attr:`refine`, the image of the refined backbone)."""
        self._check_family(tokens)
        tokens = self._staged(tokens)
        if self.refine:
            return self.image_of(self.decode_atoms([tokens])[0])
        return self.decode_levels([tokens.levels], [tokens.length], [tokens.chains])[0]

    def image_of(self, rec) -> np.ndarray:
        """The 6D image (3, L, L) in [-1, 1] of a decoded backbone
        (:class:`protoken.reconstruct.Reconstruction` with ``atoms``)."""
        a = rec.atoms
        dmax = self.codec.dmax
        return features_to_image(sixd(a["N"], a["CA"], a["C"], dmax), dmax).astype(np.float32)

    def _staged(self, tokens: Tokens) -> Tokens:
        if self.stages is None or self.family != "residue" or tokens.n_stages <= self.stages:
            return tokens
        return tokens.first_stages(self.stages)

    @property
    def decodes_coordinates(self) -> bool:
        """The model's decoder ends in coordinates (the per-residue family): structures come
        straight from it, with no image -> MDS detour."""
        return hasattr(self.model, "decode_backbone")

    def decode_structure(self, tokens: Tokens, backbone: bool = False, via: str = "auto"):
        """:class:`Tokens` -> 3D (:class:`protoken.reconstruct.Reconstruction`).

        ``via="decoder"`` (the default of a per-residue tokenizer): the decoder's own N, CA, C
        (refined by inversion, :attr:`refine`), with O placed from ideal geometry and the
        virtual Cb (the full backbone whatever ``backbone`` says). ``via="image"`` (the only
        way for the hierarchical family): the decoded image through
        :func:`protoken.reconstruct.reconstruct` (MDS, handedness, refinement; ``backbone``
        adds N, CA, C, O from the image).
        """
        from protoken.reconstruct import reconstruct

        if via not in ("auto", "decoder", "image"):
            raise ValueError(f"via must be 'auto', 'decoder' or 'image', got {via!r}")
        if via == "image" or (via == "auto" and not self.decodes_coordinates):
            return reconstruct(self.decode(tokens), dmax=self.codec.dmax, backbone=backbone)
        if not self.decodes_coordinates:
            raise ValueError("this tokenizer's decoder makes images, not coordinates")
        return self.decode_atoms([tokens])[0]

    @torch.no_grad()
    def decode_atoms(self, tokens: Sequence[Tokens]) -> list:
        """Per-residue tokens -> the decoder's backbones as
        :class:`protoken.reconstruct.Reconstruction` (``atoms`` N, CA, C, O, CB; ``cb`` the
        virtual Cb), batched; refined by inversion with :attr:`refine` steps."""
        from protoken.backbone import add_oxygens
        from protoken.geometry import virtual_cb
        from protoken.model.inversion import refine
        from protoken.reconstruct import Reconstruction

        out = []
        for start in range(0, len(tokens), self.batch_size):
            chunk = [self._staged(t) for t in tokens[start : start + self.batch_size]]
            for t in chunk:
                self._check_family(t)
            ns = [t.length for t in chunk]
            codes = self._to_device(self.model.batch_codes([t.levels for t in chunk], ns))
            chains = self._chain_tensor([t.chains for t in chunk], ns, max(ns))
            if self.refine:
                atoms = refine(self.model, codes, ns, chains, steps=self.refine)[:3]
            else:
                atoms = self.model.decode_backbone(codes, ns, chains)
            n, ca, c = (a.double().cpu().numpy() for a in atoms)
            for i, (t, length) in enumerate(zip(chunk, ns, strict=True)):
                atoms = {"N": n[i, :length], "CA": ca[i, :length], "C": c[i, :length]}
                index = t.chain_index
                links = (np.ones(length - 1, bool) if index is None
                         else index[1:] == index[:-1])  # fmt: skip
                atoms["O"] = add_oxygens(atoms["N"], atoms["CA"], atoms["C"], links)
                atoms["CB"] = virtual_cb(atoms["N"], atoms["CA"], atoms["C"])
                centre = atoms["CB"].mean(0)
                atoms = {k: v - centre for k, v in atoms.items()}
                out.append(Reconstruction(cb=atoms["CB"], mirrored_before_fix=False,
                                          clipped_pairs=0, handedness_score=1.0,
                                          handedness_confidence=1.0,  # coordinates: chiral
                                          dmax=self.codec.dmax, atoms=atoms))  # fmt: skip
        return out

    def meta(self) -> dict:
        """What token files record about the tokenizer that made them."""
        from protoken.model import config_to_dict

        return {
            "family": self.family,
            "checkpoint": self.checkpoint,
            "model_config": config_to_dict(self.config),
            "codec": self.codec.to_dict(),
            "level_scales_coarse_first": self._scales_coarse_first(),
            **({"stages": self.stages or self.model.n_stages} if self.family == "residue" else {}),
            "codebook_size": self.config.codebook_size,
            "bits_per_token": self.bits_per_token,
            "provenance": self.provenance,
        }

    def read_tokens(self, path: str) -> tuple[list[Tokens], dict]:
        """A token file this tokenizer can decode, in any format ``protoken encode`` writes:
        ``(tokens, meta)`` (:func:`protoken.token_files.load_tokens`, then
        :meth:`check_tokens`).

        Raises
        ------
        ValueError
            One line naming the file: not a valid token file, or not tokens of this tokenizer.
        """
        tokens, meta = load_tokens(path)
        self.check_tokens(tokens, meta, path)
        return tokens, meta

    def check_tokens(self, tokens: Sequence[Tokens], meta: dict, path: str = "tokens") -> None:
        """Refuse tokens of the other family, of another codebook size, or whose codes this
        model cannot decode (more stages than it has, codes outside its codebook when the file
        does not record one: FASTA).

        Raises
        ------
        ValueError
            One line naming ``path``.
        """
        size = self.config.codebook_size
        if meta["family"] != self.family:
            raise ValueError(f"{path} holds {meta['family']} tokens; this tokenizer decodes "
                             f"{self.family} tokens")  # fmt: skip
        if meta.get("codebook_size") not in (None, size):
            raise ValueError(f"{path} has codebook size {meta['codebook_size']}, this "
                             f"tokenizer {size}")  # fmt: skip
        for t in tokens:
            try:
                self.model.batch_codes([t.levels], [t.length])
            except ValueError as exc:
                raise ValueError(f"{path}: {t.id}: {exc}") from None


# --------------------------------------------------------------------------- many proteins


@dataclass
class EncodeSummary:
    """What :func:`encode_to_file` did: proteins written, inputs skipped (``{"source",
    "reason"}`` each), and the mean tokens per residue of the proteins written."""

    written: int = 0
    skipped: list[dict] = field(default_factory=list)
    tokens_per_residue: float = 0.0


def encode_to_file(tok: Tokenizer, sources: Iterable, out: str, format: str = "npz",
                   chains: str = "skip-multi", models: str = "skip-multi", min_len: int = 1,
                   max_len: int | None = None, progress: bool = False,
                   log: Callable[[str], None] | None = None) -> EncodeSummary:  # fmt: skip
    """Encode ``sources`` (as :meth:`Tokenizer.encode_many`) into the token file ``out``.

    Streamed end to end: inputs are read as they come, each batch's tokens go straight to the
    writer (:func:`protoken.token_files.open_token_writer`, a temporary file given the name
    ``out`` when complete). What grows with the number of proteins is only the set of ids
    written (a repeated id is skipped: the file holds each id once) and the skipped inputs,
    which are each told to ``log`` (default: stderr) and, when anything was written to a
    file, recorded in ``out.skipped.tsv``. With nothing to write, no file is made (``written``
    is 0). ``out`` ``-`` (or ``/dev/stdout``) writes FASTA to standard output.

    Raises
    ------
    FileExistsError
        ``out`` exists (it is never overwritten).
    FileNotFoundError
        An input does not exist (nothing is written).
    """
    from tqdm import tqdm

    from protoken.fileio import write_tsv

    summary = EncodeSummary()
    bar = tqdm(sources, desc="encode", unit="file", disable=not progress, file=sys.stderr)
    say = log or (lambda msg: tqdm.write(msg, file=sys.stderr))

    def skip(source, exc) -> None:
        summary.skipped.append({"source": str(source), "reason": " ".join(str(exc).split())})
        say(f"protoken encode: skipped {source}: {exc}")

    seen: set[str] = set()
    tokens_per_residue = 0.0
    writer = open_token_writer(out, tok.meta(), format)
    try:
        for t in tok.encode_many(bar, chains, models, min_len, max_len, on_error=skip):
            if t.id in seen:
                skip(t.id, "duplicate id: a protein of this id is already in the file "
                     "(the first one is kept)")  # fmt: skip
                continue
            seen.add(t.id)
            writer.add(t)
            tokens_per_residue += t.n_tokens / t.length
        summary.written = writer.count
        if writer.count:
            writer.close()
        else:
            writer.abort()
    except BaseException:
        writer.abort()
        raise
    finally:
        bar.close()
    if summary.skipped and summary.written and out not in STDOUT:
        write_tsv(out + ".skipped.tsv", ("source", "reason"), summary.skipped)
    summary.tokens_per_residue = tokens_per_residue / max(summary.written, 1)
    return summary


def decode_to_files(tok: Tokenizer, tokens: Sequence[Tokens], out: str, fmt: str = "pdb",
                    backbone: bool = False, progress: bool = False) -> None:  # fmt: skip
    """Decode each protein to ``out/ID.png`` (its image, 16-bit) and ``out/ID.FMT`` (its 3D
    structure, Cb only or the full backbone), every file written atomically.

    Raises
    ------
    protoken.inputs.UnsafePath
        An id that is no safe id (checked for every protein before anything is written).
    """
    from tqdm import tqdm

    from protoken.codec import write_png
    from protoken.fileio import atomic_write
    from protoken.inputs import safe_output_path
    from protoken.reconstruct import reconstruct

    paths = [(safe_output_path(out, t.id, ".png"), safe_output_path(out, t.id, f".{fmt}"))
             for t in tokens]  # fmt: skip
    for t, (png, structure) in tqdm(zip(tokens, paths, strict=True), total=len(tokens),
                                    desc="decode", unit="protein", disable=not progress,
                                    file=sys.stderr):  # fmt: skip
        if tok.decodes_coordinates:  # the decoder's own backbone, not the image's
            rec = tok.decode_structure(t, via="decoder")
            image = tok.image_of(rec)
        else:
            image = tok.decode(t)
            rec = reconstruct(image, dmax=tok.codec.dmax, backbone=backbone)
        write_png(png, image, bit_depth=16)
        text = structure_to_text(rec.output_atoms, t.sequence or None, fmt=fmt,
                                 chains=t.chains or None, res_ids=t.res_ids or None)  # fmt: skip
        atomic_write(structure, text)
