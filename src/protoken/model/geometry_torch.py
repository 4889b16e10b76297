"""The 6D image of a backbone, differentiably, in torch: the formulas of
:mod:`protoken.geometry` (trRosetta's, the reference design's) on batched tensors, so a decoder
that predicts coordinates yields an image consistent with a real structure by construction.

Shapes: coordinates ``(B, L, 3)``; pair features and images ``(B, L, L)`` / ``(B, 3, L, L)``.
The tests check every function against :func:`protoken.geometry.sixd` and
:func:`protoken.codec.features_to_image` on real structures.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["backbone_from_frames", "features_to_image", "rotation_from_6d", "sixd", "virtual_cb"]

CB_A, CB_B, CB_C = -0.58273431, 0.56802827, -0.54067466
#: Ideal backbone atoms in a residue's local frame (Angstrom; AlphaFold's rigid-group literature
#: values for alanine): CA at the origin, C on the x axis, N in the xy plane.
IDEAL_N = (-0.525, 1.363, 0.0)
IDEAL_C = (1.526, 0.0, 0.0)
_EPS = 1e-8


def rotation_from_6d(a: Tensor, b: Tensor) -> Tensor:
    """Rotation matrices ``(..., 3, 3)`` (columns e1, e2, e3) from two 3-vectors by Gram-Schmidt
    (Zhou et al. 2019's continuous 6D representation)."""
    e1 = a / (a.norm(dim=-1, keepdim=True) + _EPS)
    b = b - (e1 * b).sum(-1, keepdim=True) * e1
    e2 = b / (b.norm(dim=-1, keepdim=True) + _EPS)
    e3 = torch.cross(e1, e2, dim=-1)
    return torch.stack([e1, e2, e3], dim=-1)


def backbone_from_frames(rot: Tensor, trans: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Ideal N, CA, C ``(..., 3)`` of residues with frames ``rot (..., 3, 3)``, ``trans``."""
    n_local = torch.tensor(IDEAL_N, dtype=trans.dtype, device=trans.device)
    c_local = torch.tensor(IDEAL_C, dtype=trans.dtype, device=trans.device)
    n = trans + (rot @ n_local[:, None])[..., 0]
    c = trans + (rot @ c_local[:, None])[..., 0]
    return n, trans, c


def virtual_cb(n: Tensor, ca: Tensor, c: Tensor) -> Tensor:
    """The reference design's virtual C-beta."""
    b = ca - n
    cc = c - ca
    a = torch.cross(b, cc, dim=-1)
    return CB_A * a + CB_B * b + CB_C * cc + ca


def _dihedral(p0: Tensor, p1: Tensor, p2: Tensor, p3: Tensor) -> Tensor:
    b0 = p0 - p1
    b1 = p2 - p1
    b2 = p3 - p2
    b1n = b1 / (b1.norm(dim=-1, keepdim=True) + _EPS)
    v = b0 - (b0 * b1n).sum(-1, keepdim=True) * b1n
    w = b2 - (b2 * b1n).sum(-1, keepdim=True) * b1n
    x = (v * w).sum(-1)
    y = (torch.cross(b1n, v, dim=-1) * w).sum(-1)
    return torch.atan2(y, x + _EPS * (x == 0))


def _angle(p0: Tensor, p1: Tensor, p2: Tensor) -> Tensor:
    u = p0 - p1
    v = p2 - p1
    cos = (u * v).sum(-1) / (u.norm(dim=-1) * v.norm(dim=-1) + _EPS)
    return torch.acos(cos.clamp(-1 + 1e-6, 1 - 1e-6))


def sixd(n: Tensor, ca: Tensor, c: Tensor, dmax: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``d, omega, theta, phi`` ``(B, L, L)`` of backbones ``(B, L, 3)`` as
    :func:`protoken.geometry.sixd` defines them: pairs ``i != j`` with ``d < dmax`` get the
    features, every other pair ``d = dmax`` and zero angles."""
    cb = virtual_cb(n, ca, c)
    L = cb.shape[-2]
    ci, cj = cb[:, :, None], cb[:, None, :]
    ai, aj = ca[:, :, None], ca[:, None, :]
    ni = n[:, :, None]
    shape = (cb.shape[0], L, L, 3)
    d = ((cj - ci) ** 2).sum(-1).add(_EPS).sqrt()
    omega = _dihedral(ai.expand(shape), ci.expand(shape), cj.expand(shape), aj.expand(shape))
    theta = _dihedral(ni.expand(shape), ai.expand(shape), ci.expand(shape), cj.expand(shape))
    phi = _angle(ai.expand(shape), ci.expand(shape), cj.expand(shape))
    eye = torch.eye(L, dtype=torch.bool, device=cb.device)
    far = (d >= dmax) | eye
    zero = torch.zeros_like(d)
    return (
        torch.where(far, torch.full_like(d, dmax), d),
        torch.where(far, zero, omega),
        torch.where(far, zero, theta),
        torch.where(far, zero, phi),
    )


def features_to_image(d: Tensor, omega: Tensor, theta: Tensor, phi: Tensor, dmax: float) -> Tensor:
    """The codec's image layout (:func:`protoken.codec.features_to_image`) of ``(B, L, L)``
    features: ``(B, 3, L, L)`` in [-1, 1]."""
    L = d.shape[-1]
    lower = torch.ones(L, L, dtype=torch.bool, device=d.device).tril()
    c0 = torch.where(lower, d / dmax * 2.0 - 1.0, omega / math.pi)
    return torch.stack([c0, theta / math.pi, phi * (2.0 / math.pi) - 1.0], dim=1)
