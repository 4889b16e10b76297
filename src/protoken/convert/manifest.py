"""The manifest of a conversion: one TSV row per input (or per chain with ``--chains split``).

``OUT/manifest.tsv`` (``OUT/manifest.shard-I-of-N.tsv`` with ``--shard I/N``) has the columns
:data:`MANIFEST_COLUMNS`; ``status`` is ``ok``, ``skipped`` or ``failed`` with a one-line
``reason``; ``chains`` is the chain layout of a ``--chains complex`` image (``A:120,B:98``,
:func:`protoken.structure.format_chains`), empty otherwise (manifests written before that
column existed are read as they are, and appended in their own columns); ``clipped`` is the
fraction of the image's residue pairs at or beyond dmax (empty for rows without an image). It
is appended one flushed line per row (:class:`ManifestWriter`), so a killed run leaves at most a
torn last line, which readers skip and the next writer cuts off. Resume keys on it
(:func:`done_sources`); training indexes its ``ok`` rows (:func:`ok_rows`, read by
:class:`protoken.data.ImageIndex`). This module is the one reader and writer of the format.
"""

from __future__ import annotations

import csv
import hashlib
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np

from protoken.fileio import atomic_write, drop_partial_last_line
from protoken.structure import parse_chains

__all__ = [
    "MANIFEST_COLUMNS",
    "HashedSet",
    "ManifestWriter",
    "Row",
    "clean",
    "done_sources",
    "drop_failed_rows",
    "manifest_files",
    "manifest_path",
    "ok_rows",
    "read_manifest",
]

MANIFEST_COLUMNS = (
    "source", "id", "status", "reason", "length", "dropped", "bin", "sequence", "chains", "clipped",
)  # fmt: skip

_MANIFEST_RE = re.compile(r"manifest(\.shard-\d+-of-\d+)?\.tsv")


def clean(text: str) -> str:
    """A manifest value on one line: tabs and line breaks (legal in file names) become spaces."""
    return " ".join(text.replace("\t", " ").split())


@dataclass
class Row:
    """One manifest row (one input, or one chain of it in ``split`` mode), and what a worker
    made for it (not written to the manifest)."""

    source: str
    id: str = ""
    status: str = "failed"  # ok | skipped | failed
    reason: str = ""
    length: int | str = ""
    dropped: int | str = ""
    bin: str = ""
    sequence: str = ""
    chains: str = ""  # --chains complex: the layout, A:120,B:98
    clipped: str = ""  # the fraction of pairs at or beyond dmax (geometry.clipped_fraction)
    # not written to the manifest:
    png_tmp: str = field(default="", repr=False)
    fasta_tmp: str = field(default="", repr=False)
    png: bytes = field(default=b"", repr=False)  # --format shards: the image, for the main process
    verified: bool = field(default=False, repr=False)
    times: tuple[float, float, float] = field(default=(0.0, 0.0, 0.0), repr=False)

    def manifest_values(self, columns=MANIFEST_COLUMNS) -> list[str]:
        return [clean(str(getattr(self, c, ""))) for c in columns]


# --------------------------------------------------------------------------- files


def manifest_path(out: str, shard: tuple[int, int] | None) -> str:
    """The manifest a run writes: ``OUT/manifest.tsv``, or one per shard."""
    if shard is None:
        return os.path.join(out, "manifest.tsv")
    return os.path.join(out, f"manifest.shard-{shard[0]}-of-{shard[1]}.tsv")


def manifest_files(out: str) -> list[str]:
    """The manifests of ``out``: ``manifest.tsv`` and the ``manifest.shard-I-of-N.tsv`` of
    sharded runs (not the ``*.retried.tsv`` records), sorted."""
    if not os.path.isdir(out):
        return []
    with os.scandir(out) as it:
        names = [e.name for e in it if e.is_file() and _MANIFEST_RE.fullmatch(e.name)]
    return [os.path.join(out, n) for n in sorted(names)]


# --------------------------------------------------------------------------- reading


def read_manifest(path: str) -> Iterator[dict[str, str]]:
    """Rows of a manifest file as dicts (a partial last line from a killed run is ignored)."""
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as fh:
        for row in csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE):
            if row.get("sequence") is not None and row.get("status") in ("ok", "skipped", "failed"):
                yield row


