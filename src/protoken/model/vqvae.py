"""The hierarchical VQ-VAE (the reference design's section 3): encoders, quantisers, decoders.

Level 0 is the finest; level ``l`` works on a grid ``s_l = prod(scaling_rates[:l + 1])`` times
smaller than the image. Encoding runs bottom-up, quantisation top-down as in the reference design::

    e_0 = Enc_0(x),  e_l = Enc_l(e_{l-1})
    q_{n-1} = Q_{n-1}(e_{n-1})
    q_l     = Q_l([e_l, Dec_{l+1}(q_{l+1}, up(q_{l+2}), ...)])      (Dec_{l+1} upsamples to l)
    x_hat   = Head(Dec_0(q_0, up(q_1), ..., up(q_{n-1})))

so the image is decoded from the codes alone (:meth:`VQVAE.decode`). ``up`` is nearest-neighbour
upsampling; the decoder's 1x1 in-projection of the concatenated codes is computed as a sum of
per-level projections at each code's own resolution, which is the same linear map without
materialising ``n_levels * codebook_dim`` channels at the fine grid.

Padding: a token is valid when its cell holds at least one valid pixel. Every stage zeroes its
output at invalid tokens, attention ignores them, and no normalisation uses batch statistics,
so a protein's output does not depend on how much padding its batch has.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from protoken.model.config import VQVAEConfig
from protoken.model.losses import loss_weight, reconstruction_loss
from protoken.model.quantize import VectorQuantizer
from protoken.model.transformer import LayerNorm2d, Transformer


def mask_from_lengths(lengths: Tensor | Sequence[int], size: int) -> Tensor:
    """Valid-pixel masks of proteins padded to ``size``.

    Parameters
    ----------
    lengths : Tensor or sequence of int
        ``(B,)`` protein lengths L (residues), each at most ``size``.
    size : int
        Padded image side.

    Returns
    -------
    Tensor
        ``(B, size, size)`` bool, True in the top-left ``L x L`` square of each image.
    """
    lengths = torch.as_tensor(lengths).long().reshape(-1, 1)
    if bool((lengths > size).any()) or bool((lengths < 0).any()):
        raise ValueError(f"lengths must lie in [0, {size}]")
    inside = torch.arange(size, device=lengths.device) < lengths  # (B, size)
    return inside[:, :, None] & inside[:, None, :]


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


def _stage_width(width: int, halvings: int) -> int:
    return max(16, width >> halvings) if halvings else width


class Encoder(nn.Module):
    """Level ``l`` encoder: downsample by ``scaling_rates[l]``, then transformer blocks."""

    def __init__(self, config: VQVAEConfig, level: int) -> None:
        super().__init__()
        in_channels = config.in_channels if level == 0 else config.n_embd
        self.down = Downsample(in_channels, config.n_embd, config.scaling_rates[level])
        self.transformer = Transformer(config, config.n_layer_encoder, config.window_sizes[level])

    def forward(self, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """``(B, c, H, W)`` + mask -> ``(B, n_embd, H/r, W/r)`` + its mask."""
        x, mask = self.down(x, mask)
        return self.transformer(x, mask), mask


class Decoder(nn.Module):
    """Level ``l`` decoder: codes of levels ``l..n-1`` -> a map at level ``l-1`` (or image) size.

    1x1 in-projection of the concatenated (nearest-upsampled) codes, transformer blocks, then
    ConvTranspose2d upsampling by ``scaling_rates[l]`` to ``out_channels``.
    """

    def __init__(self, config: VQVAEConfig, level: int, out_channels: int) -> None:
        super().__init__()
        self.scales = config.level_scales[level:]
        self.in_proj = nn.ModuleList(
            nn.Conv2d(config.codebook_dim, config.n_embd, 1, bias=(j == 0))
            for j in range(len(self.scales))
        )
        self.transformer = Transformer(config, config.n_layer_decoder, config.window_sizes[level])
        self.up = Upsample(config.n_embd, out_channels, config.scaling_rates[level])

    def forward(self, codes: Sequence[Tensor], mask: Tensor, out_mask: Tensor) -> Tensor:
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
        h = self.transformer(h * mask[:, None], mask)
        return self.up(h, out_mask)


class RefineHead(nn.Module):
    """Full-resolution head: residual 3x3-conv blocks, then a 1x1 conv to the image channels.

    With ``symmetric_output`` it predicts four maps ``(a, b, theta, phi)`` and sets channel 0 to
    ``sym(a)`` on and below the diagonal (d) and ``sym(b)`` above it (omega), with
    ``sym(a) = (a + a^T) / 2``.
    """

    def __init__(self, config: VQVAEConfig) -> None:
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


@dataclass
class VQVAEOutput:
    """What :meth:`VQVAE.forward` returns (the model output contract of :mod:`protoken.model`,
    plus the VQ-VAE's own fields). Per-level lists and tensors are coarsest first.

    Attributes
    ----------
    recon : Tensor
        ``(B, 3, H, W)`` reconstruction, 0 at padded pixels.
    loss_sum : Tensor
        Scalar float32, sum of the reconstruction loss (``config.loss``) over what ``weight``
        counts.
    weight : Tensor
        Scalar, what ``loss_sum`` is a sum over: valid pixels x channels for the MSE, valid
        residue pairs i != j for the geometric loss (:meth:`VQVAE.loss_weight` of the mask).
    aux_loss : Tensor
        Scalar ``beta * commit_loss``, already normalised (a mean).
    metrics : dict of str to Tensor
        Detached values to log: ``codebook_usage`` and ``perplexity`` per level.
    loss : Tensor
        Scalar ``recon_loss + beta * commit_loss``.
    recon_loss : Tensor
        Scalar ``loss_sum / weight``.
    commit_loss : Tensor
        Scalar, sum over levels of the commitment losses.
    indices : list of Tensor
        Per level ``(B, H / s_l, W / s_l)`` int64 codes, -1 at padded tokens.
    usage : Tensor
        ``(n_levels,)`` fraction of each codebook used by the batch.
    perplexity : Tensor
        ``(n_levels,)`` perplexity of each level's code histogram in the batch.
    commit_losses : Tensor
        ``(n_levels,)`` commitment loss of each level.
    """

    recon: Tensor
    loss_sum: Tensor
    weight: Tensor
    aux_loss: Tensor
    metrics: dict[str, Tensor]
    loss: Tensor
    recon_loss: Tensor
    commit_loss: Tensor
    indices: list[Tensor]
    usage: Tensor
    perplexity: Tensor
    commit_losses: Tensor


class VQVAE(nn.Module):
    """Hierarchical VQ-VAE over padded batches of 6D images.

    Parameters
    ----------
    config : VQVAEConfig
    """

    def __init__(self, config: VQVAEConfig) -> None:
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
        """What :attr:`VQVAEOutput.loss_sum` of a batch with this ``(B, H, W)`` mask sums over
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

    def _decode_codes(self, codes: list[Tensor], masks: list[Tensor], mask: Tensor) -> Tensor:
        """Codes (finest first) -> image ``(B, C, H, W)``, zero at invalid pixels."""
        return self.head(self.decoders[0](codes, masks[0], mask), mask)

    def _encode(self, x: Tensor, mask: Tensor):
        """Run encoders and quantisers; codes and quantiser outputs finest first."""
        x = x * mask[:, None]
        feats, masks = [], []
        m = mask
        for encoder in self.encoders:
            x, m = encoder(x, m)
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
                cond = self.decoders[level](codes[level:], masks[level], masks[level - 1])
        return codes, outs, masks

    # -- public API --------------------------------------------------------------------------

    def forward(self, x: Tensor, mask: Tensor) -> VQVAEOutput:
        """Encode, quantise, decode and compute the losses.

        Parameters
        ----------
        x : Tensor
            ``(B, 3, H, W)`` images, zero-padded; H and W multiples of
            ``config.downsample_factor``.
        mask : Tensor
            ``(B, H, W)`` or ``(B, 1, H, W)`` bool, True at valid pixels.

        Returns
        -------
        VQVAEOutput
        """
        mask = self._check(x, mask)
        codes, outs, masks = self._encode(x, mask)
        recon = self._decode_codes(codes, masks, mask)
        loss_sum, weight = reconstruction_loss(recon, x, mask, self.config.loss)
        recon_loss = loss_sum / weight.clamp(min=1)
        commit_losses = torch.stack([o.commit_loss for o in reversed(outs)])
        commit_loss = commit_losses.sum()
        aux_loss = self.config.beta * commit_loss
        usage = torch.stack([o.usage for o in reversed(outs)])
        perplexity = torch.stack([o.perplexity for o in reversed(outs)])
        return VQVAEOutput(
            recon=recon,
            loss_sum=loss_sum,
            weight=weight,
            aux_loss=aux_loss,
            metrics={"codebook_usage": usage.detach(), "perplexity": perplexity.detach()},
            loss=recon_loss + aux_loss,
            recon_loss=recon_loss,
            commit_loss=commit_loss,
            indices=[o.indices for o in reversed(outs)],
            usage=usage,
            perplexity=perplexity,
            commit_losses=commit_losses.detach(),
        )

    @torch.no_grad()
    def encode(self, x: Tensor, mask: Tensor) -> list[Tensor]:
        """Images -> code indices.

        Call in eval mode (in training mode the codebooks' EMA is updated).

        Parameters
        ----------
        x : Tensor
            ``(B, 3, H, W)``, as for :meth:`forward`.
        mask : Tensor
            ``(B, H, W)`` or ``(B, 1, H, W)`` bool.

        Returns
        -------
        list of Tensor
            One ``(B, H / s_l, W / s_l)`` int64 grid per level, coarsest first
            (``s_l = prod(scaling_rates[:l + 1])``, so the last grid is ``H / scaling_rates[0]``);
            -1 at padded tokens. A protein of length L has valid codes in the top-left
            ``ceil(L / s_l)`` square.
        """
        mask = self._check(x, mask)
        _, outs, _ = self._encode(x, mask)
        return [o.indices for o in reversed(outs)]

    def decode(self, indices: Sequence[Tensor], lengths: Tensor | Sequence[int]) -> Tensor:
        """Code indices -> images.

        Parameters
        ----------
        indices : sequence of Tensor
            As returned by :meth:`encode`: coarsest first, level ``l`` of shape
            ``(B, H / s_l, W / s_l)``. Values outside each protein's valid square are ignored.
        lengths : Tensor or sequence of int
            ``(B,)`` protein lengths.

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
        return self._decode_codes(codes, masks, mask)
