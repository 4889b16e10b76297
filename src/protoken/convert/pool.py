"""Worker processes that convert items one at a time, with crashes and hangs contained.

A :class:`Pool` runs a :class:`Job` (what to do with one item, and the result that records its
failure) in worker processes, never in the main one. A worker that dies (a parser's segfault,
the OOM killer) is replaced; the item it held is recorded failed ("worker crashed: signal N")
and the items queued behind it are run again one by one. The per-item ``timeout`` is enforced
by the main process, which kills and replaces a worker stuck past it, even inside C code.
Workers are forked from a forkserver that imported the job's modules once (a replaced worker
starts warm), never from the main process and its threads; each is tuned to use one core.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import multiprocessing
import os
import signal
import sys
import time
from collections import deque
from collections.abc import Iterator
from multiprocessing.connection import wait as wait_for
from typing import Any, Protocol

__all__ = ["Job", "Pool", "available_cores", "single_thread_blas", "tune_malloc"]


class Job(Protocol):
    """What the workers of a :class:`Pool` do; pickled once into each worker."""

    #: Modules the forkserver imports once, for every worker (missing ones are left out).
    preload: tuple[str, ...]

    def run(self, item: Any) -> Any:
        """The result of one item (never raises on bad input)."""

    def failed(self, item: Any, reason: str) -> Any:
        """The result recording that ``item`` failed for ``reason``."""

    def discard(self, result: Any) -> None:
        """Remove what a result left behind that will never be used (its main process died)."""


def available_cores() -> int:
    """The cores this process may use (its CPU affinity: a SLURM or cgroup allocation, not
    the machine's count)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


# --------------------------------------------------------------------------- one core each


def tune_malloc() -> bool:
    """Keep freed numpy temporaries in the heap instead of returning them to the OS.

    Each image is built from a few dozen (L, L) float64 temporaries of ~100 kB-8 MB. glibc
    serves those with mmap and unmaps them on free, so every structure pays for fresh pages
    (page faults): about 35% of the feature and encoding time on 150-residue domains. Raising
    the mmap and trim thresholds (glibc's mallopt) keeps them in the heap; the cost is that the
    process keeps its peak memory (tens of MB). A no-op where mallopt is unavailable.
    """
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # from <malloc.h>
    ok = mallopt(m_mmap_threshold, 64 << 20) == 1
    return bool(mallopt(m_trim_threshold, 256 << 20) == 1 and ok)


def single_thread_blas() -> bool:
    """Make the BLAS library numpy loaded (OpenBLAS in numpy's wheels) use one thread.

    A worker is meant to use one core: ``convert`` starts one worker per core. But OpenBLAS
    starts a thread per core for each matrix product of :func:`protoken.geometry.sixd`, even
    the (L, 3) x (3, L) ones, and on small products those threads mostly spin: with one worker
    on 2 cores, 1.5x the CPU time for 20% less wall time (BM5 chains), and with one worker per
    core they only compete with the other workers. Set through OpenBLAS's own
    ``openblas_set_num_threads`` (found in the libraries this process mapped, as threadpoolctl
    does), since the worker's numpy was imported before (the forkserver preloads it), when the
    ``OPENBLAS_NUM_THREADS`` variable is no longer read. True if a BLAS was set; a no-op
    elsewhere (no /proc, another BLAS).
    """
    import ctypes

    try:
        with open("/proc/self/maps") as fh:
            libs = {line.split()[-1] for line in fh if "blas" in line.lower() and ".so" in line}
    except OSError:
        return False
    names = ("openblas_set_num_threads", "scipy_openblas_set_num_threads64_",
             "scipy_openblas_set_num_threads", "openblas_set_num_threads64_")  # fmt: skip
    done = False
    for lib in sorted(libs):
        try:
            handle = ctypes.CDLL(lib)
        except OSError:
            continue
        for name in names:
            setter = getattr(handle, name, None)
            if setter is not None:
                setter(1)
                done = True
                break
    return done


# --------------------------------------------------------------------------- workers


def _worker_main(conn, job: Job) -> None:
    """A worker process: run the job on the items the main process sends, one at a time.

    Messages in: ``(seq, item)``, or None to stop. Out: ``("ready",)`` once, then
    ``(seq, result, cpu_seconds)`` per item. SIGINT is ignored (Ctrl-C reaches the whole
    process group; the main process decides); the worker ends when the main process closes its
    pipe.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent()
    tune_malloc()
    single_thread_blas()
    result = None
    try:
        conn.send(("ready",))
        while True:
            msg = conn.recv()
            if msg is None:
                return
            seq, item = msg
            result = None
            cpu = time.process_time()
            try:
                result = job.run(item)
            except Exception as exc:  # noqa: BLE001 - e.g. a full disk: recorded, not fatal here
                reason = f"internal error: {type(exc).__name__}: {' '.join(str(exc).split())[:160]}"
                result = job.failed(item, reason)
            conn.send((seq, result, time.process_time() - cpu))
    except (EOFError, OSError, KeyboardInterrupt):  # the main process is gone
        if result is not None:  # it will never be committed: leave nothing behind
            job.discard(result)


def _die_with_parent() -> None:
    """Linux: SIGKILL this worker when the process that started it ends (the forkserver, which
    ends with the main process), so a killed run leaves no worker converting on."""
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            pr_set_pdeathsig = 1  # from <sys/prctl.h>
            ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


def _mp_context(preload: tuple[str, ...]):
    """forkserver where the platform has it (a clean, fast fork of a server that imported
    ``preload`` once; never a fork of the main process and its threads), else spawn."""
    methods = multiprocessing.get_all_start_methods()
    if "forkserver" in methods:
        ctx = multiprocessing.get_context("forkserver")
        # what every worker needs, imported once in the server rather than in each worker
        # (a worker replaced after a crash starts warm too); only the modules installed
        ctx.set_forkserver_preload([m for m in preload if importlib.util.find_spec(m)])
        return ctx
    return multiprocessing.get_context("spawn")


@contextlib.contextmanager
def _main_module_hidden() -> Iterator[None]:
    """Start a worker without making it import the caller's ``__main__``.

    multiprocessing (spawn, forkserver) runs the main script again in each new process, to find
    what it defines; a script without an ``if __name__ == "__main__"`` guard would then convert
    again in every worker, and code read from stdin cannot be run at all. Workers need protoken
    only (and what the job holds, which must live in importable modules), so the main module's
    file and spec are hidden while a worker starts.
    """
    main = sys.modules.get("__main__")
    if main is None:
        yield
        return
    saved = {k: main.__dict__[k] for k in ("__spec__", "__file__") if k in main.__dict__}
    main.__dict__["__spec__"] = None
    main.__dict__.pop("__file__", None)
    try:
        yield
    finally:
        main.__dict__.pop("__spec__", None)
        main.__dict__.update(saved)


def _death_reason(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = "unknown signal"
        return f"worker crashed: signal {-exitcode} ({name})"
    return f"worker crashed: exit code {exitcode}"


class _Worker:
    """One worker process, its pipe, and the items sent to it (oldest first)."""

    def __init__(self, ctx, job: Job):
        parent, child = ctx.Pipe()
        self.process = ctx.Process(
            target=_worker_main, args=(child, job), daemon=True, name="protoken-convert"
        )
        with _main_module_hidden():
            self.process.start()
        child.close()
        self.conn = parent
        self.queue: deque[tuple[int, Any]] = deque()
        self.ready = False
        self.started = 0.0  # when the item at the head of the queue started

    def send(self, seq: int, item: Any) -> None:
        if not self.queue:
            self.started = time.monotonic()
        self.queue.append((seq, item))
        self.conn.send((seq, item))

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join()
        self.conn.close()


class Pool:
    """``n`` worker processes running ``job`` on items one at a time, with crashes and hangs
    contained.

    Each worker holds at most ``depth`` items (one running, the others queued in its pipe) so
    it never waits for work. The main process waits on every pipe and every process sentinel
    at once, with a deadline: the head item of each worker must finish within ``timeout``
    seconds of starting (None or inf: no limit), or the worker is killed. A dead worker's head
    item is the one that killed it (``job.failed``); the items queued behind it are sent again.
    """

    #: Workers that die before they start, in a row, before the run gives up.
    MAX_START_FAILURES = 3

    def __init__(self, n: int, job: Job, timeout: float | None = None, depth: int = 4):
        self.ctx = _mp_context(job.preload)
        self.job, self.depth = job, depth
        self.timeout = timeout if timeout and math.isfinite(timeout) and timeout > 0 else math.inf
        self.workers = [self._new() for _ in range(n)]
        self.retry: deque[tuple[int, Any]] = deque()
        self.start_failures = 0
        self.cpu_seconds = 0.0  # spent by the workers on the items they finished

    def _new(self) -> _Worker:
        return _Worker(self.ctx, self.job)

    def busy(self) -> bool:
        return bool(self.retry) or any(w.queue for w in self.workers)

    def free_slots(self) -> int:
        return sum(self.depth - len(w.queue) for w in self.workers)

    def submit(self, seq: int, item: Any) -> None:
        """Send ``item`` (numbered ``seq``) to the least busy worker."""
        worker = min(self.workers, key=lambda w: len(w.queue))
        worker.send(seq, item)

    def _resubmit(self) -> None:
        while self.retry and self.free_slots():
            self.submit(*self.retry.popleft())

    def results(self) -> Iterator[tuple[int, Any, Any]]:
        """Wait for the next events; yield ``(seq, item, result)`` for each item finished,
        crashed or timed out."""
        self._resubmit()
        timeout = self.timeout
        now = time.monotonic()
        heads = [w.started + timeout - now for w in self.workers if w.queue and w.ready]
        wait_s = max(0.0, min(heads)) if heads and math.isfinite(min(heads)) else None
        handles = [w.conn for w in self.workers] + [w.process.sentinel for w in self.workers]
        wait_for(handles, wait_s)
        for k, w in enumerate(self.workers):
            dead = False
            try:
                while w.conn.poll():
                    msg = w.conn.recv()
                    if msg == ("ready",):
                        w.ready, self.start_failures = True, 0
                        w.started = time.monotonic()
                        continue
                    seq, result, cpu = msg
                    head_seq, item = w.queue.popleft()
                    assert head_seq == seq, (head_seq, seq)
                    w.started = time.monotonic()
                    self.cpu_seconds += cpu
                    yield seq, item, result
            except (EOFError, OSError):
                dead = True
            if dead or not w.process.is_alive():
                yield from self._replace(k, _death_reason(self._exitcode(w)))
            elif w.queue and w.ready and time.monotonic() - w.started > timeout:
                yield from self._replace(k, f"timed out after {timeout:g} s (worker killed)")

    @staticmethod
    def _exitcode(w: _Worker) -> int | None:
        w.process.join(timeout=5)
        return w.process.exitcode

    def _replace(self, k: int, reason: str) -> Iterator[tuple[int, Any, Any]]:
        w = self.workers[k]
        w.kill()
        if not w.ready:
            self.start_failures += 1
            if self.start_failures >= self.MAX_START_FAILURES:
                raise RuntimeError(
                    f"worker processes die before converting anything ({reason}); "
                    "is the machine out of memory or processes?"
                )
            self.retry.extendleft(reversed(w.queue))
        elif w.queue:
            seq, item = w.queue.popleft()
            self.retry.extendleft(reversed(w.queue))  # run again, one item at a time
            yield seq, item, self.job.failed(item, reason)
        self.workers[k] = self._new()

    def close(self) -> None:
        """Let the workers finish and end (killed after 5 s)."""
        for w in self.workers:
            with contextlib.suppress(OSError):
                w.conn.send(None)
        deadline = time.monotonic() + 5
        for w in self.workers:
            w.process.join(timeout=max(0.0, deadline - time.monotonic()))
            w.kill()

    def terminate(self) -> None:
        """Kill the workers now (an error or a signal in the main process)."""
        for w in self.workers:
            w.kill()
