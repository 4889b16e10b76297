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


# Readers that replace protoken.structure.read_backbones in convert's worker processes (they
# must be module-level to reach them). Each misbehaves on files whose name says so and reads
# every other file for real.


def _real(path, **kw):
    from protoken.structure import read_backbones

    return read_backbones(path, **kw)


def exiting_reader(path, **kw):
    """Dies at once, without cleanup (os._exit, as a C extension's abort would), on *crash*."""
    import os

    if "crash" in os.path.basename(path):
        os._exit(3)
    return _real(path, **kw)


def segfaulting_reader(path, **kw):
    """Dies by a real SIGSEGV on *crash* files (what a parser bug does)."""
    import os
    import signal

    if "crash" in os.path.basename(path):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGSEGV})
        signal.signal(signal.SIGSEGV, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGSEGV)
    return _real(path, **kw)


def hanging_reader(path, **kw):
    """Hangs inside C code on *hang* files: libc sleep() with SIGALRM, SIGINT and SIGTERM
    blocked, so no alarm or Python signal handler can end it."""
    import ctypes
    import os
    import signal

    if "hang" in os.path.basename(path):
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM, signal.SIGINT, signal.SIGTERM})
        ctypes.CDLL(None).sleep(3600)
    return _real(path, **kw)


def slow_reader(path, **kw):
    """Takes a second longer on files in a folder named ``slow`` (so that an input converted
    later finishes first)."""
    import os
    import time

    if os.path.basename(os.path.dirname(path)) == "slow":
        time.sleep(1.0)
    return _real(path, **kw)


def make_foldcomp_db(files, path) -> list[str]:
    """Write a Foldcomp database of single-chain PDB ``files`` at ``path`` (the MMseqs2 layout
    Foldcomp databases use: data file of entries each ended by NUL, ``.index`` lines ``KEY
    OFFSET LENGTH``, ``.lookup`` lines ``KEY NAME 0``, a 4-byte ``.dbtype``), each entry made
    with ``foldcomp.compress``. Returns the entry names (file names without extension)."""
    import os
    import struct

    import foldcomp

    names = []
    offset = 0
    with open(path, "wb") as data, open(f"{path}.index", "w") as index, \
            open(f"{path}.lookup", "w") as lookup:  # fmt: skip
        for key, f in enumerate(files):
            name = os.path.basename(str(f)).split(".")[0]
            with open(f) as fh:
                entry = foldcomp.compress(name, fh.read()) + b"\0"
            data.write(entry)
            index.write(f"{key}\t{offset}\t{len(entry)}\n")
            lookup.write(f"{key}\t{name}\t0\n")
            offset += len(entry)
            names.append(name)
    with open(f"{path}.dbtype", "wb") as fh:
        fh.write(struct.pack("<i", 0))
    return names


# Many proteins cheaply, for the memory tests: a few small real structures converted once, then
# linked under new ids (the inputs of a large run, at the cost of a few files).

SMALL = ["cathtools__1c55A.pdb", "cathtools__1hykA.pdb", "cathtools__1au7A02.pdb"]  # 40-57 res


def small_images(structures_dir, out) -> list:
    """The :data:`SMALL` structures converted to 16-bit PNGs in ``out``: their paths."""
    from pathlib import Path

    from protoken.convert import ConvertOptions, convert

    convert([str(structures_dir / n) for n in SMALL], ConvertOptions(out=str(out), bit_depth=16),
            workers=1, progress=False)  # fmt: skip
    return sorted(Path(out).rglob("*.png"))


def linked_images(images, folder, n: int):
    """A folder of ``n`` PNGs, p00000.png ..., each a symlink to one of ``images`` in turn."""
    import os
    from pathlib import Path

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        os.symlink(images[i % len(images)], folder / f"p{i:05d}.png")
    return folder


def peak_python_memory(fn) -> tuple[object, int]:
    """``(fn(), peak bytes of Python and numpy allocations while it ran)`` (tracemalloc)."""
    import gc
    import tracemalloc

    gc.collect()
    tracemalloc.start()
    try:
        result = fn()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return result, peak


def random_residue_checkpoint(path) -> str:
    """Save a per-residue ``residue-tiny`` model with random weights (seed 0) as a checkpoint
    at ``path``; returns the path."""
    import torch

    from protoken import checkpoint as ckpt_io
    from protoken.codec import CodecSettings
    from protoken.model import ResidueConfig, ResidueVQVAE, config_to_dict

    torch.manual_seed(0)
    cfg = ResidueConfig.preset("residue-tiny")
    ckpt_io.save(str(path), {"model": ResidueVQVAE(cfg).state_dict(),
                             "model_config": config_to_dict(cfg),
                             "codec": CodecSettings().to_dict()})  # fmt: skip
    return str(path)


class SquareJob:
    """A :class:`protoken.convert.pool.Job` for the pool's tests: ``n -> n * n``; the item
    ``"segv"`` dies by a real SIGSEGV, ``"exit"`` exits at once, ``"hang"`` sleeps inside C code
    with the catchable signals blocked, ``"raise"`` raises."""

    preload = ("numpy",)

    def run(self, item):
        import ctypes
        import os
        import signal

        if item == "segv":
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGSEGV})
            signal.signal(signal.SIGSEGV, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGSEGV)
        if item == "exit":
            os._exit(3)
        if item == "hang":
            blocked = {signal.SIGALRM, signal.SIGINT, signal.SIGTERM}
            signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
            ctypes.CDLL(None).sleep(3600)
        if item == "raise":
            raise OSError("disk full")
        return ("ok", item, item * item)

    def failed(self, item, reason):
        return ("failed", item, reason)

    def discard(self, result):
        pass
