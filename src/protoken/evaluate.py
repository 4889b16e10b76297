"""Evaluation: reconstructions compared with the structures they came from, honestly.

- :func:`compare_with_reference`: the metrics of one reconstruction against its true structure
  (proper rotations only: a mirror image never hides behind a reflection).
- :func:`reconstruct_images` (``protoken reconstruct``): images -> structure files, compared
  with references found by id (:class:`ReferenceIndex`), residue names from FASTA
  (:class:`SequenceLookup`).
- :func:`evaluate` (``protoken evaluate``): structures -> image (the checkpoint's dmax and bit
  depth) -> tokens -> decoded image -> 3D (MDS, handedness from the image, refinement;
  optionally the full backbone) -> compared with the true structure.
- :func:`summarize`: the statistics of metric rows that both commands write to
  ``summary.json``.

What the commands write (tables, report, pictures) is in :mod:`protoken.report`. The two
pipelines share the comparison, the lookups and the streamed worker pool, hence one module of
~970 lines.
"""

from __future__ import annotations

import functools
import heapq
import itertools
import math
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from protoken.archives import SEP
from protoken.codec import check_image, read_converted_image
from protoken.fileio import atomic_write, read_fasta, write_tsv
from protoken.geometry import virtual_cb
from protoken.inputs import image_id, safe_output_path, structure_id
from protoken.metrics import distance_mae, lddt, mirror_rmsd, rmsd, tm_score
from protoken.reconstruct import Reconstruction, clipped_mask, reconstruct
from protoken.report import write_reconstruct_tables, write_report
from protoken.structure import (
    Backbone,
    format_chains,
    parse_chains,
    read_backbones,
    structure_to_text,
)

__all__ = [
    "COMPLEX_METRICS",
    "METRICS",
    "MemberRef",
    "by_complex_size",
    "complex_row",
    "ReferenceIndex",
    "SequenceLookup",
    "compare_with_reference",
    "evaluate",
    "reconstruct_images",
    "summarize",
]

#: Scores of a complex (``--chains complex``, :func:`protoken.metrics.complex_scores`) that
#: rows hold, each also as ``ceiling_*``.
COMPLEX_METRICS = (
    "dockq", "fnat", "irmsd", "lrmsd", "complex_tm_score", "chain_tm_min",
)  # fmt: skip

#: Metrics summarised by :func:`summarize` (median, mean, min, max), when rows hold them.
METRICS = (
    "cb_rmsd", "tm_score", "lddt", "distance_mae", "image_mse", "tokens_per_residue",
    "bits_per_residue", "bb_rmsd", "ca_rmsd", "ca_tm_score", "ceiling_cb_rmsd",
    "ceiling_tm_score", "ceiling_lddt",
    *COMPLEX_METRICS, *(f"ceiling_{k}" for k in COMPLEX_METRICS),
)  # fmt: skip

#: DockQ quality classes (CAPRI): acceptable, medium, high from these values on.
DOCKQ_CLASSES = (("acceptable", 0.23), ("medium", 0.49), ("high", 0.80))


# --------------------------------------------------------------------------- comparison


def _reference_atoms(reference) -> dict[str, np.ndarray]:
    """Atoms of a reference: a Backbone, a structure file path or an (L, 3, 3) N/CA/C array give
    N, CA, C and their virtual CB; an (L, 3) array is taken as CB only."""
    if isinstance(reference, dict):  # atoms already (a reconstruction's)
        return reference
    if isinstance(reference, str | os.PathLike):
        reference = read_backbones(reference, chains="first", models="first")[0]
    coords = getattr(reference, "coords", reference)
    coords = np.asarray(coords, dtype=np.float64)
    if coords.ndim == 2 and coords.shape[1] == 3:
        return {"CB": coords}
    if coords.ndim != 3 or coords.shape[1:] != (3, 3):
        raise ValueError(
            f"reference: expected N/CA/C (L, 3, 3) or CB (L, 3) coordinates, got {coords.shape}"
        )
    n, ca, c = coords[:, 0], coords[:, 1], coords[:, 2]
    return {"N": n, "CA": ca, "C": c, "CB": virtual_cb(n, ca, c)}


def compare_with_reference(rec: Reconstruction, reference) -> dict:
    """Metrics of a reconstruction against the structure its image was made from.

    Parameters
    ----------
    rec : Reconstruction
    reference : Backbone, str/PathLike (structure file; first chain, first model), array
        (L, 3, 3) of N, CA, C, or array (L, 3) of Cb
        The reference Cb is the reference design's virtual Cb of its N, CA, C. A Cb-only
        reference gives the Cb metrics only.

    Returns
    -------
    dict
        ``length``; ``cb_rmsd`` (Angstrom, after superposition by a proper rotation),
        ``tm_score`` (on Cb, fixed correspondence, :func:`protoken.metrics.tm_score`),
        ``lddt`` (on Cb), ``clipped_pairs``, ``mirrored_before_fix``, ``handedness_score``,
        ``handedness_confidence`` and ``handedness`` (``"determined"`` or ``"undetermined"``:
        :attr:`protoken.reconstruct.Reconstruction.handedness`), ``distance_rms``, and
        ``mirror_image`` (True if the reconstruction superposes better
        onto the reference after a reflection: the check that the handedness is right). With a
        backbone also ``bb_rmsd`` (N, CA, C superposed together), ``ca_rmsd`` and
        ``ca_tm_score`` (when the reference has N, CA, C).

    Raises
    ------
    ValueError
        The reference has a different number of residues.
    """
    ref = _reference_atoms(reference)
    length = len(ref["CB"])
    if length != len(rec.cb):
        raise ValueError(f"reference has {length} residues, the reconstruction {len(rec.cb)}")
    cb_rmsd = rmsd(rec.cb, ref["CB"])
    out = {
        "length": length,
        "cb_rmsd": cb_rmsd,
        "tm_score": tm_score(rec.cb, ref["CB"]),
        "lddt": lddt(rec.cb, ref["CB"]),
        "clipped_pairs": rec.clipped_pairs,
        "mirrored_before_fix": rec.mirrored_before_fix,
        "mirror_image": bool(length >= 4 and mirror_rmsd(rec.cb, ref["CB"]) < cb_rmsd),
        "handedness_score": rec.handedness_score,
        "handedness_confidence": rec.handedness_confidence,
        "handedness": rec.handedness,
        "distance_rms": rec.distance_rms,
    }
    if rec.atoms is not None and "N" in ref:
        names = ("N", "CA", "C")
        mine = np.concatenate([rec.atoms[k] for k in names])
        theirs = np.concatenate([ref[k] for k in names])
        out["bb_rmsd"] = rmsd(mine, theirs)
        out["ca_rmsd"] = rmsd(rec.atoms["CA"], ref["CA"])
        out["ca_tm_score"] = tm_score(rec.atoms["CA"], ref["CA"])
    return out


