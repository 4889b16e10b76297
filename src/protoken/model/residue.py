"""The per-residue tokenizer: a 6D image in, exactly one code per residue, the image back out.

::

    image (B, 3, L, L)
      -> pair features f_ij = MLP(RBF(d_ij), sin/cos of omega_ij, theta_ij, phi_ij, theta_ji,
         phi_ji) + relpos(j - i)                                   (B, L, L, pair_dim)
      -> masked mean and max over j (row pooling)                  (B, L, d_model)
      -> 1D transformer over residues (rotary positions)           (B, L, d_model)
      -> FSQ (vector-quantize-pytorch): one code per residue       (B, L) int64
      -> 1D transformer over the codes                             (B, L, d_model)
      -> a frame per residue (rotation by Gram-Schmidt, translation) -> ideal N, CA, C
      -> virtual Cb and the 6D features in torch                    (B, 3, L, L)

The decoder predicts coordinates and derives the image with the 6D formulas
(:mod:`protoken.model.geometry_torch`), as ESM3's and GCP-VQVAE's decoders end in coordinates:
its images are those of a real backbone by construction, and the image -> 3D path reads them
back exactly. The image is invariant to rotation and translation, so the predicted frames need
no canonical orientation. The geometric loss (:mod:`protoken.model.losses`) trains it; its
frame-aligned term decides the fold's handedness (without it the decoder fitted mirror images
of 3 of 4 training proteins in an overfitting test).

FSQ (finite scalar quantisation, Mentzer et al. 2023) has no codebook to learn: no EMA, no dead
codes, nothing to all-reduce under DDP. Levels ``(8, 8, 8, 8)`` give 4096 codes, 12 bits per
residue, as ESM3, GCP-VQVAE and Kanzi.

Cost: the pair encoder is pointwise, the decoder's 6D features are elementwise: linear in the
pixels; the transformers are quadratic in L, like the image.

Padding: attention ignores padded residues, pooling uses only valid pairs, and every other
operation is per residue or per pair, so a protein's codes do not depend on its batch.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from protoken.model import geometry_torch as gt
from protoken.model.losses import loss_weight, reconstruction_loss, unpack_image
from protoken.model.transformer import Transformer

__all__ = ["RESIDUE_PRESETS", "ResidueConfig", "ResidueOutput", "ResidueVQVAE"]


@dataclass(frozen=True)
class ResidueConfig:
    """Hyper-parameters of :class:`ResidueVQVAE`.

    Parameters
    ----------
    d_model : int
        Width of the residue transformers (``n_embd`` of their blocks).
    n_head, mlp_ratio : int
        Attention heads, MLP hidden width / d_model.
    rope_dim : int
        Rotary features per head (a multiple of 4; half rotate with the residue index).
    n_layer_encoder, n_layer_decoder : int
        Transformer blocks of the encoder and the decoder.
    pair_dim : int
        Width of the pair features pooled into residues.
    n_rbf : int
        Radial basis functions of the distance (centres 2 .. 22 A).
    max_relpos : int
        Sequence separations are clipped to this for the relative-position embedding.
    fsq_levels : tuple of int
        FSQ levels; the codebook size is their product.
    loss, dmax, delta, angle_cutoff, angle_weight, frame_cutoff, frame_weight
        As :class:`protoken.model.VQVAEConfig` (``loss`` defaults to ``"geometric"`` here).
    """

    in_channels: int = 3
    d_model: int = 128
    n_head: int = 4
    mlp_ratio: int = 4
    rope_dim: int = 16
    n_layer_encoder: int = 2
    n_layer_decoder: int = 6
    pair_dim: int = 32
    n_rbf: int = 16
    max_relpos: int = 32
    fsq_levels: tuple[int, ...] = (8, 8, 8, 8)
    loss: str = "geometric"
    dmax: float = 80.0
    delta: float = 1.0
    angle_cutoff: float = 20.0
    angle_weight: float = 1.0
    frame_cutoff: float = 20.0
    frame_weight: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "fsq_levels", tuple(int(v) for v in self.fsq_levels))
        if self.loss not in ("mse", "geometric"):
            raise ValueError(f"loss must be 'mse' or 'geometric', got {self.loss!r}")
        if self.d_model % self.n_head:
            raise ValueError("d_model must be divisible by n_head")
        if self.rope_dim % 4 or not 0 < self.rope_dim <= self.d_model // self.n_head:
            raise ValueError("rope_dim must be a multiple of 4 and at most d_model // n_head")
        if not self.fsq_levels or any(v < 2 for v in self.fsq_levels):
            raise ValueError(f"fsq_levels must be integers >= 2, got {self.fsq_levels}")

    # what the 2D transformer blocks read
    @property
    def n_embd(self) -> int:
        return self.d_model

    @property
    def attn_dim(self) -> int:
        return self.d_model

    @property
    def mlp_hidden_dim(self) -> int:
        return self.d_model * self.mlp_ratio

    @property
    def codebook_size(self) -> int:
        return math.prod(self.fsq_levels)

    @property
    def bits_per_token(self) -> float:
        return math.log2(self.codebook_size)

    @property
    def downsample_factor(self) -> int:
        """Image sides need no padding multiple: one token per residue."""
        return 1

    def to_dict(self) -> dict[str, Any]:
        return {
            k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ResidueConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown ResidueConfig fields: {sorted(unknown)}")
        return cls(**d)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> ResidueConfig:
        if name not in RESIDUE_PRESETS:
            raise KeyError(f"unknown preset {name!r}; choose from {sorted(RESIDUE_PRESETS)}")
        return dataclasses.replace(RESIDUE_PRESETS[name], **overrides)


#: ``residue-tiny`` (tests), ``residue-small`` (the bundled ``residue`` model), ``residue-base``.
RESIDUE_PRESETS: dict[str, ResidueConfig] = {
    "residue-tiny": ResidueConfig(
        d_model=32, n_head=2, rope_dim=8, n_layer_encoder=1, n_layer_decoder=1, pair_dim=8, n_rbf=8
    ),
    "residue-small": ResidueConfig(),
    "residue-base": ResidueConfig(
        d_model=256, n_head=8, rope_dim=16, n_layer_encoder=4, n_layer_decoder=8, pair_dim=64
    ),
}


@dataclass
class ResidueOutput:
    """What :meth:`ResidueVQVAE.forward` returns (the output contract of :mod:`protoken.model`).

    ``recon`` (B, 3, L, L) zero at padding; ``loss_sum``/``weight`` the reconstruction loss sum
    and what it sums over; ``aux_loss`` 0 (FSQ has no commitment loss); ``metrics``
    (``codebook_usage``: fraction of the codebook used in the batch, ``perplexity``);
    ``indices`` (B, L) int64, -1 at padding; ``loss`` = ``loss_sum / weight``.
    """

    recon: Tensor
    loss_sum: Tensor
    weight: Tensor
    aux_loss: Tensor
    metrics: dict[str, Tensor]
    loss: Tensor
    indices: Tensor


class FSQ(nn.Module):
    """Finite scalar quantisation of ``len(levels)``-dim vectors, by vector-quantize-pytorch's
    :class:`vector_quantize_pytorch.FSQ` (straight-through rounding of bounded coordinates)."""

    def __init__(self, levels: tuple[int, ...]) -> None:
        super().__init__()
        from vector_quantize_pytorch import FSQ as _FSQ

        self.fsq = _FSQ(levels=list(levels))
        self.size = math.prod(levels)

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """``(B, L, D)`` -> quantised ``(B, L, D)``, indices ``(B, L)`` int64."""
        q, idx = self.fsq(z)
        return q, idx.long()

    def lookup(self, indices: Tensor) -> Tensor:
        return self.fsq.indices_to_codes(indices.clamp(0, self.size - 1))


class PairEncoder(nn.Module):
    """``(B, 3, L, L)`` image -> ``(B, L, d_model)`` residue vectors by pair features and
    masked mean + max pooling over each row (residue i's pairs with every j != i)."""

    def __init__(self, c: ResidueConfig) -> None:
        super().__init__()
        self.dmax = c.dmax
        self.register_buffer("centres", torch.linspace(2.0, 22.0, c.n_rbf), persistent=False)
        n_in = c.n_rbf + 1 + 10
        self.pair = nn.Sequential(
            nn.Linear(n_in, c.pair_dim), nn.GELU(), nn.Linear(c.pair_dim, c.pair_dim)
        )
        self.max_relpos = c.max_relpos
        self.relpos = nn.Embedding(2 * c.max_relpos + 1, c.pair_dim)
        self.out = nn.Sequential(nn.LayerNorm(2 * c.pair_dim), nn.Linear(2 * c.pair_dim, c.d_model))

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        d, omega, theta, phi = unpack_image(x.float(), self.dmax)
        th_t, ph_t = theta.transpose(-1, -2), phi.transpose(-1, -2)
        width = (self.centres[1] - self.centres[0]) if len(self.centres) > 1 else 2.0
        rbf = torch.exp(-(((d[..., None] - self.centres) / width) ** 2))
        angles = torch.stack([omega, theta, phi, th_t, ph_t], -1)
        feats = torch.cat([rbf, (d / self.dmax)[..., None], angles.sin(), angles.cos()], -1)
        L = x.shape[-1]
        pos = torch.arange(L, device=x.device)
        rel = (pos[None, :] - pos[:, None]).clamp(-self.max_relpos, self.max_relpos)
        h = self.pair(feats) + self.relpos(rel + self.max_relpos)  # (B, L, L, P)
        n = x.shape[-1]
        pm = mask & ~torch.eye(n, dtype=torch.bool, device=x.device)
        w = pm[..., None].to(h.dtype)
        mean = (h * w).sum(2) / w.sum(2).clamp(min=1)
        mx = h.masked_fill(~pm[..., None], -1e4).amax(2)
        mx = torch.where(pm.any(2)[..., None], mx, torch.zeros_like(mx))
        return self.out(torch.cat([mean, mx], -1))


class FrameHead(nn.Module):
    """Residue vectors -> a frame each -> the backbone's 6D image."""

    def __init__(self, c: ResidueConfig) -> None:
        super().__init__()
        self.dmax = c.dmax
        self.proj = nn.Linear(c.d_model, 9)

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(B, L, d_model)`` -> N, CA, C ``(B, L, 3)``."""
        p = self.proj(h.float())
        rot = gt.rotation_from_6d(p[..., 3:6] + _E1.to(p), p[..., 6:9] + _E2.to(p))
        return gt.backbone_from_frames(rot, p[..., :3] * 10.0)


_E1 = torch.tensor([1.0, 0.0, 0.0])
_E2 = torch.tensor([0.0, 1.0, 0.0])


class ResidueVQVAE(nn.Module):
    """One FSQ code per residue; see the module docstring.

    Parameters
    ----------
    config : ResidueConfig
    """

    def __init__(self, config: ResidueConfig) -> None:
        super().__init__()
        self.config = config
        self.pair_encoder = PairEncoder(config)
        self.encoder = Transformer(config, config.n_layer_encoder, 0)
        self.pre_quant = nn.Linear(config.d_model, len(config.fsq_levels))
        self.quantizer = FSQ(config.fsq_levels)
        self.post_quant = nn.Linear(len(config.fsq_levels), config.d_model)
        self.decoder = Transformer(config, config.n_layer_decoder, 0)
        self.head = FrameHead(config)

    # -- helpers -----------------------------------------------------------------------------

    def loss_weight(self, mask: Tensor) -> int:
        """What ``loss_sum`` sums over for this mask (see :class:`protoken.model.VQVAE`)."""
        return loss_weight(mask, self.config)

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

    @staticmethod
    def _residue_mask(mask: Tensor) -> Tensor:
        return mask.diagonal(dim1=-2, dim2=-1)  # (B, L)

    def _transform(self, block: Transformer, h: Tensor, rmask: Tensor) -> Tensor:
        """A 2D transformer run on a 1 x L grid: (B, L, C) -> (B, L, C)."""
        y = block(h.transpose(1, 2)[:, :, None], rmask[:, None])
        return y[:, :, 0].transpose(1, 2)

    def _encode(self, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        rmask = self._residue_mask(mask)
        h = self.pair_encoder(x * mask[:, None], mask)
        h = self._transform(self.encoder, h, rmask)
        q, idx = self.quantizer(self.pre_quant(h).float())
        return q, idx.masked_fill(~rmask, -1), rmask

    def _decode(self, q: Tensor, rmask: Tensor) -> Tensor:
        h = self._transform(self.decoder, self.post_quant(q), rmask)
        # coordinates and angles in fp32 even under bf16 autocast (acos / atan2 of nearly
        # parallel vectors lose everything in bf16)
        with torch.autocast(h.device.type, enabled=False):
            n, ca, c = self.head(h.float())
            feats = gt.sixd(n, ca, c, self.config.dmax)
            image = gt.features_to_image(*feats, self.config.dmax)
        pm = rmask[:, :, None] & rmask[:, None, :]
        return image * pm[:, None]

    # -- public API --------------------------------------------------------------------------

    def forward(self, x: Tensor, mask: Tensor) -> ResidueOutput:
        """Encode, quantise, decode and compute the loss; ``x`` ``(B, 3, L, L)`` zero-padded,
        ``mask`` ``(B, L, L)`` bool."""
        mask = self._check(x, mask)
        q, idx, rmask = self._encode(x, mask)
        recon = self._decode(q, rmask)
        loss_sum, weight = reconstruction_loss(recon, x, mask, self.config)
        with torch.no_grad():
            valid = idx[rmask]
            counts = torch.bincount(valid, minlength=self.quantizer.size).float()
            usage = (counts > 0).float().mean()
            p = counts / counts.sum().clamp(min=1)
            perplexity = torch.exp(-(p * torch.log(p.clamp(min=1e-12))).sum())
        zero = loss_sum.new_zeros(())
        return ResidueOutput(
            recon=recon,
            loss_sum=loss_sum,
            weight=weight,
            aux_loss=zero,
            metrics={"codebook_usage": usage, "perplexity": perplexity},
            loss=loss_sum / weight.clamp(min=1),
            indices=idx,
        )

    @torch.no_grad()
    def encode(self, x: Tensor, mask: Tensor) -> Tensor:
        """Images ``(B, 3, L, L)`` and masks -> codes ``(B, L)`` int64, -1 at padding."""
        mask = self._check(x, mask)
        return self._encode(x, mask)[1]

    def _lookup(self, indices: Tensor, lengths) -> tuple[Tensor, Tensor]:
        """Codes ``(B, L)`` and lengths -> their code vectors and the residue mask."""
        indices = torch.as_tensor(indices)
        if indices.ndim != 2:
            raise ValueError(f"expected (B, L) codes, got shape {tuple(indices.shape)}")
        device = self.post_quant.weight.device
        lengths = torch.as_tensor(lengths, device=device).long().reshape(-1)
        rmask = torch.arange(indices.shape[1], device=device)[None] < lengths[:, None]
        return self.quantizer.lookup(indices.to(device)), rmask

    def decode(self, indices: Tensor, lengths) -> Tensor:
        """Codes ``(B, L)`` (values past each length ignored) -> images ``(B, 3, L, L)``."""
        return self._decode(*self._lookup(indices, lengths))

    @torch.no_grad()
    def decode_backbone(self, indices: Tensor, lengths) -> tuple[Tensor, Tensor, Tensor]:
        """Codes ``(B, L)`` -> the decoder's own N, CA, C ``(B, L, 3)`` (before the image)."""
        q, rmask = self._lookup(indices, lengths)
        h = self._transform(self.decoder, self.post_quant(q), rmask)
        with torch.autocast(h.device.type, enabled=False):
            return self.head(h.float())
