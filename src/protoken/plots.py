"""Pictures of training samples: input | reconstruction | error, per channel (matplotlib)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from protoken.fileio import atomic_path

__all__ = ["save_samples"]

CHANNELS = ("ch0: d (lower) / omega (upper)", "ch1: theta", "ch2: phi")


def save_samples(path: str, samples: Sequence[tuple[np.ndarray, np.ndarray, int, str]]) -> None:
    """Write a PNG grid: one row per protein and channel, columns input | reconstruction |
    |error|.

    Parameters
    ----------
    path : str
        Output PNG (written atomically).
    samples : sequence of (input, reconstruction, length, id)
        Images (3, L, L) in [-1, 1] (after undoing any standardisation).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = len(samples) * 3
    fig, axes = plt.subplots(rows, 3, figsize=(7.5, 2.4 * rows), squeeze=False)
    for k, (inp, rec, length, pid) in enumerate(samples):
        for c in range(3):
            r = 3 * k + c
            panels = [
                (inp[c], "input", "viridis", -1, 1),
                (rec[c], "reconstruction", "viridis", -1, 1),
                (np.abs(rec[c] - inp[c]), "|error|", "magma", 0, 0.5),
            ]
            for col, (img, title, cmap, vmin, vmax) in enumerate(panels):
                ax = axes[r, col]
                ax.imshow(img, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                if col == 0:
                    ax.set_ylabel(f"{pid} (L={length})\n{CHANNELS[c]}", fontsize=7)
                if r == 0:
                    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=80)
    plt.close(fig)
