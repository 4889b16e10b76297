"""The per-residue tokenizer: a 6D image in, K codes per residue (a rate knob), a backbone out.

::

    image (B, 3, L, L), chain index (B, L)
      -> each residue's 16 nearest residues by Cb distance (row i of the image): RBF(d),
         sin/cos of omega, theta_ij, phi_ij, theta_ji, phi_ji, relative position
         -> attention pooling                                       (B, L, d_model)
      -> 1D transformer over residues                               (B, L, d_model)
      -> residual FSQ (vector-quantize-pytorch): K stages, stage k of residue i is token (i, k)
                                                                    (B, L, K) int64
      -> 1D transformer over the summed code vectors of the first k stages
      -> pair representation z_ij (outer product of residues, relative position)
         -> binned d / omega / theta / phi (trRosetta's 37 / 25 / 25 / 13 bins), cross-entropy
         -> attention biased by z_ij (the decoder's last blocks)
      -> a frame per residue -> N, CA, C (and O, Cb)                 (B, L, 3) each
      -> the 6D image of that backbone, in torch                     (B, 3, L, L)

The encoder reads a residue's neighbourhood, as ESM3's structure encoder does, rather than a
pooled whole row: a token then describes the same local geometry whether the chain has 60 or
1000 residues, and training on crops carries over to whole chains. Position enters as a
relative-position bias of the attention (T5-style buckets: exact within 16 residues, then
log-spaced to 128, plus one bucket for "another chain"), so chains of a complex are known as
chains, never as a sequence distance.

Rate: residual FSQ quantises what earlier stages left (each stage 4096 codes, 12 bits), and
training drops the later stages at random (``quantize_dropout``, as SoundStream and EnCodec do),
so one model decodes from the first 1, 2, 3 or 4 stages: 12 to 48 bits per residue.

The decoder predicts coordinates and derives the image with the 6D formulas
(:mod:`protoken.model.geometry_torch`): its images are those of a real backbone by construction.
Its losses: the geometric loss of :mod:`protoken.model.losses` on that image (distances,
angles, and a frame-aligned term that fixes the handedness), plus cross-entropy of the pair
heads against the binned true image (ESM3's distogram and direction heads; the image holds
their exact targets).

A configuration without the fields of this design (checkpoints written before it) builds the
first per-residue design exactly (pooled rows, rotary positions, one FSQ stage, no pair
representation): see :data:`V1_FIELDS`; its weights load and give the same tokens.

Padding: attention ignores padded residues, neighbours are valid residues only, and every other
operation is per residue or per pair, so a protein's codes do not depend on its batch.

One module of ~920 lines on purpose: config and model read together, as nanoGPT's model.py
(encoders, residual FSQ, decoder, frame head and the first design's compatibility fields).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from rotary_embedding_torch import RotaryEmbedding, apply_rotary_emb
from torch import Tensor, nn

from protoken.model import geometry_torch as gt
from protoken.model.contract import ModelOutput
from protoken.model.losses import LossConfig, reconstruction_loss, unpack_image
from protoken.model.quantize import code_statistics

__all__ = [
    "PAIR_BINS",
    "RESIDUE_PRESETS",
    "V1_FIELDS",
    "ResidueConfig",
    "ResidueVQVAE",
    "chain_layout",
    "relpos_buckets",
]

# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class ResidueConfig:
    """Hyper-parameters of :class:`ResidueVQVAE`.

    Parameters
    ----------
    d_model, n_head, mlp_ratio : int
        Width of the residue transformers, attention heads, MLP hidden width / d_model.
    n_layer_encoder, n_layer_decoder : int
        Transformer blocks of the encoder and of the decoder (the decoder's last
        ``n_pair_blocks`` of them are biased by the pair representation).
    encoder : {"knn", "row", "both"}
        Residue features from the ``knn`` nearest residues, pooled over the whole row (the first
        design), or both summed (local geometry and the residue's view of the whole chain).
    knn : int
        Neighbours per residue of the ``knn`` encoder.
    pair_dim : int
        Width of the encoder's pair features.
    n_rbf : int
        Radial basis functions of the distance (centres 2 .. 22 A).
    position : {"relpos", "rope"}
        Relative-position attention bias with a bucket for "another chain" (this design), or
        rotary features (the first design: ``rope_dim`` per head; one chain only).
    rope_dim : int
        Rotary features per head of ``position="rope"``.
    max_relpos : int
        Separations clipped to this in the ``row`` encoder's position embedding.
    fsq_levels : tuple of int
        FSQ levels of each stage; the codes per stage are their product.
    n_stages : int
        Residual FSQ stages (tokens per residue at the full rate).
    first_stage_weight : float
        Share of the proteins that training decodes from the first stage alone (the others
        from 2..K stages, uniformly).
    pair_dim_decoder : int
        Width of the decoder's pair representation; 0 for none.
    n_pair_blocks : int
        Decoder blocks (the last ones) whose attention is biased by the pair representation.
    pair_loss_weight : float
        Weight of the pair heads' cross-entropy (summed over the four heads, per pair).
    pair_loss_fraction : float
        Fraction of the pairs (drawn at random) whose cross-entropy training computes.
    loss : LossConfig
        The geometric loss's settings (``dmax`` is the codec's).
    encoder_chains : bool
        Whether the encoder sees a complex's chain layout (relative positions within each
        chain and the "another chain" bucket) or reads the complex as one chain, the layout
        left to the decoder (False). The image alone shows where chains meet; the decoder
        always knows the chains.
    """

    in_channels: int = 3
    d_model: int = 128
    n_head: int = 4
    mlp_ratio: int = 4
    n_layer_encoder: int = 2
    n_layer_decoder: int = 6
    encoder: str = "both"
    knn: int = 16
    pair_dim: int = 32
    n_rbf: int = 16
    position: str = "relpos"
    rope_dim: int = 16
    max_relpos: int = 32
    fsq_levels: tuple[int, ...] = (8, 8, 8, 8)
    n_stages: int = 4
    first_stage_weight: float = 0.5
    pair_dim_decoder: int = 0
    n_pair_blocks: int = 0
    pair_loss_weight: float = 0.0
    pair_loss_fraction: float = 0.25
    loss: LossConfig = dataclasses.field(default_factory=lambda: LossConfig(kind="geometric"))
    encoder_chains: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "fsq_levels", tuple(int(v) for v in self.fsq_levels))
        if isinstance(self.loss, dict):
            object.__setattr__(self, "loss", LossConfig(**self.loss))
        if self.encoder not in ("knn", "row", "both"):
            raise ValueError(f"encoder must be 'knn', 'row' or 'both', got {self.encoder!r}")
        if self.position not in ("relpos", "rope"):
            raise ValueError(f"position must be 'relpos' or 'rope', got {self.position!r}")
        if self.d_model % self.n_head:
            raise ValueError("d_model must be divisible by n_head")
        if self.position == "rope" and (
            self.rope_dim % 4 or not 0 < self.rope_dim <= self.d_model // self.n_head
        ):
            raise ValueError("rope_dim must be a multiple of 4 and at most d_model // n_head")
        if not self.fsq_levels or any(v < 2 for v in self.fsq_levels):
            raise ValueError(f"fsq_levels must be integers >= 2, got {self.fsq_levels}")
        if self.n_stages < 1:
            raise ValueError(f"n_stages must be >= 1, got {self.n_stages}")
        if not 0 <= self.n_pair_blocks <= self.n_layer_decoder:
            raise ValueError("n_pair_blocks must be between 0 and n_layer_decoder")
        if self.n_pair_blocks and not self.pair_dim_decoder:
            raise ValueError("n_pair_blocks needs a pair representation (pair_dim_decoder > 0)")
        if self.pair_loss_weight and not self.pair_dim_decoder:
            raise ValueError("pair_loss_weight needs a pair representation (pair_dim_decoder)")

    @property
    def dmax(self) -> float:
        return self.loss.dmax

    @property
    def codebook_size(self) -> int:
        """Codes of one stage."""
        return math.prod(self.fsq_levels)

    @property
    def bits_per_token(self) -> float:
        return math.log2(self.codebook_size)

    @property
    def downsample_factor(self) -> int:
        """Image sides need no padding multiple: tokens are per residue."""
        return 1

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["fsq_levels"] = list(self.fsq_levels)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ResidueConfig:
        """Inverse of :meth:`to_dict`; also reads the first design's configs (flat loss fields,
        none of this design's fields: :data:`V1_FIELDS`)."""
        d = dict(d)
        if "encoder" not in d:  # written before this design
            d = {**V1_FIELDS, **d}
        d["loss"] = LossConfig(kind="geometric").with_overrides(d)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown ResidueConfig fields: {sorted(unknown)}")
        return cls(**d)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> ResidueConfig:
        if name not in RESIDUE_PRESETS:
            raise KeyError(f"unknown preset {name!r}; choose from {sorted(RESIDUE_PRESETS)}")
        base = RESIDUE_PRESETS[name]
        overrides["loss"] = base.loss.with_overrides(overrides)
        return dataclasses.replace(base, **overrides)


