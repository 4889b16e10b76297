"""Token files: the tokens of many proteins, read and written in memory that does not grow
with their number.

Three formats (``protoken encode --format``):

``npz`` (:class:`NpzTokenWriter`, read by :func:`load_tokens`, and by plain ``numpy.load``)::

    format           "protoken-tokens/3"  (versions 1 and 2 are read: see below)
    meta             JSON: family ("hierarchical" or "residue"), checkpoint id, model config,
                     codec settings, codebook size, level scales, stages, provenance
    ids, sequences   (N,) str;   lengths (N,) int32
    hierarchical:    level{l}_codes   all proteins' level-l grids, flattened row-major and
                                      concatenated (uint16 when the codebook has <= 65536 codes)
                     level{l}_offsets (N + 1,) int64: protein i's grid is
                                      codes[offsets[i]:offsets[i + 1]], reshaped to
                                      (ceil(L_i / s_l), ceil(L_i / s_l))
    residue:         codes, offsets   one code per residue (the first stage): protein i's are
                                      codes[offsets[i]:offsets[i + 1]], L_i of them
                     codes_stage{k}   stage k = 2 .. K of residual tokens (meta "stages": K),
                                      with the same offsets
    complexes:       chain_ids, chain_lengths   (C,) every protein's chains in order, and
                     chain_offsets    (N + 1,): protein i's chains are [chain_offsets[i],
                                      chain_offsets[i + 1]) (none: one chain, id unknown)

    numbering:       res_numbers, res_icodes   (sum of L,) int32 and uint8: every residue's
                                      author number and insertion code (0: none), present
                                      when every protein recorded its numbering

Version 2 named the family in ``meta["layout"]`` (``"grid"`` for hierarchical), version 1
(before the per-residue family) did not name it; the arrays are the same in all three. Stages,
chains and numbering are members of their own: a reader of version 2 that ignores members it
does not know reads the first stage of every protein.

``fasta`` (:class:`FastaTokenWriter`, per-residue tokens only): ``>ID length=L`` (plus
`` chains=A:120,B:98`` for a complex and `` stages=K`` for K > 1 stages), then the codes of
each stage as space-separated integers on one line each, the i-th belonging to the i-th
residue.

``parquet`` (:class:`ParquetTokenWriter`, per-residue tokens only, pyarrow): columns ``id``,
``sequence``, ``tokens`` (list of uint16 or int32: the first stage), ``tokens_2`` ..
``tokens_K`` (the later stages), ``length``, ``chain_ids`` and ``chain_lengths`` (lists; empty
for a single chain of unknown id), ``res_ids`` (the author numbering, empty when unknown); the
meta as the schema's ``protoken`` metadata (JSON).

:func:`load_tokens` reads all three (from a file's first bytes) and checks every field (FASTA
records no tokenizer: the decoding one checks the codes).

One module of ~1000 lines on purpose: each format's reader and writer side by side, so that
they cannot drift apart.

Every writer streams protein by protein under a temporary name and gives the file its name
only when complete (:func:`protoken.fileio.publish`: never over an existing file);
:func:`save_tokens` and its FASTA and Parquet siblings take a list or a generator.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from protoken.codec import MAX_IMAGE_SIDE
from protoken.fileio import publish, temp_name
from protoken.inputs import is_safe_id

__all__ = [
    "TOKEN_FORMAT",
    "WRITERS",
    "FastaTokenWriter",
    "NpzTokenWriter",
    "ParquetTokenWriter",
    "TokenWriter",
    "Tokens",
    "chains_text",
    "STDOUT",
    "StdoutFastaWriter",
    "load_tokens",
    "open_token_writer",
    "parse_chains",
    "save_tokens",
    "save_tokens_fasta",
    "save_tokens_parquet",
]

TOKEN_FORMAT = "protoken-tokens/3"
#: Older formats, still read: version 1 held the hierarchical family only; version 2 named the
#: family in ``meta["layout"]`` ("grid" for hierarchical).
_V1, _V2 = "protoken-tokens/1", "protoken-tokens/2"
_V2_LAYOUTS = {"grid": "hierarchical", "residue": "residue"}
FAMILIES = ("hierarchical", "residue")


@dataclass
class Tokens:
    """The tokens of one protein (or complex).

    Attributes
    ----------
    id : str
    length : int
        Residues L (of all chains).
    sequence : str
        One-letter sequence ("" when encoded from an image without one), chains concatenated.
    levels : list of ndarray
        Residue family: one ``(L, K)`` int array, the K stages of residue i in row i (an
        ``(L,)`` array is one stage). Hierarchical family: coarsest level first, level l an int
        array (ceil(L / s_l), ceil(L / s_l)).
    chains : tuple of (str, int)
        The chain layout of a complex, ``(chain id, residues)`` in order; empty for a single
        chain whose id is not recorded.
    res_ids : tuple of str
        The residues' author numbering (number and insertion code, ``"12"``, ``"12A"``), so
        decoded structures are numbered as the input was; empty: 1..n within each chain.
    """

    id: str
    length: int
    sequence: str
    levels: list[np.ndarray]
    chains: tuple[tuple[str, int], ...] = ()
    res_ids: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self.chains = tuple((str(c), int(n)) for c, n in self.chains)
        self.res_ids = tuple(str(r) for r in self.res_ids)
        if self.chains and sum(n for _, n in self.chains) != self.length:
            raise ValueError(f"{self.id}: chain lengths {self.chain_lengths} do not sum to the "
                             f"length {self.length}")  # fmt: skip
        if self.res_ids and len(self.res_ids) != self.length:
            raise ValueError(f"{self.id}: {len(self.res_ids)} residue ids for {self.length} "
                             "residues")  # fmt: skip

    @property
    def family(self) -> str:
        """``"residue"`` (codes per residue) or ``"hierarchical"`` (grids of codes)."""
        first = np.asarray(self.levels[0]) if len(self.levels) == 1 else None
        per_residue = first is not None and first.ndim in (1, 2) and first.shape[0] == self.length
        return "residue" if per_residue and (first.ndim == 1 or self.length > 1) else "hierarchical"

    @property
    def stages(self) -> np.ndarray:
        """The ``(L, K)`` codes of the residue family, stage k of residue i at ``[i, k]``."""
        if self.family != "residue":
            raise ValueError(f"{self.id}: hierarchical tokens have no per-residue codes")
        codes = np.asarray(self.levels[0])
        return codes[:, None] if codes.ndim == 1 else codes

    @property
    def codes(self) -> np.ndarray:
        """The ``(L,)`` codes of the first stage (12 bits per residue with ``residue``)."""
        return self.stages[:, 0]

    @property
    def n_stages(self) -> int:
        return self.stages.shape[1] if self.family == "residue" else 0

    def first_stages(self, k: int) -> Tokens:
        """These tokens with only the first ``k`` stages (the rate knob)."""
        if not 1 <= k <= self.n_stages:
            raise ValueError(f"{self.id}: {k} stages asked, the tokens have {self.n_stages}")
        return Tokens(self.id, self.length, self.sequence, [self.stages[:, :k]], self.chains,
                      self.res_ids)  # fmt: skip

    @property
    def chain_ids(self) -> list[str]:
        return [c for c, _ in self.chains]

    @property
    def chain_lengths(self) -> list[int]:
        return [n for _, n in self.chains]

    @property
    def chain_index(self) -> np.ndarray | None:
        """``(L,)`` chain index of each residue, or None for one chain."""
        if len(self.chains) < 2:
            return None
        return np.repeat(np.arange(len(self.chains)), self.chain_lengths)

    @property
    def n_tokens(self) -> int:
        return int(sum(np.size(g) for g in self.levels))


_RES_ID = re.compile(r"^(-?\d{1,9})([A-Za-z]?)$")


def split_res_ids(res_ids) -> tuple[np.ndarray, np.ndarray] | None:
    """Author residue ids (``"12"``, ``"12A"``) as numbers (int32) and insertion codes
    (uint8, 0 for none); None when one is no such id."""
    numbers, codes = [], []
    for r in res_ids:
        m = _RES_ID.match(r)
        if m is None:
            return None
        numbers.append(int(m.group(1)))
        codes.append(ord(m.group(2)) if m.group(2) else 0)
    return np.asarray(numbers, dtype=np.int32), np.asarray(codes, dtype=np.uint8)


def join_res_ids(numbers: np.ndarray, codes: np.ndarray) -> tuple[str, ...]:
    """Inverse of :func:`split_res_ids`."""
    return tuple(f"{n}{chr(c) if c else ''}" for n, c in zip(numbers.tolist(), codes.tolist(),
                                                              strict=True))  # fmt: skip


def chains_text(chains) -> str:
    """``A:120,B:98``: a chain layout as the manifest, FASTA headers and reports write it."""
    return ",".join(f"{c}:{n}" for c, n in chains)


def parse_chains(text: str) -> tuple[tuple[str, int], ...]:
    """Inverse of :func:`chains_text` (ValueError on anything else)."""
    out = []
    for part in filter(None, text.split(",")):
        cid, sep, n = part.rpartition(":")
        if not sep or not cid or not n.isdigit() or int(n) < 1:
            raise ValueError(f"bad chain layout {text[:60]!r} (expected e.g. A:120,B:98)")
        out.append((cid, int(n)))
    return tuple(out)


# --------------------------------------------------------------------------- token files


def _code_dtype(meta: dict):
    return np.uint16 if meta.get("codebook_size", 1 << 16) <= (1 << 16) else np.int32


def save_tokens(path: str, tokens: Iterable[Tokens], meta: dict) -> None:
    """Write tokens to a ``.npz`` file (format in the module docstring), atomically, in memory
    that does not grow with their number (:class:`NpzTokenWriter`; ``tokens`` may be a
    generator). An existing file is not overwritten (FileExistsError)."""
    with NpzTokenWriter(path, meta) as out:
        for t in tokens:
            out.add(t)


def load_tokens(path: str) -> tuple[list[Tokens], dict]:
    """Read a token file of any of the three formats (from its first bytes): ``(tokens,
    meta)``, the meta with ``family`` and ``codebook_size`` (None for FASTA, which records no
    tokenizer). Every ``.npz`` version (1, 2, 3) is read.

    Raises
    ------
    ValueError
        One line naming the file and what is wrong: not a token file, a missing key, bad
        metadata, arrays of the wrong type or shape, offsets that do not match the lengths,
        chain lengths that do not sum to a length, codes outside the codebook, a sequence
        whose length is not the protein's, duplicate or unsafe ids. Nothing is returned of a
        file with any such fault.
    """

    def bad(why: str) -> ValueError:
        return ValueError(f"{path}: {why}")

    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
    except OSError as exc:
        raise bad(f"unreadable ({exc.strerror or type(exc).__name__})") from None
    try:
        if head.startswith(b"PAR1"):
            tokens, meta = _read_parquet(path, bad)
        elif head.startswith(b">"):
            tokens, meta = _read_fasta(path, bad)
        else:
            tokens, meta = _read_npz(path, bad)
    except ValueError as exc:  # e.g. a chain layout that does not add up: name the file
        if str(exc).startswith(path):
            raise
        raise bad(str(exc)) from None
    _check_proteins(tokens, meta.get("codebook_size"), bad)
    return tokens, meta


def _check_proteins(tokens: list[Tokens], size: int | None, bad) -> None:
    """What every format must hold: unique safe ids (they become file names), lengths within
    the images protoken reads, a sequence of the protein's length (or none), and codes within
    the codebook (of size ``size``, when known)."""
    ids = [t.id for t in tokens]
    if len(set(ids)) != len(ids):
        raise bad("several proteins share an id (each would overwrite the other)")
    unsafe = [i for i in ids if not is_safe_id(i)]
    if unsafe:
        raise bad(f"unsafe id {unsafe[0][:40]!r} (ids become file names)")
    for t in tokens:
        if not 1 <= t.length <= MAX_IMAGE_SIDE:
            raise bad(f"{t.id}: length {t.length} outside 1..{MAX_IMAGE_SIDE}")
        if t.sequence and len(t.sequence) != t.length:
            raise bad(f"{t.id}: a sequence of {len(t.sequence)} residues for {t.length} "
                      "residues of codes")  # fmt: skip
        for codes in t.levels:
            codes = np.asarray(codes)
            if codes.size and (int(codes.min()) < 0 or (size and int(codes.max()) >= size)):
                top = f"0..{size - 1}" if size else "0.."
                raise bad(f"{t.id}: codes outside the codebook {top}")


def _read_npz(path: str, bad) -> tuple[list[Tokens], dict]:
    """The ``.npz`` format (module docstring), every field checked."""
    try:
        z = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise bad(f"not a token file ({type(exc).__name__})") from None
    if not hasattr(z, "files"):
        raise bad("not a token file (a bare array, not an .npz archive)")
    try:
        with z:
            arrays = {k: z[k] for k in z.files}
    except Exception as exc:  # a corrupt member: zlib, zipfile or numpy errors
        raise bad(f"unreadable archive member ({type(exc).__name__})") from None
    for key in ("format", "meta", "ids", "sequences", "lengths"):
        if key not in arrays:
            raise bad(f"missing {key!r}")
    fmt = str(arrays["format"])
    if fmt not in (TOKEN_FORMAT, _V2, _V1):
        raise bad(f"not a protoken token file (format {fmt[:40]!r})")
    try:
        meta = json.loads(str(arrays["meta"]))
    except ValueError:
        raise bad("meta is not JSON") from None
    if not isinstance(meta, dict):
        raise bad("meta is not a JSON object")
    if fmt == TOKEN_FORMAT:
        family = meta.get("family")
    elif fmt == _V2:
        family = _V2_LAYOUTS.get(meta.pop("layout", "grid"))
    else:
        family = "hierarchical"
    if family not in FAMILIES:
        raise bad(f"unknown family {str(family)[:40]!r}")
    meta["family"] = family
    ids, seqs, lengths = arrays["ids"], arrays["sequences"], arrays["lengths"]
    if ids.dtype.kind != "U" or seqs.dtype.kind != "U" or lengths.dtype.kind not in "iu":
        raise bad("ids and sequences must be strings, lengths integers")
    n = len(ids)
    if ids.shape != (n,) or seqs.shape != (n,) or lengths.shape != (n,):
        raise bad("ids, sequences and lengths must be (N,) arrays of one N")
    if n and (lengths.min() < 1 or lengths.max() > MAX_IMAGE_SIDE):
        raise bad(f"lengths must lie in 1..{MAX_IMAGE_SIDE}")
    size = meta.get("codebook_size")
    if not isinstance(size, int) or size < 1:
        raise bad("meta has no valid codebook_size")
    if family == "residue":
        scales, names = [1], [("codes", "offsets")]
    else:
        scales = meta.get("level_scales_coarse_first")
        if not isinstance(scales, list) or not scales or not all(
                isinstance(v, int) and v >= 1 for v in scales):  # fmt: skip
            raise bad("meta has no valid level_scales_coarse_first")
        names = [(f"level{lv}_codes", f"level{lv}_offsets") for lv in range(len(scales))]
    stages = meta.get("stages", 1) if family == "residue" else 1
    if not isinstance(stages, int) or stages < 1:
        raise bad("meta has no valid number of stages")
    per_level = []
    for (ck, ok), s in zip(names, scales, strict=True):
        if ck not in arrays or ok not in arrays:
            raise bad(f"missing {ck!r} or {ok!r}")
        codes, offsets = arrays[ck], arrays[ok]
        if codes.ndim != 1 or codes.dtype.kind not in "iu":
            raise bad(f"{ck} must be a 1-D integer array")
        if offsets.shape != (n + 1,) or offsets.dtype.kind not in "iu":
            raise bad(f"{ok} must be (N + 1,) integers")
        if family == "residue":
            sizes = lengths.astype(np.int64)
        else:
            sizes = np.ceil(lengths / s).astype(np.int64) ** 2
        expect = np.concatenate([[0], np.cumsum(sizes)])
        if not np.array_equal(offsets.astype(np.int64), expect) or len(codes) != expect[-1]:
            raise bad(f"{ok} do not match the lengths ({len(codes)} codes)")
        if len(codes) and (int(codes.min()) < 0 or int(codes.max()) >= size):
            raise bad(f"codes outside the codebook 0..{size - 1} in {ck}")
        per_level.append((codes, expect))
    later = []  # stages 2..K of the residue family, each with the first stage's offsets
    for k in range(2, stages + 1):
        codes = arrays.get(f"codes_stage{k}")
        if codes is None or codes.shape != per_level[0][0].shape or codes.dtype.kind not in "iu":
            raise bad(f"codes_stage{k} missing or not shaped as codes")
        if len(codes) and (int(codes.min()) < 0 or int(codes.max()) >= size):
            raise bad(f"codes outside the codebook 0..{size - 1} in codes_stage{k}")
        later.append(codes)
    chains = _chain_arrays(arrays, lengths, bad)
    numbering = None
    if "res_numbers" in arrays:
        nums, icodes = arrays["res_numbers"], arrays.get("res_icodes")
        total = int(lengths.astype(np.int64).sum())
        if (nums.shape != (total,) or nums.dtype.kind not in "iu" or icodes is None
                or icodes.shape != (total,) or icodes.dtype.kind != "u"):  # fmt: skip
            raise bad("res_numbers and res_icodes must hold one entry per residue")
        numbering = (nums, icodes, np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]))
    out = []
    for i, length in enumerate(lengths.tolist()):
        levels = []
        for (codes, off), s in zip(per_level, scales, strict=True):
            c = codes[off[i] : off[i + 1]].astype(np.int64)
            if family == "hierarchical":
                k = math.ceil(length / s)
                c = c.reshape(k, k)
            elif later:
                c = np.stack([c] + [x[off[i] : off[i + 1]].astype(np.int64) for x in later], 1)
            levels.append(c)
        res_ids = ()
        if numbering is not None:
            nums, icodes, off = numbering
            res_ids = join_res_ids(nums[off[i] : off[i + 1]], icodes[off[i] : off[i + 1]])
        out.append(Tokens(str(ids[i]), int(length), str(seqs[i]), levels, chains[i], res_ids))
    return out, meta


#: The longest line read from a FASTA token file: a header, or the codes of the longest
#: protein (MAX_IMAGE_SIDE codes of at most 10 digits and a space).
_MAX_LINE = 11 * MAX_IMAGE_SIDE + 1024


def _read_fasta(path: str, bad) -> tuple[list[Tokens], dict]:
    """Per-residue tokens as :class:`FastaTokenWriter` writes them: ``>ID length=L`` (with
    ``chains=`` and ``stages=K``), then K lines of L codes. No sequence and no tokenizer is
    recorded (``codebook_size`` None); every line is read bounded (:data:`_MAX_LINE`)."""
    out: list[Tokens] = []
    number = 0
    with open(path, encoding="utf-8", errors="replace") as fh:

        def line() -> str:
            nonlocal number
            text = fh.readline(_MAX_LINE)
            number += 1
            if len(text) >= _MAX_LINE:
                raise bad(f"line {number}: longer than {_MAX_LINE} characters")
            return text

        while head := line():
            if not head.strip():
                continue
            if not head.startswith(">") or not head[1:].split():
                raise bad(f"line {number}: not a '>ID length=L' header")
            words = head[1:].split()
            fields = dict(w.split("=", 1) for w in words[1:] if "=" in w)
            try:
                stages = int(fields.get("stages", 1))
                chains = parse_chains(fields.get("chains", ""))
            except ValueError:
                raise bad(f"line {number}: bad header {head.strip()[:80]!r}") from None
            if not 1 <= stages <= 64:
                raise bad(f"line {number}: stages={stages} out of range")
            rows = []
            for _ in range(stages):
                body = line()
                try:
                    rows.append(np.array([int(v) for v in body.split()], dtype=np.int64))
                except (ValueError, OverflowError):
                    raise bad(f"line {number}: codes must be whole numbers") from None
            length = len(rows[0])
            stated = fields.get("length")
            if stated is not None and stated != str(length):
                raise bad(f"line {number}: {length} codes for length={stated}")
            if any(len(r) != length for r in rows) or not length:
                raise bad(f"line {number}: expected {length} codes in each of {stages} stages")
            out.append(Tokens(words[0], length, "", [np.stack(rows, 1)], chains))
    if not out:
        raise bad("no token record")
    return out, {"family": "residue", "codebook_size": None}


def _read_parquet(path: str, bad) -> tuple[list[Tokens], dict]:
    """Per-residue tokens as :class:`ParquetTokenWriter` writes them (pyarrow)."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise bad("reading Parquet needs pyarrow: pip install pyarrow") from None
    try:
        table = pq.read_table(path)
    except Exception as exc:  # noqa: BLE001 - pyarrow's errors of a damaged file: one line
        raise bad(f"unreadable Parquet ({' '.join(str(exc).split())[:120]})") from None
    if not {"id", "sequence", "tokens", "length"} <= set(table.column_names):
        raise bad(f"not a token table (columns {table.column_names[:6]})")
    raw = (table.schema.metadata or {}).get(b"protoken", b"{}")
    try:
        meta = json.loads(raw)
    except ValueError:
        raise bad("the protoken metadata is not JSON") from None
    if not isinstance(meta, dict) or meta.get("family", "residue") != "residue":
        raise bad("the protoken metadata is not that of per-residue tokens")
    meta["family"] = "residue"
    meta.pop("layout", None)
    size = meta.get("codebook_size")
    if size is not None and (not isinstance(size, int) or size < 1):
        raise bad("meta has no valid codebook_size")
    cols = set(table.column_names)
    stage_cols = ["tokens"] + sorted((c for c in cols if c.startswith("tokens_")
                                      and c[7:].isdigit()), key=lambda c: int(c[7:]))  # fmt: skip
    out = []
    try:
        for row in table.to_pylist():
            length = int(row["length"])
            codes = [np.asarray(row[c], dtype=np.int64) for c in stage_cols]
            if any(c.shape != (length,) for c in codes):
                raise bad(f"{row['id']}: codes of a stage are not {length} long")
            chains = tuple(zip(row.get("chain_ids") or [], row.get("chain_lengths") or [],
                               strict=True))  # fmt: skip
            out.append(Tokens(str(row["id"]), length, str(row["sequence"] or ""),
                              [np.stack(codes, 1)], chains, row.get("res_ids") or ()))  # fmt: skip
    except (TypeError, ValueError, OverflowError) as exc:
        if str(exc).startswith(path):
            raise
        raise bad(
            f"a row of the wrong types or layout ({' '.join(str(exc).split())[:80]})"
        ) from None
    return out, meta


