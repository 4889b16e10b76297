"""One structure file, or one archive member, converted: its manifest rows and its outputs.

:func:`convert_file` runs in a worker process (:mod:`protoken.convert.pool`, through
:class:`FileJob`). It parses the input, makes one image per chain kept by the chain, model and
length policies, and leaves the PNG and FASTA under temporary names (``NAME.tmp.TAG.PID``)
for the main process to commit; with ``--format shards`` it returns the PNG bytes instead.
Bad input never raises: the reason is in the row.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from protoken.archives import member_id, read_member
from protoken.codec import decode_png, encode_pixels, features_to_pixels
from protoken.convert.bins import bin_name
from protoken.convert.manifest import Row
from protoken.convert.options import ConvertOptions
from protoken.geometry import clipped_fraction, sixd
from protoken.inputs import UnsafePath, safe_output_path, structure_id
from protoken.structure import (
    MIN_CHAIN_LEN,
    SkipStructure,
    StructureError,
    format_chains,
    read_backbones,
)

__all__ = ["FileJob", "convert_file", "fasta_record", "item_id", "item_source"]


def _safe_stem(path: str) -> str:
    try:
        return structure_id(path)
    except ValueError:
        return "%00"


# What a worker is sent: a file's path, or an archive member as
# ``(source, name, kind, data, error)`` (its bytes, read by the main process).


def item_source(item) -> str:
    """The manifest source of a work item: a file's path, or ``ARCHIVE::MEMBER``."""
    return item if isinstance(item, str) else item[0]


def item_id(item) -> str:
    """The id of a work item: a file's structure id (``%00`` when its name gives none), or an
    archive member's id."""
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
    sid = item_id(path)
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
    complexes = opts.chains == "complex"
    for bb in backbones:
        length = len(bb)
        row = Row(source=source, id=bb.id, length=length, dropped=bb.dropped, sequence=bb.sequence)
        if complexes:  # the layout, wherever the image goes
            row.chains = format_chains(bb.chains)
            if bb.dropped_chains:
                row.reason = (f"dropped chains {format_chains(bb.dropped_chains)} "
                              f"(fewer than {MIN_CHAIN_LEN} residues)")  # fmt: skip
        whole = f"complex of {len(bb.chains)} chains, " if len(bb.chains) > 1 else ""
        if length < opts.min_len:
            row.status = "skipped"
            row.reason = f"too short: {whole}{length} residues < {opts.min_len}"
        elif length > opts.max_len:
            row.status = "skipped"
            row.reason = f"too long: {whole}{length} residues > {opts.max_len}"
            if whole:
                row.reason += " (the whole complex: not split; --chains split for its chains)"
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
            fasta = fasta_record(bb.id, bb.sequence, row.chains)
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


def fasta_record(image_id: str, sequence: str, chains: str = "") -> str:
    """The FASTA file of an image: ``>ID`` and its sequence; a ``--chains complex`` image's
    header adds its length and layout (``>ID length=218 chains=A:120,B:98``), the sequence
    staying contiguous (chain breaks are in the header, never fake residues)."""
    if chains:
        return f">{image_id} length={len(sequence)} chains={chains}\n{sequence}\n"
    return f">{image_id}\n{sequence}\n"


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


@dataclass(frozen=True)
class FileJob:
    """What the workers of a conversion do (a :class:`protoken.convert.pool.Job`):
    :func:`convert_file` with the run's options on each item."""

    opts: ConvertOptions
    read: Callable[..., list] | None = None
    tag: str = "all"
    preload: tuple[str, ...] = ("protoken.convert.file", "protoken.structure", "gemmi",
                                "imagecodecs", "foldcomp")  # fmt: skip

    def run(self, item) -> list[Row]:
        return convert_file(item, self.opts, self.read, self.tag)

    def failed(self, item, reason: str) -> list[Row]:
        return [Row(item_source(item), item_id(item), "failed", reason)]

    def discard(self, rows: list[Row]) -> None:
        for row in rows:
            for tmp in (row.png_tmp, row.fasta_tmp):
                if tmp:
                    with contextlib.suppress(OSError):
                        os.unlink(tmp)