#: The first per-residue design (checkpoints written before ``encoder`` existed).
V1_FIELDS: dict[str, Any] = {
    "encoder": "row",
    "position": "rope",
    "n_stages": 1,
    "pair_dim_decoder": 0,
    "n_pair_blocks": 0,
    "pair_loss_weight": 0.0,
}

#: ``residue-tiny`` (tests), ``residue-small`` (the bundled ``residue`` model), ``residue-base``.
RESIDUE_PRESETS: dict[str, ResidueConfig] = {
    "residue-tiny": ResidueConfig(
        d_model=32,
        n_head=2,
        n_layer_encoder=1,
        n_layer_decoder=2,
        n_pair_blocks=1,
        pair_dim=8,
        n_rbf=8,
        knn=8,
        pair_dim_decoder=8,
        n_stages=2,
    ),  # fmt: skip
    "residue-small": ResidueConfig(),
    "residue-base": ResidueConfig(
        d_model=256,
        n_head=8,
        n_layer_encoder=4,
        n_layer_decoder=12,
        n_pair_blocks=4,
        pair_dim=64,
        pair_dim_decoder=64,
    ),  # fmt: skip
}

# --------------------------------------------------------------------------- positions


def chain_layout(chains: Tensor | None, rmask: Tensor) -> tuple[Tensor, Tensor]:
    """Each residue's index within its chain and the same-chain matrix.

    Parameters
    ----------
    chains : Tensor or None
        ``(B, L)`` chain index of each residue (chains contiguous, in order); None: one chain.
    rmask : Tensor
        ``(B, L)`` bool, valid residues.

    Returns
    -------
    pos : Tensor
        ``(B, L)`` int64, 0 at each chain's first residue.
    same : Tensor
        ``(B, L, L)`` bool, residues i and j in one chain. Both have a batch dimension of 1
        when ``chains`` is None (the same for every protein).
    """
    B, L = rmask.shape
    idx = torch.arange(L, device=rmask.device).expand(B, L)
    if chains is None:  # broadcast over the batch
        return idx[:1], torch.ones(1, L, L, dtype=torch.bool, device=rmask.device)
    chains = chains.to(rmask.device).long()
    start = torch.ones_like(rmask)
    start[:, 1:] = chains[:, 1:] != chains[:, :-1]
    first = torch.where(start, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - first, chains[:, :, None] == chains[:, None, :]


_N_EXACT, _N_LOG, _MAX_DIST = 16, 8, 128
_HALF = _N_EXACT + _N_LOG - 1
#: Relative-position buckets: signed separations (exact below 16, log-spaced to 128), then
#: "another chain".
N_BUCKETS = 2 * _HALF + 2


def relpos_buckets(pos: Tensor, same: Tensor) -> Tensor:
    """``(B, L, L)`` bucket of residue pair (i, j): the separation ``pos_j - pos_i`` within a
    chain (exact up to 15, then 8 log-spaced buckets to 128 and beyond), and one bucket,
    ``N_BUCKETS - 1``, for residues of different chains."""
    rel = pos[:, None, :] - pos[:, :, None]
    a = rel.abs()
    logb = _N_EXACT + (
        torch.log(a.clamp(min=_N_EXACT).float() / _N_EXACT)
        / math.log(_MAX_DIST / _N_EXACT)
        * _N_LOG
    ).long().clamp(max=_N_LOG - 1)
    mag = torch.where(a < _N_EXACT, a, logb)
    signed = torch.where(rel < 0, -mag, mag) + _HALF
    return torch.where(same, signed, torch.full_like(signed, N_BUCKETS - 1))


# --------------------------------------------------------------------------- blocks


class Attention(nn.Module):
    """Multi-head self-attention over residues ``(B, L, C)``, with an additive bias
    ``(B, n_head, L, L)`` and/or rotary features (``rope_dim`` per head, from ``rope_start``)."""

    def __init__(self, d_model: int, n_head: int, rope_dim: int = 0, rope_start: int = 0):
        super().__init__()
        self.n_head, self.rope_start = n_head, rope_start
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.proj = nn.Linear(d_model, d_model)
        self.rotary = RotaryEmbedding(dim=rope_dim) if rope_dim else None

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        q, k, v = rearrange(self.qkv(x), "b l (three h d) -> three b h l d", three=3, h=self.n_head)
        if self.rotary is not None:
            freqs = self.rotary(torch.arange(x.shape[1], device=x.device))
            q = apply_rotary_emb(freqs, q, start_index=self.rope_start)
            k = apply_rotary_emb(freqs, k, start_index=self.rope_start)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))
        return self.proj(rearrange(y, "b h l d -> b l (h d)"))


