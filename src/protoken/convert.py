"""Batch conversion: structure files -> 6D images (PNG) + FASTA, binned by length.

Layout of the output folder ``OUT`` (the reference design's)::

    OUT/bin_40_64/ID.png, OUT/bin_65_128/ID.png, ..., OUT/bin_961_1024/ID.png
    OUT/fasta/ID.fasta            (or --fasta-dir)
    OUT/manifest.tsv              (OUT/manifest.shard-I-of-N.tsv with --shard I/N)

How it stays safe at scale:

- Inputs are streamed (:func:`protoken.inputs.find_structures`), never listed or counted up
  front.
- Workers parse, compute and write their PNG and FASTA under temporary names; the main process
  commits them (rename PNG, then FASTA) and appends the manifest row. A killed run leaves at
  most ``*.tmp*`` files, never a truncated PNG or FASTA, and a FASTA only next to its PNG.
- Resume: an input with a manifest row, or whose FASTA already exists (its id is known from its
  name outside ``--chains split``), is skipped before parsing.
- ``--delete-source`` deletes an input only after all its outputs were written, read back and
  compared, and never a skipped or failed input. Existing outputs are never overwritten: a
  second input with an id already written is recorded as a skipped duplicate.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import signal
import sys
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field

import numpy as np

from protoken.codec import decode_png, encode_png, features_to_image, quantize
from protoken.fileio import atomic_write, read_fasta, temp_name
from protoken.geometry import DMAX, sixd
from protoken.inputs import find_structures, structure_id
from protoken.structure import SkipStructure, StructureError, read_backbones

__all__ = [
    "MANIFEST_COLUMNS",
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

MANIFEST_COLUMNS = ("source", "id", "status", "reason", "length", "dropped", "bin", "sequence")


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

    @property
    def fasta_folder(self) -> str:
        return self.fasta_dir or os.path.join(self.out, "fasta")


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
    # not written to the manifest:
    png_tmp: str = field(default="", repr=False)
    fasta_tmp: str = field(default="", repr=False)
    verified: bool = field(default=False, repr=False)
    times: tuple[float, float, float] = field(default=(0.0, 0.0, 0.0), repr=False)

    def manifest_values(self) -> list[str]:
        return [_clean(str(getattr(self, c))) for c in MANIFEST_COLUMNS]


def _clean(text: str) -> str:
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


# --------------------------------------------------------------------------- one file


def convert_file(path: str, opts: ConvertOptions) -> list[Row]:
    """Convert one structure file; outputs are left under temporary names for the caller.

    Returns one row per chain considered (one row for a skipped or failed file). Never raises
    on bad input: the reason is in the row.
    """
    t0 = time.perf_counter()
    try:
        backbones = read_backbones(path, chains=opts.chains, models=opts.models)
    except SkipStructure as exc:
        return [Row(source=path, id=structure_id(path), status="skipped", reason=str(exc))]
    except StructureError as exc:
        return [Row(source=path, id=structure_id(path), status="failed", reason=str(exc))]
    except TimeoutError:
        raise
    except Exception as exc:  # noqa: BLE001 - a bad file must never stop the batch
        reason = f"unexpected error: {type(exc).__name__}: {' '.join(str(exc).split())[:160]}"
        return [Row(source=path, id=structure_id(path), status="failed", reason=reason)]
    t_parse = time.perf_counter() - t0
    rows = []
    for bb in backbones:
        length = len(bb)
        row = Row(source=path, id=bb.id, length=length, dropped=bb.dropped, sequence=bb.sequence)
        if length < opts.min_len:
            row.status, row.reason = "skipped", f"too short: {length} residues < {opts.min_len}"
        elif length > opts.max_len:
            row.status, row.reason = "skipped", f"too long: {length} residues > {opts.max_len}"
        else:
            t1 = time.perf_counter()
            features = sixd(bb.n, bb.ca, bb.c, dmax=opts.dmax)
            image = features_to_image(features, opts.dmax)
            t2 = time.perf_counter()
            if not np.isfinite(image).all():
                row.status, row.reason = "failed", "non-finite 6D features"
                rows.append(row)
                continue
            row.bin = bin_name(length)
            png_path = os.path.join(opts.out, row.bin, f"{bb.id}.png")
            fasta_path = os.path.join(opts.fasta_folder, f"{bb.id}.fasta")
            row.png_tmp, row.fasta_tmp = temp_name(png_path), temp_name(fasta_path)
            png = encode_png(image, opts.bit_depth)
            fasta = f">{bb.id}\n{bb.sequence}\n"
            os.makedirs(os.path.dirname(png_path), exist_ok=True)
            with open(row.png_tmp, "wb") as fh:
                fh.write(png)
            with open(row.fasta_tmp, "w") as fh:
                fh.write(fasta)
            if opts.delete_source:
                row.verified = _verify(row, quantize(image, opts.bit_depth), fasta)
            row.status = "ok"
            row.times = (0.0, t2 - t1, time.perf_counter() - t2)
        rows.append(row)
    if rows:
        first = rows[0]
        first.times = (t_parse, *first.times[1:])
    return rows


def _verify(row: Row, pixels: np.ndarray, fasta: str) -> bool:
    """Read the written files back and compare them with what was meant to be written."""
    try:
        with open(row.png_tmp, "rb") as fh:
            back = decode_png(fh.read())
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


def _alarm(signum, frame):  # pragma: no cover - only fires on a hung parser
    raise TimeoutError


def _worker_convert(paths: list[str], opts: ConvertOptions) -> list[Row]:
    """Convert a chunk of files in a worker process, with a per-file time limit."""
    use_alarm = opts.timeout > 0 and hasattr(signal, "SIGALRM")
    if use_alarm:
        signal.signal(signal.SIGALRM, _alarm)
    rows: list[Row] = []
    for path in paths:
        try:
            if use_alarm:
                signal.setitimer(signal.ITIMER_REAL, opts.timeout)
            rows.extend(convert_file(path, opts))
        except TimeoutError:
            reason = f"timed out after {opts.timeout:g} s"
            rows.append(Row(path, structure_id(path), "failed", reason))
        except Exception as exc:  # noqa: BLE001 - one file's error must never stop the batch
            reason = f"internal error: {type(exc).__name__}: {' '.join(str(exc).split())[:160]}"
            rows.append(Row(path, structure_id(path), "failed", reason))
        finally:
            if use_alarm:
                signal.setitimer(signal.ITIMER_REAL, 0)
    return rows


# --------------------------------------------------------------------------- manifest


def _key(text: str) -> int:
    return int.from_bytes(
        hashlib.blake2b(text.encode("utf-8", "surrogateescape"), digest_size=8).digest(), "big"
    )


def manifest_path(out: str, shard: tuple[int, int] | None) -> str:
    if shard is None:
        return os.path.join(out, "manifest.tsv")
    return os.path.join(out, f"manifest.shard-{shard[0]}-of-{shard[1]}.tsv")


def read_manifest(path: str) -> Iterator[dict[str, str]]:
    """Rows of a manifest file as dicts (a partial last line from a killed run is ignored)."""
    with open(path, newline="") as fh:
        for row in csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE):
            if row.get("sequence") is not None and row.get("status") in ("ok", "skipped", "failed"):
                yield row


def _done_sources(out: str) -> np.ndarray:
    """Sorted 64-bit hashes of every source with a row in any manifest of ``out``.

    Hashes, not paths, so that resuming over millions of inputs costs 8 bytes per input.
    """
    keys: list[int] = []
    if os.path.isdir(out):
        with os.scandir(out) as it:
            names = [
                e.path for e in it if e.name.startswith("manifest") and e.name.endswith(".tsv")
            ]
        for name in names:
            keys.extend(_key(row["source"]) for row in read_manifest(name))
    return np.unique(np.asarray(keys, dtype=np.uint64))


def _contains(sorted_keys: np.ndarray, key: int) -> bool:
    i = np.searchsorted(sorted_keys, np.uint64(key))
    return bool(i < len(sorted_keys) and sorted_keys[i] == key)


class _Manifest:
    """Append-only TSV manifest, one line flushed per row; repairs a torn last line."""

    def __init__(self, path: str):
        self.path = path
        new = not os.path.exists(path) or os.path.getsize(path) == 0
        if not new:
            self._drop_partial_last_line()
        self.fh = open(path, "a", newline="")  # noqa: SIM115 - closed in close()
        if new:
            self.fh.write("\t".join(MANIFEST_COLUMNS) + "\n")
            self.fh.flush()

    def _drop_partial_last_line(self) -> None:
        with open(self.path, "rb+") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 65536))
            tail = fh.read()
            if tail.endswith(b"\n"):
                return
            cut = tail.rfind(b"\n")
            fh.truncate(size - len(tail) + cut + 1 if cut >= 0 else 0)

    def write(self, row: Row) -> None:
        self.fh.write("\t".join(row.manifest_values()) + "\n")
        self.fh.flush()

    def close(self) -> None:
        self.fh.close()


# --------------------------------------------------------------------------- the run


@dataclass
class Summary:
    """Counts of a conversion run."""

    converted: int = 0
    resumed: int = 0
    skipped: Counter = field(default_factory=Counter)
    failed: Counter = field(default_factory=Counter)
    deleted: int = 0
    seconds: float = 0.0
    times: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    files: int = 0

    def as_dict(self) -> dict:
        return {
            "converted": self.converted,
            "already_done": self.resumed,
            "skipped": dict(self.skipped),
            "failed": dict(self.failed),
            "deleted_sources": self.deleted,
            "files": self.files,
            "seconds": round(self.seconds, 3),
            "seconds_parse_features_encode": [round(t, 3) for t in self.times],
        }

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
        return "\n".join(lines)


def _category(reason: str) -> str:
    for sep in (":", "("):
        reason = reason.split(sep, 1)[0]
    return reason.strip()


def _chunks(items: Iterator[str], size: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def convert(
    inputs: Iterable[str],
    opts: ConvertOptions,
    workers: int | None = None,
    shard: tuple[int, int] | None = None,
    progress: bool = True,
    chunksize: int = 8,
    log=None,
) -> Summary:
    """Convert structure files into ``opts.out``; see the module docstring.

    Parameters
    ----------
    inputs : iterable of str
        Files and folders.
    opts : ConvertOptions
    workers : int, optional
        Worker processes (default: all cores); 1 converts in this process.
    shard : (int, int), optional
        Convert only shard I of N (by hash of each input's relative path).
    progress : bool
        Show a tqdm bar (files, files/s) on stderr.

    Returns
    -------
    Summary
    """
    from tqdm import tqdm

    log = log or (lambda msg: tqdm.write(msg, file=sys.stderr))
    workers = workers or os.cpu_count() or 1
    os.makedirs(opts.out, exist_ok=True)
    os.makedirs(opts.fasta_folder, exist_ok=True)
    _record_settings(opts)
    done = _done_sources(opts.out)
    manifest = _Manifest(manifest_path(opts.out, shard))
    summary = Summary()
    start = time.perf_counter()
    bar = tqdm(
        desc="convert", unit="file", disable=not progress, dynamic_ncols=True, file=sys.stderr
    )

    def pending_inputs() -> Iterator[str]:
        for path in find_structures(inputs, shard):
            if _contains(done, _key(path)):
                summary.resumed += 1
                bar.update()
                continue
            if opts.chains != "split":
                sid = structure_id(path)
                fasta = os.path.join(opts.fasta_folder, f"{sid}.fasta")
                if os.path.exists(fasta):
                    # from an interrupted earlier run, or another input with the same id:
                    # not parsed, never overwritten
                    row = Row(path, sid, "skipped", f"outputs already exist: {sid}")
                    _fill_from_fasta(row, fasta)
                    commit([row])
                    continue
            yield path

    def commit(rows: list[Row]) -> None:
        source_ok = bool(rows) and all(r.status == "ok" for r in rows)
        for row in rows:
            if row.status == "ok":
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
                log(f"protoken convert: failed: {row.source}: {row.reason}")
            manifest.write(row)
        summary.times[0] += rows[0].times[0] if rows else 0.0
        summary.files += 1
        bar.update()
        if opts.delete_source and source_ok and all(r.verified for r in rows):
            try:
                os.unlink(rows[0].source)
                summary.deleted += 1
            except OSError as exc:
                log(f"protoken convert: could not delete {rows[0].source}: {exc}")

    try:
        if workers == 1:
            tune_malloc()
            for chunk in _chunks(pending_inputs(), chunksize):
                for path in chunk:
                    commit(_worker_convert([path], opts))
        else:
            with ProcessPoolExecutor(max_workers=workers, initializer=tune_malloc) as pool:
                inflight = set()
                for chunk in _chunks(pending_inputs(), chunksize):
                    inflight.add(pool.submit(_worker_convert, chunk, opts))
                    if len(inflight) >= 4 * workers:
                        finished, inflight = wait(inflight, return_when=FIRST_COMPLETED)
                        for fut in finished:
                            _commit_chunk(fut.result(), commit)
                for fut in inflight:
                    _commit_chunk(fut.result(), commit)
    finally:
        manifest.close()
        bar.close()
        summary.seconds = time.perf_counter() - start
    return summary


SETTINGS_FILE = "convert.json"


def read_settings(out: str) -> dict | None:
    """The codec settings an output folder was converted with (``OUT/convert.json``), if any."""
    path = os.path.join(out, SETTINGS_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as fh:
        return json.load(fh)


def _record_settings(opts: ConvertOptions) -> None:
    """Write OUT/convert.json (dmax, bit depth, ...) or check a rerun uses the same values.

    Images of one folder must share dmax and bit depth, since training and decoding read them
    from here; a run with other values into the same folder is refused.
    """
    settings = {
        "dmax": opts.dmax,
        "bit_depth": opts.bit_depth,
        "chains": opts.chains,
        "models": opts.models,
        "min_len": opts.min_len,
        "max_len": opts.max_len,
    }
    old = read_settings(opts.out)
    if old is None:
        atomic_write(os.path.join(opts.out, SETTINGS_FILE), json.dumps(settings, indent=1) + "\n")
        return
    for key in ("dmax", "bit_depth"):
        if old.get(key) != settings[key]:
            raise ValueError(
                f"{opts.out} was converted with {key}={old.get(key)}; refusing to add images "
                f"with {key}={settings[key]} (use another --out)"
            )


def _commit_chunk(rows: list[Row], commit) -> None:
    """Commit a worker's rows source by source (rows of one source are contiguous)."""
    group: list[Row] = []
    for row in rows:
        if group and row.source != group[0].source:
            commit(group)
            group = []
        group.append(row)
    if group:
        commit(group)


def _commit_outputs(row: Row, opts: ConvertOptions) -> bool:
    """Rename a row's temporary PNG, then FASTA, into place unless its id is already written.

    Only the main process commits, so checking for the FASTA here is race-free: of several
    inputs with one id (``1abc.pdb`` and ``1abc.cif``), the first to finish is kept.
    """
    png_path = os.path.join(opts.out, row.bin, f"{row.id}.png")
    fasta_path = os.path.join(opts.fasta_folder, f"{row.id}.fasta")
    if os.path.exists(fasta_path):
        for tmp in (row.png_tmp, row.fasta_tmp):
            _unlink_quiet(tmp)
        row.status = "skipped"
        row.reason = f"duplicate id: outputs for {row.id} already exist (not overwritten)"
        row.verified = False
        return False
    os.replace(row.png_tmp, png_path)
    os.replace(row.fasta_tmp, fasta_path)
    return True


def _unlink_quiet(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _fill_from_fasta(row: Row, fasta: str) -> None:
    """Fill length, bin and sequence of a row from existing outputs (resume bookkeeping)."""
    try:
        seq = next(iter(read_fasta(fasta).values()), "")
    except OSError:
        return
    if seq:
        row.sequence, row.length = seq, len(seq)
        row.bin = bin_name(len(seq))
