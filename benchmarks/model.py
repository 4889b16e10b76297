"""Training throughput of any model preset: forward + backward + AdamW step on random images.

    python benchmarks/model.py --preset tiny --sizes 64 128 256
    python benchmarks/model.py --preset residue-small --sizes 128 256 --threads 1 [--dtype bfloat16]

prints one JSON line per size: images_per_s (from the median step time), seconds per step
(median, mean and min), and peak memory (CUDA: max
allocated; CPU: the peak resident set of a fresh process that runs only that size, and its
growth over the process's state before the first step).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

from protoken.model import build_model, mask_from_lengths


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run_one(
    preset: str,
    size: int,
    batch: int,
    steps: int,
    warmup: int,
    device: str,
    overrides: dict,
    dtype: str = "float32",
) -> dict:
    """Time ``steps`` training steps at ``size`` x ``size`` after ``warmup`` steps (any
    family's preset; ``dtype`` bfloat16 runs the forward pass under autocast)."""
    torch.manual_seed(0)
    model = build_model(preset, overrides)
    config = model.config
    if size % config.downsample_factor:
        raise SystemExit(f"size {size} is not a multiple of {config.downsample_factor}")
    model = model.to(device).train()
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == "bfloat16")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.rand(batch, config.in_channels, size, size, device=device) * 2 - 1
    mask = mask_from_lengths([size] * batch, size).to(device)
    base = _rss_mb()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def step() -> None:
        with autocast:
            out = model(x, mask)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()

    for _ in range(warmup):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    dt = statistics.median(times)  # robust to other processes sharing the cores
    result = {
        "preset": preset,
        "overrides": overrides,
        "size": size,
        "batch": batch,
        "threads": torch.get_num_threads(),
        "dtype": dtype,
        "device": device,
        "params": model.num_parameters(),
        "step_s": round(dt, 4),
        "step_s_mean": round(statistics.fmean(times), 4),
        "step_s_min": round(min(times), 4),
        "images_per_s": round(batch / dt, 2),
    }
    if device == "cuda":
        result["peak_mem_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    else:
        result["peak_rss_mb"] = round(_rss_mb(), 1)
        result["peak_rss_growth_mb"] = round(_rss_mb() - base, 1)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--config", default="{}", help="JSON of config fields to override")
    parser.add_argument("--in-process", action="store_true", help="do not fork per size")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    for size in args.sizes:
        if args.in_process or len(args.sizes) == 1:
            result = run_one(
                args.preset,
                size,
                args.batch,
                args.steps,
                args.warmup,
                args.device,
                json.loads(args.config),
                args.dtype,
            )
            print(json.dumps(result), flush=True)
        else:  # a fresh process per size, so each peak RSS is that size's own
            cmd = [
                sys.executable,
                __file__,
                "--sizes",
                str(size),
                "--preset",
                args.preset,
                "--batch",
                str(args.batch),
                "--threads",
                str(args.threads),
                "--steps",
                str(args.steps),
                "--warmup",
                str(args.warmup),
                "--device",
                args.device,
                "--config",
                args.config,
                "--dtype",
                args.dtype,
            ]
            subprocess.run(cmd, check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
