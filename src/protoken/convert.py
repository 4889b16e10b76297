"""Batch conversion: structure files -> 6D images (PNG) + FASTA, binned by length.

Layout of the output folder ``OUT`` (the reference design's)::

    OUT/bin_40_64/ID.png, OUT/bin_65_128/ID.png, ..., OUT/bin_961_1024/ID.png
    OUT/fasta/ID.fasta            (or --fasta-dir)
    OUT/manifest.tsv              (OUT/manifest.shard-I-of-N.tsv with --shard I/N)
    OUT/convert.json              the settings that change outputs

or, with ``format="shards"`` (``--format shards``), tar shards in the WebDataset layout and
their index instead of the bins and FASTA files (:mod:`protoken.shards`)::

    OUT/shards/BIN/TAG-000000.tar, OUT/shards/index.TAG.tsv

Inputs are files, folders, tar archives and Foldcomp databases (:mod:`protoken.archives`):
the main process streams archive members and sends each member's bytes to a worker, with the
source ``ARCHIVE::MEMBER`` in its manifest row, so sharding and resume work per member.

How it stays safe at scale, and against hostile files:

- Inputs are streamed (:func:`protoken.archives.find_sources`), never listed or counted up
  front. Ids are safe ids (:func:`protoken.inputs.safe_id`) and every output path is checked to
  lie inside its folder.
- Each file is converted in a worker process, never in the main one. A worker that dies (a
  parser's segfault, the OOM killer) is replaced; the file it was converting is recorded
  ``failed`` ("worker crashed: signal N") and the files queued behind it are converted again
  one by one. The per-file ``timeout`` is enforced by the main process, which kills and
  replaces a worker stuck past it, even inside C code.
- Shards: workers return the PNG bytes and the main process appends them to the open shard of
  their bin; a source's manifest rows are written once every image of it is in a committed
  shard (see :mod:`protoken.shards` for the commit protocol).
- Workers write their PNG and FASTA under temporary names (``NAME.tmp.TAG.PID``); the main
  process commits them with hard links that never replace an existing file (PNG, then FASTA:
  a FASTA is the mark of a complete output) and appends the manifest row. A killed run leaves
  at most temporary files, removed by the next run into the same OUT and shard.
- One writer per OUT and shard: a lock file (``OUT/.protoken-convert.lock``, ``flock``) makes
  a second run refuse at once; shards of one OUT run side by side.
- Inputs sharing an id (``1abc.pdb``, ``1abc.cif``) are always in the same shard (shards are
  by id) and the first in walk order wins, whatever the timing of the workers: a result is held
  back while an earlier input with the same id is still being converted. The others are
  recorded as skipped duplicates, and never deleted by ``--delete-source``.
- Resume: an input with a manifest row, or whose FASTA already exists (its id is known from its
  name outside ``--chains split``), is skipped before parsing; failed inputs are tried again
  only with ``retry_failed`` (their old rows move to ``manifest...retried.tsv``).
- ``--delete-source`` deletes an input only after all its outputs were written, read back and
  compared, and never a skipped or failed input. Existing outputs are never overwritten.
- ``OUT/convert.json`` records every setting that changes the outputs (dmax, bit depth, chains,
  models, lengths); a run with other values into the same OUT is refused.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import importlib.util
import json
import logging
import math
import multiprocessing
import os
import signal
import socket
import sys
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import wait as wait_for

import numpy as np

from protoken.archives import find_sources, member_id, read_member
from protoken.codec import decode_png, encode_pixels, features_to_pixels
from protoken.fileio import atomic_write, drop_partial_last_line, read_fasta
from protoken.geometry import DMAX, clipped_fraction, sixd
from protoken.inputs import (
    SETTINGS_FILE,
    UnsafePath,
    safe_output_path,
    structure_id,
)
from protoken.shards import DEFAULT_SHARD_BYTES, ShardWriter, index_files, read_index
from protoken.structure import DEFAULT_MAX_BYTES, SkipStructure, StructureError, read_backbones

__all__ = [
    "MANIFEST_COLUMNS",
    "SETTINGS_FILE",
    "ConvertBusy",
    "ConvertOptions",
    "Row",
    "Summary",
    "bin_name",
    "convert",
    "convert_file",
    "manifest_path",
    "read_manifest",
    "read_settings",
]

#: ``clipped``: the fraction of the image's residue pairs at or beyond dmax (last, so that
#: manifests of before it still read, and a resumed run writes them in their own columns).
MANIFEST_COLUMNS = ("source", "id", "status", "reason", "length", "dropped", "bin", "sequence",
                    "clipped")  # fmt: skip

#: Settings recorded in ``OUT/convert.json`` that change what a run writes; a run with other
#: values into the same OUT is refused.
OUTPUT_SETTINGS = ("dmax", "bit_depth", "chains", "models", "min_len", "max_len", "format")

#: Output formats: one PNG (and FASTA) per chain, or tar shards with an index.
FORMATS = ("png", "shards")


class ConvertBusy(RuntimeError):
    """Another ``protoken convert`` is writing the same OUT (and shard)."""


@dataclass(frozen=True)
class ConvertOptions:
    """Options of a conversion run (see ``protoken convert --help``)."""

    out: str
    fasta_dir: str | None = None
    chains: str = "skip-multi"
    models: str = "skip-multi"
    min_len: int = 40
    max_len: int = 1024
    dmax: float = DMAX
    bit_depth: int = 8
    delete_source: bool = False
    timeout: float = 300.0
    max_bytes: int = DEFAULT_MAX_BYTES
    retry_failed: bool = False
    follow_links: bool = False
    format: str = "png"
    shard_bytes: int = DEFAULT_SHARD_BYTES

    @property
    def fasta_folder(self) -> str:
        return self.fasta_dir or os.path.join(self.out, "fasta")

    def settings(self) -> dict:
        """The values of :data:`OUTPUT_SETTINGS` (what ``convert.json`` records)."""
        return {key: getattr(self, key) for key in OUTPUT_SETTINGS}


@dataclass
class Row:
    """One manifest row (one input, or one chain of it in ``split`` mode)."""

    source: str
    id: str = ""
    status: str = "failed"  # ok | skipped | failed
    reason: str = ""
    length: int | str = ""
    dropped: int | str = ""
    bin: str = ""
    sequence: str = ""
    clipped: str = ""
    # not written to the manifest:
    png_tmp: str = field(default="", repr=False)
    fasta_tmp: str = field(default="", repr=False)
    png: bytes = field(default=b"", repr=False)  # --format shards: the image, for the main process
    verified: bool = field(default=False, repr=False)
    times: tuple[float, float, float] = field(default=(0.0, 0.0, 0.0), repr=False)

    def manifest_values(self, columns=MANIFEST_COLUMNS) -> list[str]:
        return [_clean(str(getattr(self, c, ""))) for c in columns]


def _clean(text: str) -> str:
    """A manifest value on one line: tabs and line breaks (legal in file names) become spaces."""
    return " ".join(text.replace("\t", " ").split())


def bin_name(length: int) -> str:
    """Length bin folder, as the reference design: bin_40_64, bin_65_128, ..., bin_961_1024 (steps
    of 64).

    Lengths outside the reference design's 40-1024 (with --min-len / --max-len) extend the scheme:
    bin_1_39 below, bin_1025_1088, ... above.
    """
    if length < 1:
        raise ValueError(f"length must be positive, not {length}")
    if length < 40:
        return "bin_1_39"
    if length <= 64:
        return "bin_40_64"
    lo = (length - 1) // 64 * 64 + 1
    return f"bin_{lo}_{lo + 63}"


def _safe_stem(path: str) -> str:
    try:
        return structure_id(path)
    except ValueError:
        return "%00"


# What a worker is sent: a file's path, or an archive member as
# ``(source, name, kind, data, error)`` (its bytes, read by the main process).


def _item_source(item) -> str:
    return item if isinstance(item, str) else item[0]


def _item_id(item) -> str:
    return _safe_stem(item) if isinstance(item, str) else member_id(item[1])


# --------------------------------------------------------------------------- one file


def _temp(path: str, tag: str) -> str:
    """The temporary name a worker writes ``path`` under: ``path.tmp.TAG.PID``."""
    return f"{path}.tmp.{tag}.{os.getpid()}"


def convert_file(
    path,
    opts: ConvertOptions,
    read: Callable[..., list] | None = None,
    tag: str = "all",
) -> list[Row]:
    """Convert one structure file, or one archive member; outputs are left under temporary
    names for the caller (``--format shards``: the PNG is returned in ``Row.png``).

    ``path`` is a file's path or an archive member ``(source, name, kind, data, error)``.
    ``read`` replaces :func:`protoken.structure.read_backbones` (same signature) for files;
    ``tag`` names the run's temporary files (``NAME.tmp.TAG.PID``). Returns one row per chain
    considered (one row for a skipped or failed input). Never raises on bad input: the reason
    is in the row.
    """
    read = read or read_backbones
    t0 = time.perf_counter()
    sid = _item_id(path)
    member = not isinstance(path, str)
    if member:
        source, name, kind, data, error = path
        if error:
            return [Row(source=source, id=sid, status="failed", reason=error)]
    else:
        source = path
    try:
        if member:
            backbones = read_member(name, kind, data, opts.chains, opts.models, opts.max_bytes)
        else:
            backbones = read(path, chains=opts.chains, models=opts.models, max_bytes=opts.max_bytes)
    except SkipStructure as exc:
        return [Row(source=source, id=sid, status="skipped", reason=str(exc))]
    except StructureError as exc:
        return [Row(source=source, id=sid, status="failed", reason=str(exc))]
    except Exception as exc:  # noqa: BLE001 - a bad file must never stop the batch
        reason = f"unexpected error: {type(exc).__name__}: {' '.join(str(exc).split())[:160]}"
        return [Row(source=source, id=sid, status="failed", reason=reason)]
    t_parse = time.perf_counter() - t0
    rows = []
    for bb in backbones:
        length = len(bb)
        row = Row(source=source, id=bb.id, length=length, dropped=bb.dropped, sequence=bb.sequence)
        if length < opts.min_len:
            row.status, row.reason = "skipped", f"too short: {length} residues < {opts.min_len}"
        elif length > opts.max_len:
            row.status, row.reason = "skipped", f"too long: {length} residues > {opts.max_len}"
        else:
            row.bin = bin_name(length)
            shards = opts.format == "shards"
            try:
                png_path = safe_output_path(os.path.join(opts.out, row.bin), bb.id, ".png")
                fasta_path = safe_output_path(opts.fasta_folder, bb.id, ".fasta")
            except UnsafePath as exc:
                row.status, row.reason, row.bin = "failed", str(exc), ""
                rows.append(row)
                continue
            t1 = time.perf_counter()
            features = sixd(bb.n, bb.ca, bb.c, dmax=opts.dmax)
            row.clipped = f"{clipped_fraction(features.d, opts.dmax):.6g}"
            try:  # quantize(features_to_image(...)), bit for bit
                pixels = features_to_pixels(features, opts.dmax, opts.bit_depth)
            except ValueError:
                row.status, row.reason, row.bin = "failed", "non-finite 6D features", ""
                rows.append(row)
                continue
            t2 = time.perf_counter()
            png = encode_pixels(pixels)
            fasta = f">{bb.id}\n{bb.sequence}\n"
            if shards:  # the main process appends it to a shard
                row.png, row.status = png, "ok"
                row.times = (0.0, t2 - t1, time.perf_counter() - t2)
                rows.append(row)
                continue
            row.png_tmp, row.fasta_tmp = _temp(png_path, tag), _temp(fasta_path, tag)
            os.makedirs(os.path.dirname(png_path), exist_ok=True)
            with open(row.png_tmp, "wb") as fh:
                fh.write(png)
            with open(row.fasta_tmp, "w") as fh:
                fh.write(fasta)
            if opts.delete_source and not member:
                row.verified = _verify(row, pixels, fasta, opts.max_len)
            row.status = "ok"
            row.times = (0.0, t2 - t1, time.perf_counter() - t2)
        rows.append(row)
    if rows:
        first = rows[0]
        first.times = (t_parse, *first.times[1:])
    return rows


def _verify(row: Row, pixels: np.ndarray, fasta: str, max_len: int) -> bool:
    """Read the written files back and compare them with what was meant to be written."""
    try:
        with open(row.png_tmp, "rb") as fh:
            back = decode_png(fh.read(), max_len)
        with open(row.fasta_tmp) as fh:
            text = fh.read()
    except (OSError, ValueError):
        return False
    return back.dtype == pixels.dtype and np.array_equal(back, pixels) and text == fasta


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


def _worker_main(conn, opts: ConvertOptions, read, tag: str) -> None:
    """A worker process: convert the files the main process sends, one at a time.

    Messages in: ``(seq, path)``, or None to stop. Out: ``("ready",)`` once, then
    ``(seq, rows, cpu_seconds)`` per file. SIGINT is ignored (Ctrl-C reaches the whole process
    group; the main process decides); the worker ends when the main process closes its pipe.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent()
    tune_malloc()
    single_thread_blas()
    rows: list[Row] = []
    try:
        conn.send(("ready",))
        while True:
            msg = conn.recv()
            if msg is None:
                return
            seq, path = msg
            rows = []
            cpu = time.process_time()
            try:
                rows = convert_file(path, opts, read, tag)
            except Exception as exc:  # noqa: BLE001 - e.g. a full disk: recorded, not fatal here
                reason = f"internal error: {type(exc).__name__}: {' '.join(str(exc).split())[:160]}"
                rows = [Row(_item_source(path), _item_id(path), "failed", reason)]
            conn.send((seq, rows, time.process_time() - cpu))
    except (EOFError, OSError, KeyboardInterrupt):  # the main process is gone
        for row in rows:  # its outputs will never be committed: leave nothing behind
            for tmp in (row.png_tmp, row.fasta_tmp):
                if tmp:
                    _unlink_quiet(tmp)


