"""The per-residue tokenizer on one CUDA GPU, in at most ~8 minutes: training throughput at
L = 256, 512, 1024 (bf16 autocast, with and without ``torch.compile``), peak GPU memory, encode
throughput, and the held-out TM-score of a 5-minute training run on the Foldcomp shards.

    python benchmarks/gpu.py --data data/promod3                   # on a GPU: the full run
    python benchmarks/gpu.py --data data/promod3 --cpu-smoke      # the same, small, on a CPU

Parts (each prints one JSON line; the last line is a summary):

``throughput``
    ``--steps`` optimiser steps (after ``--warmup`` steps, which also absorb compilation) of
    ``--preset`` on batches of ``--batch`` images of side L, cut from real images of the data
    (the first images of at least L residues, cropped on the diagonal; a protein shorter than
    every L is tiled: throughput does not depend on the image's content). Proteins per second,
    seconds per step, peak memory (``torch.cuda.max_memory_allocated``, or the peak resident
    memory of the process on a CPU).
``encode``
    ``Tokenizer.encode_images`` of the same images at the smallest L: proteins per second.
``train``
    ``protoken train --config configs/residue-gpu.yaml`` for ``--train-minutes`` of wall time
    (then SIGUSR1: the run saves ``last.pt`` at a step boundary), and ``protoken evaluate`` of
    that checkpoint on ``--heldout`` proteins of ``configs/heldout.tsv``: median TM-score.

bf16 autocast is used where the device supports it (CUDA with bf16, or ``--dtype bfloat16`` on
a CPU); ``torch.compile`` is tried with ``mode="default"`` and reported as failed (with the
reason) where the platform cannot compile, never silently skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def say(record: dict) -> None:
    print(json.dumps(record), flush=True)


def real_images(data: str, sizes: list[int], n: int) -> dict[int, np.ndarray]:
    """``n`` real images (3, L, L) per size L, cut from the data's images (tiled if shorter)."""
    from protoken.data import ImageIndex, decode_image

    index = ImageIndex.build(data)
    order = np.argsort(-np.asarray(index.lengths))  # longest first
    pool = [decode_image(index.read(int(i))) for i in order[: max(n, 1) * 4]]
    out = {}
    for L in sizes:
        batch = []
        for k in range(n):
            im = pool[k % len(pool)]
            reps = -(-L // im.shape[-1])
            tiled = np.tile(im, (1, reps, reps))[:, :L, :L]
            batch.append(np.ascontiguousarray(tiled, dtype=np.float32))
        out[L] = np.stack(batch)
    return out


def peak_memory_mb(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def throughput(args, device, dtype, images: dict[int, np.ndarray]) -> list[dict]:
    import torch

    from protoken.model import build_model, mask_from_lengths

    rows = []
    for L, batch in images.items():
        for compiled in args.compile:
            torch.manual_seed(0)
            model = build_model(args.preset).to(device).train()
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
            x = torch.as_tensor(batch, device=device)
            mask = mask_from_lengths([L] * len(batch), L).to(device)
            step_fn = model
            row = {"part": "throughput", "L": L, "batch": len(batch), "compile": compiled,
                   "dtype": str(dtype).removeprefix("torch."), "device": device.type}  # fmt: skip
            if compiled:
                try:
                    step_fn = torch.compile(model)
                except Exception as exc:  # noqa: BLE001 - reported
                    rows.append({**row, "error": f"torch.compile: {exc}".splitlines()[0]})
                    say(rows[-1])
                    continue
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            amp = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
            try:
                for i in range(args.warmup + args.steps):
                    if i == args.warmup:
                        if device.type == "cuda":
                            torch.cuda.synchronize(device)
                        start = time.perf_counter()
                    with amp:
                        out = step_fn(x, mask)
                    opt.zero_grad(set_to_none=True)
                    out.loss.backward()
                    opt.step()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
            except Exception as exc:  # noqa: BLE001 - out of memory, compile errors: reported
                rows.append({**row, "error": f"{type(exc).__name__}: {exc}".splitlines()[0]})
                say(rows[-1])
                continue
            seconds = (time.perf_counter() - start) / args.steps
            rows.append({**row, "proteins_per_s": round(len(batch) / seconds, 2),
                         "s_per_step": round(seconds, 4),
                         "peak_memory_mb": round(peak_memory_mb(device), 1)})  # fmt: skip
            say(rows[-1])
            del model, opt, step_fn
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def encode_speed(args, device, images: np.ndarray) -> dict:
    import torch

    from protoken.codec import CodecSettings
    from protoken.model import build_model
    from protoken.tokenizer import Tokenizer

    torch.manual_seed(0)
    model = build_model(args.preset).to(device).eval()
    tok = Tokenizer(model, CodecSettings(), device=device, batch_size=len(images))
    tok.encode_images(list(images))  # warm-up
    start = time.perf_counter()
    for _ in range(args.steps):
        tok.encode_images(list(images))
    seconds = (time.perf_counter() - start) / args.steps
    row = {"part": "encode", "L": int(images.shape[-1]), "batch": len(images),
           "proteins_per_s": round(len(images) / seconds, 2)}  # fmt: skip
    say(row)
    return row


def train_and_score(args, work: str) -> dict:
    """``--train-minutes`` of ``protoken train`` (stopped by SIGUSR1), then the held-out
    median TM-score of its ``last.pt``."""
    cfg = os.path.join(ROOT, "configs", "residue-gpu.yaml")
    run = os.path.join(work, "run")
    cmd = [sys.executable, "-m", "protoken", "train", "--config", cfg, "--data", args.data,
           "--out", run, *sum((["--set", s] for s in args.set), [])]  # fmt: skip
    start = time.perf_counter()
    with open(os.path.join(work, "train.log"), "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        started = os.path.join(run, "config.json")  # written once the signal handler is in place
        while proc.poll() is None and (
            time.perf_counter() - start < args.train_minutes * 60 or not os.path.exists(started)
        ):
            time.sleep(1)
        if proc.poll() is None:
            proc.send_signal(signal.SIGUSR1)
        code = proc.wait()
    if code not in (0, 75):
        raise SystemExit(f"gpu: training exited {code}; see {work}/train.log")
    ckpt = os.path.join(run, "last.pt")
    sys.path.insert(0, HERE)
    from heldout import read_heldout

    files = read_heldout(args.structures, 40, 400)[: args.heldout]
    report = os.path.join(work, "eval")
    subprocess.run([sys.executable, "-m", "protoken", "evaluate", *files, "--checkpoint", ckpt,
                    "--out", report, "--chains", "first", "--models", "first",
                    "--no-progress"], check=True, stdout=subprocess.DEVNULL)  # fmt: skip
    with open(os.path.join(report, "summary.json")) as fh:
        summary = json.load(fh)
    from protoken import checkpoint

    row = {"part": "train", "minutes": args.train_minutes,
           "steps": checkpoint.load(ckpt)["step"], "heldout_proteins": summary["proteins"],
           "tm_score_median": summary["tm_score"]["median"]}  # fmt: skip
    say(row)
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--data",
        default=os.path.join(ROOT, "data", "promod3"),
        help="images or shards written by protoken convert (the Foldcomp shards)",
    )
    p.add_argument("--structures", default=os.path.join(ROOT, "..", "shared", "data",
                                                        "structures"))  # fmt: skip
    p.add_argument("--preset", default="residue-small")
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument(
        "--compile",
        type=lambda s: s == "on",
        nargs="+",
        default=[False, True],
        metavar="on|off",
        help="with and/or without torch.compile (default: both)",
    )
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto")
    p.add_argument("--train-minutes", type=float, default=5.0)
    p.add_argument("--heldout", type=int, default=40)
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="TrainConfig overrides of the training run (protoken train --set)",
    )
    p.add_argument(
        "--cpu-smoke",
        action="store_true",
        help="small sizes for a CPU: L 32 and 64, batch 2, 1 step, no compile, "
        "a few seconds of training on a tiny preset, 2 held-out proteins",
    )
    p.add_argument("--work", help="folder for the training run (default: a temporary one)")
    args = p.parse_args(argv)
    import torch

    if args.cpu_smoke:
        args.sizes, args.batch, args.steps, args.warmup = [32, 64], 2, 1, 1
        args.compile, args.heldout, args.train_minutes = [False], 2, 0.25
        args.preset = "residue-tiny"
        args.set = ["preset=residue-tiny", "batch_size=2", "crop=48", "num_workers=0",
                    "eval_interval=1000000", "ckpt_interval=1000000", *args.set]  # fmt: skip
    if not os.path.isdir(args.data):
        print(f"gpu: {args.data} not found: protoken convert ../shared/data/promod3/promod3 "
              f"--out {args.data} --format shards", file=sys.stderr)  # fmt: skip
        return 1
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.dtype == "auto":
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        dtype = torch.bfloat16 if bf16 else torch.float32
    else:
        dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    say({"part": "device", "device": name, "torch": torch.__version__,
         "dtype": str(dtype).removeprefix("torch.")})  # fmt: skip
    images = real_images(args.data, args.sizes, args.batch)
    rows = throughput(args, device, dtype, images)
    rows.append(encode_speed(args, device, images[min(args.sizes)]))
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or tmp
        os.makedirs(work, exist_ok=True)
        rows.append(train_and_score(args, work))
    say({"part": "summary", "rows": len(rows),
         "errors": [r for r in rows if "error" in r]})  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