def summarize(rows: Sequence[dict]) -> dict:
    """Statistics of metric rows (each a dict as from :func:`compare_with_reference`).

    Returns, for every key of :data:`METRICS` that the rows hold, its ``median``, ``mean``,
    ``min`` and ``max``; with TM-scores the fractions of rows above 0.5 and 0.9; the number of
    ``mirror_images`` (reconstructions that superpose better onto the truth after a reflection:
    the wrong hand) and of ``mirrored_before_fix`` (fixed by the handedness step).
    """
    out: dict = {}
    for key in METRICS:
        vals = np.array([r[key] for r in rows if key in r], dtype=np.float64)
        if len(vals):
            out[key] = {"median": float(np.median(vals)), "mean": float(np.mean(vals)),
                        "min": float(vals.min()), "max": float(vals.max())}  # fmt: skip
    tm = np.array([r["tm_score"] for r in rows if "tm_score" in r])
    if len(tm):
        out["fraction_tm_above_0.5"] = float(np.mean(tm > 0.5))
        out["fraction_tm_above_0.9"] = float(np.mean(tm > 0.9))
    out["mirror_images"] = int(sum(bool(r.get("mirror_image")) for r in rows))
    out["mirrored_before_fix"] = int(sum(bool(r.get("mirrored_before_fix")) for r in rows))
    for prefix in ("", "ceiling_"):
        dq = np.array([r[f"{prefix}dockq"] for r in rows if f"{prefix}dockq" in r])
        if len(dq):
            out[f"{prefix}dockq_classes"] = {name: float(np.mean(dq >= cut))
                                             for name, cut in DOCKQ_CLASSES}  # fmt: skip
    return out


# --------------------------------------------------------------------------- lookups


class SequenceLookup:
    """Residue names for images (``--fasta``): one FASTA file, whose records are matched by id
    (a single record also serves a single image of any id), or a folder of ID.fasta files.
    A header's ``chains=A:120,B:98`` (``protoken convert --chains complex``) gives the
    image's chain layout (:meth:`chains`)."""

    def __init__(self, path: str | os.PathLike | None, n_images: int):
        self.path = os.fspath(path) if path else None
        self.records: dict[str, str] = {}
        self.layouts: dict[str, str] = {}
        self.single = None
        self.single_layout = ""
        if self.path and os.path.isfile(self.path):
            self.records = read_fasta(self.path)
            self.layouts = _fasta_layouts(self.path)
            if len(self.records) == 1 and n_images == 1:
                self.single = next(iter(self.records.values()))
                self.single_layout = next(iter(self.layouts.values()), "")

    def chains(self, sid: str) -> str:
        """The chain layout of image ``sid`` from its FASTA header (``A:120,B:98``), or ""."""
        if not self.path:
            return ""
        if os.path.isdir(self.path):
            for ext in (".fasta", ".fa", ".faa"):
                fasta = os.path.join(self.path, sid + ext)
                if os.path.isfile(fasta):
                    return next(iter(_fasta_layouts(fasta).values()), "")
            return ""
        return self.layouts.get(sid, self.single_layout if sid not in self.records else "")

    def get(self, sid: str) -> str | None:
        """The sequence of image ``sid``, or None."""
        if not self.path:
            return None
        if os.path.isdir(self.path):
            for ext in (".fasta", ".fa", ".faa"):
                fasta = os.path.join(self.path, sid + ext)
                if os.path.isfile(fasta):
                    return next(iter(read_fasta(fasta).values()), None)
            return None
        return self.records.get(sid, self.single)


class MemberRef(NamedTuple):
    """Where a reference inside an archive is (:func:`protoken.archives.read_at` reads it)."""

    archive: str
    kind: str
    name: str
    offset: int
    size: int


