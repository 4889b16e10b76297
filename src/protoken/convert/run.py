"""A conversion run: inputs streamed to the workers, their results committed in walk order.

:func:`convert` checks the options, takes the output folder's lock and runs a
:class:`Conversion`: resume bookkeeping (inputs with a manifest row, or whose outputs exist,
are skipped before parsing), the worker pool, the commits (PNG then FASTA by hard link, or
into tar shards), the manifest, ``--delete-source`` and the :class:`Summary`.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from protoken.archives import find_sources
from protoken.convert.bins import bin_name
from protoken.convert.file import FileJob, item_id
from protoken.convert.lock import Lock, remove_leftovers
from protoken.convert.manifest import (
    HashedSet,
    ManifestWriter,
    Row,
    clean,
    done_sources,
    drop_failed_rows,
    hash64,
    manifest_files,
    manifest_path,
)
from protoken.convert.options import FORMATS, ConvertOptions
from protoken.convert.pool import Pool, available_cores
from protoken.convert_settings import record_settings
from protoken.fileio import atomic_write, publish, read_fasta
from protoken.shards import ShardWriter, index_files, read_index
from protoken.structure import format_chains, parse_chains

__all__ = ["Conversion", "Summary", "convert"]


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

    def count(self, row: Row) -> None:
        """Count a row that was not converted (skipped or failed) under its reason's category."""
        if row.status == "skipped":
            self.skipped[_category(row.reason)] += 1
        elif row.status == "failed":
            self.failed[_category(row.reason)] += 1
            self.crashed += row.reason.startswith("worker crashed")
            self.timed_out += row.reason.startswith("timed out")

    def converted_one(self, row: Row) -> None:
        self.converted += 1
        self.times[1] += row.times[1]
        self.times[2] += row.times[2]


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
    """Convert structure files into ``opts.out``; see :mod:`protoken.convert`.

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
    log : callable, optional
        Receives the one-line messages of the run (default: stderr, above the bar).
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
    if opts.format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, not {opts.format!r}")
    if opts.format == "shards" and opts.delete_source:
        raise ValueError("--delete-source is not supported with --format shards")
    os.makedirs(opts.out, exist_ok=True)
    lock = Lock(opts.out, shard)
    try:
        conversion = Conversion(opts, lock, workers or available_cores(), shard, progress, log,
                                read)  # fmt: skip
        return conversion.run(inputs)
    finally:
        lock.release()


class Conversion:
    """One run into ``opts.out`` (one shard of it), holding ``lock``; :meth:`run` once.

    Opening it prepares the folder: ``convert.json`` recorded or checked, the temporary files
    of a killed run of the same tag removed, a marker written (removed when the run ends
    cleanly), failed rows moved aside with ``retry_failed``, and what is already done read from
    the manifests (and the shard indexes).
    """

    def __init__(self, opts: ConvertOptions, lock: Lock, workers: int,
                 shard: tuple[int, int] | None = None, progress: bool = True, log=None,
                 read: Callable[..., list] | None = None):  # fmt: skip
        from tqdm import tqdm

        self.opts, self.lock, self.workers, self.shard, self.read = opts, lock, workers, shard, read
        self.log = log or (lambda msg: tqdm.write(msg, file=sys.stderr))
        if opts.format == "png":
            os.makedirs(opts.fasta_folder, exist_ok=True)
        record_settings(opts.out, opts.settings())
        self.summary = Summary()
        if os.path.exists(lock.marker):  # the last run of this tag was killed
            self.summary.leftovers_removed = remove_leftovers(opts.out, opts.fasta_folder, lock.tag)
        atomic_write(lock.marker, f"pid {os.getpid()}\n")
        if opts.retry_failed:
            mine = manifest_files(opts.out) if shard is None else [manifest_path(opts.out, shard)]
            self.summary.retried_rows = drop_failed_rows([p for p in mine if os.path.exists(p)])
        self.done = done_sources(opts.out)
        self.manifest = ManifestWriter(manifest_path(opts.out, shard))
        self.start = time.perf_counter()
        self.bar = tqdm(desc="convert", unit="file", disable=not progress, dynamic_ncols=True,
                        file=sys.stderr)  # fmt: skip
        self.shards: ShardWriter | None = None
        if opts.format == "shards":
            self.shards = ShardWriter(opts.out, lock.tag, opts.shard_bytes, self._shards_committed)
            self.summary.leftovers_removed += self.shards.remove_uncommitted()
            ids = (row[4] for path in index_files(opts.out) for row in read_index(path))
            self.shard_ids = HashedSet(ids)  # images already in shards
            self.new_ids: set[int] = set()

    # ------------------------------------------------------------------ the loop

    def run(self, inputs: Iterable[str]) -> Summary:
        """Convert ``inputs`` (files and folders, streamed); the summary of the run."""
        order = _InputOrder(self.commit)
        pool = Pool(self.workers, FileJob(self.opts, self.read, self.lock.tag), self.opts.timeout)
        clean_end = False
        try:
            stream = enumerate(self.pending(inputs))
            exhausted = False
            while True:
                while not exhausted and pool.free_slots() > 0 and not pool.retry:
                    item = next(stream, None)
                    if item is None:
                        exhausted = True
                        break
                    seq, work = item
                    order.started(seq, work)
                    pool.submit(seq, work)
                if exhausted and not pool.busy():
                    break
                for seq, work, rows in pool.results():
                    order.finished(seq, work, rows)
            clean_end = True
        finally:
            if clean_end:
                pool.close()
                if self.shards is not None:
                    self.shards.close()
            else:  # an error or a signal: stop the workers now, keep the marker for the next run
                pool.terminate()
                if self.shards is not None:
                    self.shards.abandon()
            self.summary.worker_cpu_seconds = pool.cpu_seconds
            self.manifest.close()
            self.bar.close()
            self.summary.seconds = time.perf_counter() - self.start
        os.unlink(self.lock.marker)
        return self.summary

    def pending(self, inputs: Iterable[str]) -> Iterator:
        """The work items of ``inputs`` not done before: file paths, and archive members as
        ``(source, name, kind, data, error)`` with their bytes read here (a tar is read in one
        pass, before the stream moves on)."""
        opts = self.opts
        for found in find_sources(inputs, self.shard, opts.follow_links, opts.max_bytes):
            source = found if isinstance(found, str) else found.source
            if source in self.done:
                self.summary.resumed += 1
                self.bar.update()
                continue
            sid = item_id(found) if isinstance(found, str) else found.id
            if opts.chains != "split" and opts.format == "png":
                fasta = os.path.join(opts.fasta_folder, f"{sid}.fasta")
                if os.path.exists(fasta):
                    # from an earlier run, or an earlier input with the same id in this one:
                    # not parsed, never overwritten
                    row = Row(source, sid, "skipped", f"outputs already exist: {sid}")
                    _fill_from_fasta(row, fasta)
                    self.commit([row])
                    continue
            if isinstance(found, str):
                yield found
                continue
            error, data = found.error, b""
            if not error:
                try:
                    data = found.read()
                except (OSError, ValueError) as exc:  # Member.read: one line, never a trace
                    error = " ".join(str(exc).split())[:200]
                    if not error.startswith("unreadable"):
                        error = f"unreadable archive member ({error})"
            yield (found.source, found.name, found.kind, data, error)

    # ------------------------------------------------------------------ commits

    def commit(self, rows: list[Row]) -> None:
        """Publish one input's outputs and write its manifest rows (with ``--format shards``,
        once its images' shards are committed); count them; ``--delete-source``."""
        summary = self.summary
        source_ok = bool(rows) and all(r.status == "ok" for r in rows)
        held = [rows, 0]  # --format shards: rows wait until their images' shards commit
        for row in rows:
            if row.status == "ok" and self.shards is not None:
                if self._new_shard_id(row):
                    summary.converted_one(row)
                    held[1] += 1
                    meta = {"id": row.id, "sequence": row.sequence, "length": row.length,
                            "bin": row.bin, "source": clean(row.source)}  # fmt: skip
                    if row.chains:  # --chains complex: the layout, as in the manifest
                        meta["chains"] = row.chains
                    self.shards.add(row.id, row.bin, row.png, meta, held)
                    row.png = b""
            elif row.status == "ok":
                if _publish_outputs(row, self.opts):
                    summary.converted_one(row)
                else:
                    source_ok = False
            summary.count(row)
            if row.status == "failed":
                self.log(f"protoken convert: failed: {row.source}: {row.reason}")
        if held[1] == 0:
            self._write_rows(rows)
        summary.times[0] += rows[0].times[0] if rows else 0.0
        summary.files += 1
        summary.failed_files += bool(rows) and all(r.status == "failed" for r in rows)
        self.bar.update()
        if self.opts.delete_source and source_ok and all(r.verified for r in rows):
            try:
                os.unlink(rows[0].source)
                summary.deleted += 1
            except OSError as exc:
                self.log(f"protoken convert: could not delete {rows[0].source}: {exc}")

    def _new_shard_id(self, row: Row) -> bool:
        """Whether a row's image may go into a shard: no image of its id is in one yet (else
        the row becomes a skipped duplicate)."""
        key = hash64(row.id)
        if row.id in self.shard_ids or key in self.new_ids:
            row.status, row.png = "skipped", b""
            row.reason = f"duplicate id: an image {row.id} already exists (not overwritten)"
            return False
        self.new_ids.add(key)
        return True

    def _shards_committed(self, items: list) -> None:
        """A shard was committed: write the manifest rows of each source all of whose images
        are now in committed shards."""
        for held in items:
            held[1] -= 1
            if held[1] == 0:
                self._write_rows(held[0])

    def _write_rows(self, rows: list[Row]) -> None:
        for row in rows:
            self.manifest.write(row)


