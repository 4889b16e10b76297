"""Checkpoints: save atomically, load without running code, validate, describe.

A checkpoint is a ``torch.save`` of a dict of tensors and plain values only (dicts, lists,
tuples, strings, numbers, booleans, None), so :func:`load` reads it with
``torch.load(weights_only=True)``: a file holding pickled Python objects (which could run any
code when unpickled) is refused with one line naming the file, before anything of it runs.

Format 2 (written by :func:`save`, read by ``protoken train --resume`` and the tokenizer)::

    format        2
    version       protoken version that wrote it
    model         the model's state_dict
    model_config  the model's config as a dict, with its ``family`` (protoken.model)
    codec         dmax, bit_depth, normalize (protoken.codec.CodecSettings)
    step, best_val
    config        the training config (a dict, as RUN/config.json)
    optimizer, scaler        state_dicts
    data          where the training stream stands: epoch, position (batches of the epoch
                  consumed by all ranks), batches_per_epoch, world_size
    rng           one dict per rank: python (list), numpy (list), torch (uint8 tensor),
                  cuda (list of tensors)

Format 1 (protoken 0.1, before this module) held numpy arrays in its RNG states. :func:`load`
still reads it with ``weights_only=True``, allowing just numpy's array and dtype types
(plain data, no code), for inference; training cannot continue it (its data position meant
a replay of the old stream) and says so.

Inference never imports training code: the tokenizer uses :func:`load` and
:func:`model_from_checkpoint`. torch is imported only when needed, so the CLI can catch
:class:`CheckpointError` without loading it.
"""

from __future__ import annotations

import argparse
import math
import os
import pickle
import random
import sys
from typing import Any

import numpy as np

from protoken.fileio import atomic_path

__all__ = [
    "FORMAT",
    "CheckpointError",
    "describe",
    "load",
    "model_from_checkpoint",
    "provenance",
    "rng_state",
    "save",
    "set_rng_state",
    "validate",
]

FORMAT = 2
#: Keys every checkpoint has (what inference needs).
MODEL_KEYS = ("format", "model", "model_config", "codec")
#: Keys a training checkpoint adds (what ``--resume`` needs).
TRAINING_KEYS = ("step", "best_val", "config", "optimizer", "scaler", "data", "rng")


class CheckpointError(ValueError):
    """A file that is not a usable protoken checkpoint (the message says why and what to do)."""


# --------------------------------------------------------------------------- RNG states


