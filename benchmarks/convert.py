"""Conversion speed: structures/s (one worker, all workers), time split, reader rates, features.

Usage: python benchmarks/convert.py [--shared ../shared] [--repeat 20]

Prints one line per figure and a JSON summary last. Targets (issue 2): >= 300 structures/s per
core on the 100-250 residue SCOPe domains of ../shared, L = 1024 features < 0.1 s.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from protoken.convert import ConvertOptions, convert
from protoken.geometry import sixd
from protoken.structure import read_backbones

REPO = Path(__file__).resolve().parents[1]


def best_of(fn, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def replicate(files: list[str], copies: int, folder: Path) -> list[str]:
    """Symlink each file `copies` times under distinct names (distinct ids, same content)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for k in range(copies):
        for f in files:
            dst = folder / f"r{k}_{os.path.basename(f)}"
            os.symlink(os.path.abspath(f), dst)
            out.append(str(dst))
    return out


def run_convert(inputs: list[str], workers: int, tmp: Path, **kw) -> tuple[float, dict, float]:
    """(wall seconds, summary, CPU seconds of this process and its workers) of one run."""
    out = tmp / f"out_{workers}_{time.perf_counter_ns()}"
    cpu = time.process_time()
    summary = convert(inputs, ConvertOptions(out=str(out), **kw), workers=workers, progress=False)
    cpu = time.process_time() - cpu + summary.worker_cpu_seconds
    shutil.rmtree(out)
    return summary.seconds, summary.as_dict(), cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", default=str(REPO.parent / "shared"))
    parser.add_argument("--repeat", type=int, default=20, help="copies of the SCOPe set")
    args = parser.parse_args()
    structures = Path(args.shared) / "data" / "structures"
    scope = sorted(glob.glob(str(structures / "foldseek__d*.pdb")))
    scope = [f for f in scope if 100 <= len(read_backbones(f)[0]) <= 250]
    every = sorted(
        str(p) for p in structures.iterdir() if p.name not in ("MANIFEST.tsv", "README.md")
    )
    cores = os.cpu_count() or 1
    results: dict[str, float | dict] = {"cores": cores, "scope_domains": len(scope)}

    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        many = replicate(scope, args.repeat, tmp / "scope")
        # one worker process (the main process commits): the best of 3 runs (the machine may be
        # shared); the CPU-time rate (main process and worker) is the per-core figure, unaffected
        # by waiting for the disk or other processes
        secs, split, cpu = min((run_convert(many, 1, tmp) for _ in range(3)), key=lambda x: x[0])
        per_file = [t / len(many) * 1e3 for t in split["seconds_parse_features_encode"]]
        results["scope_per_s_1_worker"] = len(many) / secs
        results["scope_per_cpu_s_1_worker"] = len(many) / cpu
        results["scope_ms_parse_features_encode_write"] = [round(x, 3) for x in per_file]
        secs_all, _, _ = run_convert(many, cores, tmp)
        results[f"scope_per_s_{cores}_workers"] = len(many) / secs_all
        for depth in (16,):
            s16, _, _ = run_convert(many, 1, tmp, bit_depth=depth)
            results[f"scope_per_s_1_worker_{depth}bit"] = len(many) / s16
        # every file of ../shared (bad and huge ones included)
        secs_every, _, _ = run_convert(every, 1, tmp)
        results["shared_all_files_per_s_1_worker"] = len(every) / secs_every
        secs_every_all, _, _ = run_convert(every, cores, tmp)
        results[f"shared_all_files_per_s_{cores}_workers"] = len(every) / secs_every_all

    # the readers alone on the same SCOPe files
    import gemmi
    from biotite.structure.io.pdb import PDBFile

    texts = [open(f).read() for f in scope]
    results["gemmi_parse_per_s"] = len(texts) / best_of(
        lambda: [gemmi.read_pdb_string(t) for t in texts]
    )
    results["read_backbones_per_s"] = len(scope) / best_of(
        lambda: [read_backbones(f) for f in scope]
    )

    def biotite_parse():
        import io

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for t in texts:
                PDBFile.read(io.StringIO(t)).get_structure(model=1)

    results["biotite_parse_per_s"] = len(texts) / best_of(biotite_parse, 1)

    rng = np.random.default_rng(0)
    for length in (256, 512, 1024):
        x = np.cumsum(rng.normal(size=(length, 3, 3)) * 2.0, axis=0)
        results[f"features_s_L{length}"] = best_of(lambda x=x: sixd(x[:, 0], x[:, 1], x[:, 2]), 5)

    per_core = results["scope_per_s_1_worker"]
    lines = [
        ("SCOPe domains (100-250 res), 1 worker, structures/s (target >= 300)", per_core),
        (
            "  the same per CPU-second of the converting process",
            results["scope_per_cpu_s_1_worker"],
        ),
        (f"SCOPe domains, {cores} workers, structures/s", results[f"scope_per_s_{cores}_workers"]),
        (
            "  ms per structure: parse, features, encode+write",
            results["scope_ms_parse_features_encode_write"],
        ),
        (
            "SCOPe domains, 16-bit PNG, 1 worker, structures/s",
            results["scope_per_s_1_worker_16bit"],
        ),
        (
            f"all {len(every)} files of ../shared, 1 worker, files/s",
            results["shared_all_files_per_s_1_worker"],
        ),
        (
            f"all files, {cores} workers, files/s",
            results[f"shared_all_files_per_s_{cores}_workers"],
        ),
        ("gemmi parse only, /s", results["gemmi_parse_per_s"]),
        ("read_backbones (gemmi + extraction), /s", results["read_backbones_per_s"]),
        ("biotite PDBFile parse, /s", results["biotite_parse_per_s"]),
        (
            "gemmi / biotite parse speed ratio",
            results["gemmi_parse_per_s"] / results["biotite_parse_per_s"],
        ),
    ]
    lines += [(f"features L={n}, ms", results[f"features_s_L{n}"] * 1e3) for n in (256, 512, 1024)]
    lines += [
        ("ratio to target: structures/s per core / 300", per_core / 300),
        ("ratio to target: 100 ms / features L=1024", 0.1 / results["features_s_L1024"]),
    ]
    for label, value in lines:
        shown = f"{value:10.2f}" if isinstance(value, float) else f"{value!s:>10}"
        print(f"{label:<72}{shown}")
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in results.items()}))


if __name__ == "__main__":
    main()