class ReferenceIndex:
    """Reference structures by id (``--reference``): a structure file, a tar archive, a
    Foldcomp database, or a folder of any of them walked recursively
    (:func:`protoken.archives.find_sources`). The reference of image ``ID`` is the file
    ``ID.*``, the archive member ``.../ID.*`` or the Foldcomp entry ``ID``; of several with one
    id the first in walk order (sorted paths, archive order) is used.

    Archives are read once, to index their members (id -> location, about 200 bytes each);
    each reference is then read from its location when its image is reconstructed.
    """

    def __init__(self, path: str | os.PathLike | None):
        from protoken.archives import Member, find_sources

        self.files: dict[str, str] = {}
        self.members: dict[str, MemberRef] = {}
        if not path:
            return
        for item in find_sources([os.fspath(path)]):
            if isinstance(item, Member):
                if not item.error and item.size >= 0:
                    archive = item.source[: -len(item.name) - len(SEP)]
                    ref = MemberRef(archive, item.kind, item.name, item.offset, item.size)
                    self.members.setdefault(item.id, ref)
            else:
                self.files.setdefault(structure_id(item), item)

    def __bool__(self) -> bool:
        return bool(self.files or self.members)

    def __len__(self) -> int:
        return len(self.files) + len(self.members)

    def _where(self, sid: str) -> str | MemberRef | None:
        return self.files.get(sid) or self.members.get(sid)

    def locate(self, sid: str) -> tuple[str | MemberRef, str] | None:
        """Where the reference of image ``sid`` is: ``(file or member, "first")`` for ID.*, or
        ``(file or member, "split")`` for chain CHAIN of STEM.* (the ids ``STEM_CHAIN`` that
        ``protoken convert --chains split`` makes); None if absent. Small enough to send to a
        worker in place of the whole index."""
        where = self._where(sid)
        if where is not None:
            return where, "first"
        stem, _, chain = sid.rpartition("_")
        where = self._where(stem) if stem and chain else None
        return (where, "split") if where is not None else None

    def find(self, sid: str) -> Backbone | None:
        """The reference of image ``sid`` (:meth:`locate`, then read). None if absent."""
        return read_reference(sid, self.locate(sid))


def _fasta_layouts(path: str) -> dict[str, str]:
    """``chains=`` of the FASTA headers of a file: id -> layout text (records without one are
    left out)."""
    out = {}
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if line.startswith(">") and "chains=" in line:
                words = line[1:].split()
                fields = dict(w.split("=", 1) for w in words[1:] if "=" in w)
                if words and fields.get("chains"):
                    out[words[0]] = fields["chains"]
    return out


def read_reference(sid: str, where: tuple[str | MemberRef, str] | None,
                   complex_: bool = False) -> Backbone | None:  # fmt: skip
    """The backbone :meth:`ReferenceIndex.locate` points to for ``sid`` (None if none); with
    ``complex_`` (an image of several chains) all protein chains of the file, as ``protoken
    convert --chains complex`` reads them."""
    if where is None:
        return None
    path, mode = where
    chains = ("complex" if complex_ else "first") if mode == "first" else "split"
    if isinstance(path, MemberRef):
        from protoken.archives import read_at, read_member

        data = read_at(path.archive, path.kind, path.offset, path.size)
        backbones = read_member(path.name, path.kind, data, chains=chains, models="first")
    else:
        backbones = read_backbones(path, chains=chains, models="first")
    if mode == "first":
        return backbones[0]
    for bb in backbones:
        if bb.id == sid:
            return bb
    return None


# --------------------------------------------------------------------------- process pool


def _single_threaded() -> None:
    """Pool initializer: one torch thread per worker process (the pool provides the
    parallelism; more threads would only oversubscribe the cores)."""
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:  # pragma: no cover
        pass


def _imap(fn: Callable, tasks: Iterable, workers: int | None, progress: bool = False,
          desc: str = "", window: int | None = None) -> Iterator:  # fmt: skip
    """``fn(t) for t in tasks``, lazily and in order, in ``workers`` processes when there are
    more than one (and more than one task).

    Streamed both ways: a task is drawn from ``tasks`` only when fewer than ``window`` (default
    twice the workers) are submitted and not yet collected, and each result is yielded as soon
    as it and those before it are done; so neither the tasks nor the results are ever all in
    memory, and an iterable that builds tasks on demand (reading a file, decoding a batch) is
    read at the pace of the workers.
    """
    from tqdm import tqdm

    from protoken.convert.pool import available_cores

    workers = workers or available_cores()
    tasks = iter(tasks)
    head = list(itertools.islice(tasks, 2))
    bar = tqdm(desc=desc, unit="protein", disable=not progress, file=sys.stderr)
    try:
        if workers <= 1 or len(head) < 2:
            for task in itertools.chain(head, tasks):
                result = fn(task)
                bar.update()
                yield result
            return
        from concurrent.futures import ProcessPoolExecutor

        window = window or 2 * workers
        with ProcessPoolExecutor(workers, initializer=_single_threaded) as pool:
            pending: deque = deque()
            for task in itertools.chain(head, tasks):
                pending.append(pool.submit(fn, task))
                if len(pending) >= window:
                    result = pending.popleft().result()
                    bar.update()
                    yield result
            while pending:
                result = pending.popleft().result()
                bar.update()
                yield result
    finally:
        bar.close()


# --------------------------------------------------------------------------- reconstruct


@dataclass
class _ImageTask:
    image: str
    out: str
    fmt: str
    dmax: float | None
    refine: bool
    backbone: bool
    sequence: str | None
    #: With references: where this image's is (:meth:`ReferenceIndex.locate`), None when it has
    #: none. The task carries only this, never the whole index.
    reference: tuple[str, str] | None
    with_references: bool
    max_len: int | None = None
    #: The chain layout from the FASTA header (``A:120,B:98``), "" when none.
    chains: str = ""


