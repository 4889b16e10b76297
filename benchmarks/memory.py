"""Peak memory of ``protoken encode`` and ``protoken evaluate`` against the number of proteins:
flat when the outputs stream (issue 16: data at AlphaFold-DB scale).

    python benchmarks/memory.py [--sizes 100 1000 10000] [--checkpoint residue]
                                [--evaluate-sizes 100 1000 10000] [--workers 2] [--src DIR]

Inputs: the single-chain structures of ../shared/data/structures of 40-80 residues, converted
once to 8-bit PNGs, then symlinked under new ids (p0000000.png ...) to make N proteins: a run
reads, tokenizes and writes N distinct proteins at the cost of a few real files. Each command
runs in a fresh subprocess (``python -m protoken ...``) and its peak resident memory is the
``ru_maxrss`` of ``os.wait4`` on it (the largest of it and its reaped children, i.e. also the
evaluate workers). Printed: per command and N, peak RSS (MB), wall time, and the ratio of the
peak at the largest N to the peak at the smallest (target ~1.0: flat).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SHARED = os.environ.get("PROTOKEN_SHARED", os.path.join(os.path.dirname(ROOT), "shared"))
if not os.path.isdir(SHARED):
    SHARED = "/work/shared"


def small_structures(lo: int = 40, hi: int = 80) -> list[str]:
    folder = os.path.join(SHARED, "data", "structures")
    with open(os.path.join(folder, "MANIFEST.tsv"), newline="") as fh:
        rows = [r for r in csv.DictReader(fh, delimiter="\t")
                if r["n_models"] == "1" and r["n_chains"] == "1"
                and lo <= int(r["n_protein_residues_first_chain"]) <= hi]  # fmt: skip
    return [os.path.join(folder, r["file"]) for r in rows]


def longest_structure(limit: int = 1024) -> str:
    """The structure of ../shared whose first chain is the longest of at most ``limit``."""
    folder = os.path.join(SHARED, "data", "structures")
    with open(os.path.join(folder, "MANIFEST.tsv"), newline="") as fh:
        rows = [r for r in csv.DictReader(fh, delimiter="\t")
                if (r["n_protein_residues_first_chain"] or "0").isdigit()
                and int(r["n_protein_residues_first_chain"]) <= limit]  # fmt: skip
    best = max(rows, key=lambda r: int(r["n_protein_residues_first_chain"]))
    return os.path.join(folder, best["file"])


SRC = os.path.join(ROOT, "src")


def run(argv: list[str]) -> tuple[float, float]:
    """(peak RSS in MB, seconds) of ``python -m protoken ARGV`` in its own process."""
    env = {**os.environ, "PYTHONPATH": SRC}
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "protoken", *argv], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"protoken {argv[0]} failed ({proc.returncode}): {err.decode()[-500:]}")
    return usage.ru_maxrss / 1024, seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 10000])
    ap.add_argument("--evaluate-sizes", type=int, nargs="+", default=None,
                    help="sizes for evaluate (default: --sizes)")  # fmt: skip
    ap.add_argument(
        "--checkpoint",
        default="residue",
        help="bundled tokenizer or checkpoint (default: residue, the faster one)",
    )
    ap.add_argument("--workers", type=int, default=2, help="evaluate's 3D workers")
    ap.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument("--json", default=None, help="also write the figures here")
    ap.add_argument("--long", type=int, default=0, metavar="N",
                    help="also encode N copies of the longest single chain of ../shared of at "
                         "most 1024 residues, 8 per batch: the peak memory at the largest "
                         "length (target ~1 GB)")  # fmt: skip
    ap.add_argument("--src", default=SRC, help="the protoken sources to measure (default: this "
                    "checkout's; e.g. an older version's, unpacked with git archive)")  # fmt: skip
    args = ap.parse_args()
    globals()["SRC"] = os.path.abspath(args.src)
    eval_sizes = args.evaluate_sizes or args.sizes
    work = args.work or tempfile.mkdtemp(prefix="protoken-memory-")
    images = os.path.join(work, "real")
    if not os.path.isdir(images):
        sources = small_structures()
        run(["convert", *sources, "--out", images, "--workers", "2", "--no-progress"])
    pool = sorted(os.path.join(d, f) for d, _, fs in os.walk(images) for f in fs
                  if f.endswith(".png"))  # fmt: skip
    print(
        f"{len(pool)} real proteins of 40-80 residues, linked under new ids; "
        f"checkpoint {args.checkpoint}; {os.cpu_count()} cores",
        flush=True,
    )
    results: dict[str, dict[int, tuple[float, float]]] = {"encode": {}, "evaluate": {}}
    if args.long:
        folder = os.path.join(work, "long")
        if not os.path.isdir(folder):
            run(["convert", longest_structure(), "--out", folder, "--no-progress", "--max-len",
                 "1024", "--chains", "first", "--models", "first"])  # fmt: skip
        png = next(os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs
                   if f.endswith(".png"))  # fmt: skip
        copies = os.path.join(work, f"long{args.long}")
        os.makedirs(copies, exist_ok=True)
        for i in range(args.long):
            link = os.path.join(copies, f"l{i:05d}.png")
            if not os.path.exists(link):
                os.symlink(png, link)
        out = os.path.join(work, "long.npz")
        if os.path.exists(out):
            os.unlink(out)
        peak, seconds = run(["encode", copies, "-c", args.checkpoint, "-o", out,
                             "--no-progress", "--batch-size", "8"])  # fmt: skip
        from protoken.codec import check_png_header

        with open(png, "rb") as fh:
            side = check_png_header(fh.read(64))[0]
        print(
            f"encode {args.long} proteins of {os.path.basename(png)[:-4]} ({side} residues), "
            f"8 per batch: peak RSS {peak:.0f} MB, {seconds:.1f} s",
            flush=True,
        )
    for n in sorted(set(args.sizes) | set(eval_sizes)):
        folder = os.path.join(work, f"in{n}")
        if not os.path.isdir(folder):
            os.makedirs(folder)
            for i in range(n):
                os.symlink(pool[i % len(pool)], os.path.join(folder, f"p{i:07d}.png"))
        if n in args.sizes:
            out = os.path.join(work, f"tokens{n}.npz")
            if os.path.exists(out):
                os.unlink(out)
            results["encode"][n] = run(["encode", folder, "-c", args.checkpoint, "-o", out,
                                        "--no-progress", "--batch-size", "16"])  # fmt: skip
            print(
                f"encode   {n:>6} proteins: peak RSS {results['encode'][n][0]:7.1f} MB, "
                f"{results['encode'][n][1]:6.1f} s",
                flush=True,
            )
        if n in eval_sizes:
            results["evaluate"][n] = run(["evaluate", folder, "-c", args.checkpoint, "-o",
                                          os.path.join(work, f"report{n}"), "--no-progress",
                                          "--workers", str(args.workers)])  # fmt: skip
            print(
                f"evaluate {n:>6} proteins: peak RSS {results['evaluate'][n][0]:7.1f} MB, "
                f"{results['evaluate'][n][1]:6.1f} s",
                flush=True,
            )
    print()
    print("| command | " + " | ".join(f"N = {n}" for n in sorted(set(args.sizes) | set(eval_sizes)))
          + " | peak(max N) / peak(min N) |")  # fmt: skip
    for cmd, rows in results.items():
        if not rows:
            continue
        ns = sorted(rows)
        cells = [f"{rows[n][0]:.0f} MB ({rows[n][1]:.0f} s)" if n in rows else ""
                 for n in sorted(set(args.sizes) | set(eval_sizes))]  # fmt: skip
        ratio = rows[ns[-1]][0] / rows[ns[0]][0]
        print(f"| {cmd} | " + " | ".join(cells) + f" | {ratio:.3f} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({c: {str(n): {"peak_rss_mb": v[0], "seconds": v[1]} for n, v in r.items()}
                       for c, r in results.items()}, fh, indent=2)  # fmt: skip


if __name__ == "__main__":
    main()
