"""The hierarchical VQ-VAE (the reference design's section 3): its config, encoders, quantisers
and decoders. Config and model are read together, as nanoGPT's model.py (hence one file of
about 700 lines); the 2D transformer blocks are :mod:`protoken.model.transformer`, the
quantiser :mod:`protoken.model.quantize`.

Level 0 is the finest; level ``l`` works on a grid ``s_l = prod(scaling_rates[:l + 1])`` times
smaller than the image. Encoding runs bottom-up, quantisation top-down as in the reference design::

    e_0 = Enc_0(x),  e_l = Enc_l(e_{l-1})
    q_{n-1} = Q_{n-1}(e_{n-1})
    q_l     = Q_l([e_l, Dec_{l+1}(q_{l+1}, up(q_{l+2}), ...)])      (Dec_{l+1} upsamples to l)
    x_hat   = Head(Dec_0(q_0, up(q_1), ..., up(q_{n-1})))

so the image is decoded from the codes alone (:meth:`HierarchicalVQVAE.decode`). ``up`` is
nearest-neighbour upsampling; the decoder's 1x1 in-projection of the concatenated codes is
computed as a sum of per-level projections at each code's own resolution, which is the same
linear map without materialising ``n_levels * codebook_dim`` channels at the fine grid.

Chains (``chain_aware``): a complex's image covers all its residues; the map ``S`` of pixels
whose two residues share a chain, averaged over each level's cells, is added through a 1x1
convolution (zero at initialisation) to every encoder and decoder level, so the model knows
where chains break and a model extended this way starts exactly where it was.

Padding: a token is valid when its cell holds at least one valid pixel. Every stage zeroes its
output at invalid tokens, attention ignores them, and no normalisation uses batch statistics,
so a protein's output does not depend on how much padding its batch has.

Configs and checkpoints written before a field or preset was renamed still load: old field names
(:data:`RENAMED_FIELDS`, e.g. ``latent_dim``) and preset names (:data:`PRESET_ALIASES`, e.g.
``seed``) are read as the new ones; configs without ``chain_aware`` build a model without it.
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
from torch import Tensor, nn

from protoken.model.contract import ModelOutput, mask_from_lengths, same_chain
from protoken.model.losses import LossConfig, loss_weight, reconstruction_loss
from protoken.model.quantize import VectorQuantizer
from protoken.model.transformer import LayerNorm2d, Transformer

__all__ = ["HIERARCHICAL_PRESETS", "HierarchicalConfig", "HierarchicalVQVAE", "symmetrise"]

# A level runs global self-attention when its token grid is at most this many tokens a side for
# the largest image the presets are meant for (1024 residues); finer levels use windows.
_GLOBAL_ATTN_MAX_GRID = 32
_DESIGN_MAX_SIZE = 1024
_DEFAULT_WINDOW = 8

#: Field names of older versions -> their current names (read by
#: :meth:`HierarchicalConfig.from_dict`
#: and :meth:`HierarchicalConfig.preset`). ``latent_dim`` was the attention width, not the latent.
RENAMED_FIELDS = {"latent_dim": "attn_dim"}
#: Preset names of older versions -> their current names. "seed" now means only an RNG seed.
PRESET_ALIASES = {"seed": "reference"}


@dataclass(frozen=True)
class HierarchicalConfig:
    """Hyper-parameters of :class:`HierarchicalVQVAE`.

    The defaults are the reference design's model (the ``"reference"`` preset); most names follow
    it.

    Parameters
    ----------
    in_channels : int
        Image channels (3: d/omega, theta, phi).
    n_embd : int
        Width of the residual stream of every encoder and decoder stage.
    mlp_hidden_dim : int
        Hidden width of the transformer MLPs.
    n_head : int
        Attention heads; ``attn_dim`` is split into ``n_head`` heads.
    attn_dim : int
        Width of Q, K and V (all heads together). Called ``latent_dim`` before (and by the
        reference design), a name still read from old configs; the latent is ``codebook_dim``.
    rope_dim : int
        Features of each head rotated by the 2D axial rotary embedding (half per image axis);
        a multiple of 4, at most ``attn_dim // n_head``.
    q_channels : int
        Channels of a coarse level's decoder output, which conditions the quantiser of the
        next finer level.
    codebook_dim, codebook_size : int
        Size of each code vector and number of codes per level.
    n_layer_encoder, n_layer_decoder : int
        Transformer blocks per level in the encoder and in the decoder.
    beta : float
        Weight of the summed commitment losses.
    scaling_rates : tuple of int
        Downsampling factor of each level relative to the previous one (level 0 relative to the
        image); powers of 2. There is one code level per entry.
    window_sizes : tuple of int or None
        Attention window (tokens a side) per level, 0 for global attention. None chooses global
        attention where a 1024 x 1024 image gives a grid of at most 32 x 32 tokens, and windows
        of 8 x 8 elsewhere.
    refine_channels, n_layer_refine : int
        Width and number of residual 3x3-conv blocks of the full-resolution refinement head.
    ema_decay, ema_eps : float
        Codebook EMA decay and Laplace smoothing constant.
    dead_code_threshold : float
        A code whose EMA cluster size falls below this fraction of the mean cluster size is
        restarted from a random encoder output of the batch; 0 disables restarts.
    symmetric_output : bool
        Predict d and omega as two maps, symmetrise each, and assemble channel 0 from them
        (lower triangle and diagonal: d, upper triangle: omega). Off by default: as each
        quantity is stored once in the image, this only averages the prediction made at
        (i, j) with the one made at (j, i), where the features describe the other quantity; on
        held-out proteins (tiny, 600 steps, 2 seeds) it raised the MSE of d about 4x.
    loss : LossConfig
        The reconstruction loss (:class:`protoken.model.losses.LossConfig`): the reference
        design's pixel MSE (``kind="mse"``), or the geometric loss (contact-weighted Huber
        distances, periodic angle errors, a frame-aligned Cb term) and its settings; its
        ``dmax`` is the images' distance cut-off (training sets it from the data's
        convert.json). Configs of older versions give ``loss`` as a name and the settings as
        fields of their own; they are read.
    chain_aware : bool
        Add the same-chain map of a complex to every level (see the module docstring). Off by
        default, so that configs and runs written before it build the same model; the
        bundled ``default`` tokenizer turns it on to read complexes.
    """

    in_channels: int = 3
    n_embd: int = 1024
    mlp_hidden_dim: int = 2048
    n_head: int = 16
    attn_dim: int = 256
    rope_dim: int = 16
    q_channels: int = 256
    codebook_dim: int = 1024
    codebook_size: int = 4096
    n_layer_encoder: int = 2
    n_layer_decoder: int = 2
    beta: float = 0.25
    scaling_rates: tuple[int, ...] = (2, 2, 2, 2, 2, 2)
    window_sizes: tuple[int, ...] | None = None
    refine_channels: int = 64
    n_layer_refine: int = 2
    ema_decay: float = 0.99
    ema_eps: float = 1e-5
    dead_code_threshold: float = 0.03
    symmetric_output: bool = False
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    chain_aware: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.loss, dict):
            object.__setattr__(self, "loss", LossConfig(**self.loss))
        rates = tuple(int(r) for r in self.scaling_rates)
        object.__setattr__(self, "scaling_rates", rates)
        if not rates or any(r < 2 or r & (r - 1) for r in rates):
            raise ValueError(f"scaling_rates must be powers of 2 >= 2, got {rates}")
        if self.window_sizes is None:
            windows = tuple(
                0 if _DESIGN_MAX_SIZE // s <= _GLOBAL_ATTN_MAX_GRID else _DEFAULT_WINDOW
                for s in self.level_scales
            )
        else:
            windows = tuple(int(w) for w in self.window_sizes)
        object.__setattr__(self, "window_sizes", windows)
        if len(windows) != len(rates) or any(w < 0 for w in windows):
            raise ValueError(f"window_sizes needs one entry >= 0 per level, got {windows}")
        if self.attn_dim % self.n_head:
            raise ValueError("attn_dim must be divisible by n_head")
        head_dim = self.attn_dim // self.n_head
        if self.rope_dim % 4 or not 0 < self.rope_dim <= head_dim:
            raise ValueError(f"rope_dim must be a multiple of 4 in (0, {head_dim}]")
        if self.symmetric_output and self.in_channels != 3:
            raise ValueError("symmetric_output needs the 3-channel (d/omega, theta, phi) image")
        if not 0.0 <= self.dead_code_threshold < 1.0:
            raise ValueError("dead_code_threshold must be in [0, 1)")

    @property
    def dmax(self) -> float:
        return self.loss.dmax

    @property
    def n_levels(self) -> int:
        """Number of code levels."""
        return len(self.scaling_rates)

    @property
    def level_scales(self) -> tuple[int, ...]:
        """Downsampling of each level's grid relative to the image, finest first."""
        return tuple(math.prod(self.scaling_rates[: i + 1]) for i in range(self.n_levels))

    @property
    def downsample_factor(self) -> int:
        """Image sides must be a multiple of this (the product of the scaling rates)."""
        return math.prod(self.scaling_rates)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict of all fields (tuples as lists)."""
        return {
            k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HierarchicalConfig:
        """Inverse of :meth:`to_dict` (old field names accepted); unknown keys are an error."""
        d = _current_names(d)
        d["loss"] = LossConfig().with_overrides(d)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown HierarchicalConfig fields: {sorted(unknown)}")
        return cls(**d)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> HierarchicalConfig:
        """A named preset (``reference``, ``small``, ``tiny``; old names accepted), optionally
        with fields overridden (old field names accepted)."""
        name = PRESET_ALIASES.get(name, name)
        if name not in HIERARCHICAL_PRESETS:
            raise KeyError(f"unknown preset {name!r}; choose from {sorted(HIERARCHICAL_PRESETS)}")
        overrides = _current_names(overrides)
        overrides["loss"] = HIERARCHICAL_PRESETS[name].loss.with_overrides(overrides)
        if "scaling_rates" in overrides:  # re-derive the windows unless given
            overrides.setdefault("window_sizes", None)
        return dataclasses.replace(HIERARCHICAL_PRESETS[name], **overrides)


def _current_names(d: dict[str, Any]) -> dict[str, Any]:
    """``d`` with the field names of older versions (:data:`RENAMED_FIELDS`) renamed."""
    out = dict(d)
    for old, new in RENAMED_FIELDS.items():
        if old in out:
            if new in out:
                raise ValueError(f"both {old!r} (the old name of {new!r}) and {new!r} given")
            out[new] = out.pop(old)
    return out


#: The presets by name: ``reference`` (the reference design's sizes, 182 M parameters),
#: ``small`` (12 M) and ``tiny`` (0.29 M, the demo).
HIERARCHICAL_PRESETS: dict[str, HierarchicalConfig] = {}
HIERARCHICAL_PRESETS["reference"] = HierarchicalConfig()
HIERARCHICAL_PRESETS["small"] = HierarchicalConfig(
    n_embd=256,
    mlp_hidden_dim=512,
    n_head=8,
    attn_dim=256,
    rope_dim=32,
    q_channels=64,
    codebook_dim=64,
    codebook_size=1024,
    n_layer_encoder=2,
    n_layer_decoder=2,
    scaling_rates=(2, 2, 2, 2, 2),
    refine_channels=32,
    n_layer_refine=2,
)
HIERARCHICAL_PRESETS["tiny"] = HierarchicalConfig(
    n_embd=64,
    mlp_hidden_dim=128,
    n_head=4,
    attn_dim=64,
    rope_dim=16,
    q_channels=32,
    codebook_dim=32,
    codebook_size=512,
    n_layer_encoder=1,
    n_layer_decoder=1,
    scaling_rates=(4, 2, 2),
    window_sizes=(8, 8, 0),
    refine_channels=16,
    n_layer_refine=1,
)


# --------------------------------------------------------------------------- model


def _pool_mask(mask: Tensor, factor: int) -> Tensor:
    """``(B, H, W)`` bool -> ``(B, H/f, W/f)``: a cell is valid if any of its pixels is."""
    if factor == 1:
        return mask
    return F.max_pool2d(mask[:, None].float(), factor)[:, 0] > 0


def _n_doublings(rate: int) -> int:
    return rate.bit_length() - 1


class Downsample(nn.Module):
    """``log2(rate)`` stages of Conv2d(k=2, s=2) + LayerNorm + GELU: ``(B, c_in, H, W)`` ->
    ``(B, c_out, H/rate, W/rate)``, zero at invalid tokens.

    The width doubles with each stage up to ``c_out``, so the high-resolution stages stay cheap.
    Only the output is masked: a stage's cells that hold no valid pixel see only zeros, so
    whatever constant they hold is the same however much padding there is.
    """

    def __init__(self, in_channels: int, out_channels: int, rate: int) -> None:
        super().__init__()
        n = _n_doublings(rate)
        widths = [in_channels] + [_stage_width(out_channels, n - 1 - i) for i in range(n)]
        self.stages = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(widths[i], widths[i + 1], 2, stride=2),
                LayerNorm2d(widths[i + 1]),
                nn.GELU(),
            )
            for i in range(n)
        )

    def forward(self, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """``x`` and its ``(B, H, W)`` mask -> downsampled ``x`` and mask."""
        for stage in self.stages:
            x = stage(x)
        mask = _pool_mask(mask, 2 ** len(self.stages))
        return x * mask[:, None], mask


class Upsample(nn.Module):
    """``log2(rate)`` ConvTranspose2d(k=2, s=2) stages with LayerNorm + GELU between them:
    ``(B, c_in, h, w)`` -> ``(B, c_out, h*rate, w*rate)``, zero at invalid pixels.

    The width halves with each intermediate stage. Each output pixel depends on one input
    token only, so masking the final output is enough.
    """

    def __init__(self, in_channels: int, out_channels: int, rate: int) -> None:
        super().__init__()
        n = _n_doublings(rate)
        widths = [_stage_width(in_channels, i) for i in range(n)] + [out_channels]
        layers: list[nn.Module] = []
        for i in range(n):
            layers.append(nn.ConvTranspose2d(widths[i], widths[i + 1], 2, stride=2))
            if i < n - 1:
                layers += [LayerNorm2d(widths[i + 1]), nn.GELU()]
        self.layers = nn.Sequential(*layers)

    def forward(self, x: Tensor, out_mask: Tensor) -> Tensor:
        """``x`` -> upsampled ``x``, zero where ``out_mask`` ``(B, H, W)`` is False."""
        return self.layers(x) * out_mask[:, None]


def _chain_projection(config: HierarchicalConfig) -> nn.Module | None:
    """1x1 convolution of the same-chain map to the tokens, zero at initialisation."""
    if not config.chain_aware:
        return None
    conv = nn.Conv2d(1, config.n_embd, 1, bias=False)
    nn.init.zeros_(conv.weight)
    return conv


def _stage_width(width: int, halvings: int) -> int:
    return max(16, width >> halvings) if halvings else width


class Encoder(nn.Module):
    """Level ``l`` encoder: downsample by ``scaling_rates[l]``, then transformer blocks."""

    def __init__(self, config: HierarchicalConfig, level: int) -> None:
        super().__init__()
        in_channels = config.in_channels if level == 0 else config.n_embd
        self.down = Downsample(in_channels, config.n_embd, config.scaling_rates[level])
        self.chain = _chain_projection(config)
        self.transformer = Transformer(config, config.n_layer_encoder, config.window_sizes[level])

    def forward(self, x: Tensor, mask: Tensor, same: Tensor) -> tuple[Tensor, Tensor]:
        """``(B, c, H, W)`` + mask + the same-chain map at this level -> ``(B, n_embd, H/r,
        W/r)`` + its mask."""
        x, mask = self.down(x, mask)
        if self.chain is not None:
            x = x + self.chain(same) * mask[:, None]
        return self.transformer(x, mask), mask


class Decoder(nn.Module):
    """Level ``l`` decoder: codes of levels ``l..n-1`` -> a map at level ``l-1`` (or image) size.

    1x1 in-projection of the concatenated (nearest-upsampled) codes, transformer blocks, then
    ConvTranspose2d upsampling by ``scaling_rates[l]`` to ``out_channels``.
    """

    def __init__(self, config: HierarchicalConfig, level: int, out_channels: int) -> None:
        super().__init__()
        self.scales = config.level_scales[level:]
        self.in_proj = nn.ModuleList(
            nn.Conv2d(config.codebook_dim, config.n_embd, 1, bias=(j == 0))
            for j in range(len(self.scales))
        )
        self.chain = _chain_projection(config)
        self.transformer = Transformer(config, config.n_layer_decoder, config.window_sizes[level])
        self.up = Upsample(config.n_embd, out_channels, config.scaling_rates[level])

    def forward(
        self, codes: Sequence[Tensor], mask: Tensor, out_mask: Tensor, same: Tensor
    ) -> Tensor:
        """Decode.

        Parameters
        ----------
        codes : sequence of Tensor
            Code maps of levels ``l, l+1, ...`` (finest first), each ``(B, codebook_dim, h_j,
            w_j)``, zero at invalid tokens.
        mask : Tensor
            ``(B, h_l, w_l)`` valid tokens of level ``l``.
        out_mask : Tensor
            ``(B, H, W)`` valid positions of the output grid.
        same : Tensor
            ``(B, 1, h_l, w_l)`` the same-chain map averaged over level ``l``'s cells.

        Returns
        -------
        Tensor
            ``(B, out_channels, H, W)``, zero where ``out_mask`` is False.
        """
        h = 0
        for proj, code, scale in zip(self.in_proj, codes, self.scales, strict=True):
            y = proj(code)
            factor = scale // self.scales[0]
            h = h + (F.interpolate(y, scale_factor=factor, mode="nearest") if factor > 1 else y)
        if self.chain is not None:
            h = h + self.chain(same)
        h = self.transformer(h * mask[:, None], mask)
        return self.up(h, out_mask)


class RefineHead(nn.Module):
    """Full-resolution head: residual 3x3-conv blocks, then a 1x1 conv to the image channels.

    With ``symmetric_output`` it predicts four maps ``(a, b, theta, phi)`` and sets channel 0 to
    ``sym(a)`` on and below the diagonal (d) and ``sym(b)`` above it (omega), with
    ``sym(a) = (a + a^T) / 2``.
    """

    def __init__(self, config: HierarchicalConfig) -> None:
        super().__init__()
        c = config.refine_channels
        self.symmetric = config.symmetric_output
        self.convs = nn.ModuleList(
            nn.ModuleList([nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=1)])
            for _ in range(config.n_layer_refine)
        )
        self.out = nn.Conv2d(c, config.in_channels + int(self.symmetric), 1)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """``(B, refine_channels, H, W)``, mask ``(B, H, W)`` -> ``(B, in_channels, H, W)``."""
        m = mask[:, None]
        for conv_1, conv_2 in self.convs:
            h = conv_1(F.gelu(x)) * m
            x = x + conv_2(F.gelu(h)) * m
        y = self.out(F.gelu(x))
        if self.symmetric:
            y = symmetrise(y)
        return y * m


def symmetrise(y: Tensor) -> Tensor:
    """``(B, 4, H, W)`` maps ``(a, b, theta, phi)`` -> ``(B, 3, H, W)`` with channel 0
    ``sym(a)`` on and below the diagonal and ``sym(b)`` above it."""
    sym = (y[:, :2] + y[:, :2].transpose(-1, -2)) / 2
    n = y.shape[-1]
    upper = torch.ones(n, n, dtype=torch.bool, device=y.device).triu(1)
    return torch.cat([torch.where(upper, sym[:, 1:2], sym[:, 0:1]), y[:, 2:]], dim=1)


class HierarchicalVQVAE(nn.Module):
    """Hierarchical VQ-VAE over padded batches of 6D images.

    Parameters
    ----------
    config : HierarchicalConfig
    """

    def __init__(self, config: HierarchicalConfig) -> None:
        super().__init__()
        self.config = config
        n = config.n_levels
        self.encoders = nn.ModuleList(Encoder(config, level) for level in range(n))
        self.quantizers = nn.ModuleList(
            VectorQuantizer(
                config.n_embd + (config.q_channels if level < n - 1 else 0),
                config.codebook_dim,
                config.codebook_size,
                decay=config.ema_decay,
                eps=config.ema_eps,
                dead_code_threshold=config.dead_code_threshold,
            )
            for level in range(n)
        )
        self.decoders = nn.ModuleList(
            Decoder(config, level, config.refine_channels if level == 0 else config.q_channels)
            for level in range(n)
        )
        self.head = RefineHead(config)

    def loss_weight(self, mask: Tensor) -> int:
        """What ``ModelOutput.loss_sum`` of a batch with this ``(B, H, W)`` mask sums over
        (valid pixels x channels for the MSE, valid pairs i != j for the geometric loss),
        computed where the mask is (on the host for a loader's batch, so the training loop
        knows the global weight before the forward passes)."""
        return loss_weight(mask, self.config.loss, self.config.in_channels)

    def num_parameters(self) -> int:
        """Number of trainable parameters (codebooks are EMA buffers, not counted)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    # -- helpers -----------------------------------------------------------------------------

    def _check(self, x: Tensor, mask: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] != self.config.in_channels:
            raise ValueError(f"x must be (B, {self.config.in_channels}, H, W), got {x.shape}")
        f = self.config.downsample_factor
        if x.shape[-1] != x.shape[-2]:
            raise ValueError(f"images must be square, got {tuple(x.shape[-2:])}")
        if x.shape[-1] % f:
            raise ValueError(f"H and W must be multiples of downsample_factor={f} (pad first)")
        if mask.ndim == 4:
            mask = mask[:, 0]
        if mask.shape != (x.shape[0], *x.shape[-2:]):
            raise ValueError(f"mask must be (B, H, W) or (B, 1, H, W), got {mask.shape}")
        return mask.bool()

    def _level_masks(self, mask: Tensor) -> list[Tensor]:
        return [_pool_mask(mask, s) for s in self.config.level_scales]

    def _same_chain(self, chains: Tensor | None, mask: Tensor) -> list[Tensor]:
        """The same-chain map averaged over each level's cells, finest first: ``(B, 1, h, w)``."""
        if not self.config.chain_aware:
            return [None] * self.config.n_levels
        s = same_chain(chains, mask)[:, None].float()
        return [F.avg_pool2d(s, k) for k in self.config.level_scales]

    def _decode_codes(self, codes: list[Tensor], masks: list[Tensor], mask: Tensor, same) -> Tensor:
        """Codes (finest first) -> image ``(B, C, H, W)``, zero at invalid pixels."""
        return self.head(self.decoders[0](codes, masks[0], mask, same[0]), mask)

    def _encode(self, x: Tensor, mask: Tensor, same: list):
        """Run encoders and quantisers; codes and quantiser outputs finest first."""
        x = x * mask[:, None]
        feats, masks = [], []
        m = mask
        for encoder, sm in zip(self.encoders, same, strict=True):
            x, m = encoder(x, m, sm)
            feats.append(x)
            masks.append(m)
        n = self.config.n_levels
        codes: list[Tensor] = [None] * n  # type: ignore[list-item]
        outs = [None] * n
        cond = None
        for level in reversed(range(n)):
            inp = feats[level] if cond is None else torch.cat([feats[level], cond], dim=1)
            outs[level] = self.quantizers[level](inp, masks[level])
            codes[level] = outs[level].quantized
            if level > 0:
                cond = self.decoders[level](
                    codes[level:], masks[level], masks[level - 1], same[level]
                )
        return codes, outs, masks

    # -- public API --------------------------------------------------------------------------

    def forward(self, x: Tensor, mask: Tensor, chains: Tensor | None = None) -> ModelOutput:
        """Encode, quantise, decode and compute the losses.

        Parameters
        ----------
        x : Tensor
            ``(B, 3, H, W)`` images, zero-padded; H and W multiples of
            ``config.downsample_factor``.
        mask : Tensor
            ``(B, H, W)`` or ``(B, 1, H, W)`` bool, True at valid pixels.
        chains : Tensor, optional
            ``(B, L)`` chain index of each residue (complexes); None: one chain each.

        Returns
        -------
        ModelOutput
            ``metrics``: per level (coarsest first) ``codebook_usage``, ``perplexity`` and
            ``commit_loss``; ``aux_loss`` is ``beta`` times the summed commitment losses;
            ``codes`` per level, coarsest first, -1 at padded tokens.
        """
        mask = self._check(x, mask)
        same = self._same_chain(chains, mask)
        codes, outs, masks = self._encode(x, mask, same)
        recon = self._decode_codes(codes, masks, mask, same)
        loss_sum, weight = reconstruction_loss(recon, x, mask, self.config.loss, chains)
        outs = outs[::-1]  # coarsest first
        commit = torch.stack([o.commit_loss for o in outs])
        metrics = {
            "codebook_usage": torch.stack([o.usage for o in outs]).detach(),
            "perplexity": torch.stack([o.perplexity for o in outs]).detach(),
            "commit_loss": commit.detach(),
        }
        return ModelOutput(recon, loss_sum, weight, self.config.beta * commit.sum(), metrics,
                           [o.indices for o in outs])  # fmt: skip

    @torch.no_grad()
    def encode(self, x: Tensor, mask: Tensor, chains: Tensor | None = None) -> list[Tensor]:
        """Images -> code indices.

        Call in eval mode (in training mode the codebooks' EMA is updated).

        Parameters
        ----------
        x : Tensor
            ``(B, 3, H, W)``, as for :meth:`forward`.
        mask : Tensor
            ``(B, H, W)`` or ``(B, 1, H, W)`` bool.
        chains : Tensor, optional
            As for :meth:`forward`.

        Returns
        -------
        list of Tensor
            One ``(B, H / s_l, W / s_l)`` int64 grid per level, coarsest first
            (``s_l = prod(scaling_rates[:l + 1])``, so the last grid is ``H / scaling_rates[0]``);
            -1 at padded tokens. A protein of length L has valid codes in the top-left
            ``ceil(L / s_l)`` square.
        """
        mask = self._check(x, mask)
        _, outs, _ = self._encode(x, mask, self._same_chain(chains, mask))
        return [o.indices for o in reversed(outs)]

    def unbatch_codes(self, codes: Sequence[Tensor], lengths) -> list[list[np.ndarray]]:
        """Batched grids (coarsest first) -> per protein its valid grids, level ``l``
        ``(ceil(L / s_l), ceil(L / s_l))`` int64, coarsest first."""
        scales = self.config.level_scales[::-1]
        return [
            [g[i, : math.ceil(n / s), : math.ceil(n / s)].cpu().numpy().astype(np.int64)
             for g, s in zip(codes, scales, strict=True)]
            for i, n in enumerate(int(n) for n in lengths)
        ]  # fmt: skip

    def batch_codes(self, per_protein: Sequence[Sequence[np.ndarray]], lengths) -> list[Tensor]:
        """Per protein grids (coarsest first, as :meth:`unbatch_codes` gives) -> batched grids
        padded with -1 (image side a multiple of the downsampling)."""
        cfg = self.config
        ns = [int(n) for n in lengths]
        f = cfg.downsample_factor
        side = -(-max(ns, default=f) // f) * f
        grids = []
        for lv, s in enumerate(cfg.level_scales[::-1]):
            g = torch.full((len(ns), side // s, side // s), -1, dtype=torch.long)
            for i, per in enumerate(per_protein):
                if len(per) != cfg.n_levels:
                    raise ValueError(f"expected {cfg.n_levels} levels of codes, got {len(per)}")
                code = np.asarray(per[lv], dtype=np.int64)
                k = math.ceil(ns[i] / s)
                if code.shape != (k, k):
                    raise ValueError(f"level {lv}: expected a {k}x{k} grid, got {code.shape}")
                if k and (code.min() < 0 or code.max() >= cfg.codebook_size):
                    raise ValueError(f"level {lv}: codes outside 0..{cfg.codebook_size - 1}")
                g[i, :k, :k] = torch.as_tensor(code)
            grids.append(g)
        return grids

    def decode(self, indices: Sequence[Tensor], lengths: Tensor | Sequence[int],
               chains: Tensor | None = None) -> Tensor:  # fmt: skip
        """Code indices -> images.

        Parameters
        ----------
        indices : sequence of Tensor
            As returned by :meth:`encode`: coarsest first, level ``l`` of shape
            ``(B, H / s_l, W / s_l)``. Values outside each protein's valid square are ignored.
        lengths : Tensor or sequence of int
            ``(B,)`` protein lengths.
        chains : Tensor, optional
            As for :meth:`forward`.

        Returns
        -------
        Tensor
            ``(B, 3, H, W)`` float32 images with ``H = indices[-1].shape[-2] *
            scaling_rates[0]``, zero at padded pixels.
        """
        cfg = self.config
        indices = list(reversed(indices))  # finest first
        if len(indices) != cfg.n_levels:
            raise ValueError(f"expected {cfg.n_levels} index grids, got {len(indices)}")
        B, h = indices[0].shape[:2]
        H = h * cfg.scaling_rates[0]
        for idx, s in zip(indices, cfg.level_scales, strict=True):
            if idx.shape != (B, H // s, H // s):
                raise ValueError(f"index grid {tuple(idx.shape)} != {(B, H // s, H // s)}")
        device = self.quantizers[0].embed.device
        mask = mask_from_lengths(torch.as_tensor(lengths, device=device), H)
        masks = self._level_masks(mask)
        codes = [
            q.lookup(idx.to(device), m)
            for q, idx, m in zip(self.quantizers, indices, masks, strict=True)
        ]
        return self._decode_codes(codes, masks, mask, self._same_chain(chains, mask))