def _reconstruct_image(task: _ImageTask) -> dict:
    """Reconstruct one image, write its structure, compare with its reference if any.

    The PNG header is checked before decoding (side at most ``max_len``); dmax and bit depth
    come from the convert.json beside the image when there is one
    (:func:`protoken.codec.read_converted_image`); a degenerate image (a constant channel) is
    refused (:func:`protoken.codec.check_image`).
    """
    sid = image_id(task.image)
    row: dict = {"id": sid, "image": task.image}
    try:
        t0 = time.perf_counter()
        path = safe_output_path(task.out, sid, f".{task.fmt}")
        image, dmax = read_converted_image(task.image, task.dmax, task.max_len, np.float64)
        check_image(image)
        rec = reconstruct(image, dmax=dmax, refine=task.refine, backbone=task.backbone)
        row["seconds"] = time.perf_counter() - t0
        seq = task.sequence
        note = ""
        if seq is not None and len(seq) != len(rec):
            note = f"sequence has {len(seq)} residues, image {len(rec)}: residues written as UNK"
            seq = None
        layout = None
        if task.chains:
            try:
                layout = parse_chains(task.chains, length=len(rec))
            except ValueError as exc:
                note = (note + "; " if note else "") + f"{exc}: written as one chain"
        if layout is not None and len(layout) > 1:  # a complex: its chains, numbered 1..n each
            text = structure_to_text(rec.output_atoms, seq, fmt=task.fmt, chains=layout)
        else:
            text = rec.to_text(sequence=seq, fmt=task.fmt)
        atomic_write(path, text)
        row.update(length=len(rec), clipped_pairs=rec.clipped_pairs, note=note)
        row["clipped_fraction"] = _fraction_of_pairs(rec.clipped_pairs, len(rec))
        row["mirrored_before_fix"] = rec.mirrored_before_fix
        if layout is not None:
            row["chains"], row["n_chains"] = format_chains(layout), len(layout)
        if task.with_references:
            multi = layout is not None and len(layout) > 1
            ref = read_reference(sid, task.reference, complex_=multi)
            if ref is None:
                row["note"] = (note + "; " if note else "") + "no reference"
            else:
                row.update(compare_with_reference(rec, ref))
                if multi:
                    truth = _reference_atoms(ref)
                    row.update(complex_row(rec, truth, layout, ref.sequence))
                row["has_reference"] = True
    except ValueError as exc:  # a refused image: the reason says it all
        row["error"] = " ".join(str(exc).split())
    except Exception as exc:  # noqa: BLE001 - one bad input must not stop a batch
        row["error"] = f"{type(exc).__name__}: {' '.join(str(exc).split())}"
    return row


def image_tasks(images: Iterable[str], out: str, sequences: SequenceLookup,
                references: ReferenceIndex, dmax: float | None = None, refine: bool = True,
                backbone: bool = False, fmt: str = "pdb",
                max_len: int | None = None) -> Iterator[_ImageTask]:  # fmt: skip
    """The worker tasks of :func:`reconstruct_images`, one per image, made as they are taken:
    each holds its image's path, sequence and reference location only (its pickled size does
    not grow with the number of references)."""
    for image in images:
        sid = image_id(image)
        yield _ImageTask(image, out, fmt, dmax, refine, backbone, sequences.get(sid),
                         references.locate(sid) if references else None, bool(references),
                         max_len, sequences.chains(sid))  # fmt: skip


def reconstruct_images(images: Iterable[str], out: str, fasta: str | None = None,
                       reference: str | None = None, dmax: float | None = None,
                       refine: bool = True, backbone: bool = False, fmt: str = "pdb",
                       workers: int | None = 1,
                       max_len: int | None = None, on_row: Callable[[dict], None] | None = None,
                       ) -> tuple[list[dict], dict]:  # fmt: skip
    """Reconstruct PNG images into ``out/ID.{fmt}`` (``protoken reconstruct``).

    ``images`` is streamed (a generator such as :func:`protoken.inputs.find_images` is read as
    the workers take images, never listed first); each worker task carries one image's path,
    sequence and reference location (:func:`image_tasks`), and at most twice ``workers`` tasks
    are in flight. ``on_row(row)`` hears of each row as it is done (in input order).

    Residue names come from ``fasta`` (:class:`SequenceLookup`), else UNK; a FASTA header's
    chain layout (``chains=A:120,B:98``, as ``protoken convert --chains complex`` writes it)
    makes the structure one chain per entry, with those ids, residues numbered from 1 in each.
    With ``reference`` (:class:`ReferenceIndex`) each structure is compared with its reference
    (:func:`compare_with_reference`; a complex with all protein chains of the reference file,
    and :func:`complex_row`: DockQ with ``backbone``) and ``out/metrics.tsv`` and
    ``out/summary.json`` are written. ``dmax``: the images' cut-off when no convert.json
    beside them says (default 80); one that contradicts it fails the image. An image that
    fails (unreadable, refused from its header, larger than ``max_len``, degenerate ...) is
    recorded (``error``, and a row of ``out/failed.tsv``: id, image, reason), never stops the
    others.

    Returns
    -------
    rows : list of dict
        Per image: ``id``, and ``error``, or ``length``, ``clipped_pairs``,
        ``clipped_fraction`` (of the pairs i < j), ``note``, the metrics (``has_reference``) ...
    summary : dict
        ``images``, ``failed``, ``with_reference``, :func:`summarize` of the compared rows,
        ``clipped_proteins`` and ``by_clipped`` (:func:`by_clipped`).
    """
    os.makedirs(out, exist_ok=True)
    images = iter(images)
    head = list(itertools.islice(images, 2))  # one image alone takes a single-record FASTA
    sequences = SequenceLookup(fasta, len(head))
    references = ReferenceIndex(reference)
    tasks = image_tasks(itertools.chain(head, images), out, sequences, references, dmax=dmax,
                        refine=refine, backbone=backbone, fmt=fmt, max_len=max_len)  # fmt: skip
    rows = []
    for row in _imap(_reconstruct_image, tasks, workers):
        if on_row is not None:
            on_row(row)
        rows.append(row)
    failed = [{"id": r["id"], "image": r["image"], "reason": r["error"]} for r in rows
              if "error" in r]  # fmt: skip
    if failed:
        write_tsv(os.path.join(out, "failed.tsv"), ("id", "image", "reason"), failed)
    scored = [r for r in rows if r.get("has_reference")]
    summary: dict = {
        "images": len(rows),
        "failed": sum("error" in r for r in rows),
        "with_reference": len(scored),
    }
    if scored:
        summary.update(summarize(scored))
        summary["clipped_proteins"] = [
            {k: r[k] for k in ("id", "length", "clipped_pairs", "cb_rmsd", "tm_score")}
            for r in scored
            if r["clipped_pairs"]
        ]
        summary["by_clipped"] = by_clipped(scored)
    if reference:
        write_reconstruct_tables(out, scored, summary, backbone)
    return rows, summary