class MLP(nn.Module):
    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.fc = nn.Linear(d_model, hidden)
        self.proj = nn.Linear(hidden, d_model)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(F.gelu(self.fc(x)))


class SequenceBlock(nn.Module):
    """Pre-LayerNorm transformer block over residues: ``x + attn(ln(x))``, ``x + mlp(ln(x))``;
    with ``pair_dim`` the attention is also biased by a linear map of a pair representation."""

    def __init__(self, c: ResidueConfig, pair_dim: int = 0) -> None:
        super().__init__()
        rope = c.rope_dim // 2 if c.position == "rope" else 0  # the first design's layout
        self.ln_1 = nn.LayerNorm(c.d_model)
        self.attn = Attention(c.d_model, c.n_head, rope, rope_start=rope)
        self.ln_2 = nn.LayerNorm(c.d_model)
        self.mlp = MLP(c.d_model, c.d_model * c.mlp_ratio)
        self.pair_bias = nn.Linear(pair_dim, c.n_head, bias=False) if pair_dim else None

    def forward(self, x: Tensor, bias: Tensor, pair: Tensor | None = None) -> Tensor:
        if self.pair_bias is not None:
            bias = bias + rearrange(self.pair_bias(pair), "b i j h -> b h i j")
        x = x + self.attn(self.ln_1(x), bias)
        return x + self.mlp(self.ln_2(x))


class SequenceStack(nn.Module):
    """Blocks over ``(B, L, d_model)`` residues and a final LayerNorm; the last
    ``n_pair_blocks`` read the pair representation. Output projections start as nanoGPT's,
    N(0, 0.02 / sqrt(2 n_layer)), so each block starts near the identity."""

    def __init__(self, c: ResidueConfig, n_layer: int, n_pair_blocks: int = 0) -> None:
        super().__init__()
        first_pair = n_layer - n_pair_blocks
        self.blocks = nn.ModuleList(
            SequenceBlock(c, c.pair_dim_decoder if i >= first_pair else 0) for i in range(n_layer)
        )
        self.ln_f = nn.LayerNorm(c.d_model)
        self.relpos = nn.Embedding(N_BUCKETS, c.n_head) if c.position == "relpos" else None
        if self.relpos is not None:
            nn.init.zeros_(self.relpos.weight)
        std = 0.02 / math.sqrt(2 * max(n_layer, 1))
        for block in self.blocks:
            for proj in (block.attn.proj, block.mlp.proj):
                nn.init.normal_(proj.weight, std=std)
                nn.init.zeros_(proj.bias)

    def forward(self, x: Tensor, rmask: Tensor, buckets: Tensor, pair: Tensor | None = None):
        bias = torch.zeros(rmask.shape[0], 1, 1, rmask.shape[1], device=x.device)
        bias = bias.masked_fill(~rmask[:, None, None, :], float("-inf"))
        if self.relpos is not None:
            bias = bias + rearrange(self.relpos(buckets), "b i j h -> b h i j")
        for block in self.blocks:
            x = block(x, bias, pair)
        return self.ln_f(x) * rmask[..., None]


# --------------------------------------------------------------------------- encoder


def _pair_features(d, omega, theta, phi, theta_t, phi_t, centres: Tensor, dmax: float) -> Tensor:
    """RBF(d), d / dmax, sin and cos of omega, theta_ij, phi_ij, theta_ji, phi_ji (any leading
    shape; the ``_t`` angles are those of the pair (j, i), given already in place)."""
    width = (centres[1] - centres[0]) if len(centres) > 1 else 2.0
    rbf = torch.exp(-(((d[..., None] - centres) / width) ** 2))
    angles = torch.stack([omega, theta, phi, theta_t, phi_t], -1)
    return torch.cat([rbf, (d / dmax)[..., None], angles.sin(), angles.cos()], -1)


