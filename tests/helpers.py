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