def ok_rows(path: str) -> Iterator[tuple[str, str, int]]:
    """``(id, bin, length)`` of the ``ok`` rows of a manifest, fast: the first columns of each
    line only (``str.split`` with a limit), so the sequences are never split; a partial last
    line (a killed conversion) is skipped.

    Raises
    ------
    ValueError
        Not a protoken manifest (its header).
    """
    with open(path, encoding="utf-8", errors="surrogateescape") as fh:
        header = fh.readline().rstrip("\n").split("\t")
        try:
            c_id, c_status = header.index("id"), header.index("status")
            c_len, c_bin = header.index("length"), header.index("bin")
        except ValueError:
            raise ValueError(f"{path}: not a protoken manifest (header {header})") from None
        limit = max(c_id, c_status, c_len, c_bin) + 1
        for line in fh:
            cols = line.split("\t", limit)
            if len(cols) <= limit or cols[c_status] != "ok" or not line.endswith("\n"):
                continue
            yield cols[c_id], cols[c_bin], int(cols[c_len])


def chain_layout_texts(path: str) -> dict[str, str]:
    """The ``chains`` column of the ``ok`` rows of a manifest that hold a complex (written by
    ``convert --chains complex``): ``{id: "A:120,B:98"}``. Rows of one chain, and manifests
    without the column, give nothing."""
    out: dict[str, str] = {}
    with open(path, encoding="utf-8", errors="surrogateescape") as fh:
        header = fh.readline().rstrip("\n").split("\t")
        if "chains" not in header:
            return out
        c_id, c_status, c_chains = (
            header.index("id"),
            header.index("status"),
            header.index("chains"),
        )
        for line in fh:
            cols = line.rstrip("\n").split("\t")
            if len(cols) == len(header) and cols[c_status] == "ok" and "," in cols[c_chains]:
                out[cols[c_id]] = cols[c_chains]
    return out


def chain_layouts(path: str) -> dict[str, tuple[int, ...]]:
    """The chain lengths of :func:`chain_layout_texts`: ``{id: (120, 98)}``; a damaged
    layout (:func:`protoken.structure.parse_chains` refuses it) is left out (the image then
    trains as one chain)."""
    out: dict[str, tuple[int, ...]] = {}
    for key, text in chain_layout_texts(path).items():
        try:
            out[key] = tuple(n for _, n in parse_chains(text))
        except ValueError:
            continue
    return out


class HashedSet:
    """A set of manifest values (sources, ids) held as sorted 64-bit hashes of their cleaned
    text (:func:`hash64`): 8 bytes per value, so resuming over millions of inputs stays small.
    """

    def __init__(self, values: Iterable[str] = ()):
        self.hashes = np.unique(np.asarray([hash64(v) for v in values], dtype=np.uint64))

    def __contains__(self, value: str) -> bool:
        key = np.uint64(hash64(value))
        i = np.searchsorted(self.hashes, key)
        return bool(i < len(self.hashes) and self.hashes[i] == key)

    def __len__(self) -> int:
        return len(self.hashes)


def hash64(text: str) -> int:
    """The 64-bit blake2b hash of a manifest value as the manifest writes it (:func:`clean`)."""
    data = clean(text).encode("utf-8", "surrogateescape")
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


def done_sources(out: str) -> HashedSet:
    """Every source with a row in any manifest of ``out``."""
    return HashedSet(row["source"] for path in manifest_files(out) for row in read_manifest(path))


# --------------------------------------------------------------------------- writing


def drop_failed_rows(paths: list[str]) -> int:
    """``--retry-failed``: move the failed rows of manifests to ``*.retried.tsv`` (appended, for
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


class ManifestWriter:
    """Append-only TSV manifest, one line flushed per row; repairs a torn last line. An
    existing manifest is appended in its own columns (one written before ``chains`` existed
    stays without it)."""

    def __init__(self, path: str):
        self.path = path
        new = not os.path.exists(path) or os.path.getsize(path) == 0
        self.columns: tuple[str, ...] = MANIFEST_COLUMNS
        if not new:
            drop_partial_last_line(self.path)
            with open(path, encoding="utf-8", errors="surrogateescape") as fh:
                header = tuple(fh.readline().rstrip("\n").split("\t"))
            if set(header) <= set(MANIFEST_COLUMNS) and "source" in header:
                self.columns = header
        self.fh = open(path, "a", newline="", encoding="utf-8", errors="surrogateescape")  # noqa: SIM115
        if new:
            self.fh.write("\t".join(MANIFEST_COLUMNS) + "\n")
            self.fh.flush()

    def write(self, row: Row) -> None:
        self.fh.write("\t".join(row.manifest_values(self.columns)) + "\n")
        self.fh.flush()

    def close(self) -> None:
        self.fh.close()