class NeighbourEncoder(nn.Module):
    """Image -> residue vectors from each residue's ``knn`` nearest residues by Cb distance:
    pair features + relative position, pooled by attention (``n_head`` heads) and a mean."""

    def __init__(self, c: ResidueConfig) -> None:
        super().__init__()
        self.dmax, self.k, self.n_head = c.dmax, c.knn, c.n_head
        self.register_buffer("centres", torch.linspace(2.0, 22.0, c.n_rbf), persistent=False)
        self.pair = nn.Sequential(
            nn.Linear(c.n_rbf + 11, c.pair_dim), nn.GELU(), nn.Linear(c.pair_dim, c.pair_dim)
        )
        self.relpos = nn.Embedding(N_BUCKETS, c.pair_dim)
        self.score = nn.Linear(c.pair_dim, c.n_head)
        self.out = nn.Sequential(nn.LayerNorm(2 * c.pair_dim), nn.Linear(2 * c.pair_dim, c.d_model))

    def forward(self, x: Tensor, mask: Tensor, buckets: Tensor) -> Tensor:
        d, omega, theta, phi = unpack_image(x.float(), self.dmax)
        L = d.shape[-1]
        eye = torch.eye(L, dtype=torch.bool, device=d.device)
        far = d.double().masked_fill(~mask | eye, math.inf)
        # images quantise distances (8-bit: steps of 0.31 A), so ties are common: broken by
        # the residue index (1e-9 A per index, far below any step), never by the padding
        far = far + torch.arange(L, device=d.device, dtype=torch.float64) * 1e-9
        k = min(self.k, max(L - 1, 1))
        dk, nb = far.topk(k, dim=-1, largest=False)  # (B, L, k)
        valid = torch.isfinite(dk)

        def take(t: Tensor) -> Tensor:
            return t.gather(-1, nb)

        def take_t(t: Tensor) -> Tensor:  # t_ji for the neighbours j of i
            return t.transpose(-1, -2).gather(-1, nb)

        feats = _pair_features(
            take(d), take(omega), take(theta), take(phi), take_t(theta), take_t(phi),
            self.centres, self.dmax,
        )  # fmt: skip
        nb_buckets = buckets.expand(nb.shape[0], -1, -1).gather(-1, nb)
        h = self.pair(feats) + self.relpos(nb_buckets)  # (B, L, k, P)
        w = valid[..., None].to(h.dtype)
        mean = (h * w).sum(2) / w.sum(2).clamp(min=1)
        s = self.score(h).masked_fill(~valid[..., None], -1e4).softmax(dim=2)  # (B, L, k, H)
        hv = rearrange(h, "b l k (h p) -> b l k h p", h=self.n_head)
        pooled = torch.einsum("blkh,blkhp->blhp", s * w, hv).flatten(2)
        return self.out(torch.cat([pooled, mean], -1))


class RowEncoder(nn.Module):
    """Pair features of every pair of row i, masked mean and max: the first design's encoder
    (relative positions clipped at ``max_relpos``, one chain), and the global half of
    ``encoder="both"`` (relative-position buckets that know chains)."""

    def __init__(self, c: ResidueConfig) -> None:
        super().__init__()
        self.dmax = c.dmax
        self.register_buffer("centres", torch.linspace(2.0, 22.0, c.n_rbf), persistent=False)
        self.pair = nn.Sequential(
            nn.Linear(c.n_rbf + 11, c.pair_dim), nn.GELU(), nn.Linear(c.pair_dim, c.pair_dim)
        )
        self.max_relpos = c.max_relpos
        self.buckets = c.position == "relpos"
        n_rel = N_BUCKETS if self.buckets else 2 * c.max_relpos + 1
        self.relpos = nn.Embedding(n_rel, c.pair_dim)
        self.out = nn.Sequential(nn.LayerNorm(2 * c.pair_dim), nn.Linear(2 * c.pair_dim, c.d_model))

    #: Rows of the image whose pair features are held at once without gradients (encoding):
    #: memory O(chunk x L) instead of O(L^2) per protein, the same result.
    chunk = 128

    def forward(self, x: Tensor, mask: Tensor, buckets: Tensor) -> Tensor:
        d, omega, theta, phi = unpack_image(x.float(), self.dmax)
        th_t, ph_t = theta.transpose(-1, -2), phi.transpose(-1, -2)
        L = x.shape[-1]
        if self.buckets:
            rel = buckets
        else:
            pos = torch.arange(L, device=x.device)
            rel = (pos[None, :] - pos[:, None]).clamp(-self.max_relpos, self.max_relpos)
            rel = (rel + self.max_relpos)[None]  # (1, L, L) as the buckets
        pm = mask & ~torch.eye(L, dtype=torch.bool, device=x.device)
        step = L if torch.is_grad_enabled() else self.chunk
        pooled = []
        for i in range(0, L, step):
            rows = slice(i, i + step)
            angles = (t[:, rows] for t in (omega, theta, phi, th_t, ph_t))
            feats = _pair_features(d[:, rows], *angles, self.centres, self.dmax)
            h = self.pair(feats) + self.relpos(rel[:, rows])  # (B, rows, L, P)
            m = pm[:, rows]
            w = m[..., None].to(h.dtype)
            mean = (h * w).sum(2) / w.sum(2).clamp(min=1)
            mx = h.masked_fill(~m[..., None], -1e4).amax(2)
            mx = torch.where(m.any(2)[..., None], mx, torch.zeros_like(mx))
            pooled.append(torch.cat([mean, mx], -1))
        return self.out(torch.cat(pooled, 1))


# --------------------------------------------------------------------------- quantiser


