"""Reconstruction losses of 6D images, shared by every model family.

Images are the codec's (:mod:`protoken.codec`): values in [-1, 1], channel 0 holding
``d / dmax * 2 - 1`` on and below the diagonal and ``omega / pi`` above it, channel 1
``theta / pi``, channel 2 ``phi / pi * 2 - 1``.

Two losses, both returning ``(loss_sum, weight)`` so the training loop can divide sums over ranks
and micro-batches by the global weight (the model output contract of :mod:`protoken.model`):

:func:`mse_loss`
    The reference design's plain pixel MSE (sum over valid pixels and channels).
:func:`geometric_loss`
    A loss suited to what the channels hold, per ordered residue pair ``(i, j)``, ``i != j``:

    - **distance**: Huber loss (``delta`` Angstrom) on ``d`` in Angstrom, weighted
      ``1 / (1 + d / 10)`` so contacts (which decide the fold) weigh more than 80 A pairs;
      where the true ``d`` is clipped at ``dmax`` only a prediction below ``dmax`` is an error;
    - **angles**: ``1 - cos(error)`` for omega, theta and phi of pairs closer than
      ``angle_cutoff`` (an error of 2 pi is no error; far pairs' angles carry little);
    - **frame**: the position of Cb_j in residue i's frame, ``d (sin phi cos theta, sin phi
      sin theta, cos phi)`` (``phi`` the planar angle CA_i-Cb_i-Cb_j, ``theta`` the dihedral
      N_i-CA_i-Cb_i-Cb_j), compared as vectors with the error clamped at 10 A (like AlphaFold's
      FAPE) for pairs closer than ``frame_cutoff``. It couples d, theta and phi and is the only
      term that sees the sign of theta together with the distance, the handedness of the fold:
      without it, decoders readily learn mirror images (measured on the per-residue family).

    In a complex, every term of a pair of residues of *different* chains closer than
    ``frame_cutoff`` (its interfaces) is multiplied by ``interface_weight`` (1: no difference).
    Such pairs are a few percent of a complex's pairs, yet they alone place the chains.

    ``weight`` is the number of valid ordered pairs ``i != j``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from protoken.model.contract import same_chain

__all__ = [
    "LossConfig",
    "geometric_loss",
    "geometric_weight",
    "loss_weight",
    "mse_loss",
    "reconstruction_loss",
    "unpack_image",
]

_FAPE_CLAMP = 10.0


@dataclass(frozen=True)
class LossConfig:
    """The reconstruction loss of a model: ``kind`` (``"mse"``, the reference design's, or
    ``"geometric"``) and the settings of :func:`geometric_loss` (``dmax``: the codec's distance
    cut-off in Angstrom). One field of every family's config (``config.loss``)."""

    kind: str = "mse"
    dmax: float = 80.0
    delta: float = 1.0
    angle_cutoff: float = 20.0
    angle_weight: float = 1.0
    frame_cutoff: float = 20.0
    frame_weight: float = 1.0
    interface_weight: float = 1.0

    #: The settings besides ``kind`` (flat fields of the model configs written before this
    #: class, read by :meth:`from_fields`).
    FIELDS: ClassVar[tuple[str, ...]] = (
        "dmax", "delta", "angle_cutoff", "angle_weight", "frame_cutoff", "frame_weight",
        "interface_weight",
    )  # fmt: skip

    def __post_init__(self) -> None:
        if self.kind not in ("mse", "geometric"):
            raise ValueError(f"loss must be 'mse' or 'geometric', got {self.kind!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def with_overrides(self, d: dict[str, Any]) -> LossConfig:
        """This loss with the loss entries of a config dict applied, removing them from ``d``:
        ``loss`` as a dict of this class's fields, a LossConfig or a kind name, and the settings
        as flat fields (as configs of older versions and ``--set dmax=...`` give them)."""
        loss = d.pop("loss", None)
        flat = {k: d.pop(k) for k in self.FIELDS if k in d}
        if isinstance(loss, LossConfig):
            base = loss
        elif isinstance(loss, dict):
            base = dataclasses.replace(self, **loss)
        else:
            base = dataclasses.replace(self, kind=loss) if loss else self
        return dataclasses.replace(base, **flat)


def unpack_image(image: Tensor, dmax: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(B, 3, L, L)`` codec image -> ``d, omega, theta, phi`` each ``(B, L, L)``, with ``d``
    and ``omega`` made symmetric from the lower and upper triangle of channel 0."""
    c0 = image[:, 0]
    n = c0.shape[-1]
    lower = torch.ones(n, n, dtype=torch.bool, device=image.device).tril(-1)
    low = torch.where(lower, c0, torch.zeros_like(c0))
    up = torch.where(lower.T, c0, torch.zeros_like(c0))
    d = (low + low.transpose(-1, -2) + 1.0) * (dmax / 2.0)
    omega = (up + up.transpose(-1, -2)) * math.pi
    theta = image[:, 1] * math.pi
    phi = (image[:, 2] + 1.0) * (math.pi / 2.0)
    return d, omega, theta, phi


def pair_mask(mask: Tensor) -> Tensor:
    """``(B, L, L)`` valid pixels -> valid ordered pairs ``i != j``."""
    n = mask.shape[-1]
    eye = torch.eye(n, dtype=torch.bool, device=mask.device)
    return mask & ~eye


def geometric_weight(mask: Tensor) -> int:
    """What :func:`geometric_loss` sums over for a ``(B, L, L)`` mask (valid pairs i != j)."""
    return int(mask.sum()) - int(mask.diagonal(dim1=-2, dim2=-1).sum())


def mse_loss(recon: Tensor, target: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Sum of squared errors over valid pixels and channels, and that count."""
    m = mask[:, None]
    loss_sum = (((recon.float() - target.float()) * m) ** 2).sum()
    return loss_sum, mask.sum() * target.shape[1]


def _frame_vector(d: Tensor, theta: Tensor, phi: Tensor) -> Tensor:
    s = torch.sin(phi)
    return (
        torch.stack([s * torch.cos(theta), s * torch.sin(theta), torch.cos(phi)], -1) * d[..., None]
    )


def geometric_loss(
    recon: Tensor, target: Tensor, mask: Tensor, w: LossConfig, other_chain: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """The geometric loss (see the module docstring) of ``(B, 3, L, L)`` images;
    ``other_chain`` ``(B or 1, L, L)`` bool marks the pairs of residues of different chains
    (None: single chains), whose near pairs weigh ``w.interface_weight``.

    Returns
    -------
    loss_sum, weight : Tensor
        Scalar float32 sum over valid ordered pairs ``i != j`` and their count.
    """
    pm = pair_mask(mask.bool())
    d_p, om_p, th_p, ph_p = unpack_image(recon.float(), w.dmax)
    with torch.no_grad():
        d_t, om_t, th_t, ph_t = unpack_image(target.float(), w.dmax)
        clipped = d_t >= w.dmax * (1.0 - 1e-3)
        dist_w = 1.0 / (1.0 + d_t / 10.0)
        near = (d_t < w.angle_cutoff) & pm
        framed = (d_t < w.frame_cutoff) & pm
        if other_chain is not None and w.interface_weight != 1.0:
            inter = other_chain & framed
            pair_w = 1.0 + (w.interface_weight - 1.0) * inter.float()
            dist_w, near, framed = dist_w * pair_w, near * pair_w, framed * pair_w
    err = torch.where(clipped, F.relu(d_t - d_p), d_p - d_t)
    dist = F.huber_loss(err, torch.zeros_like(err), reduction="none", delta=w.delta) * dist_w
    total = (dist * pm).sum()
    if w.angle_weight:
        ang = (1 - torch.cos(om_p - om_t)) + (1 - torch.cos(th_p - th_t))
        ang = ang + (1 - torch.cos(ph_p - ph_t))
        total = total + w.angle_weight * (ang * near).sum()
    if w.frame_weight:
        v_p = _frame_vector(d_p, th_p, ph_p)
        v_t = _frame_vector(d_t, th_t, ph_t)
        fe = torch.sqrt(((v_p - v_t) ** 2).sum(-1) + 1e-8).clamp(max=_FAPE_CLAMP)
        total = total + w.frame_weight * (fe * framed).sum()
    return total, pm.sum()


def reconstruction_loss(
    recon: Tensor, target: Tensor, mask: Tensor, loss: LossConfig, chains: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """The loss ``loss`` asks for (``loss.kind``: ``"mse"`` or ``"geometric"``):
    ``(loss_sum, weight)``. ``chains`` ``(B, L)``: each residue's chain index (complexes; None:
    single chains), whose interfaces weigh ``loss.interface_weight`` in the geometric loss (the
    MSE weighs every pixel alike)."""
    if loss.kind == "geometric":
        other = None
        if chains is not None and loss.interface_weight != 1.0:
            other = mask & ~same_chain(chains, mask)
        return geometric_loss(recon, target, mask, loss, other)
    return mse_loss(recon, target, mask)


def loss_weight(mask: Tensor, loss: LossConfig, channels: int = 3) -> int:
    """What :func:`reconstruction_loss` sums over for a ``(B, H, W)`` or ``(B, 1, H, W)`` mask,
    computed where the mask is (valid pixels x channels for the MSE, valid pairs i != j for
    the geometric loss)."""
    if mask.ndim == 4:
        mask = mask[:, 0]
    if loss.kind == "geometric":
        return geometric_weight(mask)
    return int(mask.sum()) * channels
