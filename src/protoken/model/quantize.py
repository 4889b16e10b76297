"""Vector quantisation of a token grid with an EMA codebook (van den Oord et al. 2017).

One :class:`VectorQuantizer` per level: a 1x1 projection to ``codebook_dim``, the nearest code
by squared L2 distance, a straight-through estimator, the commitment loss
``||sg[z_q] - z_e||^2``, and in training mode the EMA codebook update

    N_k <- decay N_k + (1 - decay) n_k                 (n_k: batch vectors assigned to code k)
    m_k <- decay m_k + (1 - decay) sum_{i -> k} z_i
    e_k <- m_k / Ñ_k,   Ñ_k = (N_k + eps) / (sum N + K eps) * sum N   (Laplace smoothing)

followed by a restart of dead codes. Only valid (unpadded) tokens count anywhere. Distances,
the EMA statistics and the commitment loss are computed in float32 whatever the autocast.
When ``torch.distributed`` is initialised with more than one rank, ``n_k`` and the sums are
all-reduced before the update and restarts draw from all ranks, so every rank holds the same
codebook (a training-mode forward is then a collective call).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn


def _world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def _all_reduce(t: Tensor) -> Tensor:
    if _world_size() > 1:
        dist.all_reduce(t)
    return t


def _all_gather_cat(t: Tensor) -> Tensor:
    """Concatenate ``t`` (same shape on every rank) over ranks along dim 0, rank-major."""
    if _world_size() == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


@dataclass
class QuantizerOutput:
    """What one level's quantiser returns.

    Attributes
    ----------
    quantized : Tensor
        ``(B, codebook_dim, h, w)`` code vectors (straight-through gradient to the input), zero
        at invalid tokens.
    indices : Tensor
        ``(B, h, w)`` int64 code indices, -1 at invalid tokens.
    commit_loss : Tensor
        Scalar, mean of ``(z_e - sg[z_q])^2`` over valid tokens and features.
    usage : Tensor
        Scalar, fraction of the codebook used by the batch's valid tokens.
    perplexity : Tensor
        Scalar, ``exp`` of the entropy of the batch's code histogram.
    """

    quantized: Tensor
    indices: Tensor
    commit_loss: Tensor
    usage: Tensor
    perplexity: Tensor


def code_statistics(counts: Tensor) -> tuple[Tensor, Tensor]:
    """Of a histogram of codes ``(codebook_size,)``: the fraction of codes used and the
    perplexity ``exp(entropy)`` of their distribution."""
    probs = counts / counts.sum().clamp(min=1)
    perplexity = torch.exp(-(probs * torch.log(probs.clamp(min=1e-12))).sum())
    return (counts > 0).float().mean(), perplexity


class VectorQuantizer(nn.Module):
    """EMA vector quantiser of one level.

    Parameters
    ----------
    in_channels : int
        Channels of the input map (projected to ``codebook_dim`` by a 1x1 convolution).
    codebook_dim, codebook_size : int
        Code vector size ``D`` and number of codes ``K``.
    decay, eps : float
        EMA decay and Laplace smoothing constant.
    dead_code_threshold : float
        Codes whose EMA cluster size is below this fraction of the mean cluster size are
        restarted (at every training step) from random valid inputs of the batch, and given the
        mean cluster size. 0 disables restarts. The codebook is initialised from the first
        training batch's valid inputs (see :meth:`_initialise`).
    """

    def __init__(
        self,
        in_channels: int,
        codebook_dim: int,
        codebook_size: int,
        decay: float = 0.99,
        eps: float = 1e-5,
        dead_code_threshold: float = 0.03,
    ) -> None:
        super().__init__()
        self.codebook_size = codebook_size
        self.decay = decay
        self.eps = eps
        self.dead_code_threshold = dead_code_threshold
        self.proj = nn.Conv2d(in_channels, codebook_dim, 1)
        self.register_buffer("embed", torch.randn(codebook_size, codebook_dim))
        self.register_buffer("embed_avg", self.embed.clone())
        self.register_buffer("cluster_size", torch.ones(codebook_size))
        self.register_buffer("initialised", torch.tensor(False))

    def lookup(self, indices: Tensor, mask: Tensor) -> Tensor:
        """Code vectors of an index grid.

        Parameters
        ----------
        indices : Tensor
            ``(B, h, w)`` integer indices (any value at invalid tokens).
        mask : Tensor
            ``(B, h, w)`` bool of valid tokens.

        Returns
        -------
        Tensor
            ``(B, codebook_dim, h, w)`` float32, zero at invalid tokens.
        """
        q = F.embedding(indices.clamp(0, self.codebook_size - 1), self.embed)
        return (q * mask.unsqueeze(-1)).permute(0, 3, 1, 2)

    @torch.no_grad()
    def nearest(self, z: Tensor) -> Tensor:
        """Index of the nearest code (squared L2) of each row of ``z`` ``(N, D)`` -> ``(N,)``."""
        embed = self.embed
        e2 = (embed * embed).sum(dim=1)
        rows = max(1, 2**22 // self.codebook_size)  # bound the (rows, K) distance block (16 MB)
        # ||z||^2 is the same for every code, so it does not change the argmin
        return torch.cat([(e2 - 2.0 * c @ embed.t()).argmin(dim=1) for c in z.split(rows)])

    def forward(self, x: Tensor, mask: Tensor) -> QuantizerOutput:
        """Quantise a map.

        Parameters
        ----------
        x : Tensor
            ``(B, in_channels, h, w)`` input.
        mask : Tensor
            ``(B, h, w)`` bool, True at valid tokens.

        Returns
        -------
        QuantizerOutput
        """
        B, _, h, w = x.shape
        with torch.autocast(device_type=x.device.type, enabled=False):
            z = self.proj(x.float()).permute(0, 2, 3, 1).reshape(B * h * w, -1)
            valid = mask.reshape(-1)
            update = self.training
            if update and not bool(self.initialised):
                self._initialise(z[valid])
            idx = self.nearest(z)
            q = F.embedding(idx, self.embed)  # a copy, taken before the EMA update
            counts = torch.bincount(idx[valid], minlength=self.codebook_size).float()
            if update:
                counts = self._update(z[valid], idx[valid], counts)
            sq = ((z - q) ** 2).sum(dim=1)
            n_valid = valid.sum().clamp(min=1)
            commit = (sq * valid).sum() / (n_valid * z.shape[1])
            # straight-through: the value is exactly q, the gradient goes to z
            q = (q + (z - z.detach())) * valid.unsqueeze(1)
            quantized = q.reshape(B, h, w, -1).permute(0, 3, 1, 2)
            idx = torch.where(valid, idx, -1).reshape(B, h, w)
            usage, perplexity = code_statistics(counts)
        return QuantizerOutput(quantized, idx, commit, usage, perplexity)

    @torch.no_grad()
    def _update(self, z: Tensor, idx: Tensor, counts: Tensor) -> Tensor:
        """EMA update from valid inputs ``z`` ``(N, D)`` and their codes; returns global counts."""
        sums = torch.zeros_like(self.embed).index_add_(0, idx, z)
        _all_reduce(counts)
        _all_reduce(sums)
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.embed_avg.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        n = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (n + self.codebook_size * self.eps) * n
        # a code with no EMA mass yet (never assigned since its (re)start) keeps its vector
        used = (self.cluster_size > 0).unsqueeze(1)
        self.embed.copy_(torch.where(used, self.embed_avg / smoothed.unsqueeze(1), self.embed))
        if self.dead_code_threshold > 0:
            dead = self.cluster_size < self.dead_code_threshold * self.cluster_size.mean()
            if bool(dead.any()):
                self._restart(z, dead)
        return counts

    @torch.no_grad()
    def restart_dead_codes(self, z: Tensor, threshold: float | None = None) -> int:
        """Restart the codes whose EMA cluster size is below ``threshold`` x the mean.

        Done automatically at every training step when ``dead_code_threshold > 0``; call it
        by hand to restart with another threshold. Collective under ``torch.distributed``.

        Parameters
        ----------
        z : Tensor
            ``(N, codebook_dim)`` candidate vectors (e.g. projected encoder outputs).
        threshold : float, optional
            Defaults to ``dead_code_threshold``.

        Returns
        -------
        int
            Number of codes restarted (at most the number of candidates over all ranks).
        """
        threshold = self.dead_code_threshold if threshold is None else threshold
        dead = self.cluster_size < threshold * self.cluster_size.mean()
        return self._restart(z.float(), dead) if bool(dead.any()) else 0

    @torch.no_grad()
    def _restart(self, z: Tensor, dead: Tensor) -> int:
        """Set ``dead`` codes to distinct random rows of ``z``, drawn on every rank.

        Each rank draws up to ``ceil(n_dead / world)`` rows without replacement; the draws are
        gathered, interleaved by rank, and given to the dead codes in index order, so all ranks
        agree. With fewer rows than dead codes, the remaining codes wait for a later batch.
        """
        world = _world_size()
        dead_idx = dead.nonzero().squeeze(1)
        per_rank = -(-dead_idx.numel() // world)
        n_local = min(per_rank, z.shape[0])
        local = z.new_zeros(per_rank, z.shape[1])
        local[:n_local] = z[torch.randperm(z.shape[0], device=z.device)[:n_local]]
        n_each = _all_gather_cat(torch.tensor([n_local], device=z.device))  # (world,)
        candidates = _all_gather_cat(local).view(world, per_rank, -1).transpose(0, 1)
        drawn = torch.arange(per_rank, device=z.device)[:, None] < n_each[None, :]
        new = candidates[drawn][: dead_idx.numel()]  # (n, D), slot-major then rank
        dead_idx = dead_idx[: new.shape[0]]
        size = self.cluster_size.mean()
        self.embed[dead_idx] = new
        self.cluster_size[dead_idx] = size
        self.embed_avg[dead_idx] = new * size
        return int(dead_idx.numel())

    @torch.no_grad()
    def _initialise(self, z: Tensor) -> None:
        """Data-dependent init: as many codes as there are tokens (over all ranks) are set to
        distinct tokens, and every code starts with zero EMA mass.

        Starting the cluster sizes at zero makes the early EMA judge each code on the steps seen
        so far (as a bias-corrected average would), so codes left unused while the encoder's
        outputs move fast in the first steps are restarted within a few steps instead of after
        hundreds, which is what keeps the codebooks from collapsing early in training.
        """
        self.cluster_size.zero_()
        self.embed_avg.zero_()
        self.initialised.fill_(True)
        self._restart(z, torch.ones_like(self.cluster_size, dtype=torch.bool))