# --------------------------------------------------------------------------- evaluate


#: Length bins of the by-length medians (residues, inclusive).
LENGTH_BINS = ((40, 99), (100, 199), (200, 399), (400, 1024))


def by_length(rows: Sequence[dict], keys=("tm_score", "cb_rmsd", "lddt")) -> list[dict]:
    """Per :data:`LENGTH_BINS` bin that holds proteins: its range, count and the medians of
    ``keys`` (and ``ceiling_tm_score`` when the rows have it)."""
    out = []
    for lo, hi in LENGTH_BINS:
        sel = [r for r in rows if lo <= r["length"] <= hi]
        if not sel:
            continue
        entry: dict = {"lengths": f"{lo}-{hi}", "proteins": len(sel)}
        for key in (*keys, "ceiling_tm_score"):
            vals = [r[key] for r in sel if key in r]
            if vals:
                entry[key] = float(np.median(vals))
        out.append(entry)
    return out


#: Bins of the fraction of clipped pairs (d >= dmax) of :func:`by_clipped`: (label, low, high],
#: the first one exactly 0.
CLIPPED_BINS = (("none", -1.0, 0.0), ("0-1%", 0.0, 0.01), ("1-10%", 0.01, 0.1),
                ("10-30%", 0.1, 0.3), ("over 30%", 0.3, 1.0))  # fmt: skip


def _fraction_of_pairs(clipped_pairs: int, length: int) -> float:
    """The fraction of a protein's residue pairs i < j that are clipped (0 below 2 residues)."""
    pairs = length * (length - 1) // 2
    return clipped_pairs / pairs if pairs else 0.0


def by_clipped(rows: Sequence[dict], key: str = "tm_score") -> list[dict]:
    """The TM-score against the fraction of clipped pairs: per :data:`CLIPPED_BINS` bin that
    holds proteins (rows with ``clipped_fraction``), its label, count, the median and min of
    ``key`` (and of ``ceiling_tm_score`` when the rows have it) and its mirror images."""
    out = []
    for label, lo, hi in CLIPPED_BINS:
        sel = [r for r in rows if "clipped_fraction" in r and lo < r["clipped_fraction"] <= hi]
        if not sel:
            continue
        entry: dict = {"clipped": label, "proteins": len(sel)}
        for name in (key, "ceiling_tm_score"):
            vals = [r[name] for r in sel if name in r]
            if vals:
                entry[name] = {"median": float(np.median(vals)), "min": float(np.min(vals))}
        entry["mirror_images"] = int(sum(bool(r.get("mirror_image")) for r in sel))
        out.append(entry)
    return out


#: Chain-count bins of the by-complex-size medians (inclusive; None: no upper end).
CHAIN_BINS = ((1, 1), (2, 2), (3, 3), (4, 4), (5, None))

#: Keys of the by-complex-size medians.
COMPLEX_SIZE_KEYS = ("dockq", "complex_tm_score", "ceiling_dockq", "ceiling_complex_tm_score")


def by_complex_size(rows: Sequence[dict]) -> dict:
    """Medians of :data:`COMPLEX_SIZE_KEYS` by complex size: ``chains`` (per
    :data:`CHAIN_BINS` bin that holds complexes: ``"2"``, ``"5+"`` ...) and ``residues`` (per
    :data:`LENGTH_BINS` bin), each entry with its ``complexes`` count. Rows without a chain
    count (``n_chains``) are left out."""
    rows = [r for r in rows if "n_chains" in r]

    def entry(label_key, label, sel) -> dict:
        out: dict = {label_key: label, "complexes": len(sel)}
        for key in COMPLEX_SIZE_KEYS:
            vals = [r[key] for r in sel if key in r]
            if vals:
                out[key] = float(np.median(vals))
        return out

    by_chains = []
    for lo, hi in CHAIN_BINS:
        sel = [r for r in rows if r["n_chains"] >= lo and (hi is None or r["n_chains"] <= hi)]
        if sel:
            by_chains.append(entry("chains", f"{lo}+" if hi is None else str(lo), sel))
    by_residues = []
    for lo, hi in LENGTH_BINS:
        sel = [r for r in rows if lo <= r["length"] <= hi]
        if sel:
            by_residues.append(entry("residues", f"{lo}-{hi}", sel))
    return {"chains": by_chains, "residues": by_residues}


def complex_row(rec: Reconstruction, truth: dict, layout, sequence: str | None) -> dict:
    """The :data:`COMPLEX_METRICS` (and ``interfaces``) of a reconstruction of a complex image
    against the true atoms (:func:`protoken.metrics.complex_scores`: DockQ needs
    ``rec.atoms``, the reconstructed backbone); NaN scores (no interface) are left out."""
    from protoken.metrics import complex_scores

    pred = rec.atoms if rec.atoms is not None else {"CB": rec.cb}
    scores = complex_scores(pred, truth, layout, sequence or None, dockq=rec.atoms is not None)
    out = {k: scores[k] for k in (*COMPLEX_METRICS, "interfaces")
           if k in scores and np.isfinite(scores[k])}  # fmt: skip
    return out


