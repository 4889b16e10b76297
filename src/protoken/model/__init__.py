"""Tokenizer models of 6D protein images, built by name through one small factory.

>>> from protoken.model import build_model, mask_from_lengths
>>> model = build_model("tiny")                  # a preset of any family, or a config
>>> out = model(x, mask)                         # x (B, 3, H, W), mask (B, H, W) bool
>>> codes = model.encode(x, mask)                # list of (B, h_l, w_l) int64, coarsest first
>>> images = model.decode(codes, lengths)        # (B, 3, H, W)

Families: ``hierarchical`` (:class:`VQVAE`, grids of codes per level; presets ``tiny``, ``small``,
``reference``; ``seed``, the old name of ``reference``, is still read) and ``residue``
(:class:`ResidueVQVAE`, one FSQ code per residue; presets ``residue-tiny``, ``residue-small``,
``residue-base``; ``encode`` returns one ``(B, L)`` tensor). A family registers its
config class, model class and presets in :data:`FAMILIES`; a checkpoint's ``model_config`` names its
family (no name: hierarchical, as every checkpoint written before families existed).

The output contract every family's ``forward(x, mask)`` meets (what ``protoken train`` uses):

``recon``
    ``(B, C, H, W)`` reconstruction, zero at padded pixels.
``loss_sum``
    Scalar float32: the sum over valid elements of the per-element reconstruction error (not a
    mean), so the training loop can divide the sum over ranks and accumulation steps by the
    global weight and weigh every residue pair alike whatever the batch it sits in.
``weight``
    Scalar: what ``loss_sum`` sums over (for the VQ-VAE, valid pixels x channels). The model
    also has ``loss_weight(mask) -> int`` giving the same number from the mask alone, so the
    loop knows the global weight of a step on the host before its forward passes.
``aux_loss``
    Scalar, auxiliary losses already normalised and weighted (the VQ-VAE's ``beta`` times its
    commitment losses): added once per micro-batch, averaged over micro-batches and ranks.
``metrics``
    Dict of detached tensors to log (scalars or per-level vectors), e.g. ``codebook_usage``.

so the loss the loop minimises is ``sum(loss_sum) / sum(weight) + mean(aux_loss)``.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from protoken.model.config import PRESET_ALIASES, PRESETS, VQVAEConfig
from protoken.model.quantize import QuantizerOutput, VectorQuantizer
from protoken.model.residue import RESIDUE_PRESETS, ResidueConfig, ResidueOutput, ResidueVQVAE
from protoken.model.vqvae import VQVAE, VQVAEOutput, mask_from_lengths, symmetrise

__all__ = [
    "DEFAULT_FAMILY",
    "FAMILIES",
    "PRESETS",
    "VQVAE",
    "QuantizerOutput",
    "RESIDUE_PRESETS",
    "ResidueConfig",
    "ResidueOutput",
    "ResidueVQVAE",
    "VQVAEConfig",
    "VQVAEOutput",
    "VectorQuantizer",
    "build_model",
    "config_from_dict",
    "config_to_dict",
    "family_of",
    "mask_from_lengths",
    "preset_config",
    "symmetrise",
]

#: family name -> (config class, model class, presets {name: config}). The config class has
#: ``to_dict()``, ``from_dict(d)`` and ``dataclasses.replace``-able fields.
FAMILIES: dict[str, tuple[type, type[nn.Module], dict[str, Any]]] = {
    "hierarchical": (VQVAEConfig, VQVAE, PRESETS),
    "residue": (ResidueConfig, ResidueVQVAE, RESIDUE_PRESETS),
}
#: The family of a ``model_config`` without a ``family`` field (checkpoints of format 1).
DEFAULT_FAMILY = "hierarchical"


def family_of(config: Any) -> str:
    """The family name of a config object."""
    for name, (config_cls, _, _) in FAMILIES.items():
        if type(config) is config_cls:
            return name
    raise TypeError(f"not the config of a registered model family: {type(config).__name__}")


def config_to_dict(config: Any) -> dict[str, Any]:
    """A config as stored in checkpoints and RUN/config.json: its fields plus ``family``."""
    return {"family": family_of(config), **config.to_dict()}


def config_from_dict(d: dict[str, Any]) -> Any:
    """Inverse of :func:`config_to_dict`; dispatches on ``family`` (default hierarchical)."""
    d = dict(d)
    family = d.pop("family", DEFAULT_FAMILY)
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; known: {sorted(FAMILIES)}")
    return FAMILIES[family][0].from_dict(d)


def preset_config(name: str, overrides: dict[str, Any] | None = None) -> Any:
    """The config of a preset of any family (``tiny``, ``residue-small``, ...) with some
    fields overridden (lists become tuples)."""
    overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in (overrides or {}).items()}
    name = PRESET_ALIASES.get(name, name)  # names of older versions
    for config_cls, _, presets in FAMILIES.values():
        if name in presets:
            if hasattr(config_cls, "preset"):
                return config_cls.preset(name, **overrides)
            import dataclasses

            return dataclasses.replace(presets[name], **overrides)
    known = sorted(p for _, _, presets in FAMILIES.values() for p in presets)
    raise ValueError(f"unknown model preset {name!r}; choose from {', '.join(known)}")


def build_model(config: Any, overrides: dict[str, Any] | None = None) -> nn.Module:
    """A freshly initialised model from a preset name, a config dict (with ``family``) or a
    config object; ``overrides`` replace fields of a preset."""
    if isinstance(config, str):
        config = preset_config(config, overrides)
    elif isinstance(config, dict):
        config = config_from_dict({**config, **(overrides or {})})
    elif overrides:
        raise ValueError("overrides apply to a preset name or a config dict")
    return FAMILIES[family_of(config)][1](config)