def rng_state() -> dict[str, Any]:
    """This process's RNG states as plain values (loadable with ``weights_only=True``)."""
    import torch

    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()  # noqa: NPY002
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`rng_state`."""
    import torch

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))  # noqa: NPY002
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------- save / load


def _check_plain(value: Any, where: str, plain: tuple) -> None:
    """Raise TypeError at the first value ``weights_only`` could not load."""
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str | int):
                raise TypeError(f"checkpoint key {where}[{k!r}] is a {type(k).__name__}")
            _check_plain(v, f"{where}[{k!r}]", plain)
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]", plain)
    elif not isinstance(value, plain) or isinstance(value, np.generic):
        raise TypeError(
            f"checkpoint value {where} is a {type(value).__name__}: only tensors and plain "
            "values load with weights_only=True"
        )


def save(path: str, payload: dict[str, Any]) -> None:
    """Write ``payload`` (format 2 is stamped in) to ``path`` atomically: a temporary file in
    the same folder, then a rename, so readers see the old file or the whole new one.

    Raises
    ------
    TypeError
        A value that ``torch.load(weights_only=True)`` could not read back (checked before
        anything is written).
    """
    import torch

    from protoken._version import __version__

    payload = {"format": FORMAT, "version": __version__, **payload}
    plain = (str, int, float, bool, type(None), torch.Tensor, torch.dtype, torch.device)
    _check_plain(payload, "checkpoint", plain)
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def _numpy_globals() -> list:
    """What a numpy array needs to unpickle: the array, its dtype, the reconstructor."""
    reconstruct = np.ndarray.__reduce__(np.zeros(1))[0]
    dtypes = {type(np.dtype(t)) for t in (np.uint32, np.int64, np.float64)}
    return [np.ndarray, np.dtype, reconstruct, *dtypes]


def load(path: str, map_location: Any = "cpu") -> dict[str, Any]:
    """Read a checkpoint with ``torch.load(weights_only=True)`` and validate it.

    Format 1 checkpoints are read too (numpy arrays allowed, nothing else) and returned with
    ``format`` 1 and their RNG states converted.

    Raises
    ------
    CheckpointError
        Unreadable, holds pickled objects (refused, nothing of it ran), or not a protoken
        checkpoint; the message names the file.
    """
    import torch

    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"no checkpoint at {path}") from None
    except pickle.UnpicklingError as exc:
        ckpt = _load_format1(path, map_location, exc)
    except Exception as exc:  # noqa: BLE001 - truncated, random bytes ...: one line, no traceback
        raise CheckpointError(f"cannot read checkpoint {path}: {_unreadable(exc)}") from None
    validate(ckpt, path)
    return ckpt


def _unreadable(exc: BaseException) -> str:
    """One short line for a file torch cannot read (not its multi-line advice)."""
    if isinstance(exc, PermissionError | IsADirectoryError) and exc.strerror:
        return exc.strerror
    first = " ".join(str(exc).split())[:160] or type(exc).__name__
    return f"not a complete PyTorch checkpoint (truncated, or another kind of file: {first})"


def _load_format1(path: str, map_location: Any, exc: Exception) -> dict[str, Any]:
    import torch
    from torch.serialization import get_unsafe_globals_in_checkpoint, safe_globals

    try:
        needed = set(get_unsafe_globals_in_checkpoint(path))
    except Exception:  # noqa: BLE001 - not a zip checkpoint at all (random bytes, legacy file)
        raise CheckpointError(
            f"cannot read checkpoint {path}: not a PyTorch checkpoint (truncated, or another "
            "kind of file)"
        ) from None
    allowed = _numpy_globals()
    names = {f"{g.__module__}.{g.__qualname__}" for g in allowed}
    if not needed <= names:
        raise CheckpointError(
            f"refusing to load {path}: it holds pickled Python objects "
            f"({', '.join(sorted(needed - names)[:3])}) that could run code when loaded; "
            "protoken checkpoints hold only tensors and plain values"
        ) from None
    try:
        with safe_globals(allowed):
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
        if isinstance(ckpt, dict) and ckpt.get("format") == 1:
            ckpt["rng"] = [_rng1_to_plain(s) for s in ckpt.get("rng", [])]
    except Exception as err:  # noqa: BLE001 - a damaged file: one line
        raise CheckpointError(f"cannot read checkpoint {path}: {_unreadable(err)}") from None
    return ckpt


def _rng1_to_plain(state: dict) -> dict:
    version, internal, gauss = state["python"]
    name, keys, pos, has_gauss, cached = state["numpy"]
    out = dict(state)
    out["python"] = [version, list(internal), gauss]
    out["numpy"] = [str(name), np.asarray(keys).tolist(), int(pos), int(has_gauss), float(cached)]
    return out


def validate(ckpt: Any, path: str = "checkpoint", training: bool = False) -> None:
    """Check ``ckpt`` is a protoken checkpoint (with what training needs when ``training``).

    Raises
    ------
    CheckpointError
        Not a dict, an unknown format, or missing keys; format 1 with ``training=True``.
    """
    if not isinstance(ckpt, dict) or ckpt.get("format") not in (1, FORMAT):
        raise CheckpointError(f"{path} is not a protoken checkpoint (format 1 or {FORMAT})")
    missing = [k for k in MODEL_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path} lacks {', '.join(missing)}: not a complete checkpoint")
    if training and ckpt["format"] == 1:
        raise CheckpointError(
            f"{path} was written by protoken 0.1 (checkpoint format 1), whose data order "
            "cannot be continued: start a new run (--out elsewhere); the old checkpoint "
            "still works for encode, decode and evaluate"
        )
    if training:
        missing = [k for k in TRAINING_KEYS if k not in ckpt]
        if missing:
            raise CheckpointError(
                f"{path} lacks {', '.join(missing)}: a model-only checkpoint cannot be resumed"
            )


def model_from_checkpoint(ckpt: dict[str, Any]) -> Any:
    """The model of a checkpoint, with its weights, in eval mode."""
    from protoken.model import build_model

    model = build_model(ckpt["model_config"])
    model.load_state_dict(ckpt["model"])
    return model.eval()


def provenance(ckpt: dict[str, Any]) -> dict[str, Any]:
    """Where a checkpoint's model came from: family, preset, parameters, training step, batch,
    crop, data folder and split (what evaluation reports and model cards print)."""
    cfg = ckpt.get("config") or {}
    mc = ckpt.get("model_config") or {}
    n_params = sum(int(v.numel()) for v in ckpt.get("model", {}).values()
                   if hasattr(v, "numel") and v.is_floating_point())  # fmt: skip
    out = {
        "family": mc.get("family", "hierarchical"),
        "preset": cfg.get("preset", ""),
        "weights": n_params,  # parameters and buffers (codebooks)
        "step": ckpt.get("step"),
        "batch_size": cfg.get("batch_size"),
        "crop": cfg.get("crop"),
        "data": os.path.basename(os.path.normpath(cfg["data"])) if cfg.get("data") else "",
        "split_key_regex": cfg.get("split_key_regex"),
        "valid_frac": cfg.get("valid_frac"),
    }
    if ckpt.get("lineage"):  # fine-tuned (--init): where its starting weights came from
        out["lineage"] = ckpt["lineage"]
    return {k: v for k, v in out.items() if v not in (None, "")}


def describe(ckpt: dict[str, Any], path: str = "") -> str:
    """A few lines saying what a checkpoint holds (for ``python -m protoken.checkpoint``)."""
    from protoken.model import DEFAULT_FAMILY

    model_config = ckpt["model_config"]
    n_params = sum(v.numel() for v in ckpt["model"].values() if hasattr(v, "numel"))
    codec = ckpt["codec"]
    lines = [
        f"{path or 'checkpoint'}: protoken checkpoint format {ckpt['format']}"
        + (f", written by protoken {ckpt['version']}" if "version" in ckpt else ""),
        f"model: family {model_config.get('family', DEFAULT_FAMILY)}, "
        f"{n_params / 1e6:.2f} M values in its state",
        f"codec: dmax {codec.get('dmax')} A, {codec.get('bit_depth')}-bit PNGs, "
        f"normalize {codec.get('normalize')}",
    ]
    if "step" in ckpt:
        best = ckpt.get("best_val", math.inf)
        lines.append(
            f"training: step {ckpt['step']}, best validation loss "
            + ("none yet" if best is None or math.isinf(best) else f"{best:.5g}")
        )
    if isinstance(ckpt.get("data"), dict):
        d = ckpt["data"]
        lines.append(
            f"data: epoch {d.get('epoch')}, batch {d.get('position')} of "
            f"{d.get('batches_per_epoch')}, {d.get('world_size')} process(es)"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``python -m protoken.checkpoint FILE...``: describe checkpoints (loaded safely)."""
    parser = argparse.ArgumentParser(
        prog="python -m protoken.checkpoint", description="describe protoken checkpoints"
    )
    parser.add_argument("paths", nargs="+")
    args = parser.parse_args(argv)
    status = 0
    for path in args.paths:
        try:
            print(describe(load(path), path))
        except CheckpointError as exc:
            print(f"error: {exc}", file=sys.stderr)
            status = 2
    return status


if __name__ == "__main__":
    sys.exit(main())