class StageFSQ(nn.Module):
    """Residual FSQ of ``len(levels)``-dim vectors in ``n_stages`` stages, with
    vector-quantize-pytorch's quantisers (the stages of
    :class:`~vector_quantize_pytorch.ResidualFSQ`, or one
    :class:`~vector_quantize_pytorch.FSQ` for the first design's single stage).

    Training keeps the first k stages of each protein and drops the rest, k drawn per protein:
    1 with probability ``first_stage_weight`` (the 12-bit rate, the one language models use,
    gets that share of the training), else uniformly from 2..K; so decoding from the first k
    stages works at every k. (The library's own quantize dropout draws one k per batch,
    uniformly: measured slower to train the first stage.)"""

    def __init__(self, levels: tuple[int, ...], n_stages: int, single: bool,
                 first_stage_weight: float = 0.5) -> None:  # fmt: skip
        super().__init__()
        from vector_quantize_pytorch import FSQ, ResidualFSQ

        self.n_stages, self.size, self.single = n_stages, math.prod(levels), single
        self.first_stage_weight = first_stage_weight
        if single:
            self.fsq = FSQ(levels=list(levels))
        else:
            self.rfsq = ResidualFSQ(
                levels=list(levels), num_quantizers=n_stages, quantize_dropout=n_stages > 1
            )

    def _kept(self, batch: int, device) -> Tensor:
        """``(B,)`` stages kept per protein in training."""
        if self.n_stages == 1:
            return torch.ones(batch, dtype=torch.long, device=device)
        first = torch.rand(batch, device=device) < self.first_stage_weight
        rest = torch.randint(2, self.n_stages + 1, (batch,), device=device)
        return torch.where(first, torch.ones_like(rest), rest)

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """``(B, L, D)`` -> quantised ``(B, L, D)``, codes ``(B, L, K)`` int64 (-1: a stage
        dropped in training)."""
        if self.single:
            q, idx = self.fsq(z)
            return q, idx.long()[..., None]
        rfsq = self.rfsq
        with torch.autocast(z.device.type, enabled=False):
            x = self.bound(z)
            residual, parts, codes = x, [], []
            for layer, scale in zip(rfsq.layers, rfsq.scales, strict=True):
                q_k, idx_k = layer(residual / scale)
                q_k = q_k * scale
                residual = residual - q_k.detach()
                parts.append(q_k)
                codes.append(idx_k.long())
            codes = torch.stack(codes, -1)
            if not self.training:
                return sum(parts), codes
            kept = self._kept(z.shape[0], z.device)
            keep = torch.arange(self.n_stages, device=z.device) < kept[:, None]  # (B, K)
            q = sum(p * keep[:, None, k, None] for k, p in enumerate(parts))
            return q, codes.masked_fill(~keep[:, None, :], -1)

    def bound(self, z: Tensor) -> Tensor:
        """Latents as the stages see them: fp32, soft-clamped as ResidualFSQ bounds its input."""
        x = z.float()
        clamp = None if self.single else self.rfsq.soft_clamp_input_value
        return x if clamp is None else (x / clamp).tanh() * clamp

    def mismatch(self, z: Tensor, codes: Tensor) -> Tensor:
        """How far latents ``z`` ``(B, L, D)`` are from quantising to ``codes`` ``(B, L, k)``
        (the first k stages), per residue ``(B, L)``, differentiable in ``z``.

        Stage s quantises what the token's earlier stages left, ``x - sum_{t<s} q_t``, scaled
        by its scale; its value before rounding (:func:`_soft_bound`) must fall in the cell of
        the token's code. Stages before the last add their squared distance from that cell (0
        inside: any point there gives the code), the last its squared distance from the
        cell's centre (the best guess inside it); in the units of ``z``. What decoding by
        inversion (:mod:`protoken.model.inversion`) minimises."""
        layers = [self.fsq] if self.single else list(self.rfsq.layers)
        scales = [1.0] * len(layers) if self.single else list(self.rfsq.scales)
        k = codes.shape[-1]
        if not 1 <= k <= len(layers):
            raise ValueError(f"expected 1 to {len(layers)} stages of codes, got {k}")
        residual, total = self.bound(z), z.new_zeros(z.shape[:-1], dtype=torch.float32)
        for s in range(k):
            layer, scale = layers[s], scales[s]
            code = layer.indices_to_codes(codes[..., s].clamp(0, self.size - 1)).float()
            u, half, top = _soft_bound(layer, residual / scale)
            err = u - code
            if s < k - 1:  # 0 inside the cell
                err = err.sign() * (err.abs() - half).clamp(min=0)
            # the outermost cells reach to infinity
            past = ((code >= top - 1e-6) & (err > 0)) | ((code <= -1 + 1e-6) & (err < 0))
            err = err.masked_fill(past, 0.0)
            total = total + ((err * scale) ** 2).sum(-1)
            residual = residual - code * scale
        return total

    def lookup(self, codes: Tensor) -> Tensor:
        """Codes ``(B, L, k)``, ``1 <= k <= n_stages`` (-1: no code) -> summed code vectors."""
        if codes.shape[-1] < 1 or codes.shape[-1] > self.n_stages:
            raise ValueError(
                f"expected 1 to {self.n_stages} stages of codes, got {codes.shape[-1]}"
            )
        if self.single:
            return self.fsq.indices_to_codes(codes[..., 0].clamp(0, self.size - 1))
        codes = codes.clamp(-1, self.size - 1)
        pad = self.n_stages - codes.shape[-1]
        if pad:
            codes = F.pad(codes, (0, pad), value=-1)
        parts = self.rfsq.get_codes_from_indices(codes)  # (K, B, L, D), zero where -1
        return parts.sum(0)


