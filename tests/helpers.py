"""Small helpers shared by several test modules (not tests themselves)."""

from __future__ import annotations

import numpy as np

# A model smaller than the tiny preset, so that a CPU test step takes a fraction of a second.
MICRO = {
    "n_embd": 32, "mlp_hidden_dim": 64, "n_head": 2, "attn_dim": 32, "rope_dim": 8,
    "q_channels": 16, "codebook_dim": 16, "codebook_size": 64, "refine_channels": 16,
}  # fmt: skip


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A uniformly random proper rotation matrix (det +1)."""
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q *= np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] *= -1
    return q
