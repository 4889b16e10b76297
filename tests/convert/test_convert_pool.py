"""The worker pool: every item gets exactly one result, whatever kills or hangs a worker, and
the items queued behind a dead worker are run again; one thread of BLAS per worker."""

from __future__ import annotations

import subprocess
import sys

import pytest

from helpers import SquareJob
from protoken.convert.pool import Pool, available_cores


def run_all(pool: Pool, items: list) -> dict:
    """Submit every item and collect ``{seq: result}``, as a conversion drives the pool."""
    results, todo = {}, list(enumerate(items))
    while todo or pool.busy():
        while todo and pool.free_slots() > 0 and not pool.retry:
            pool.submit(*todo.pop(0))
        for seq, item, result in pool.results():
            assert seq not in results and items[seq] == item
            results[seq] = result
    return results


def test_crashes_hangs_and_errors_cost_one_item_each():
    items = [2, "segv", 3, "exit", 4, "hang", 5, "raise", 6, 7]
    pool = Pool(2, SquareJob(), timeout=3.0, depth=3)
    try:
        results = run_all(pool, items)
    finally:
        pool.close()
    assert sorted(results) == list(range(len(items)))  # one result per item
    for seq, item in enumerate(items):
        if isinstance(item, int):
            assert results[seq] == ("ok", item, item * item)  # queued behind a crash: run again
    reasons = {results[seq][1]: results[seq][2] for seq in range(len(items))
               if results[seq][0] == "failed"}  # fmt: skip
    assert set(reasons) == {"segv", "exit", "hang", "raise"}
    assert reasons["segv"] == "worker crashed: signal 11 (SIGSEGV)"
    assert reasons["exit"] == "worker crashed: exit code 3"
    assert reasons["hang"] == "timed out after 3 s (worker killed)"
    assert reasons["raise"] == "internal error: OSError: disk full"
    assert pool.cpu_seconds >= 0 and 1 <= available_cores()


def test_single_thread_blas_sets_openblas_to_one_thread():
    """Workers run numpy's BLAS on one thread (in a fresh process: the setting is global)."""
    code = (
        "import ctypes, numpy\n"
        "from protoken.convert.pool import single_thread_blas\n"
        "done = single_thread_blas()\n"
        "libs = {l.split()[-1] for l in open('/proc/self/maps') if 'openblas' in l.lower()}\n"
        "names = ('openblas_get_num_threads', 'scipy_openblas_get_num_threads64_')\n"
        "got = [getattr(ctypes.CDLL(p), n)() for p in libs for n in names\n"
        "       if hasattr(ctypes.CDLL(p), n)]\n"
        "print(done, got)\n"
    )
    if not sys.platform.startswith("linux"):
        pytest.skip("reads /proc/self/maps")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    done, got = out.stdout.split(" ", 1)
    if done == "False":
        pytest.skip("numpy is not linked to OpenBLAS here")
    assert got.strip() == "[1]", out.stdout