def _reconstruct_and_compare(task: tuple) -> dict:
    """Worker: reconstruct a decoded image and compare it with the reference; with
    ``ceiling``, also the input image itself (the exact image -> 3D path, no tokenizer).

    ``task``: (decoded, reference, input image or None, dmax, backbone, ceiling, structure or
    None, where, id, layout, sequence). A reference of None (an input PNG) is read from
    ``where`` (:meth:`ReferenceIndex.locate`, ``--reference``) when given and found with the
    image's length, else it is the input image's own reconstruction, made here. A structure
    given (a per-residue decoder's own backbone) is compared as it is, the decoded image
    unused. With a chain layout of two chains or more (``--chains complex``) the backbone is
    rebuilt (DockQ needs N, CA, C) and the row adds ``complex`` (:func:`complex_row`; and in
    ``ceiling``). The result holds ``cb`` (reconstructed) and ``truth`` (the reference's Cb)
    for the report's pictures, and ``reference``: what the reconstruction was compared with
    (``"structure"``, ``"reference"`` or ``"image"``).
    """
    decoded, reference, image, dmax, backbone, ceiling, rec, where, sid, layout, sequence = task
    multi = layout is not None and len(layout) > 1
    kind, note = "structure", ""
    if reference is None and where is not None:
        try:
            found = read_reference(sid, where, complex_=multi)
        except Exception as exc:  # noqa: BLE001 - an unreadable reference: the image instead
            found, note = None, f"reference unreadable ({' '.join(str(exc).split())[:160]})"
        if found is not None and len(found) != image.shape[-1]:
            note = f"reference has {len(found)} residues, the image {image.shape[-1]}"
            found = None
        reference, kind = found, "reference"
    exact = None
    if reference is None:
        exact = reconstruct(image, dmax=dmax, backbone=multi)
        reference, kind = (exact.atoms if multi else exact.cb), "image"
    if rec is None:
        rec = reconstruct(decoded, dmax=dmax, backbone=backbone or multi)
    truth = _reference_atoms(reference)
    row = compare_with_reference(rec, reference)
    if multi:
        row["complex"] = complex_row(rec, truth, layout, sequence)
    if ceiling:
        exact = exact if exact is not None else reconstruct(image, dmax=dmax, backbone=multi)
        scores = compare_with_reference(exact, truth["CB"])
        row["ceiling"] = {k: scores[k] for k in ("cb_rmsd", "tm_score", "lddt")}
        if multi:
            row["ceiling"].update(complex_row(exact, truth, layout, sequence))
    row["cb"] = rec.cb
    row["truth"] = truth["CB"]
    row["reference"] = kind
    row["note"] = note
    return row


@dataclass
class Picture:
    """What the report shows of one protein: its row index, input and decoded images (float16:
    shown, never measured), reconstructed and true Cb."""

    index: int
    image: np.ndarray
    decoded: np.ndarray
    cb: np.ndarray
    truth: np.ndarray


