"""Tokenizers bundled with the package: load by name, offline, without pickle.

A bundled tokenizer ``NAME`` is three files in ``protoken/resources/pretrained/``:

``NAME.safetensors``
    the model's weights (safetensors: tensors only, nothing that can run code);
``NAME.json``
    ``{"name", "model_config" (with its family), "codec", "sha256" (of the .safetensors),
    "provenance" (training steps, data, compute), "results" (held-out figures)}``;
``NAME.md``
    the model card (training data, split, compute, config, held-out results by length,
    limitations, how to reproduce).

``aliases.json`` maps names to others (``default`` -> the recommended tokenizer). Wherever a
checkpoint path is accepted (``--checkpoint``, :meth:`protoken.Tokenizer.load`), a
bundled name works too; a path that exists wins over a name. ``protoken pretrained`` lists them.
:func:`export` writes the files from a training checkpoint (``benchmarks/pretrained.py release``).
"""

from __future__ import annotations

import json
import os
from importlib import resources
from typing import Any

from protoken.fileio import file_sha256

__all__ = ["aliases", "card", "closest", "export", "info", "is_name", "load", "name_of", "names",
           "resolve"]  # fmt: skip

_DIR = "resources/pretrained"


def _root() -> str:
    return str(resources.files("protoken").joinpath(_DIR))


def aliases() -> dict[str, str]:
    """Alias -> bundled name (``default`` -> the recommended tokenizer)."""
    return _aliases()


def _aliases() -> dict[str, str]:
    path = os.path.join(_root(), "aliases.json")
    if not os.path.exists(path):
        return {}
    with open(path) as fh:
        return json.load(fh)


def names() -> list[str]:
    """Bundled tokenizer names (aliases included), sorted."""
    root = _root()
    found = set()
    if os.path.isdir(root):
        found = {f[: -len(".json")] for f in os.listdir(root)
                 if f.endswith(".json") and f != "aliases.json"}  # fmt: skip
    return sorted(found | {a for a, t in _aliases().items() if t in found})


def resolve(name: str) -> str:
    """The bundled model a name (or alias) stands for; KeyError if none."""
    name = _aliases().get(name, name)
    if not os.path.exists(os.path.join(_root(), f"{name}.json")):
        known = ", ".join(names()) or "none"
        raise KeyError(f"no bundled tokenizer {name!r} (bundled: {known})")
    return name


def is_name(text: str | os.PathLike) -> bool:
    """True when ``text`` is no existing path but a bundled tokenizer's name."""
    text = os.fspath(text)
    if os.path.exists(text) or os.sep in text:
        return False
    try:
        resolve(text)
    except KeyError:
        return False
    return True


def closest(text: str) -> str | None:
    """The bundled name closest to a misspelt one (``residu`` -> ``residue``), or None."""
    import difflib

    found = difflib.get_close_matches(os.path.basename(os.fspath(text)), names(), n=1, cutoff=0.6)
    return found[0] if found else None


def name_of(checkpoint_id: str) -> str | None:
    """The bundled tokenizer a checkpoint id recorded in token files names
    (``residue-0123456789ab`` -> ``residue``), or None for another checkpoint."""
    name, _, digest = str(checkpoint_id).rpartition("-")
    if not name or len(digest) != 12:
        return None
    try:
        return resolve(name)
    except KeyError:
        return None


def info(name: str) -> dict[str, Any]:
    """The JSON description of a bundled tokenizer."""
    name = resolve(name)
    with open(os.path.join(_root(), f"{name}.json")) as fh:
        return json.load(fh)


def card(name: str) -> str:
    """The model card (markdown) of a bundled tokenizer."""
    name = resolve(name)
    with open(os.path.join(_root(), f"{name}.md")) as fh:
        return fh.read()


def load(name: str) -> dict[str, Any]:
    """A bundled tokenizer as a checkpoint-like dict (``model``, ``model_config``, ``codec``,
    ``checkpoint_id``, ``provenance``), its weights checked against the recorded sha256."""
    from safetensors.torch import load_file

    from protoken.checkpoint import CheckpointError

    real = resolve(name)
    meta = info(real)
    path = os.path.join(_root(), f"{real}.safetensors")
    digest = file_sha256(path)
    if digest != meta["sha256"]:
        raise CheckpointError(f"bundled tokenizer {real}: {path} does not match its sha256")
    return {
        "format": 2,
        "model": load_file(path),
        "model_config": meta["model_config"],
        "codec": meta["codec"],
        "checkpoint_id": f"{real}-{digest[:12]}",
        "provenance": meta.get("provenance", {}),
    }


def export(ckpt_path: str, name: str, out_dir: str | None = None, **extra: Any) -> str:
    """Write a training checkpoint as bundled tokenizer ``name`` (weights as safetensors, the
    JSON description with ``extra`` fields such as ``provenance`` and ``results``); returns the
    JSON path. The card (``name.md``) is written separately."""
    from safetensors.torch import save_file

    from protoken import checkpoint

    ckpt = checkpoint.load(ckpt_path)
    out_dir = out_dir or _root()
    os.makedirs(out_dir, exist_ok=True)
    weights = os.path.join(out_dir, f"{name}.safetensors")
    state = {k: v.detach().contiguous().clone() for k, v in ckpt["model"].items()}
    save_file(state, weights)
    os.chmod(weights, 0o644)
    meta = {
        "name": name,
        "model_config": ckpt["model_config"],
        "codec": ckpt["codec"],
        "sha256": file_sha256(weights),
        "provenance": checkpoint.provenance(ckpt),
        **extra,
    }
    path = os.path.join(out_dir, f"{name}.json")
    with open(path, "w") as fh:
        json.dump(meta, fh, indent=1)
        fh.write("\n")
    return path