def _soft_bound(layer, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """An FSQ layer's value of ``z`` before rounding, in code units, the half width of its
    cells and its largest code value (the smallest is -1): vector-quantize-pytorch's ``bound``
    (tanh, its eps and the offset of even levels) or, with ``preserve_symmetry``, its
    symmetric bound (tanh or a hard clamp, whose soft value is ``z`` itself) without their
    rounding; the test checks that the library's codes lie in these cells."""
    levels = layer._levels.to(z.device)
    z = z.float()
    if getattr(layer, "preserve_symmetry", False):
        u = z if layer.bound_hard_clamp else z.tanh()
        return u, 1.0 / (levels - 1), torch.ones_like(levels, dtype=torch.float32)
    if getattr(layer, "bound_hard_clamp", False):
        raise NotImplementedError("FSQ with a hard clamp and no preserve_symmetry")
    half_l = (levels - 1) * (1 + 1e-3) / 2
    offset = torch.where(levels % 2 == 0, 0.5, 0.0)
    shift = torch.atanh(offset / half_l)
    half_width = levels // 2
    u = ((z + shift).tanh() * half_l - offset) / half_width
    return u, 0.5 / half_width, (levels - 1 - half_width) / half_width


# --------------------------------------------------------------------------- decoder heads

#: trRosetta's bins of the 6D features: d in 36 bins of 0.5 A over 2-20 A plus "beyond 20 A",
#: omega and theta in 24 bins of 15 degrees, phi in 12, each plus "no contact" (bin 0).
PAIR_BINS = {"d": 37, "omega": 25, "theta": 25, "phi": 13}
_CONTACT = 20.0


def binned_targets(d: Tensor, omega: Tensor, theta: Tensor, phi: Tensor) -> dict[str, Tensor]:
    """trRosetta's class of each pair's d, omega, theta, phi (bin 0: d >= 20 A)."""
    far = d >= _CONTACT
    db = ((d - 2.0) / 0.5).floor().long().clamp(0, 35) + 1
    ob = ((omega + math.pi) / (2 * math.pi) * 24).floor().long().clamp(0, 23) + 1
    tb = ((theta + math.pi) / (2 * math.pi) * 24).floor().long().clamp(0, 23) + 1
    pb = (phi / math.pi * 12).floor().long().clamp(0, 11) + 1
    zero = torch.zeros_like(db)
    return {
        "d": torch.where(far, zero, db),
        "omega": torch.where(far, zero, ob),
        "theta": torch.where(far, zero, tb),
        "phi": torch.where(far, zero, pb),
    }


class PairRepresentation(nn.Module):
    """Residues ``(B, L, C)`` -> pairs ``(B, L, L, P)``: ``W (a_i * b_j) + u_i + v_j`` plus an
    embedding of the relative-position bucket (an outer product of the residues, kept to one
    matrix product per pair: on a CPU every pair-wise layer costs as much as the transformer)."""

    def __init__(self, c: ResidueConfig) -> None:
        super().__init__()
        p = c.pair_dim_decoder
        self.ln = nn.LayerNorm(c.d_model)
        self.abuv = nn.Linear(c.d_model, 4 * p)
        self.prod = nn.Linear(p, p)
        self.relpos = nn.Embedding(N_BUCKETS, p)

    def forward(self, h: Tensor, buckets: Tensor) -> Tensor:
        a, b, u, v = self.abuv(self.ln(h)).chunk(4, -1)
        z = self.prod(a[:, :, None] * b[:, None]) + u[:, :, None] + v[:, None]
        return z + self.relpos(buckets)


class PairHeads(nn.Module):
    """Pair representation -> logits of the binned d and omega (from ``z_ij + z_ji``: both
    symmetric), theta and phi (from ``z_ij``)."""

    def __init__(self, c: ResidueConfig) -> None:
        super().__init__()
        p = c.pair_dim_decoder
        self.sym = nn.Sequential(nn.LayerNorm(p), nn.Linear(p, PAIR_BINS["d"] + PAIR_BINS["omega"]))
        self.asym = nn.Sequential(
            nn.LayerNorm(p), nn.Linear(p, PAIR_BINS["theta"] + PAIR_BINS["phi"])
        )

    def forward(self, z: Tensor, pm: Tensor) -> dict[str, Tensor]:
        """Logits ``(N, bins)`` of the N pairs where ``pm`` ``(B, L, L)`` holds, in the order of
        ``pm.nonzero()``."""
        b, i, j = pm.nonzero(as_tuple=True)
        zij = z[b, i, j]
        d, omega = self.sym(zij + z[b, j, i]).split([PAIR_BINS["d"], PAIR_BINS["omega"]], -1)
        theta, phi = self.asym(zij).split([PAIR_BINS["theta"], PAIR_BINS["phi"]], -1)
        return {"d": d, "omega": omega, "theta": theta, "phi": phi}


def pair_cross_entropy(
    heads: PairHeads, z: Tensor, target: Tensor, pm: Tensor, dmax: float, fraction: float
) -> Tensor:
    """Cross-entropy of the four pair heads against the binned true image, summed over valid
    pairs: in training over a random ``fraction`` of them, scaled by ``1 / fraction`` (an
    unbiased estimate of the sum at a fraction of the cost)."""
    with torch.no_grad():
        if fraction < 1.0:
            pm = pm & (torch.rand(pm.shape, device=pm.device) < fraction)
        bins = binned_targets(*unpack_image(target.float(), dmax))
    logits = heads(z, pm)
    total = target.new_zeros((), dtype=torch.float32)
    for name, lg in logits.items():
        total = total + F.cross_entropy(lg.float(), bins[name][pm], reduction="sum")
    return total / fraction


class FrameHead(nn.Module):
    """Residue vectors ``(B, L, d_model)`` -> a frame each (rotation by Gram-Schmidt of two
    predicted vectors, translation in units of 10 A) -> ideal N, CA, C ``(B, L, 3)``."""

    def __init__(self, c: ResidueConfig) -> None:
        super().__init__()
        self.proj = nn.Linear(c.d_model, 9)

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self.atoms(self.proj(h.float()))

    @staticmethod
    def atoms(p: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Frame parameters ``(B, L, 9)`` (translation / 10 A, two rotation vectors) -> ideal
        N, CA, C."""
        e1 = torch.tensor([1.0, 0.0, 0.0], device=p.device)
        e2 = torch.tensor([0.0, 1.0, 0.0], device=p.device)
        rot = gt.rotation_from_6d(p[..., 3:6] + e1, p[..., 6:9] + e2)
        return gt.backbone_from_frames(rot, p[..., :3] * 10.0)


# --------------------------------------------------------------------------- model


class ResidueVQVAE(nn.Module):
    """Per-residue tokens of 6D images; see the module docstring.

    Parameters
    ----------
    config : ResidueConfig
    """

    def __init__(self, config: ResidueConfig) -> None:
        super().__init__()
        c = self.config = config
        self.pair_encoder = NeighbourEncoder(c) if c.encoder != "row" else RowEncoder(c)
        self.row_encoder = RowEncoder(c) if c.encoder == "both" else None
        self.encoder = SequenceStack(c, c.n_layer_encoder)
        self.pre_quant = nn.Linear(c.d_model, len(c.fsq_levels))
        single = c.encoder == "row" and c.position == "rope"  # the first design
        self.quantizer = StageFSQ(c.fsq_levels, c.n_stages, single, c.first_stage_weight)
        self.post_quant = nn.Linear(len(c.fsq_levels), c.d_model)
        self.decoder = SequenceStack(c, c.n_layer_decoder - c.n_pair_blocks)
        if c.pair_dim_decoder:
            self.pair = PairRepresentation(c)
            self.structure = SequenceStack(c, c.n_pair_blocks, c.n_pair_blocks)
            self.pair_heads = PairHeads(c) if c.pair_loss_weight else None
        self.head = FrameHead(c)

    # -- helpers -----------------------------------------------------------------------------

    @property
    def n_stages(self) -> int:
        return self.config.n_stages

    def loss_weight(self, mask: Tensor) -> int:
        """What ``loss_sum`` sums over for this ``(B, L, L)`` mask: valid pairs ``i != j``."""
        if mask.ndim == 4:
            mask = mask[:, 0]
        return int(mask.sum()) - int(mask.diagonal(dim1=-2, dim2=-1).sum())

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def _check(self, x: Tensor, mask: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] != self.config.in_channels or x.shape[-1] != x.shape[-2]:
            raise ValueError(f"x must be (B, {self.config.in_channels}, L, L), got {x.shape}")
        if mask.ndim == 4:
            mask = mask[:, 0]
        if mask.shape != (x.shape[0], *x.shape[-2:]):
            raise ValueError(f"mask must be (B, L, L) or (B, 1, L, L), got {mask.shape}")
        return mask.bool()

    def _latent(self, x: Tensor, mask: Tensor, buckets: Tensor) -> Tensor:
        rmask = mask.diagonal(dim1=-2, dim2=-1)
        h = self.pair_encoder(x * mask[:, None], mask, buckets)
        if self.row_encoder is not None:
            h = h + self.row_encoder(x * mask[:, None], mask, buckets)
        return self.pre_quant(self.encoder(h, rmask, buckets)).float()

    def _encode(self, x: Tensor, mask: Tensor, buckets: Tensor) -> tuple[Tensor, Tensor]:
        rmask = mask.diagonal(dim1=-2, dim2=-1)
        q, idx = self.quantizer(self._latent(x, mask, buckets))
        return q, idx.masked_fill(~rmask[..., None], -1)

    def _trunk(self, q: Tensor, rmask: Tensor, buckets: Tensor):
        """Code vectors -> residue vectors for the frame head, and the pair representation."""
        h = self.decoder(self.post_quant(q), rmask, buckets)
        if not self.config.pair_dim_decoder:
            return h, None
        z = self.pair(h, buckets)
        return self.structure(h, rmask, buckets, z), z

    def _image(self, h: Tensor, rmask: Tensor) -> Tensor:
        # coordinates and angles in fp32 even under bf16 autocast (acos / atan2 of nearly
        # parallel vectors lose everything in bf16)
        with torch.autocast(h.device.type, enabled=False):
            n, ca, c = self.head(h.float())
            image = gt.features_to_image(*gt.sixd(n, ca, c, self.config.dmax), self.config.dmax)
        pm = rmask[:, :, None] & rmask[:, None, :]
        return image * pm[:, None]

    def _layout(self, rmask: Tensor, chains: Tensor | None) -> Tensor:
        pos, same = chain_layout(chains, rmask)
        return relpos_buckets(pos, same)

    def _encoder_layout(
        self, rmask: Tensor, chains: Tensor | None, buckets: Tensor | None = None
    ) -> Tensor:
        """The encoder's relative positions: the chain layout's (``buckets`` when the caller
        has them already), or one chain's when the config says the encoder reads complexes as
        one chain (``encoder_chains=False``)."""
        if not self.config.encoder_chains:
            return self._layout(rmask, None)
        return self._layout(rmask, chains) if buckets is None else buckets

    # -- public API --------------------------------------------------------------------------

    def forward(self, x: Tensor, mask: Tensor, chains: Tensor | None = None) -> ModelOutput:
        """Encode, quantise, decode and compute the loss; ``x`` ``(B, 3, L, L)`` zero-padded,
        ``mask`` ``(B, L, L)`` bool, ``chains`` ``(B, L)`` chain index (None: one chain).
        ``metrics``: ``codebook_usage`` and ``perplexity`` per stage; ``aux_loss`` 0 (FSQ has
        no commitment loss); ``codes`` ``(B, L, K)``, -1 at padding and at the stages dropped
        in training."""
        mask = self._check(x, mask)
        rmask = mask.diagonal(dim1=-2, dim2=-1)
        buckets = self._layout(rmask, chains)
        q, idx = self._encode(x, mask, self._encoder_layout(rmask, chains, buckets))
        h, z = self._trunk(q, rmask, buckets)
        recon = self._image(h, rmask)
        loss_sum, weight = reconstruction_loss(recon, x, mask, self.config.loss, chains)
        if z is not None and self.config.pair_loss_weight:
            pm = mask & ~torch.eye(mask.shape[-1], dtype=torch.bool, device=mask.device)
            frac = self.config.pair_loss_fraction if self.training else 1.0
            ce = pair_cross_entropy(self.pair_heads, z, x, pm, self.config.dmax, frac)
            loss_sum = loss_sum + self.config.pair_loss_weight * ce
        with torch.no_grad():  # per stage; a stage dropped in this batch counts no code
            stats = [
                code_statistics(torch.bincount(idx[..., k][rmask & (idx[..., k] >= 0)],
                                               minlength=self.quantizer.size).float())
                for k in range(idx.shape[-1])
            ]  # fmt: skip
            metrics = {
                "codebook_usage": torch.stack([u for u, _ in stats]),
                "perplexity": torch.stack([p for _, p in stats]),
            }
        return ModelOutput(recon, loss_sum, weight, loss_sum.new_zeros(()), metrics, idx)

    @torch.no_grad()
    def encode(self, x: Tensor, mask: Tensor, chains: Tensor | None = None) -> Tensor:
        """Images ``(B, 3, L, L)`` and masks -> codes ``(B, L, K)`` int64, -1 at padding."""
        mask = self._check(x, mask)
        rmask = mask.diagonal(dim1=-2, dim2=-1)
        return self._encode(x, mask, self._encoder_layout(rmask, chains))[1]

    def latent(self, x: Tensor, mask: Tensor, chains: Tensor | None = None) -> Tensor:
        """Images and masks -> the encoder's latents ``(B, L, D)`` before quantisation
        (differentiable in ``x``; :meth:`StageFSQ.mismatch` compares them with codes)."""
        mask = self._check(x, mask)
        return self._latent(x, mask, self._encoder_layout(mask.diagonal(dim1=-2, dim2=-1), chains))

    def _lookup(self, codes: Tensor, lengths) -> tuple[Tensor, Tensor]:
        codes = torch.as_tensor(codes)
        if codes.ndim == 2:  # one stage
            codes = codes[..., None]
        if codes.ndim != 3:
            raise ValueError(f"expected (B, L, K) codes, got shape {tuple(codes.shape)}")
        device = self.post_quant.weight.device
        lengths = torch.as_tensor(lengths, device=device).long().reshape(-1)
        rmask = torch.arange(codes.shape[1], device=device)[None] < lengths[:, None]
        return self.quantizer.lookup(codes.to(device)), rmask

    def decode(self, codes: Tensor, lengths, chains: Tensor | None = None) -> Tensor:
        """Codes ``(B, L, k)`` of the first ``k`` stages (or ``(B, L)``: one stage; values past
        each length ignored) -> images ``(B, 3, L, L)``."""
        q, rmask = self._lookup(codes, lengths)
        buckets = self._layout(rmask, chains)
        return self._image(self._trunk(q, rmask, buckets)[0], rmask)

    def unbatch_codes(self, codes: Tensor, lengths) -> list[list[np.ndarray]]:
        """Batched codes ``(B, L, K)`` -> per protein ``[codes (L_i, K)]`` (int64)."""
        return [[codes[i, : int(n)].cpu().numpy().astype(np.int64)] for i, n in enumerate(lengths)]

    def batch_codes(self, per_protein: Sequence[Sequence[np.ndarray]], lengths) -> Tensor:
        """Per protein ``[codes (L_i, k)]`` (or ``(L_i,)``: one stage) -> ``(B, max L, k)``;
        ``1 <= k <= n_stages`` stages, the same for every protein."""
        ns = [int(n) for n in lengths]
        arrays = [np.asarray(p[0] if len(p) == 1 else p, dtype=np.int64) for p in per_protein]
        arrays = [a[:, None] if a.ndim == 1 else a for a in arrays]
        stages = {a.shape[-1] for a in arrays}
        if len(stages) > 1:
            raise ValueError(f"proteins with different numbers of stages: {sorted(stages)}")
        k = stages.pop() if stages else 1
        if not 1 <= k <= self.n_stages:
            raise ValueError(f"expected 1 to {self.n_stages} stages of codes, got {k}")
        out = torch.full((len(arrays), max(ns, default=0), k), -1, dtype=torch.long)
        for i, (a, n) in enumerate(zip(arrays, ns, strict=True)):
            if a.shape != (n, k):
                raise ValueError(f"expected {n} x {k} codes (one per residue and stage), got "
                                 f"shape {a.shape}")  # fmt: skip
            if n and (a.min() < 0 or a.max() >= self.quantizer.size):
                raise ValueError(f"codes outside 0..{self.quantizer.size - 1}")
            out[i, :n] = torch.as_tensor(a)
        return out

    @torch.no_grad()
    def decode_frames(self, codes: Tensor, lengths, chains: Tensor | None = None) -> Tensor:
        """Codes ``(B, L, k)`` -> the decoder's frame parameters ``(B, L, 9)``
        (:meth:`FrameHead.atoms` makes them N, CA, C)."""
        q, rmask = self._lookup(codes, lengths)
        h = self._trunk(q, rmask, self._layout(rmask, chains))[0]
        with torch.autocast(h.device.type, enabled=False):
            return self.head.proj(h.float())

    @torch.no_grad()
    def decode_backbone(self, codes: Tensor, lengths, chains: Tensor | None = None):
        """Codes ``(B, L, k)`` -> the decoder's own N, CA, C ``(B, L, 3)`` each."""
        return self.head.atoms(self.decode_frames(codes, lengths, chains))
