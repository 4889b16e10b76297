"""Training throughput: images/s and peak memory per preset on CPU, 1 vs 2 DataLoader workers.

Usage: python benchmarks/train.py [--presets tiny small] [--workers 1 2] [--steps 30]
                                  [--bins bin_65_128] [--batch-size 8] [--shared ../shared]

Each (preset, workers) runs `protoken train` in a fresh process on real images converted from
../shared (one length bin, so every run sees the same image sizes) and prints one JSON line:
images/s over the steps after the first log window (warm-up excluded) and the peak resident
memory of the whole process tree. The last lines give the 2-worker / 1-worker ratios.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "small"])
    parser.add_argument("--workers", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--bins", nargs="+", default=["bin_65_128"])
    parser.add_argument("--shared", default=str(REPO.parent / "shared"))
    args = parser.parse_args()

    from protoken.convert import ConvertOptions, convert

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "images")
        convert([os.path.join(args.shared, "data", "structures")], ConvertOptions(out=data),
                progress=False)  # fmt: skip
        for preset in args.presets:
            for workers in args.workers:
                window = max(1, args.steps // 3)
                cfg = dict(
                    data=data, out=os.path.join(tmp, f"run_{preset}_{workers}"), preset=preset,
                    only_bins=args.bins, batch_size=args.batch_size, num_workers=workers,
                    max_steps=args.steps, log_interval=window, eval_interval=10**9,
                    ckpt_interval=10**9, valid_frac=0.1, warmup_steps=1,
                )  # fmt: skip
                cfg["max_steps"] = window * 3  # three log windows; the last one is reported
                done = subprocess.run([sys.executable, "-c", CHILD, json.dumps(cfg)],
                                      capture_output=True, text=True)  # fmt: skip
                line = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
                if done.returncode or not line:
                    print(json.dumps({"preset": preset, "workers": workers,
                                      "error": done.stderr[-500:]}))  # fmt: skip
                    continue
                res = json.loads(line[0][7:])
                res.update(preset=preset, dataloader_workers=workers, bins=args.bins,
                           batch_size=args.batch_size, steps=cfg["max_steps"],
                           threads=os.cpu_count())  # fmt: skip
                results[(preset, workers)] = res
                print(json.dumps(res), flush=True)
    for preset in args.presets:
        one, two = results.get((preset, 1)), results.get((preset, 2))
        if one and two:
            ratio = two["images_per_s"] / one["images_per_s"]
            print(f"{preset}: 2 workers / 1 worker images/s = {ratio:.2f}")


if __name__ == "__main__":
    main()
