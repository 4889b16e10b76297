"""Training throughput: images/s and peak memory per preset on CPU, 1 vs 2 DataLoader workers;
and images/s of 1 vs 2 processes (DDP, gloo).

Usage: python benchmarks/train.py [--presets tiny small] [--workers 1 2] [--steps 30]
                                  [--bins bin_65_128] [--batch-size 8] [--shared ../shared]
                                  [--processes-only]

Each (preset, workers) runs `protoken train` in a fresh process on real images converted from
../shared (one length bin, so every run sees the same image sizes) and prints one JSON line:
images/s over the steps after the first log window (warm-up excluded) and the peak resident
memory of the whole process tree. The last lines give the 2-worker / 1-worker ratios.

Processes: `torchrun --nproc_per_node=1` and `=2` with the first preset, one thread per process
(OMP_NUM_THREADS=1) and one DataLoader worker each; images/s of the last log window (all ranks
together) and their ratio. The resume latency is in benchmarks/resume.py.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")

CHILD = r"""
import json, resource, sys
from protoken.train import TrainConfig, train
cfg = TrainConfig(**json.loads(sys.argv[1]))
train(cfg)
rows = [json.loads(l) for l in open(cfg.out + "/metrics.jsonl") if '"images_per_s"' in l]
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
peak_children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print("RESULT " + json.dumps({"images_per_s": rows[-1]["images_per_s"],
      "peak_rss_mb": round(peak / 1024, 1), "peak_worker_rss_mb": round(peak_children / 1024, 1)}))
"""


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
        preset=args.presets[0],
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
                    "preset": args.presets[0],
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "small"])
    parser.add_argument("--workers", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--bins", nargs="+", default=["bin_65_128"])
    parser.add_argument("--shared", default=str(REPO.parent / "shared"))
    parser.add_argument("--processes-only", action="store_true")
    args = parser.parse_args()

    from protoken.convert import ConvertOptions, convert

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "images")
        convert(
            [os.path.join(args.shared, "data", "structures")],
            ConvertOptions(out=data),
            progress=False,
        )
        throughput(data, tmp, args)
        for preset in [] if args.processes_only else args.presets:
            for workers in args.workers:
                window = max(1, args.steps // 3)
                cfg = dict(
                    data=data,
                    out=os.path.join(tmp, f"run_{preset}_{workers}"),
                    preset=preset,
                    only_bins=args.bins,
                    batch_size=args.batch_size,
                    num_workers=workers,
                    max_steps=args.steps,
                    log_interval=window,
                    eval_interval=10**9,
                    ckpt_interval=10**9,
                    valid_frac=0.1,
                    warmup_steps=1,
                )
                cfg["max_steps"] = window * 3  # three log windows; the last one is reported
                done = subprocess.run(
                    [sys.executable, "-c", CHILD, json.dumps(cfg)], capture_output=True, text=True
                )
                line = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
                if done.returncode or not line:
                    print(
                        json.dumps(
                            {"preset": preset, "workers": workers, "error": done.stderr[-500:]}
                        )
                    )
                    continue
                res = json.loads(line[0][7:])
                res.update(
                    preset=preset,
                    dataloader_workers=workers,
                    bins=args.bins,
                    batch_size=args.batch_size,
                    steps=cfg["max_steps"],
                    threads=os.cpu_count(),
                )
                results[(preset, workers)] = res
                print(json.dumps(res), flush=True)
    for preset in args.presets:
        one, two = results.get((preset, 1)), results.get((preset, 2))
        if one and two:
            ratio = two["images_per_s"] / one["images_per_s"]
            print(f"{preset}: 2 workers / 1 worker images/s = {ratio:.2f}")


if __name__ == "__main__":
    main()
