"""The hyper-parameters of the hierarchical VQ-VAE, as one JSON-serialisable dataclass.

Configs and checkpoints written before a field or preset was renamed still load: old field names
(:data:`RENAMED_FIELDS`, e.g. ``latent_dim``) and preset names (:data:`PRESET_ALIASES`, e.g.
``seed``) are read as the new ones.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from protoken.model.losses import LossConfig

# A level runs global self-attention when its token grid is at most this many tokens a side for
# the largest image the presets are meant for (1024 residues); finer levels use windows.
_GLOBAL_ATTN_MAX_GRID = 32
_DESIGN_MAX_SIZE = 1024
_DEFAULT_WINDOW = 8

#: Field names of older versions -> their current names (read by :meth:`VQVAEConfig.from_dict`
#: and :meth:`VQVAEConfig.preset`). ``latent_dim`` was the attention width, not the latent.
RENAMED_FIELDS = {"latent_dim": "attn_dim"}
#: Preset names of older versions -> their current names. "seed" now means only an RNG seed.
PRESET_ALIASES = {"seed": "reference"}


@dataclass(frozen=True)
class VQVAEConfig:
    """Hyper-parameters of :class:`protoken.model.VQVAE`.

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
    def from_dict(cls, d: dict[str, Any]) -> VQVAEConfig:
        """Inverse of :meth:`to_dict` (old field names accepted); unknown keys are an error."""
        d = _current_names(d)
        d["loss"] = LossConfig().with_overrides(d)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown VQVAEConfig fields: {sorted(unknown)}")
        return cls(**d)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> VQVAEConfig:
        """A named preset (``reference``, ``small``, ``tiny``; old names accepted), optionally
        with fields overridden (old field names accepted)."""
        name = PRESET_ALIASES.get(name, name)
        if name not in PRESETS:
            raise KeyError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
        overrides = _current_names(overrides)
        overrides["loss"] = PRESETS[name].loss.with_overrides(overrides)
        if "scaling_rates" in overrides:  # re-derive the windows unless given
            overrides.setdefault("window_sizes", None)
        return dataclasses.replace(PRESETS[name], **overrides)


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
PRESETS: dict[str, VQVAEConfig] = {}
PRESETS["reference"] = VQVAEConfig()
PRESETS["small"] = VQVAEConfig(
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
PRESETS["tiny"] = VQVAEConfig(
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
