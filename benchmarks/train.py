"""Training: images/s of 1 vs 2 processes (DDP, gloo on CPU) and resume latency at step 50 vs
step 5,000.

Usage: python benchmarks/train.py [--preset tiny] [--steps 30] [--batch-size 8]
                                  [--bins bin_65_128] [--shared ../shared] [--skip-throughput]

Throughput: `protoken train` (one process) and `torchrun --nproc_per_node=2` on real images
converted from ../shared, one thread per process (OMP_NUM_THREADS=1), one DataLoader worker
each; images/s of the last log window (all ranks together) and their ratio.

Resume latency: a short run writes last.pt; copies of it are stamped as if taken at step 50
and at step 5,000 (step and data position rewritten: what a resume reads; the weights and the
file size do not depend on the step), and `protoken train --resume` is timed from launch to
the first step after the checkpoint (read from metrics.jsonl). Target: within 2x of each
other (the former resume replayed the data stream, ~linear in the step).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def write_config(path: str, **cfg) -> list[str]:
    with open(path, "w") as fh:
        json.dump(cfg, fh)
    return ["--config", path]


def last_window(run: str) -> float:
    rows = [json.loads(x) for x in open(os.path.join(run, "metrics.jsonl")) if "images_per_s" in x]
    return rows[-1]["images_per_s"]


def throughput(data: str, tmp: str, args) -> None:
    window = max(1, args.steps // 3)
    cfg = dict(
        data=data,
        preset=args.preset,
        only_bins=args.bins,
        batch_size=args.batch_size,
        num_workers=1,
        max_steps=3 * window,
        log_interval=window,
        eval_interval=10**9,
        ckpt_interval=10**9,
        valid_frac=0.1,
        warmup_steps=1,
    )
    results = {}
    for nproc in (1, 2):
        out = os.path.join(tmp, f"run_{nproc}")
        launcher = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            "-m",
            "protoken",
        ]
        cmd = [*launcher, "train", *write_config(out + ".json", out=out, **cfg)]
        done = subprocess.run(cmd, capture_output=True, text=True, env=ENV)
        if done.returncode:
            print(json.dumps({"processes": nproc, "error": done.stderr[-800:]}))
            return
        results[nproc] = last_window(out)
        print(
            json.dumps(
                {
                    "figure": "images_per_s",
                    "processes": nproc,
                    "threads_each": 1,
                    "preset": args.preset,
                    "bins": args.bins,
                    "batch_size_per_process": args.batch_size,
                    "images_per_s": results[nproc],
                }
            ),
            flush=True,
        )
    print(
        f"images/s 2 processes / 1 process = {results[2] / results[1]:.2f} "
        f"(cores: {os.cpu_count()}; ideal 2.0 on 2 free cores)"
    )


def resume_latency(data: str, tmp: str, args) -> None:
    run = os.path.join(tmp, "base")
    cfg = dict(
        data=data,
        preset=args.preset,
        only_bins=args.bins,
        batch_size=args.batch_size,
        num_workers=1,
        max_steps=2,
        log_interval=1,
        eval_interval=10**9,
        ckpt_interval=10**9,
        valid_frac=0.1,
        warmup_steps=1,
    )
    done = subprocess.run(
        [sys.executable, "-m", "protoken", "train", *write_config(run + ".json", out=run, **cfg)],
        capture_output=True,
        text=True,
        env=ENV,
    )
    if done.returncode:
        print(json.dumps({"figure": "resume", "error": done.stderr[-800:]}))
        return
    base = torch.load(os.path.join(run, "last.pt"), weights_only=True)
    per_epoch = base["data"]["batches_per_epoch"]
    latency = {}
    for step in (50, 5000):
        out = os.path.join(tmp, f"resume_{step}")
        shutil.copytree(run, out)
        ckpt = dict(base)
        ckpt["step"] = step
        ckpt["data"] = {**base["data"], "epoch": step // per_epoch, "position": step % per_epoch}
        ckpt["config"] = {**base["config"], "out": out, "max_steps": step + 1}
        torch.save(ckpt, os.path.join(out, "last.pt"))
        with open(os.path.join(out, "config.json")) as fh:
            saved = json.load(fh)
        with open(os.path.join(out, "config.json"), "w") as fh:
            json.dump({**saved, "out": out, "max_steps": step + 1}, fh)
        os.remove(os.path.join(out, "metrics.jsonl"))
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-m", "protoken", "train", "--out", out, "--resume"],
            env=ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        metrics = os.path.join(out, "metrics.jsonl")
        while not (os.path.exists(metrics) and f'"step": {step + 1}' in open(metrics).read()):
            if proc.poll() is not None and proc.returncode:
                print(json.dumps({"figure": "resume", "error": proc.stderr.read()[-800:]}))
                return
            time.sleep(0.01)
        latency[step] = time.perf_counter() - t0
        proc.wait()
        print(
            json.dumps(
                {
                    "figure": "resume_to_first_step_s",
                    "step": step,
                    "epoch": ckpt["data"]["epoch"],
                    "seconds": round(latency[step], 2),
                }
            ),
            flush=True,
        )
    ratio = latency[5000] / latency[50]
    print(f"resume latency step 5000 / step 50 = {ratio:.2f} (target <= 2)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--bins", nargs="+", default=["bin_65_128"])
    parser.add_argument("--shared", default=str(REPO.parent / "shared"))
    parser.add_argument("--skip-throughput", action="store_true")
    args = parser.parse_args()

    from protoken.convert import ConvertOptions, convert

    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "images")
        convert(
            [os.path.join(args.shared, "data", "structures")],
            ConvertOptions(out=data),
            progress=False,
        )
        resume_latency(data, tmp, args)
        if not args.skip_throughput:
            throughput(data, tmp, args)


if __name__ == "__main__":
    main()