class _InputOrder:
    """Commits results so that of several inputs with one id, the first in walk order wins,
    whatever the order in which the workers finish: a result waits while an input with the same
    id and an earlier position is still being converted."""

    def __init__(self, commit: Callable[[list[Row]], None]):
        self.commit = commit
        self.active: dict[str, list[int]] = {}  # id -> positions in flight, ascending
        self.id_of: dict[int, str] = {}
        self.waiting: dict[int, list[Row]] = {}

    def started(self, seq: int, item) -> None:
        sid = self.id_of[seq] = item_id(item)
        self.active.setdefault(sid, []).append(seq)

    def finished(self, seq: int, item, rows: list[Row]) -> None:
        sid = self.id_of.pop(seq)
        self.waiting[seq] = rows
        queue = self.active[sid]
        while queue and queue[0] in self.waiting:
            self.commit(self.waiting.pop(queue.pop(0)))
        if not queue:
            del self.active[sid]


def _publish_outputs(row: Row, opts: ConvertOptions) -> bool:
    """Publish a row's temporary PNG, then FASTA, unless its id is already written.

    Only the main process commits; the FASTA marks a complete output. Of several inputs with
    one id the first committed is kept, and the main process commits them in walk order
    (:class:`_InputOrder`). A PNG without its FASTA is what a run killed between the two
    leaves: not an output yet, so it is replaced.
    """
    png_path = os.path.join(opts.out, row.bin, f"{row.id}.png")
    fasta_path = os.path.join(opts.fasta_folder, f"{row.id}.fasta")
    if not os.path.lexists(fasta_path):
        if not publish(row.png_tmp, png_path):
            os.replace(row.png_tmp, png_path)  # a PNG without FASTA: a killed run's leftover
        if publish(row.fasta_tmp, fasta_path):
            return True
        _unlink_quiet(png_path)  # another writer took the id between the two: undo ours
    for tmp in (row.png_tmp, row.fasta_tmp):
        _unlink_quiet(tmp)
    row.status = "skipped"
    row.reason = f"duplicate id: outputs for {row.id} already exist (not overwritten)"
    row.verified = False
    return False


def _unlink_quiet(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def _fill_from_fasta(row: Row, fasta: str) -> None:
    """Fill length, bin, sequence (and a complex's chain layout, from the header's
    ``chains=``) of a row from existing outputs (resume bookkeeping)."""
    try:
        seq = next(iter(read_fasta(fasta).values()), "")
        with open(fasta, encoding="utf-8", errors="replace") as fh:
            header = fh.readline(4096)
    except (OSError, ValueError):
        return
    if seq:
        row.sequence, row.length = seq, len(seq)
        row.bin = bin_name(len(seq))
        fields = dict(w.split("=", 1) for w in header.split()[1:] if "=" in w)
        with contextlib.suppress(ValueError):  # a layout that does not fit is not recorded
            row.chains = format_chains(parse_chains(fields.get("chains", ""), len(seq)))
