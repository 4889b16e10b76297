"""Tokenizer models of 6D protein images, built by name through one small factory.

>>> from protoken.model import build_model, mask_from_lengths
>>> model = build_model("tiny")                  # a preset of any family, or a config
>>> out = model(x, mask)                         # x (B, 3, H, W), mask (B, H, W) bool
>>> codes = model.encode(x, mask)                # the family's codes, -1 at padding
>>> images = model.decode(codes, lengths)        # (B, 3, H, W)
>>> per_protein = model.unbatch_codes(codes, lengths)     # list of [arrays] per protein
>>> codes = model.batch_codes(per_protein, lengths)       # and back (shapes checked)

Families:

``hierarchical`` (:class:`HierarchicalVQVAE`, :mod:`protoken.model.hierarchical`)
    Grids of codes per level (coarsest first); presets ``tiny``, ``small``, ``reference``
    (``seed``, its old name, is still read).
``residue`` (:class:`ResidueVQVAE`, :mod:`protoken.model.residue`)
    K residual-FSQ codes per residue, ``(B, L, K)``; presets ``residue-tiny``,
    ``residue-small``, ``residue-base``.

A family registers its config class, model class and presets in :data:`FAMILIES`; a
checkpoint's ``model_config`` names its family (no name: hierarchical, as every checkpoint
written before families existed). Every family takes ``chains`` (the ``(B, L)`` chain index
of a complex's residues) in ``forward``, ``encode`` and ``decode``, and returns
:class:`ModelOutput` from ``forward`` (:mod:`protoken.model.contract`), so the loss the
training loop minimises is ``sum(loss_sum) / sum(weight) + mean(aux_loss)``; its
``loss_weight(mask)`` gives ``weight`` from the mask alone, so the loop knows the global weight
of a step on the host before its forward passes.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from protoken.model.contract import ModelOutput, mask_from_lengths
from protoken.model.hierarchical import (
    HIERARCHICAL_PRESETS,
    PRESET_ALIASES,
    HierarchicalConfig,
    HierarchicalVQVAE,
)
from protoken.model.residue import RESIDUE_PRESETS, ResidueConfig, ResidueVQVAE

__all__ = [
    "DEFAULT_FAMILY",
    "FAMILIES",
    "HIERARCHICAL_PRESETS",
    "HierarchicalConfig",
    "HierarchicalVQVAE",
    "ModelOutput",
    "RESIDUE_PRESETS",
    "ResidueConfig",
    "ResidueVQVAE",
    "build_model",
    "config_from_dict",
    "config_to_dict",
    "family_of",
    "mask_from_lengths",
    "preset_config",
]

#: family name -> (config class, model class, presets {name: config}). The config class has
#: ``to_dict()``, ``from_dict(d)`` and ``dataclasses.replace``-able fields.
FAMILIES: dict[str, tuple[type, type[nn.Module], dict[str, Any]]] = {
    "hierarchical": (HierarchicalConfig, HierarchicalVQVAE, HIERARCHICAL_PRESETS),
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
