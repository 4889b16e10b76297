"""Average the weights of checkpoints of one model (a "model soup", Wortsman et al. 2022):
runs fine-tuned from the same weights on the same data, e.g. with two learning rates, often
score better averaged than either alone. How stage 10 of the bundled ``residue`` was made.

    python benchmarks/average_weights.py runs/residue-s10b/last.pt runs/residue-s10c/last.pt \\
        --out runs/residue-stage10/last.pt

``--set KEY=VALUE`` changes a field of the model config that holds no weights (e.g.
``encoder_chains=false``, how the encoder reads complexes); a field that would change the
weights (their names or shapes) is refused.

The checkpoints must be of one model: the same ``model_config``, codec and weight names and
shapes (else one line says which differs). The model config's ``loss`` (the training loss's
weights, e.g. ``interface_weight``) holds no weights and may differ: runs trained with other loss
weights from the same start are soup ingredients too; the average keeps the first checkpoint's
(said on stderr). Floating-point weights are averaged uniformly
(in float64, then cast back); integer buffers must be equal. The output is a model-only
checkpoint (no optimiser or data-order state: it cannot be resumed, only used for encode,
decode, evaluate, release or ``--init``), written atomically, its ``lineage`` naming the
averaged checkpoints by path and sha256 with their own lineage, and their ``step`` when they
share it.
"""

from __future__ import annotations

import argparse
import os
import sys

#: The model-config field that only training reads (the loss's weights): it may differ.
TRAINING_ONLY = "loss"


def _without_loss(model_config: dict) -> dict:
    return {k: v for k, v in model_config.items() if k != TRAINING_ONLY}


def average(paths: list[str]) -> dict:
    """The model-only checkpoint whose weights are the mean of ``paths``' weights.

    Raises
    ------
    ValueError
        Fewer than two checkpoints, or checkpoints of different models (one line naming both).
    """
    import torch

    from protoken import checkpoint
    from protoken.fileio import file_sha256

    if len(paths) < 2:
        raise ValueError("average needs at least two checkpoints")
    ckpts = [checkpoint.load(p) for p in paths]
    first = ckpts[0]
    for p, c in zip(paths[1:], ckpts[1:], strict=True):
        if c["codec"] != first["codec"]:
            raise ValueError(f"{p} and {paths[0]} differ in codec: not one model")
        if _without_loss(c["model_config"]) != _without_loss(first["model_config"]):
            raise ValueError(f"{p} and {paths[0]} differ in model_config: not one model")
        if set(c["model"]) != set(first["model"]):
            odd = sorted(set(c["model"]) ^ set(first["model"]))[:3]
            raise ValueError(f"{p} and {paths[0]} hold different weights: {', '.join(odd)}")
    state = {}
    for k, v in first["model"].items():
        vs = [c["model"][k] for c in ckpts]
        if any(tuple(x.shape) != tuple(v.shape) for x in vs):
            raise ValueError(f"weight {k} differs in shape between the checkpoints")
        if v.is_floating_point():
            state[k] = (sum(x.double() for x in vs) / len(vs)).to(v.dtype)
        elif all(torch.equal(x, v) for x in vs):
            state[k] = v
        else:
            raise ValueError(f"integer buffer {k} differs between the checkpoints")
    for p, c in zip(paths[1:], ckpts[1:], strict=True):  # said once the average is sure
        if c["model_config"].get(TRAINING_ONLY) != first["model_config"].get(TRAINING_ONLY):
            note = f"{p} was trained with other {TRAINING_ONLY} weights than {paths[0]}"
            print(f"average_weights: {note}; the average records the latter's", file=sys.stderr)
    parents = [{"checkpoint": os.path.abspath(p), "sha256": file_sha256(p)[:12],
                "step": c.get("step"), "lineage": c.get("lineage")}
               for p, c in zip(paths, ckpts, strict=True)]  # fmt: skip
    steps = {c.get("step") for c in ckpts}
    out = {"model": state, "model_config": first["model_config"], "codec": first["codec"],
           "config": first.get("config"), "lineage": {"average_of": parents}}  # fmt: skip
    if len(steps) == 1 and None not in steps:  # runs of one length: their step (provenance)
        out["step"] = steps.pop()
    return out


def set_model_fields(ckpt: dict, settings: list[str]) -> dict:
    """``ckpt`` with model-config fields changed (``KEY=VALUE``, VALUE read as YAML); the
    new config must build a model whose weights are exactly the checkpoint's.

    Raises
    ------
    ValueError
        A malformed setting, an unknown field, or one that changes the weights.
    """
    import yaml

    from protoken.checkpoint import model_from_checkpoint
    from protoken.model import config_from_dict, config_to_dict

    mc = config_to_dict(config_from_dict(ckpt["model_config"]))  # every field, defaults too
    for item in settings:
        key, sep, value = item.partition("=")
        if not sep or key not in mc or key == "family":
            raise ValueError(f"--set {item}: expected KEY=VALUE with KEY a model-config field")
        mc[key] = yaml.safe_load(value)
    out = {**ckpt, "model_config": config_to_dict(config_from_dict(mc))}
    try:  # the weights must load, strictly, into the model of the new config
        model_from_checkpoint(out)
    except RuntimeError:
        raise ValueError(f"--set {' '.join(settings)} changes the model's weights") from None
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoints", nargs="+")
    ap.add_argument("--out", required=True, help="the averaged checkpoint (not overwritten)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a model-config field holding no weights (repeatable)")  # fmt: skip
    args = ap.parse_args(argv)
    from protoken import checkpoint

    if os.path.exists(args.out):
        print(f"average_weights: {args.out} exists; choose another --out", file=sys.stderr)
        return 2
    try:
        avg = average(args.checkpoints)
        if args.set:
            avg = set_model_fields(avg, args.set)
    except (ValueError, checkpoint.CheckpointError) as exc:
        print(f"average_weights: {exc}", file=sys.stderr)
        return 2
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    checkpoint.save(args.out, avg)
    print(f"{args.out}: mean of {len(args.checkpoints)} checkpoints")
    return 0


if __name__ == "__main__":
    sys.exit(main())