def _chain_arrays(arrays: dict, lengths: np.ndarray, bad) -> list[tuple]:
    """Each protein's chain layout from the ``chain_*`` members (none: every protein ())."""
    n = len(lengths)
    if "chain_offsets" not in arrays:
        return [()] * n
    ids, sizes, off = arrays.get("chain_ids"), arrays.get("chain_lengths"), arrays["chain_offsets"]
    if ids is None or sizes is None or ids.dtype.kind != "U" or sizes.dtype.kind not in "iu":
        raise bad("chain_ids must be strings and chain_lengths integers")
    if off.shape != (n + 1,) or off.dtype.kind not in "iu" or ids.shape != sizes.shape:
        raise bad("chain_offsets must be (N + 1,) integers over chain_ids and chain_lengths")
    off = off.astype(np.int64)
    if off[0] != 0 or off[-1] != len(ids) or (np.diff(off) < 0).any():
        raise bad("chain_offsets do not index chain_ids")
    out = []
    for i in range(n):
        part = sizes[off[i] : off[i + 1]].astype(np.int64)
        if len(part) and (part.min() < 1 or int(part.sum()) != int(lengths[i])):
            raise bad(f"the chain lengths of protein {i} do not sum to its length")
        out.append(tuple(zip(ids[off[i] : off[i + 1]].tolist(), part.tolist(), strict=True)))
    return out


