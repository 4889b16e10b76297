"""benchmarks/gpu.py on a CPU (--cpu-smoke): every part runs on real mixed-length images and
prints its figures, so the script a GPU user runs is not first tried on their GPU."""

from __future__ import annotations

import importlib.util
import json
import math
import sys

import pytest

from conftest import REPO

spec = importlib.util.spec_from_file_location("gpu_benchmark", REPO / "benchmarks" / "gpu.py")
gpu = importlib.util.module_from_spec(spec)
sys.modules["gpu_benchmark"] = gpu
spec.loader.exec_module(gpu)


@pytest.mark.slow
def test_the_gpu_benchmark_runs_on_a_cpu(converted8, structures_dir, tmp_path, capsys):
    code = gpu.main(["--data", str(converted8), "--structures", str(structures_dir),
                     "--cpu-smoke", "--work", str(tmp_path / "work"),
                     "--set", "split_key_regex=^(.+)$", "--set", "valid_frac=0.2"])  # fmt: skip
    assert code == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()
            if line.startswith("{")]  # fmt: skip
    parts = [r["part"] for r in rows]
    assert parts[0] == "device" and parts[-1] == "summary" and rows[0]["device"] == "cpu"
    speed = [r for r in rows if r["part"] == "throughput"]
    assert sorted({r["L"] for r in speed}) == [32, 64]
    assert all(r["proteins_per_s"] > 0 and r["peak_memory_mb"] > 0 for r in speed)
    (enc,) = [r for r in rows if r["part"] == "encode"]
    assert enc["proteins_per_s"] > 0
    (train,) = [r for r in rows if r["part"] == "train"]
    assert train["steps"] >= 1 and train["heldout_proteins"] == 2
    assert 0.0 < train["tm_score_median"] <= 1.0 and not math.isnan(train["tm_score_median"])
    assert rows[-1]["errors"] == []