def _die_with_parent() -> None:
    """Linux: SIGKILL this worker when the process that started it ends (the forkserver, which
    ends with the main process), so a killed run leaves no worker converting on."""
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            pr_set_pdeathsig = 1  # from <sys/prctl.h>
            ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


def _mp_context():
    """forkserver where the platform has it (a clean, fast fork of a server that imported
    protoken once; never a fork of the main process and its threads), else spawn."""
    methods = multiprocessing.get_all_start_methods()
    if "forkserver" in methods:
        ctx = multiprocessing.get_context("forkserver")
        # what every worker needs, imported once in the server rather than in each worker
        # (a worker replaced after a crash starts warm too); foldcomp only where installed
        preload = ["protoken.convert", "protoken.structure", "gemmi", "imagecodecs"]
        if importlib.util.find_spec("foldcomp") is not None:
            preload.append("foldcomp")
        ctx.set_forkserver_preload(preload)
        return ctx
    return multiprocessing.get_context("spawn")


@contextlib.contextmanager
def _main_module_hidden() -> Iterator[None]:
    """Start a worker without making it import the caller's ``__main__``.

    multiprocessing (spawn, forkserver) runs the main script again in each new process, to find
    what it defines; a script without an ``if __name__ == "__main__"`` guard would then convert
    again in every worker, and code read from stdin cannot be run at all. Workers need protoken
    only (and ``read``, which must live in an importable module), so the main module's file and
    spec are hidden while a worker starts.
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
    """One worker process, its pipe, and the files sent to it (oldest first)."""

    def __init__(self, ctx, opts: ConvertOptions, read, tag: str):
        parent, child = ctx.Pipe()
        self.process = ctx.Process(
            target=_worker_main, args=(child, opts, read, tag), daemon=True, name="protoken-convert"
        )
        with _main_module_hidden():
            self.process.start()
        child.close()
        self.conn = parent
        self.queue: deque[tuple[int, str]] = deque()
        self.ready = False
        self.started = 0.0  # when the file at the head of the queue started

    def send(self, seq: int, path: str) -> None:
        if not self.queue:
            self.started = time.monotonic()
        self.queue.append((seq, path))
        self.conn.send((seq, path))

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join()
        self.conn.close()


class _Pool:
    """Worker processes converting files one at a time, with crashes and hangs contained.

    Each worker holds at most ``depth`` files (one converting, the others queued in its pipe)
    so it never waits for work. The main process waits on every pipe and every process
    sentinel at once, with a deadline: the head file of each worker must finish within
    ``timeout`` seconds of starting, or the worker is killed. A dead worker's head file is the
    one that killed it (recorded ``failed``); the files queued behind it are sent again.
    """

    #: Workers that die before they start, in a row, before the run gives up.
    MAX_START_FAILURES = 3

    def __init__(self, n: int, opts: ConvertOptions, read, tag: str, depth: int = 4):
        self.ctx = _mp_context()
        self.opts, self.read, self.tag, self.depth = opts, read, tag, depth
        self.workers = [self._new() for _ in range(n)]
        self.retry: deque[tuple[int, str]] = deque()
        self.start_failures = 0
        self.cpu_seconds = 0.0  # spent by the workers on the files they finished

    def _new(self) -> _Worker:
        return _Worker(self.ctx, self.opts, self.read, self.tag)

    def busy(self) -> bool:
        return bool(self.retry) or any(w.queue for w in self.workers)

    def free_slots(self) -> int:
        return sum(self.depth - len(w.queue) for w in self.workers)

    def submit(self, seq: int, path: str) -> None:
        worker = min(self.workers, key=lambda w: len(w.queue))
        worker.send(seq, path)

    def _resubmit(self) -> None:
        while self.retry and self.free_slots():
            self.submit(*self.retry.popleft())

    def results(self) -> Iterator[tuple[int, str, list[Row]]]:
        """Wait for the next events; yield ``(seq, path, rows)`` for each file finished, crashed
        or timed out."""
        self._resubmit()
        timeout = self.opts.timeout
        if not (timeout and math.isfinite(timeout) and timeout > 0):
            timeout = math.inf
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
                    seq, rows, cpu = msg
                    head_seq, path = w.queue.popleft()
                    assert head_seq == seq, (head_seq, seq)
                    w.started = time.monotonic()
                    self.cpu_seconds += cpu
                    yield seq, path, rows
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

    def _replace(self, k: int, reason: str) -> Iterator[tuple[int, str, list[Row]]]:
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
            seq, path = w.queue.popleft()
            self.retry.extendleft(reversed(w.queue))  # converted again, one file at a time
            yield seq, path, [Row(_item_source(path), _item_id(path), "failed", reason)]
        self.workers[k] = self._new()

    def close(self) -> None:
        for w in self.workers:
            with contextlib.suppress(OSError):
                w.conn.send(None)
        deadline = time.monotonic() + 5
        for w in self.workers:
            w.process.join(timeout=max(0.0, deadline - time.monotonic()))
            w.kill()

    def terminate(self) -> None:
        for w in self.workers:
            w.kill()


# --------------------------------------------------------------------------- manifest


def _key(text: str) -> int:
    return int.from_bytes(
        hashlib.blake2b(_clean(text).encode("utf-8", "surrogateescape"), digest_size=8).digest(),
        "big",
    )


def manifest_path(out: str, shard: tuple[int, int] | None) -> str:
    if shard is None:
        return os.path.join(out, "manifest.tsv")
    return os.path.join(out, f"manifest.shard-{shard[0]}-of-{shard[1]}.tsv")


def read_manifest(path: str) -> Iterator[dict[str, str]]:
    """Rows of a manifest file as dicts (a partial last line from a killed run is ignored)."""
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as fh:
        for row in csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE):
            if row.get("sequence") is not None and row.get("status") in ("ok", "skipped", "failed"):
                yield row


def _manifests(out: str) -> list[str]:
    if not os.path.isdir(out):
        return []
    with os.scandir(out) as it:
        return sorted(
            e.path
            for e in it
            if e.name.startswith("manifest")
            and e.name.endswith(".tsv")
            and not e.name.endswith(".retried.tsv")
        )


def _done_sources(out: str) -> np.ndarray:
    """Sorted 64-bit hashes of every source with a row in any manifest of ``out``.

    Hashes, not paths, so that resuming over millions of inputs costs 8 bytes per input.
    """
    keys: list[int] = []
    for name in _manifests(out):
        keys.extend(_key(row["source"]) for row in read_manifest(name))
    return np.unique(np.asarray(keys, dtype=np.uint64))


def _shard_ids(out: str) -> np.ndarray:
    """Sorted 64-bit hashes of the ids of every image in the shards of ``out`` (its shard
    indexes): ``--format shards`` refuses a second image with an id already written."""
    keys = [_key(row[4]) for path in index_files(out) for row in read_index(path)]
    return np.unique(np.asarray(keys, dtype=np.uint64))


def _contains(sorted_keys: np.ndarray, key: int) -> bool:
    i = np.searchsorted(sorted_keys, np.uint64(key))
    return bool(i < len(sorted_keys) and sorted_keys[i] == key)


def _drop_failed_rows(paths: list[str]) -> int:
    """``retry_failed``: move the failed rows of manifests to ``*.retried.tsv`` (appended, for
    the record) and rewrite each manifest without them, atomically. Returns the rows moved."""
    moved = 0
    for path in paths:
        with open(path, encoding="utf-8", errors="surrogateescape") as fh:
            lines = fh.read().splitlines(keepends=True)
        if not lines:
            continue
        header, body = lines[0], lines[1:]
        col = header.rstrip("\n").split("\t").index("status")
        failed = [ln for ln in body if ln.split("\t")[col : col + 1] == ["failed"]]
        if not failed:
            continue
        retried = path[: -len(".tsv")] + ".retried.tsv"
        new_file = not os.path.exists(retried)
        with open(retried, "a", encoding="utf-8", errors="surrogateescape") as fh:
            fh.writelines(([header] if new_file else []) + failed)
        kept = [header] + [ln for ln in body if ln.split("\t")[col : col + 1] != ["failed"]]
        atomic_write(path, "".join(kept).encode("utf-8", "surrogateescape"))
        moved += len(failed)
    return moved


class _Manifest:
    """Append-only TSV manifest, one line flushed per row; repairs a torn last line."""

    def __init__(self, path: str):
        self.path = path
        new = not os.path.exists(path) or os.path.getsize(path) == 0
        self.columns = MANIFEST_COLUMNS
        if not new:
            drop_partial_last_line(self.path)
            with open(path, encoding="utf-8", errors="surrogateescape") as fh:
                header = fh.readline().rstrip("\n").split("\t")
            if set(header) <= set(MANIFEST_COLUMNS):  # a manifest of before a new column
                self.columns = tuple(header)
        self.fh = open(path, "a", newline="", encoding="utf-8", errors="surrogateescape")  # noqa: SIM115
        if new:
            self.fh.write("\t".join(MANIFEST_COLUMNS) + "\n")
            self.fh.flush()

    def write(self, row: Row) -> None:
        self.fh.write("\t".join(row.manifest_values(self.columns)) + "\n")
        self.fh.flush()

    def close(self) -> None:
        self.fh.close()


# --------------------------------------------------------------------------- one writer


def _tag(shard: tuple[int, int] | None) -> str:
    return "all" if shard is None else f"shard-{shard[0]}-of-{shard[1]}"


class _Lock:
    """One writer per OUT and shard, with ``flock`` (released by the kernel when the process
    ends, so a killed run never leaves a stale lock).

    An unsharded run holds ``OUT/.protoken-convert.lock`` exclusively; a shard holds it shared
    and its own ``OUT/.protoken-convert.shard-I-of-N.lock`` exclusively: shards run side by
    side, a second run of one shard (or an unsharded run beside shards) is refused at once.
    A marker ``OUT/.protoken-convert.TAG.running`` stays behind when a run is killed, so the
    next run of that tag knows to remove its temporary files.
    """

    def __init__(self, out: str, shard: tuple[int, int] | None):
        self.handles: list = []
        self.tag = _tag(shard)
        self.marker = os.path.join(out, f".protoken-convert.{self.tag}.running")
        main = os.path.join(out, ".protoken-convert.lock")
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX: no locking
            return
        try:
            self._take(fcntl, main, fcntl.LOCK_EX if shard is None else fcntl.LOCK_SH, out)
            if shard is not None:
                own = os.path.join(out, f".protoken-convert.{self.tag}.lock")
                self._take(fcntl, own, fcntl.LOCK_EX, out)
        except BaseException:
            self.release()
            raise

    def _take(self, fcntl, path: str, mode: int, out: str) -> None:
        fh = open(path, "a+")  # noqa: SIM115 - kept open while the lock is held
        try:
            fcntl.flock(fh, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            fh.close()
            raise ConvertBusy(
                f"{out} is being written by another protoken convert ({holder}); "
                "wait for it to finish, or use another --out (shards of one OUT may run "
                "side by side)"
            ) from None
        except OSError as exc:  # a file system without locks (some network mounts)
            fh.close()
            logging.getLogger(__name__).warning(
                "%s: cannot lock %s (%s): runs into the same OUT are not kept apart", out, path,
                exc.strerror or exc,
            )  # fmt: skip
            return
        self.handles.append((fh, bool(mode & fcntl.LOCK_EX)))
        if mode & fcntl.LOCK_EX:
            fh.seek(0)
            fh.truncate()
            fh.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
            fh.flush()

    def release(self) -> None:
        for fh, exclusive in self.handles:
            if exclusive:  # no stale "pid N" for the next run's message
                with contextlib.suppress(OSError):
                    fh.truncate(0)
            fh.close()
        self.handles = []


def _remove_leftovers(opts: ConvertOptions, tag: str) -> int:
    """Remove the temporary files a killed run of this tag left in OUT's bins and FASTA folder
    (an unsharded run, which excludes every other, removes those of any tag, and the
    ``NAME.tmpPID`` files of protoken versions before the tags)."""
    needle = ".tmp" if tag == "all" else f".tmp.{tag}."
    folders = [opts.fasta_folder]
    with os.scandir(opts.out) as it:
        folders += [e.path for e in it if e.name.startswith("bin_") and e.is_dir()]
    removed = 0
    for folder in folders:
        if not os.path.isdir(folder):
            continue
        with os.scandir(folder) as it:
            for entry in it:
                if needle in entry.name and entry.is_file(follow_symlinks=False):
                    with contextlib.suppress(OSError):
                        os.unlink(entry.path)
                        removed += 1
    return removed


# --------------------------------------------------------------------------- the run


@dataclass
class Summary:
    """Counts of a conversion run.

    ``converted``, ``skipped`` and ``failed`` count manifest rows (one per chain with
    ``--chains split``); ``files`` counts the inputs processed in this run, ``failed_files``
    those of them whose every row failed, ``resumed`` the inputs already done before.
    """

    converted: int = 0
    resumed: int = 0
    skipped: Counter = field(default_factory=Counter)
    failed: Counter = field(default_factory=Counter)
    deleted: int = 0
    seconds: float = 0.0
    times: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    files: int = 0
    failed_files: int = 0
    crashed: int = 0
    timed_out: int = 0
    leftovers_removed: int = 0
    retried_rows: int = 0
    worker_cpu_seconds: float = 0.0

    def as_dict(self) -> dict:
        return {
            "converted": self.converted,
            "already_done": self.resumed,
            "skipped": dict(self.skipped),
            "failed": dict(self.failed),
            "deleted_sources": self.deleted,
            "files": self.files,
            "failed_files": self.failed_files,
            "seconds": round(self.seconds, 3),
            "worker_cpu_seconds": round(self.worker_cpu_seconds, 3),
            "seconds_parse_features_encode": [round(t, 3) for t in self.times],
        }

    @property
    def nothing_processed(self) -> bool:
        """No input at all, or every input of this run failed (and none was done before)."""
        return self.resumed == 0 and self.failed_files == self.files

    def text(self) -> str:
        lines = [
            f"converted {self.converted}, skipped {sum(self.skipped.values())}, "
            f"failed {sum(self.failed.values())}, already done {self.resumed} "
            f"({self.files} files in {self.seconds:.1f} s)"
        ]
        for label, counter in (("skipped", self.skipped), ("failed", self.failed)):
            for reason, n in counter.most_common():
                lines.append(f"  {label:8} {n:6}  {reason}")
        if self.deleted:
            lines.append(f"  deleted {self.deleted} source files")
        if self.leftovers_removed:
            lines.append(f"  removed {self.leftovers_removed} temporary files of a killed run")
        if self.retried_rows:
            lines.append(f"  retried {self.retried_rows} failed rows (moved to *.retried.tsv)")
        return "\n".join(lines)


def _available_cores() -> int:
    """The cores this process may use (its CPU affinity: a SLURM or cgroup allocation, not
    the machine's count)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _category(reason: str) -> str:
    for sep in (":", "("):
        reason = reason.split(sep, 1)[0]
    return reason.strip()


def convert(
    inputs: Iterable[str],
    opts: ConvertOptions,
    workers: int | None = None,
    shard: tuple[int, int] | None = None,
    progress: bool = True,
    log=None,
    read: Callable[..., list] | None = None,
) -> Summary:
    """Convert structure files into ``opts.out``; see the module docstring.

    Parameters
    ----------
    inputs : iterable of str
        Files and folders.
    opts : ConvertOptions
    workers : int, optional
        Worker processes (default: the cores this process may use). Files are always converted
        in workers, never in this process, so that a crash or a hang costs one file.
    shard : (int, int), optional
        Convert only shard I of N (by the md5 of each input's id).
    progress : bool
        Show a tqdm bar (files, files/s) on stderr.
    read : callable, optional
        Replaces :func:`protoken.structure.read_backbones` in the workers: a function of an
        importable module (workers import it by name; they never import the caller's
        ``__main__``).

    Returns
    -------
    Summary

    Raises
    ------
    ValueError
        OUT was converted with other settings (``convert.json``).
    ConvertBusy
        Another run is writing the same OUT and shard.
    FileNotFoundError
        An input does not exist.
    """
    from tqdm import tqdm

    log = log or (lambda msg: tqdm.write(msg, file=sys.stderr))
    workers = workers or _available_cores()
    if opts.format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, not {opts.format!r}")
    if opts.format == "shards" and opts.delete_source:
        raise ValueError("--delete-source is not supported with --format shards")
    os.makedirs(opts.out, exist_ok=True)
    lock = _Lock(opts.out, shard)
    try:
        return _run(inputs, opts, workers, shard, progress, log, read, lock)
    finally:
        lock.release()


def _run(inputs, opts, workers, shard, progress, log, read, lock) -> Summary:
    from tqdm import tqdm

    if opts.format == "png":
        os.makedirs(opts.fasta_folder, exist_ok=True)
    _record_settings(opts)
    summary = Summary()
    if os.path.exists(lock.marker):  # the last run of this tag was killed
        summary.leftovers_removed = _remove_leftovers(opts, lock.tag)
    atomic_write(lock.marker, f"pid {os.getpid()}\n")
    if opts.retry_failed:
        mine = _manifests(opts.out) if shard is None else [manifest_path(opts.out, shard)]
        summary.retried_rows = _drop_failed_rows([p for p in mine if os.path.exists(p)])
    done = _done_sources(opts.out)
    manifest = _Manifest(manifest_path(opts.out, shard))
    start = time.perf_counter()
    bar = tqdm(
        desc="convert", unit="file", disable=not progress, dynamic_ncols=True, file=sys.stderr
    )

    def pending_inputs() -> Iterator:
        for found in find_sources(inputs, shard, opts.follow_links, opts.max_bytes):
            source = found if isinstance(found, str) else found.source
            if _contains(done, _key(source)):
                summary.resumed += 1
                bar.update()
                continue
            sid = _safe_stem(found) if isinstance(found, str) else found.id
            if opts.chains != "split" and opts.format == "png":
                fasta = os.path.join(opts.fasta_folder, f"{sid}.fasta")
                if os.path.exists(fasta):
                    # from an earlier run, or an earlier input with the same id in this one:
                    # not parsed, never overwritten
                    row = Row(source, sid, "skipped", f"outputs already exist: {sid}")
                    _fill_from_fasta(row, fasta)
                    commit([row])
                    continue
            if isinstance(found, str):
                yield found
                continue
            error, data = found.error, b""
            if not error:
                try:  # read here: a tar is read in one pass, before the stream moves on
                    data = found.read()
                except (OSError, ValueError) as exc:  # Member.read: one line, never a trace
                    error = " ".join(str(exc).split())[:200]
                    if not error.startswith("unreadable"):
                        error = f"unreadable archive member ({error})"
            yield (found.source, found.name, found.kind, data, error)

    def write_rows(rows: list[Row]) -> None:
        for row in rows:
            manifest.write(row)

    def committed_to_shards(items: list) -> None:
        """A shard was committed: write the manifest rows of each source all of whose images
        are now in committed shards."""
        for held in items:
            held[1] -= 1
            if held[1] == 0:
                write_rows(held[0])

    writer = None
    if opts.format == "shards":
        writer = ShardWriter(opts.out, lock.tag, opts.shard_bytes, committed_to_shards)
        summary.leftovers_removed += writer.remove_uncommitted()
        done_ids = _shard_ids(opts.out)
        new_ids: set[int] = set()

    def to_shard(row: Row) -> bool:
        """Append a row's image to its bin's shard, unless its id is already in a shard."""
        key = _key(row.id)
        if _contains(done_ids, key) or key in new_ids:
            row.status, row.png = "skipped", b""
            row.reason = f"duplicate id: an image {row.id} already exists (not overwritten)"
            return False
        new_ids.add(key)
        return True

    def commit(rows: list[Row]) -> None:
        source_ok = bool(rows) and all(r.status == "ok" for r in rows)
        held = [rows, 0]  # --format shards: rows wait until their images' shards commit
        for row in rows:
            if row.status == "ok" and writer is not None:
                if to_shard(row):
                    summary.converted += 1
                    summary.times[1] += row.times[1]
                    summary.times[2] += row.times[2]
                    held[1] += 1
                    meta = {"id": row.id, "sequence": row.sequence, "length": row.length,
                            "bin": row.bin, "source": _clean(row.source)}  # fmt: skip
                    writer.add(row.id, row.bin, row.png, meta, held)
                    row.png = b""
            elif row.status == "ok":
                if _commit_outputs(row, opts):
                    summary.converted += 1
                    summary.times[1] += row.times[1]
                    summary.times[2] += row.times[2]
                else:
                    source_ok = False
            if row.status == "skipped":
                summary.skipped[_category(row.reason)] += 1
            elif row.status == "failed":
                summary.failed[_category(row.reason)] += 1
                summary.crashed += row.reason.startswith("worker crashed")
                summary.timed_out += row.reason.startswith("timed out")
                log(f"protoken convert: failed: {row.source}: {row.reason}")
        if held[1] == 0:
            write_rows(rows)
        summary.times[0] += rows[0].times[0] if rows else 0.0
        summary.files += 1
        summary.failed_files += bool(rows) and all(r.status == "failed" for r in rows)
        bar.update()
        if opts.delete_source and source_ok and all(r.verified for r in rows):
            try:
                os.unlink(rows[0].source)
                summary.deleted += 1
            except OSError as exc:
                log(f"protoken convert: could not delete {rows[0].source}: {exc}")

    order = _InputOrder(commit)
    pool = _Pool(workers, opts, read, lock.tag)
    clean = False
    try:
        stream = enumerate(pending_inputs())
        exhausted = False
        while True:
            while not exhausted and pool.free_slots() > 0 and not pool.retry:
                item = next(stream, None)
                if item is None:
                    exhausted = True
                    break
                seq, path = item
                order.started(seq, path)
                pool.submit(seq, path)
            if exhausted and not pool.busy():
                break
            for seq, path, rows in pool.results():
                order.finished(seq, path, rows)
        clean = True
    finally:
        if clean:
            pool.close()
            if writer is not None:
                writer.close()
        else:  # an error or a signal: stop the workers now, keep the marker for the next run
            pool.terminate()
            if writer is not None:
                writer.abandon()
        summary.worker_cpu_seconds = pool.cpu_seconds
        manifest.close()
        bar.close()
        summary.seconds = time.perf_counter() - start
    os.unlink(lock.marker)
    return summary


class _InputOrder:
    """Commits results so that of several inputs with one id, the first in walk order wins,
    whatever the order in which the workers finish: a result waits while an input with the same
    id and an earlier position is still being converted."""

    def __init__(self, commit: Callable[[list[Row]], None]):
        self.commit = commit
        self.active: dict[str, list[int]] = {}  # id stem -> positions in flight, ascending
        self.stem_of: dict[int, str] = {}
        self.waiting: dict[int, list[Row]] = {}

    def started(self, seq: int, path: str) -> None:
        stem = self.stem_of[seq] = _item_id(path)
        self.active.setdefault(stem, []).append(seq)

    def finished(self, seq: int, path: str, rows: list[Row]) -> None:
        stem = self.stem_of.pop(seq)
        self.waiting[seq] = rows
        queue = self.active[stem]
        while queue and queue[0] in self.waiting:
            self.commit(self.waiting.pop(queue.pop(0)))
        if not queue:
            del self.active[stem]


def read_settings(out: str) -> dict | None:
    """The settings an output folder was converted with (``OUT/convert.json``), if any."""
    path = os.path.join(out, SETTINGS_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as fh:
        return json.load(fh)


def _record_settings(opts: ConvertOptions) -> None:
    """Write OUT/convert.json (:data:`OUTPUT_SETTINGS`) or check a rerun uses the same values.

    Images of one folder must share dmax and bit depth, since training and decoding read them
    from here, and a rerun with another chain, model or length policy would otherwise report
    inputs as done under a policy they were never judged by; a run with other values into the
    same folder is refused, naming every difference.
    """
    settings = opts.settings()
    try:
        old = read_settings(opts.out)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{os.path.join(opts.out, SETTINGS_FILE)} is unreadable: {exc}") from None
    if old is None:
        atomic_write(os.path.join(opts.out, SETTINGS_FILE), json.dumps(settings, indent=1) + "\n")
        return
    if not isinstance(old, dict):
        raise ValueError(f"{os.path.join(opts.out, SETTINGS_FILE)} is not a JSON object")
    diffs = [k for k in OUTPUT_SETTINGS if k in old and old[k] != settings[k]]
    if diffs:
        was = ", ".join(f"{k}={old[k]}" for k in diffs)
        now = ", ".join(f"{k}={settings[k]}" for k in diffs)
        raise ValueError(
            f"{opts.out} was converted with {was}; refusing to add outputs with {now} "
            "(use another --out)"
        )


def _publish(tmp: str, final: str) -> bool:
    """Give ``tmp`` the name ``final`` unless ``final`` exists (then False): a hard link, which
    never replaces a file, or where links are not supported a check then a rename."""
    try:
        os.link(tmp, final)
    except FileExistsError:
        return False
    except OSError:  # no hard links here (some network or FUSE file systems)
        if os.path.lexists(final):
            return False
        os.replace(tmp, final)
        return True
    os.unlink(tmp)
    return True


def _commit_outputs(row: Row, opts: ConvertOptions) -> bool:
    """Publish a row's temporary PNG, then FASTA, unless its id is already written.

    Only the main process commits; the FASTA marks a complete output. Of several inputs with
    one id the first committed is kept, and the main process commits them in walk order
    (:class:`_InputOrder`). A PNG without its FASTA is what a run killed between the two
    leaves: not an output yet, so it is replaced.
    """
    png_path = os.path.join(opts.out, row.bin, f"{row.id}.png")
    fasta_path = os.path.join(opts.fasta_folder, f"{row.id}.fasta")
    if not os.path.lexists(fasta_path):
        if not _publish(row.png_tmp, png_path):
            os.replace(row.png_tmp, png_path)  # a PNG without FASTA: a killed run's leftover
        if _publish(row.fasta_tmp, fasta_path):
            return True
        _unlink_quiet(png_path)  # another writer took the id between the two: undo ours
    for tmp in (row.png_tmp, row.fasta_tmp):
        _unlink_quiet(tmp)
    row.status = "skipped"
    row.reason = f"duplicate id: outputs for {row.id} already exist (not overwritten)"
    row.verified = False
    return False


def _unlink_quiet(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _fill_from_fasta(row: Row, fasta: str) -> None:
    """Fill length, bin and sequence of a row from existing outputs (resume bookkeeping)."""
    try:
        seq = next(iter(read_fasta(fasta).values()), "")
    except (OSError, ValueError):
        return
    if seq:
        row.sequence, row.length = seq, len(seq)
        row.bin = bin_name(len(seq))