def _residue_only_error(what: str) -> ValueError:
    return ValueError(
        f"{what} needs per-residue tokens (a residue-family tokenizer such as 'residue'); "
        "hierarchical tokens have no order aligned with the sequence"
    )


def save_tokens_fasta(path: str, tokens: Iterable[Tokens]) -> None:
    """Per-residue tokens as FASTA, for language models: one record per protein, ``>ID``
    then its codes as space-separated integers on one line, the i-th number belonging to the
    i-th residue of the amino-acid sequence (same ids and order as ``protoken convert``'s FASTA).
    Appended record by record (:class:`FastaTokenWriter`), atomically."""
    with FastaTokenWriter(path) as out:
        for t in tokens:
            out.add(t)


def save_tokens_parquet(path: str, tokens: Iterable[Tokens], meta: dict) -> None:
    """Per-residue tokens as a Parquet table (pyarrow): columns ``id`` (string), ``sequence``
    (string), ``tokens`` (list of uint16/int32, one per residue), ``length`` (int32); ``meta``
    is stored as the schema's ``protoken`` metadata (JSON). Written a row group at a time
    (:class:`ParquetTokenWriter`), atomically."""
    with ParquetTokenWriter(path, meta) as out:
        for t in tokens:
            out.add(t)


# --------------------------------------------------------------------------- streamed writers