class PicturePicks:
    """The report's best, median and worst protein (by TM-score), chosen as the proteins stream
    by, holding the images of a bounded number of them (at most ``sample + 3``).

    Best and worst are exact. The median is exact when the protein at the final median is still
    held, which is always the case for up to ``sample`` proteins; beyond, the candidates are a
    uniform reservoir sample of ``sample`` proteins plus the protein nearest the running median
    (two heaps), and the one nearest the final median is shown (the report names it and its own
    TM-score, so it is never mislabelled).
    """

    def __init__(self, sample: int = 8, seed: int = 0):
        self.sample = sample
        self.rng = np.random.default_rng(seed)
        self.reservoir: list[Picture] = []
        self.best: Picture | None = None
        self.worst: Picture | None = None
        self.near_median: Picture | None = None
        self.tms: list[float] = []
        self._lo: list[float] = []  # max-heap (negated) of the lower half of the TM-scores
        self._hi: list[float] = []  # min-heap of the upper half (one more when odd)

    def _running_median(self, tm: float) -> float:
        if self._hi and tm < self._hi[0]:
            heapq.heappush(self._lo, -tm)
        else:
            heapq.heappush(self._hi, tm)
        if len(self._lo) > len(self._hi):
            heapq.heappush(self._hi, -heapq.heappop(self._lo))
        elif len(self._hi) > len(self._lo) + 1:
            heapq.heappush(self._lo, -heapq.heappop(self._hi))
        return self._hi[0]  # the upper median: sorted(tms)[n // 2]

    def offer(self, index: int, tm: float, make: Callable[[], Picture]) -> None:
        """Protein ``index`` of TM-score ``tm``; ``make()`` builds its :class:`Picture`, only
        when it is kept."""
        self.tms.append(tm)
        median = self._running_median(tm)
        slot = None
        if len(self.reservoir) < self.sample:
            slot = len(self.reservoir)
        else:
            j = int(self.rng.integers(0, index + 1))
            slot = j if j < self.sample else None
        best = self.best is None or tm > self.tms[self.best.index]
        worst = self.worst is None or tm < self.tms[self.worst.index]
        near = (self.near_median is None
                or abs(tm - median) < abs(self.tms[self.near_median.index] - median))  # fmt: skip
        if slot is None and not (best or worst or near):
            return
        pic = make()
        if slot is not None:
            if slot == len(self.reservoir):
                self.reservoir.append(pic)
            else:
                self.reservoir[slot] = pic
        if best:
            self.best = pic
        if worst:
            self.worst = pic
        if near:
            self.near_median = pic

    def picks(self) -> dict[str, Picture]:
        """``{"best", "median", "worst"}`` -> :class:`Picture` (after every protein)."""
        order = np.argsort(self.tms, kind="stable")
        target = self.tms[int(order[len(order) // 2])]
        held = [p for p in (*self.reservoir, self.near_median) if p is not None]
        median = min(held, key=lambda p: (abs(self.tms[p.index] - target), p.index))
        return {"best": self.best, "median": median, "worst": self.worst}


def _picture(index: int, image: np.ndarray, decoded: np.ndarray, result: dict) -> Picture:
    return Picture(index, image.astype(np.float16), decoded.astype(np.float16), result["cb"],
                   result["truth"])  # fmt: skip


def evaluate(tokenizer, inputs: Iterable[str], out: str, backbone: bool = False,
             workers: int | None = None, progress: bool = True, chains: str = "skip-multi",
             models: str = "skip-multi", min_len: int = 40, max_len: int = 1024,
             ceiling: bool = True, via: str = "auto", reference: str | None = None,
             log=print) -> dict:  # fmt: skip
    """Evaluate a tokenizer on structure files (or PNGs: then the reference is the 3D
    reconstruction of the input image itself). Writes OUT/metrics.tsv, OUT/summary.json and
    OUT/report.md with its pictures (:func:`protoken.report.write_report`); returns the summary.

    Streamed: inputs are read, tokenized (a batch at a time), decoded and sent to the 3D
    workers as the workers take them (at most twice ``workers`` in flight); what is kept per
    protein is its row of metrics, and images only of the few the report shows
    (:class:`PicturePicks`). Codebook usage is a bit per code.

    Per protein: ``length``, ``image_mse`` (over all pixels and channels, [-1, 1] units),
    ``distance_mae`` (:func:`protoken.metrics.distance_mae`, Angstrom), the metrics of
    :func:`compare_with_reference`, ``tokens_per_residue`` and ``bits_per_residue``; with
    ``ceiling`` also ``ceiling_*``, the same metrics of the input image reconstructed without
    the tokenizer (what the image -> 3D path alone reaches: the ceiling of any tokenizer).
    Also ``clipped_fraction`` (the input image's pairs at or beyond dmax), and the
    handedness of the reconstruction (``handedness``, ``handedness_confidence``). The summary
    adds ``by_length`` (:func:`by_length`), ``by_clipped`` (:func:`by_clipped`), the
    tokenizer's ``family`` and
    ``provenance`` (training steps, preset, data), ``structure_from`` (``via``: a per-residue
    decoder's own backbone, ``"decoder"``, or the decoded image through MDS, ``"image"``; see
    :meth:`protoken.tokenizer.Tokenizer.decode_structure`) and, per-residue, ``stages`` and
    ``refine_steps`` (decoding by inversion, :attr:`protoken.tokenizer.Tokenizer.refine`; the
    image metrics are then those of the refined backbone's image).

    With ``chains="complex"`` each structure file is one image of all its protein chains
    (:func:`protoken.structure.read_backbones`), and each complex of two chains or more adds
    ``chains`` (its layout, ``A:120,B:98``), ``n_chains`` and the scores of
    :func:`protoken.metrics.complex_scores` (``dockq``, ``fnat``, ``irmsd``, ``lrmsd``,
    ``complex_tm_score``, ``chain_tm_min``, ``interfaces``), also as ``ceiling_*``; the
    backbone of complexes is rebuilt for DockQ (when the structure does not come from the
    decoder). The summary adds ``complexes`` (their number), ``dockq_classes`` (fractions at
    least acceptable, medium, high) and ``by_complex_size`` (:func:`by_complex_size`). The
    chain layout comes from the tokenizer's items (``Item.chains``).

    ``reference`` (``--reference``): structures, tar archives or Foldcomp databases
    (:class:`ReferenceIndex`) in which an input PNG's true structure is found by id; it is then
    compared with that structure instead of its own reconstruction (``reference`` column:
    ``structure`` for structure inputs, ``reference`` or ``image`` for PNGs).
    """
    from_decoder = via == "decoder" or (via == "auto" and tokenizer.decodes_coordinates)
    if from_decoder and not tokenizer.decodes_coordinates:
        raise ValueError("this tokenizer's decoder makes images, not coordinates (use via='image')")
    complexes = chains == "complex"
    if complexes:
        _require_dockq()
    os.makedirs(out, exist_ok=True)
    skipped: list[tuple[str, str]] = []

    def skip(source, exc: Exception) -> None:
        skipped.append((str(source), str(exc)))
        log(f"protoken evaluate: skipped {source}: {exc}")

    dmax = tokenizer.codec.dmax
    size = tokenizer.config.codebook_size
    bits = math.log2(size)
    batch_size = getattr(tokenizer, "batch_size", 8)
    references = ReferenceIndex(reference)
    used: list[np.ndarray] = []  # per level, which codes occurred
    pending: deque = deque()  # (row, item, decoded) of the tasks in flight, in order

    def tasks() -> Iterator[tuple]:
        items = tokenizer.prepare_many(inputs, chains=chains, models=models, min_len=min_len,
                                       max_len=max_len, on_error=skip)  # fmt: skip
        while batch := list(itertools.islice(items, batch_size)):
            tokens = tokenizer.tokens_of(batch)
            levels = [t.levels for t in tokens]
            if from_decoder:  # the image of the (refined) backbone the metrics score
                recs = tokenizer.decode_atoms(tokens)
                decoded = [tokenizer.image_of(rec) for rec in recs]
            else:
                recs = [None] * len(batch)
                decoded = tokenizer.decode_levels(levels, [t.length for t in tokens],
                                                  [t.chains for t in tokens])  # fmt: skip
            for it, t, lv, dec, rec in zip(batch, tokens, levels, decoded, recs, strict=True):
                # codebook use per level (grids) or per stage (per-residue codes)
                parts = [t.stages[:, k] for k in range(t.n_stages)] if t.n_stages else lv
                if not used:
                    used.extend(np.zeros(size, dtype=bool) for _ in parts)
                for seen, grid in zip(used, parts, strict=True):
                    codes = np.asarray(grid).ravel()
                    seen[codes[(codes >= 0) & (codes < size)]] = True
                length = int(it.image.shape[-1])
                n_clipped = int(np.count_nonzero(clipped_mask(it.image)) // 2)
                n_tok = int(sum(np.asarray(g).size for g in lv))
                row = {
                    "id": it.id, "length": length,
                    "image_mse": float(np.mean((dec.astype(np.float64) - it.image) ** 2)),
                    "distance_mae": distance_mae(it.image, dec, dmax),
                    "tokens_per_residue": n_tok / length, "bits_per_residue": n_tok * bits / length,
                    "clipped_fraction": _fraction_of_pairs(n_clipped, length),
                }  # fmt: skip
                layout = _layout(it, length) if complexes else None
                if layout is not None:
                    row["chains"] = format_chains(layout)
                    row["n_chains"] = len(layout)
                pending.append((row, it, dec))
                needs_image = ceiling or it.backbone is None
                where = references.locate(it.id) if references and it.backbone is None else None
                yield (dec, it.backbone, it.image if needs_image else None, dmax, backbone,
                       ceiling, rec, where, it.id, layout, it.sequence)  # fmt: skip

    rows: list[dict] = []
    pictures = PicturePicks()
    for res in _imap(_reconstruct_and_compare, tasks(), workers, progress, desc="evaluate"):
        row, it, dec = pending.popleft()
        row.update(cb_rmsd=res["cb_rmsd"], tm_score=res["tm_score"], lddt=res["lddt"],
                   mirrored_before_fix=res["mirrored_before_fix"],
                   mirror_image=res["mirror_image"],
                   handedness=res.get("handedness", "determined"),
                   handedness_confidence=res.get("handedness_confidence", float("nan")),
                   reference=res["reference"])  # fmt: skip
        row.update(res.get("complex", {}))
        if res["note"]:
            log(f"protoken evaluate: {row['id']}: {res['note']}; compared with its image")
        for key, value in res.get("ceiling", {}).items():
            row[f"ceiling_{key}"] = value
        if backbone:
            row["bb_rmsd"] = res.get("bb_rmsd", float("nan"))
            row["ca_tm_score"] = res.get("ca_tm_score", float("nan"))
        index = len(rows)
        rows.append(row)
        pictures.offer(index, row["tm_score"], functools.partial(
            _picture, index, it.image, dec, res))  # fmt: skip
    if skipped:  # recorded, as convert's manifest records them
        skipped_rows = [{"source": src, "reason": " ".join(why.split())} for src, why in skipped]
        write_tsv(os.path.join(out, "skipped.tsv"), ("source", "reason"), skipped_rows)
    if not rows:
        raise ValueError(f"no protein to evaluate ({len(skipped)} inputs skipped)")

    summary = {"proteins": len(rows), "skipped_inputs": len(skipped), **summarize(rows)}
    summary["codebook_usage_per_level_coarsest_first"] = [
        round(float(seen.mean()), 4) for seen in used]  # fmt: skip
    summary["checkpoint"] = getattr(tokenizer, "checkpoint", "")
    summary["family"] = getattr(tokenizer, "family", "hierarchical")
    summary["structure_from"] = "decoder" if from_decoder else "image"
    if summary["family"] == "residue":
        summary["stages"] = len(used)
    if from_decoder:
        summary["refine_steps"] = int(getattr(tokenizer, "refine", 0))
    summary["provenance"] = getattr(tokenizer, "provenance", {})
    summary["by_length"] = by_length(rows)
    if complexes:
        summary["complexes"] = sum(r.get("n_chains", 0) > 1 for r in rows)
        summary["by_complex_size"] = by_complex_size(rows)
    summary["by_clipped"] = by_clipped(rows)
    summary["handedness_undetermined"] = sum(r["handedness"] != "determined" for r in rows)
    if references:
        summary["compared_with_references"] = sum(r["reference"] == "reference" for r in rows)
    write_report(out, rows, summary, pictures.picks(), backbone)
    return summary


def _require_dockq() -> None:
    """Interface scores need the DockQ package: one run-level error naming the extra."""
    try:
        import DockQ.DockQ  # noqa: F401
    except ImportError:
        from protoken.metrics import DOCKQ_INSTALL

        raise ImportError(
            f"--chains complex scores interfaces with the DockQ package: {DOCKQ_INSTALL}"
        ) from None


def _layout(item, length: int):
    """The chain layout of a tokenizer item (``item.chains``, as ``Backbone.chains``), checked
    against its image; a one-chain layout for an item without one that is no complex (a PNG)."""
    layout = getattr(item, "chains", None)
    if not layout:
        if getattr(item, "backbone", None) is None:
            return None  # an image without a layout: scored as one chain
        raise ValueError(
            f"{item.id}: the tokenizer's items carry no chain layout (Item.chains), which "
            "--chains complex needs"
        )
    return parse_chains(format_chains(layout), length=length)
