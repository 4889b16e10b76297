"""Resume latency: seconds from `protoken train --resume` to the first step after the
checkpoint, at step 50 and at step 5,000 (target: within 2x of each other; the former resume
replayed the data stream, ~linear in the step).

Usage: python benchmarks/resume.py [--preset tiny] [--batch-size 8] [--bins bin_65_128]
                                   [--shared ../shared]

A short run on real images converted from ../shared writes last.pt; copies of it are stamped
as if taken at step 50 and at step 5,000 (step and data position rewritten: what a resume
reads; the weights and the file size do not depend on the step), and each resume is timed
from launch to its first logged step (read from metrics.jsonl).
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


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train import write_config  # noqa: E402  (benchmarks/train.py)


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
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--bins", nargs="+", default=["bin_65_128"])
    parser.add_argument("--shared", default=str(REPO.parent / "shared"))
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


if __name__ == "__main__":
    main()