class TokenWriter:
    """Write tokens to a file protein by protein, in memory that does not grow with their number.

    >>> with open_token_writer("t.npz", tok.meta()) as out:   # or format="fasta" / "parquet"
    ...     for t in tok.encode_many(paths):
    ...         out.add(t)

    The file is written under a temporary name (:func:`protoken.fileio.temp_name`) and gets its
    own name only when :meth:`close` finishes it, so a reader never sees a partial file: a run
    that fails or is interrupted removes the temporary file (leaving the block by an exception
    calls :meth:`abort`), and one that is killed leaves at most ``FILE.tmp<pid>``, which is not
    a token file. An existing file is never overwritten. Closing a writer to which nothing was
    added raises ValueError and writes nothing.
    """

    suffix = ""

    def __init__(self, path: str | os.PathLike, meta: dict | None = None):
        self.path = os.fspath(path)
        self.meta = dict(meta or {})
        self.count = 0
        self.family: str | None = None
        self.tmp = temp_name(self.path, self.suffix)
        self._done = False
        if os.path.lexists(self.path):
            raise FileExistsError(f"{self.path} exists (not overwritten)")

    def add(self, tokens: Tokens) -> None:
        """Append one protein's tokens."""
        if self._done:
            raise ValueError(f"{self.path}: writer already closed")
        if self.family is None:
            self.family = tokens.family
            self._start()
        elif tokens.family != self.family:
            raise ValueError(f"{self.path}: tokens of both families in one file")
        self._add(tokens)
        self.count += 1

    def close(self) -> None:
        """Finish the file and give it its name (ValueError, and no file, if it is empty)."""
        if self._done:
            return
        if self.count == 0:
            self.abort()
            raise ValueError("no tokens to save")
        try:
            self._finish()
        except BaseException:
            self.abort()
            raise
        self._done = True
        if not publish(self.tmp, self.path):  # the finished temporary file is kept
            raise FileExistsError(f"{self.path} appeared while it was being written; not "
                                  f"overwritten (the tokens are kept in {self.tmp})")  # fmt: skip

    def abort(self) -> None:
        """Stop writing and remove the temporary file (the named file is never created)."""
        self._done = True
        self._cleanup()
        try:
            os.unlink(self.tmp)
        except OSError:
            pass

    def __enter__(self) -> TokenWriter:
        return self

    def __exit__(self, kind, exc, tb) -> None:
        if kind is None:
            self.close()
        else:
            self.abort()

    # what each format does
    def _start(self) -> None:
        raise NotImplementedError

    def _add(self, tokens: Tokens) -> None:
        raise NotImplementedError

    def _finish(self) -> None:
        raise NotImplementedError

    def _cleanup(self) -> None:
        pass


