"""What every model family takes and returns: padded batches with masks, and one output type.

A batch holds ``B`` images zero-padded to a common side with a ``(B, H, W)`` bool mask of valid
pixels (:func:`mask_from_lengths`); complexes add ``chains``, the ``(B, L)`` chain index of each
residue (chains contiguous, in order; None: one chain each).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["ModelOutput", "mask_from_lengths", "same_chain"]


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


def same_chain(chains: Tensor | None, mask: Tensor) -> Tensor:
    """``(B, H, W)`` bool: valid pixels whose two residues belong to one chain (``chains``
    ``(B, L)``, L <= H; None: every valid pixel)."""
    if chains is None:
        return mask
    chains = chains.to(mask.device)
    n = mask.shape[-1]
    if chains.shape[-1] < n:
        chains = torch.nn.functional.pad(chains, (0, n - chains.shape[-1]), value=-1)
    return mask & (chains[:, :, None] == chains[:, None, :])


@dataclass
class ModelOutput:
    """What ``forward(x, mask)`` of every family returns (what ``protoken train`` uses).

    Attributes
    ----------
    recon : Tensor
        ``(B, C, H, W)`` reconstruction, zero at padded pixels.
    loss_sum : Tensor
        Scalar float32: the sum over valid elements of the reconstruction error (not a mean),
        so the training loop can divide sums over ranks and accumulation steps by the global
        weight.
    weight : Tensor
        Scalar: what ``loss_sum`` sums over (the model's ``loss_weight(mask)`` of the batch).
    aux_loss : Tensor
        Scalar, auxiliary losses already normalised and weighted (the hierarchical family's
        ``beta`` times its commitment losses; 0 for FSQ).
    metrics : dict of str to Tensor
        Detached values to log (scalars or per-level / per-stage vectors): ``codebook_usage``,
        ``perplexity``, and the family's own.
    codes : Any
        The codes in the family's own shape (a list of grids per level, coarsest first, or
        ``(B, L, K)`` stages per residue), -1 at padding.
    """

    recon: Tensor
    loss_sum: Tensor
    weight: Tensor
    aux_loss: Tensor
    metrics: dict[str, Tensor]
    codes: Any

    @property
    def loss(self) -> Tensor:
        """``loss_sum / weight + aux_loss``: what one batch alone would minimise."""
        return self.loss_sum / self.weight.clamp(min=1) + self.aux_loss