class _Spool:
    """One field of an ``.npz`` token file, spooled to an anonymous temporary file (deleted by
    the OS however the run ends) while the proteins stream by."""

    def __init__(self, folder: str):
        import tempfile

        self.fh = tempfile.TemporaryFile(dir=folder, prefix=".protoken-spool")
        self.items = 0

    def close(self) -> None:
        self.fh.close()


class NpzTokenWriter(TokenWriter):
    """The ``.npz`` token file (module docstring), written in memory O(one protein).

    Each field is spooled to an anonymous temporary file as proteins arrive (codes as raw
    integers, ids and sequences as length-prefixed UTF-8, the lengths); :meth:`close` then
    writes every field as a deflated ``.npy`` member of the zip archive, streamed from its spool
    in 1 MB blocks (the offsets computed from the lengths, strings padded to the longest), so
    the file is byte-for-byte the format :func:`load_tokens` and plain ``numpy.load`` read.
    """

    suffix = ".npz"
    _BLOCK = 1 << 16  # records per block when the spools are copied into the archive

    def _start(self) -> None:
        self.meta = {**self.meta, "family": self.family}
        self.dtype = np.dtype(_code_dtype(self.meta))
        folder = os.path.dirname(os.path.abspath(self.path))
        self.ids, self.seqs, self.lengths = _Spool(folder), _Spool(folder), _Spool(folder)
        self.levels: list[_Spool] = []
        self.n_levels = 0
        self.max_id = self.max_seq = 1

    def _add(self, t: Tokens) -> None:
        folder = os.path.dirname(os.path.abspath(self.path))
        # the residue family's stages are spooled as columns, grids level by level
        parts = ([t.stages[:, k] for k in range(t.n_stages)] if self.family == "residue"
                 else list(t.levels))  # fmt: skip
        if not self.levels:
            self.n_levels = len(parts)
            self.levels = [_Spool(folder) for _ in range(self.n_levels)]
            self.chain_ids, self.chain_sizes = _Spool(folder), _Spool(folder)
            self.chain_counts = _Spool(folder)
            self.res_numbers, self.res_icodes = _Spool(folder), _Spool(folder)
            self.numbered = True
            self.max_chain = 1
            if self.family == "residue":
                self.meta["stages"] = self.n_levels
        if len(parts) != self.n_levels:
            what = "stages" if self.family == "residue" else "levels"
            raise ValueError(f"{t.id}: {len(parts)} {what}, the file has {self.n_levels}")
        for spool, text in ((self.ids, t.id), (self.seqs, t.sequence)):
            data = text.encode("utf-8", "surrogatepass")
            spool.fh.write(len(data).to_bytes(4, "little") + data)
        self.max_id = max(self.max_id, len(t.id))
        self.max_seq = max(self.max_seq, len(t.sequence))
        self.lengths.fh.write(np.int32(t.length).tobytes())
        for spool, grid in zip(self.levels, parts, strict=True):
            spool.fh.write(np.asarray(grid).ravel().astype(self.dtype).tobytes())
            spool.items += int(np.size(grid))
        self.chain_counts.fh.write(np.int32(len(t.chains)).tobytes())
        for cid, n in t.chains:
            data = cid.encode("utf-8", "surrogatepass")
            self.chain_ids.fh.write(len(data).to_bytes(4, "little") + data)
            self.chain_sizes.fh.write(np.int32(n).tobytes())
            self.max_chain = max(self.max_chain, len(cid))
        self.chain_ids.items += len(t.chains)
        numbering = split_res_ids(t.res_ids) if t.res_ids and self.numbered else None
        if numbering is None:
            self.numbered = False  # one protein without (parseable) numbering: none written
        else:
            self.res_numbers.fh.write(numbering[0].tobytes())
            self.res_icodes.fh.write(numbering[1].tobytes())
            self.res_numbers.items += len(numbering[0])

    def _finish(self) -> None:
        import zipfile

        n = self.count
        with zipfile.ZipFile(self.tmp, "w", zipfile.ZIP_DEFLATED, allowZip64=True) as zf:
            self._member(zf, "format", np.array(TOKEN_FORMAT))
            self._member(zf, "meta", np.array(json.dumps(self.meta)))
            self._strings(zf, "ids", self.ids, self.max_id, n)
            self._strings(zf, "sequences", self.seqs, self.max_seq, n)
            self._copy(zf, "lengths", self.lengths, np.dtype(np.int32), n)
            if self.family == "residue":  # stage 1 as format 2 had it, then the others
                names = ["codes"] + [f"codes_stage{k}" for k in range(2, self.n_levels + 1)]
            else:
                names = [f"level{lv}_codes" for lv in range(self.n_levels)]
            for lv, (key, spool) in enumerate(zip(names, self.levels, strict=True)):
                self._copy(zf, key, spool, self.dtype, spool.items)
                if self.family != "residue" or lv == 0:
                    off = "offsets" if self.family == "residue" else f"level{lv}_offsets"
                    self._offsets(zf, off, lv)
            if self.chain_ids.items:
                c = self.chain_ids.items
                self._strings(zf, "chain_ids", self.chain_ids, self.max_chain, c)
                self._copy(zf, "chain_lengths", self.chain_sizes, np.dtype(np.int32), c)
                self.chain_counts.fh.seek(0)
                counts = np.frombuffer(self.chain_counts.fh.read(), dtype=np.int32)
                offsets = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
                self._member(zf, "chain_offsets", offsets)
            if self.numbered:
                r = self.res_numbers.items
                self._copy(zf, "res_numbers", self.res_numbers, np.dtype(np.int32), r)
                self._copy(zf, "res_icodes", self.res_icodes, np.dtype(np.uint8), r)
        self._cleanup()

    def _cleanup(self) -> None:
        for spool in (getattr(self, "ids", None), getattr(self, "seqs", None),
                      getattr(self, "lengths", None), *getattr(self, "levels", []),
                      getattr(self, "chain_ids", None), getattr(self, "chain_sizes", None),
                      getattr(self, "chain_counts", None), getattr(self, "res_numbers", None),
                      getattr(self, "res_icodes", None)):  # fmt: skip
            if spool is not None:
                spool.close()

    @staticmethod
    def _open(zf, name: str, dtype: np.dtype, shape: tuple):
        fh = zf.open(name + ".npy", "w", force_zip64=True)
        header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
                  "shape": shape}  # fmt: skip
        np.lib.format.write_array_header_1_0(fh, header)
        return fh

    def _member(self, zf, name: str, array: np.ndarray) -> None:
        with zf.open(name + ".npy", "w", force_zip64=True) as fh:
            np.lib.format.write_array(fh, array, allow_pickle=False)

    def _copy(self, zf, name: str, spool: _Spool, dtype: np.dtype, items: int) -> None:
        spool.fh.flush()
        spool.fh.seek(0)
        with self._open(zf, name, dtype, (items,)) as fh:
            for block in iter(lambda: spool.fh.read(1 << 20), b""):
                fh.write(block)

    def _strings(self, zf, name: str, spool: _Spool, width: int, count: int) -> None:
        dtype = np.dtype(f"<U{width}")
        spool.fh.flush()
        spool.fh.seek(0)
        read = spool.fh.read
        per_block = max(1, (1 << 20) // dtype.itemsize)  # about 1 MB of padded strings
        with self._open(zf, name, dtype, (count,)) as fh:
            left = count
            while left:
                k = min(left, per_block)
                texts = []
                for _ in range(k):
                    size = int.from_bytes(read(4), "little")
                    texts.append(read(size).decode("utf-8", "surrogatepass"))
                fh.write(np.array(texts, dtype=dtype).tobytes())
                left -= k

    def _offsets(self, zf, name: str, lv: int) -> None:
        scale = 1 if self.family == "residue" else self.meta["level_scales_coarse_first"][lv]
        self.lengths.fh.seek(0)
        with self._open(zf, name, np.dtype(np.int64), (self.count + 1,)) as fh:
            fh.write(np.zeros(1, np.int64).tobytes())
            total = 0
            while True:
                data = self.lengths.fh.read(4 * self._BLOCK)
                if not data:
                    break
                lengths = np.frombuffer(data, dtype=np.int32).astype(np.int64)
                sizes = lengths if self.family == "residue" else (-(-lengths // scale)) ** 2
                ends = total + np.cumsum(sizes)
                fh.write(ends.astype(np.int64).tobytes())
                total = int(ends[-1])


def fasta_header(t: Tokens) -> str:
    """``>ID length=L`` plus `` chains=A:120,B:98`` (a complex) and `` stages=K`` (K > 1)."""
    head = f">{t.id} length={t.length}"
    if t.chains:
        head += f" chains={chains_text(t.chains)}"
    if t.n_stages > 1:
        head += f" stages={t.n_stages}"
    return head


class FastaTokenWriter(TokenWriter):
    """Per-residue tokens as FASTA (:func:`save_tokens_fasta`), appended record by record."""

    def _start(self) -> None:
        if self.family != "residue":
            raise _residue_only_error("--format fasta")
        self.fh = open(self.tmp, "w")

    def _add(self, t: Tokens) -> None:
        self.fh.write(_fasta_record(t))

    def _finish(self) -> None:
        self.fh.close()

    def _cleanup(self) -> None:
        fh = getattr(self, "fh", None)
        if fh is not None:
            fh.close()


class ParquetTokenWriter(TokenWriter):
    """Per-residue tokens as Parquet (:func:`save_tokens_parquet`), one row group per
    ``row_group`` proteins (``pyarrow.parquet.ParquetWriter``): memory O(row_group), the codes
    buffered as uint16 (int32 for codebooks over 65536)."""

    suffix = ".parquet"

    def __init__(self, path, meta=None, row_group: int = 1024):
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            raise ValueError("parquet needs pyarrow: pip install pyarrow") from None
        super().__init__(path, meta)
        self.pa, self.pq, self.row_group = pa, pq, row_group
        self.rows: list[Tokens] = []
        self.writer = None

    def _start(self) -> None:
        if self.family != "residue":
            raise _residue_only_error("--format parquet")
        self.np_type = _code_dtype(self.meta)
        self.code_type = self.pa.uint16() if self.np_type == np.uint16 else self.pa.int32()
        self.n_stages = None

    def _open(self, n_stages: int) -> None:
        pa = self.pa
        self.n_stages = n_stages
        meta = json.dumps({**self.meta, "family": "residue", "stages": n_stages})
        fields = [("id", pa.string()), ("sequence", pa.string()),
                  ("tokens", pa.list_(self.code_type))]  # fmt: skip
        fields += [(f"tokens_{k}", pa.list_(self.code_type)) for k in range(2, n_stages + 1)]
        fields += [("length", pa.int32()), ("chain_ids", pa.list_(pa.string())),
                   ("chain_lengths", pa.list_(pa.int32())),
                   ("res_ids", pa.list_(pa.string()))]  # fmt: skip
        self.writer = self.pq.ParquetWriter(
            self.tmp, pa.schema(fields, metadata={"protoken": meta})
        )

    def _add(self, t: Tokens) -> None:
        if self.writer is None:
            self._open(t.n_stages)
        if t.n_stages != self.n_stages:
            raise ValueError(f"{t.id}: {t.n_stages} stages, the file has {self.n_stages}")
        self.rows.append((t.id, t.sequence, t.stages.astype(self.np_type), t.length, t.chains,
                          list(t.res_ids)))  # fmt: skip
        if len(self.rows) >= self.row_group:
            self._flush()

    def _flush(self) -> None:
        if not self.rows:
            return
        pa = self.pa
        ids, seqs, codes, lengths, chains, res_ids = zip(*self.rows, strict=True)
        offsets = pa.array(np.concatenate([[0], np.cumsum([len(c) for c in codes])]), pa.int32())
        columns = {"id": pa.array(ids, pa.string()), "sequence": pa.array(seqs, pa.string())}
        for k in range(self.n_stages):
            values = pa.array(np.concatenate([c[:, k] for c in codes]), self.code_type)
            columns["tokens" if k == 0 else f"tokens_{k + 1}"] = pa.ListArray.from_arrays(
                offsets, values
            )
        columns["length"] = pa.array(lengths, pa.int32())
        columns["chain_ids"] = pa.array([[c for c, _ in ch] for ch in chains],
                                        pa.list_(pa.string()))  # fmt: skip
        columns["chain_lengths"] = pa.array([[n for _, n in ch] for ch in chains],
                                            pa.list_(pa.int32()))  # fmt: skip
        columns["res_ids"] = pa.array(res_ids, pa.list_(pa.string()))
        self.writer.write_table(pa.table(columns, schema=self.writer.schema),
                                row_group_size=len(ids))  # fmt: skip
        self.rows = []

    def _finish(self) -> None:
        self._flush()
        self.writer.close()
        self.writer = None

    def _cleanup(self) -> None:
        self.rows = []
        if self.writer is not None:
            try:
                self.writer.close()
            except Exception:  # noqa: BLE001 - closing a half-written file on the way out
                pass
            self.writer = None


#: ``--format`` -> writer class.
WRITERS = {"npz": NpzTokenWriter, "fasta": FastaTokenWriter, "parquet": ParquetTokenWriter}


def _fasta_record(t: Tokens) -> str:
    return (
        fasta_header(t)
        + "\n"
        + "".join(" ".join(map(str, t.stages[:, k].tolist())) + "\n" for k in range(t.n_stages))
    )


class StdoutFastaWriter:
    """FASTA tokens written straight to standard output, record by record (a pipe: no
    temporary file, nothing to publish); the interface of :class:`TokenWriter`."""

    def __init__(self, stream=None):
        import sys

        self.stream = stream or sys.stdout
        self.path, self.count, self.family = "-", 0, None

    def add(self, tokens: Tokens) -> None:
        if tokens.family != "residue":
            raise _residue_only_error("--format fasta")
        self.stream.write(_fasta_record(tokens))
        self.count += 1

    def close(self) -> None:
        self.stream.flush()

    abort = close


#: Names that mean standard output (``--out -``).
STDOUT = ("-", "/dev/stdout")


def open_token_writer(path: str | os.PathLike, meta: dict | None = None,
                      format: str = "npz") -> TokenWriter:  # fmt: skip
    """A :class:`TokenWriter` of ``format`` (``"npz"``, ``"fasta"`` or ``"parquet"``); for
    ``path`` ``-`` or ``/dev/stdout`` (FASTA only) a :class:`StdoutFastaWriter`."""
    if format not in WRITERS:
        raise ValueError(f"unknown token format {format!r} (one of {', '.join(WRITERS)})")
    if os.fspath(path) in STDOUT:
        if format != "fasta":
            raise ValueError(f"--format {format} cannot be written to standard output "
                             "(--format fasta can)")  # fmt: skip
        return StdoutFastaWriter()
    return WRITERS[format](path, meta)
