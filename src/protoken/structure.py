"""Reading protein structure files into backbones, and writing structures back out.

Supported inputs: PDB (``.pdb``, ``.ent`` or no extension), mmCIF (``.cif``, ``.mmcif``) and
BinaryCIF (``.bcif``), each optionally gzipped. Compression is detected from the file's magic
bytes, so a gzip stream is read whatever its name, and a ``.gz`` name over plain data is an error.

Readers: gemmi parses PDB and mmCIF (about 20x faster than biotite's ``PDBFile`` on the test
structures, see ``benchmarks/convert.py``); biotite reads BinaryCIF, which gemmi cannot, and is the
fallback for the PDB files gemmi rejects (MODEL without ENDMDL). PDB files whose charge columns
(79-80) hold other data are read by gemmi without those two columns.

Only amino-acid residues are kept: the 20 standard ones, ``UNK``, the reference design's map of
145 non-standard residues (``MSE`` -> ``MET`` ...) and every other residue gemmi's component
table knows as an amino acid (``MLY``, ``M3L`` ... -> the parent's letter, else ``X``); see
:func:`amino_letter`. Residues are dropped, and counted in ``Backbone.dropped``, when an amino
acid lacks any of N, CA, C, or when a residue of a protein chain that is not a known amino acid
has N, CA and C (a modified residue no table knows: dropping it silently would make its
neighbours look adjacent). The first alternate location is used. Insertion codes are separate
residues, in file order.

Complexes (``chains="complex"``): all protein chains of the model read go into one Backbone, in
file order, with the chain layout (``Backbone.chains``: chain id and residues of each) and the
author numbering (``Backbone.res_ids``, number plus insertion code) beside the concatenated
residues; chains of fewer than :data:`MIN_CHAIN_LEN` residues are dropped and recorded
(``dropped_chains``). Refused with a reason: chains that clash (the same coordinates twice,
superposed models), one chain id for two chains (numbering repeats within it), ids the layout
cannot record. :func:`structure_to_text` writes a layout back (TER between chains in PDB).

Hostile files are bounded: at most ``max_bytes`` (:data:`DEFAULT_MAX_BYTES`) are read or
inflated from gzip, as a stream, and a gzip stream of binary data is refused after its first
block; a backbone whose coordinates are degenerate (all zero, repeated, consecutive CA atoms
closer than 0.5 A for most of the chain) is refused with a reason.

One module of ~1100 lines on purpose: the two parser backends feed one reading policy (which
residues are kept, chain and model policies, the bounds), and the writer is its inverse;
split by backend, each part would only make sense beside the others.
"""

from __future__ import annotations

import csv
import io
import os
import re
import warnings
import zlib
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources

import numpy as np

from protoken.fileio import atomic_write
from protoken.inputs import chain_output_id, structure_id

__all__ = [
    "AMINO_ACIDS",
    "CHAIN_POLICIES",
    "DEFAULT_MAX_BYTES",
    "MODEL_POLICIES",
    "Backbone",
    "SkipStructure",
    "StructureError",
    "THREE_TO_ONE",
    "CLASH_DISTANCE",
    "CLASH_PAIRS",
    "MIN_CHAIN_LEN",
    "amino_letter",
    "chain_index",
    "format_chains",
    "one_letter",
    "parse_chains",
    "read_backbones",
    "structure_to_text",
    "write_structure",
]

#: The 20 standard amino acids and UNK, three-letter -> one-letter.
THREE_TO_ONE: dict[str, str] = {
    "ALA": "A", "ARG": "R", "ASN": "N", "ASP": "D", "CYS": "C", "GLN": "Q", "GLU": "E",
    "GLY": "G", "HIS": "H", "ILE": "I", "LEU": "L", "LYS": "K", "MET": "M", "PHE": "F",
    "PRO": "P", "SER": "S", "THR": "T", "TRP": "W", "TYR": "Y", "VAL": "V", "UNK": "X",
}  # fmt: skip
ONE_TO_THREE: dict[str, str] = {v: k for k, v in THREE_TO_ONE.items()}


def _load_nonstandard() -> dict[str, str]:
    text = resources.files("protoken").joinpath("resources/nonstandard-residues.tsv").read_text()
    rows = csv.DictReader(io.StringIO(text), delimiter="\t")
    return {r["nonstandard"]: r["standard"] for r in rows}


#: The reference design's map of non-standard residue names to the standard residue they stand for.
NONSTANDARD: dict[str, str] = _load_nonstandard()

#: The residue names of the reference design (20 standard, UNK and its 145 non-standard
#: residues), mapped to their one-letter code; :func:`amino_letter` also knows gemmi's table.
AMINO_ACIDS: dict[str, str] = {
    **{name: THREE_TO_ONE[std] for name, std in NONSTANDARD.items()},
    **THREE_TO_ONE,
}

#: Default of ``max_bytes`` (``protoken convert --max-bytes``): the most bytes read from a file,
#: or inflated from a gzip stream, 1 GiB. The largest entry of the PDB, the HIV capsid 3J3Q
#: (2.44 million atoms), is about 0.2-0.25 GB of mmCIF at 80-100 bytes per atom line (78 in the
#: test entries); PDB-format files stop at 99,999 atoms (< 10 MB) and AlphaFold DB models are a
#: few MB. 1 GiB keeps 4x headroom over the largest real entry, while a gzip bomb (14 MB of
#: zeros inflate to 14 GB) is stopped after 1 GiB, or after its first block when it inflates
#: to binary data.
DEFAULT_MAX_BYTES = 1 << 30


@lru_cache(maxsize=4096)  # bounded: residue names come from hostile files
def amino_letter(res_name: str) -> str | None:
    """One-letter code of a residue name if it is an amino acid, else None.

    The reference design's names (:data:`AMINO_ACIDS`) come first; then gemmi's table of
    chemical components (``gemmi.find_tabulated_residue``, a few hundred common components):
    an amino acid there (``MLY``, ``M3L``, D-amino acids ...) gets its parent's letter when that
    is one of the 20, else ``X``.
    """
    if res_name in AMINO_ACIDS:
        return AMINO_ACIDS[res_name]
    import gemmi

    info = gemmi.find_tabulated_residue(res_name)
    if info is None or not info.is_amino_acid():
        return None
    letter = info.one_letter_code.upper()
    return letter if letter in ONE_TO_THREE else "X"


BACKBONE_ATOMS = ("N", "CA", "C")

#: ``chains`` policies of :func:`read_backbones` (files with several protein chains).
CHAIN_POLICIES = ("skip-multi", "split", "first", "complex")

#: ``chains="complex"``: chains of fewer residues are dropped from the complex and recorded
#: (``Backbone.dropped_chains``), not read as partners: 1-4 residue fragments are crystallisation
#: debris, modified residues given their own chain id, or termini the model left apart; a peptide
#: partner of 5 residues or more is kept.
MIN_CHAIN_LEN = 5

#: ``chains="complex"``: two residues of different chains whose CA atoms are closer than this
#: (Angstrom) clash; real contacts keep CA atoms 3.3 A apart or more (every multi-chain file of
#: ../shared/data/structures and of the BM5 complexes: the closest pair is 3.26 A, in 1tim).
CLASH_DISTANCE = 2.0
#: ``chains="complex"``: a file with at least this many clashing residue pairs of different
#: chains is refused (chains that overlap: the same coordinates twice, superposed models).
CLASH_PAIRS = 3
#: ``models`` policies of :func:`read_backbones` (files with several models).
MODEL_POLICIES = ("skip-multi", "first")

_PDB_RECORDS = (b"ATOM", b"HETATM", b"HEADER", b"MODEL", b"REMARK", b"CRYST1", b"TITLE", b"COMPND")


class StructureError(Exception):
    """A file that cannot be read as a structure (status ``failed``)."""


class SkipStructure(Exception):
    """A readable file that yields no backbone under the chosen policy (status ``skipped``)."""


@dataclass
class Backbone:
    """The backbone of one protein chain, or of a complex (several chains one after the other),
    residues in file order.

    Attributes
    ----------
    id : str
        Output identifier: the file stem, plus ``_CHAIN`` in ``split`` mode.
    sequence : str
        One-letter sequence, one letter per residue (``X`` for UNK); a complex's chains are
        concatenated, with no letter for the breaks (see ``chains``).
    coords : ndarray, shape (L, 3, 3), float64
        Coordinates in Angstrom of N, CA, C (axis 1, in that order) of each residue.
    chain_id : str
        The chain's (author) identifier in the file; of a complex, its first chain's.
    dropped : int
        Residues dropped: amino acids lacking N, CA or C, residues with N, CA and C that are no
        known amino acid, and the residues of the chains in ``dropped_chains``.
    res_names : list of str
        Residue names as in the file (``MSE``, ``ALA`` ...), one per residue.
    res_ids : list of str
        Author residue number and insertion code of each residue (``"12"``, ``"12A"``,
        ``"-3"``); numbered ``"1"``..``"L"`` when not given.
    chains : tuple of (str, int)
        The chain layout: (chain id, residues) of each chain, in order; the counts sum to L.
        ``((chain_id, L),)`` for one chain (the default).
    dropped_chains : tuple of (str, int)
        ``chains="complex"``: chains left out of the complex for having fewer than
        :data:`MIN_CHAIN_LEN` residues, (chain id, residues).
    """

    id: str
    sequence: str
    coords: np.ndarray
    chain_id: str = "A"
    dropped: int = 0
    res_names: list[str] = field(default_factory=list)
    res_ids: list[str] = field(default_factory=list)
    chains: tuple[tuple[str, int], ...] = ()
    dropped_chains: tuple[tuple[str, int], ...] = ()

    def __post_init__(self) -> None:
        length = len(self.sequence)
        if not self.res_ids:
            self.res_ids = [str(i) for i in range(1, length + 1)]
        if not self.chains:
            self.chains = ((self.chain_id, length),)
        self.chains = tuple((str(c), int(n)) for c, n in self.chains)
        if sum(n for _, n in self.chains) != length or len(self.res_ids) != length:
            raise ValueError(
                f"{self.id}: chain layout {format_chains(self.chains)} and "
                f"{len(self.res_ids)} residue ids for a sequence of {length} residues"
            )

    def __len__(self) -> int:
        return len(self.sequence)

    @property
    def chain_index(self) -> np.ndarray:
        """(L,) int: the index of each residue's chain in :attr:`chains` (0, 0, ..., 1, ...)."""
        return chain_index(self.chains)

    @property
    def chain_ids(self) -> list[str]:
        """(L,) list of str: each residue's chain id."""
        return [c for c, n in self.chains for _ in range(n)]

    @property
    def n(self) -> np.ndarray:
        return self.coords[:, 0]

    @property
    def ca(self) -> np.ndarray:
        return self.coords[:, 1]

    @property
    def c(self) -> np.ndarray:
        return self.coords[:, 2]


@dataclass
class _Chain:
    """Amino-acid residues of one chain: names, author numbers (with insertion code) and N/CA/C
    coordinates (NaN where missing), and the number of residues with N, CA and C that are no
    known amino acid (``unknown``)."""

    chain_id: str
    res_names: list[str]
    coords: np.ndarray  # (n, 3, 3)
    res_ids: list[str]
    unknown: int = 0


def _res_ids(numbers, icodes) -> list[str]:
    """Author residue ids from numbers and insertion-code characters (int codes; 0 or 32 for
    none): ``"12"``, ``"12A"``."""
    out = list(map(str, numbers))
    for i in np.flatnonzero((np.asarray(icodes) != 0) & (np.asarray(icodes) != 32)).tolist():
        out[i] += chr(int(icodes[i]) & 0xFF)
    return out


def one_letter(res_name: str) -> str:
    """One-letter code of an amino-acid residue name (``MSE`` -> ``M``, ``MLY`` -> ``K``,
    ``UNK`` -> ``X``); KeyError for a name that is no amino acid."""
    letter = amino_letter(res_name)
    if letter is None:
        raise KeyError(res_name)
    return letter


def _format_of(path: str) -> str:
    name = os.path.basename(path).lower()
    if name.endswith(".gz"):
        name = name[:-3]
    if name.endswith(".bcif"):
        return "bcif"
    if name.endswith((".cif", ".mmcif")):
        return "cif"
    return "pdb"


def _read_bytes(path: str, max_bytes: int = DEFAULT_MAX_BYTES, text: bool = True) -> bytes:
    """The bytes of a file, inflated when they are gzip (detected from the magic bytes), never
    more than ``max_bytes`` of them (StructureError beyond). ``text``: refuse a gzip stream
    whose first inflated block holds NUL bytes at once (binary data, e.g. a bomb of zeros)."""
    with open(path, "rb") as fh:
        head = fh.read(2)
        if head == b"\x1f\x8b":
            raw = _inflate(fh, head, max_bytes, text)
        elif path.lower().endswith(".gz"):
            raise StructureError("named .gz but not gzip-compressed")
        else:
            raw = head + fh.read(max_bytes + 1 - len(head))  # bounded even if stat would lie
            if len(raw) > max_bytes:
                raise StructureError(f"larger than --max-bytes ({max_bytes} bytes)")
    if not raw.strip():
        raise StructureError("empty file")
    return raw


def _bytes_given(data: bytes, name: str, max_bytes: int, text: bool) -> bytes:
    """:func:`_read_bytes` for bytes already in memory (an archive member named ``name``)."""
    if data[:2] == b"\x1f\x8b":
        raw = _inflate(io.BytesIO(data[2:]), data[:2], max_bytes, text)
    elif name.lower().endswith(".gz"):
        raise StructureError("named .gz but not gzip-compressed")
    else:
        if len(data) > max_bytes:
            raise StructureError(f"larger than --max-bytes ({max_bytes} bytes)")
        raw = bytes(data)
    if not raw.strip():
        raise StructureError("empty file")
    return raw


def _inflate(fh, head: bytes, max_bytes: int, text: bool) -> bytes:
    """Inflate a gzip file (several members allowed) as a stream, at most ``max_bytes``."""
    chunks: list[bytes] = []
    total = 0
    inflater = zlib.decompressobj(wbits=31)
    data = head
    checked = not text
    pending = False  # zlib may hold output beyond the last cap, with no input left
    try:
        while True:
            if not data and not pending:
                data = fh.read(1 << 20)
                if not data:
                    break
            cap = min(max_bytes + 1 - total, 1 << 20)  # 1 MB of output at a time, at most
            out = inflater.decompress(data, cap)
            data = inflater.unconsumed_tail
            pending = len(out) == cap and not inflater.eof
            chunks.append(out)
            total += len(out)
            if total > max_bytes:
                raise StructureError(
                    f"inflates to more than --max-bytes ({max_bytes} bytes): not read further"
                )
            if not checked and (total >= 4096 or inflater.eof):
                checked = True
                if b"\x00" in b"".join(chunks)[:4096]:
                    raise StructureError("binary data, not a text structure file")
            if inflater.eof:  # a further member may follow (concatenated gzip files)
                rest = inflater.unused_data
                if len(rest) < 2:
                    rest += fh.read(2 - len(rest))
                if rest[:2] != b"\x1f\x8b":  # trailing bytes (padding) are ignored, as gzip does
                    break
                inflater = zlib.decompressobj(wbits=31)
                data = rest
    except zlib.error as exc:
        raise StructureError(f"corrupt or truncated gzip stream ({exc})") from None
    if not inflater.eof:
        raise StructureError("corrupt or truncated gzip stream (it ends before its end marker)")
    return b"".join(chunks)


def _decode_text(raw: bytes) -> str:
    head = raw[:4096]
    if b"\x00" in head:
        raise StructureError("binary data, not a text structure file")
    low = head.lstrip()[:200].lower()
    if low.startswith((b"<!doctype", b"<html", b"<?xml", b"<head", b"<body")):
        raise StructureError("an HTML/XML page, not a structure file (a failed download?)")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _end_records(text: str) -> list[tuple[int, int]]:
    """(start, end) of each ``END`` record line (not ENDMDL), found with str.find."""
    out = []
    at = 0 if text.startswith("END") else (text.find("\nEND") + 1 or -1)
    while at >= 0:
        stop = text.find("\n", at)
        stop = len(text) if stop < 0 else stop + 1
        if text[at + 3 : at + 4] in ("", "\n", "\r", " ", "\t"):
            out.append((at, stop))
        nxt = text.find("\nEND", stop - 1)
        at = nxt + 1 if nxt >= 0 else -1
    return out


def _split_pdb_models_on_end(text: str) -> list[str]:
    """Split PDB text at ``END`` records that are followed by more coordinates.

    The PDB format ends an entry with ``END``; some tools concatenate several models that way,
    without MODEL records. Each part that holds coordinates is returned (END lines left out).
    """
    ends = _end_records(text)
    if not ends:
        return [text]
    starts = [0, *(b for _, b in ends)]
    stops = [*(a for a, _ in ends), len(text)]
    parts = [text[a:b] for a, b in zip(starts, stops, strict=True)]
    with_atoms = [p for p in parts if "ATOM  " in p or "HETATM" in p]
    return with_atoms or [text]


def _check_pdb_complete(text: str) -> None:
    """Reject a PDB text cut inside a coordinate record (an interrupted download).

    A complete file ends with a newline; one that does not, and whose last line is a coordinate
    record too short to hold x, y and z (or a cut record name such as ``ATO``), was truncated.
    """
    if text.endswith("\n"):
        return
    tail = text.rsplit("\n", 1)[-1].rstrip("\r")
    record = tail[:6]
    cut_name = len(tail) < 6 and ("ATOM  ".startswith(tail) or "HETATM".startswith(tail))
    if cut_name or (record in ("ATOM  ", "HETATM") and len(tail.rstrip()) < 54):
        raise StructureError("truncated: the last coordinate record is cut short")


# --------------------------------------------------------------------------- gemmi backend


def _u64(names: list[str]) -> np.ndarray:
    """Names as the uint64 view of their 8-byte (S8) form, for fast vectorised comparisons."""
    return np.array([n.encode() for n in names], dtype="S8").view("<u8")


_BACKBONE_U64 = _u64(list(BACKBONE_ATOMS))


def _letters_of(names_u64: np.ndarray) -> np.ndarray:
    """Per residue (names as from :func:`_u64`), its one-letter code as uint8, 0 if it is no
    amino acid (:func:`amino_letter`, looked up once per distinct name)."""
    uniq, inverse = np.unique(names_u64, return_inverse=True)
    names = uniq.view("S8")
    table = np.array(
        [ord(amino_letter(n.decode("latin-1")) or "\0") for n in names.tolist()], dtype=np.uint8
    )
    return table[inverse.ravel()]


def _first_of_runs(sorted_ids: np.ndarray) -> np.ndarray:
    """Positions of the first element of each run of equal values in a sorted array."""
    head = np.ones(len(sorted_ids), dtype=bool)
    head[1:] = sorted_ids[1:] != sorted_ids[:-1]
    return np.flatnonzero(head)


def _chains_from_gemmi(st) -> list[_Chain]:
    """Amino-acid residues of the first model, per chain name, from gemmi's flat atom table.

    Vectorised over atoms (gemmi.FlatStructure, names compared as 8-byte integers) rather than
    a Python loop over residues. Residues are gemmi's, in file order. Altlocs are resolved here
    rather than with gemmi's ``remove_alternative_conformations``, which also deletes residues
    whose number repeats anywhere in a chain (several copies in one chain id, numbering
    restarted): N, CA and C are taken from the first altloc found on the residue's backbone
    atoms (atoms without altloc always match). A residue whose backbone atoms all carry an
    altloc, at a number already read in the chain, is an alternative residue (a point
    mutation) and is not read.
    """
    import gemmi

    flat = gemmi.FlatStructure(st)
    flat.strings_as_numbers = False
    if len(flat) == 0:
        return []
    model = flat.model_num
    n = len(model) if model[-1] == model[0] else int(np.argmax(model != model[0]))
    chain = flat.chain_ids[:n].view("<u8")
    resname = flat.residue_names[:n].view("<u8")
    atom = flat.atom_names[:n].view("<u8")
    resnum, icode = flat.resnums[:n], flat.icodes[:n]
    alt, pos = flat.altlocs[:n], flat.pos[:n]
    # a new residue wherever chain, number, insertion code or name changes (gemmi's grouping)
    start = np.ones(n, dtype=bool)
    start[1:] = ((chain[1:] != chain[:-1]) | (resnum[1:] != resnum[:-1])
                 | (icode[1:] != icode[:-1]) | (resname[1:] != resname[:-1]))  # fmt: skip
    rid = np.cumsum(start) - 1
    first_atom = np.flatnonzero(start)
    n_res = len(first_atom)
    res_names = resname[first_atom]
    is_aa = _letters_of(res_names) != 0

    which = np.full(n, -1)
    for k, name in enumerate(_BACKBONE_U64):
        which[atom == name] = k
    # residues that are no known amino acid but have N, CA and C: dropped, and counted
    has_atom = np.zeros((n_res, 3), dtype=bool)
    named = np.flatnonzero(which >= 0)
    has_atom[rid[named], which[named]] = True
    unknown = ~is_aa & has_atom.all(axis=1)
    bb = (which >= 0) & is_aa[rid]
    # the first altloc on each residue's backbone atoms
    res_alt = np.zeros(n_res, dtype=alt.dtype)
    with_alt = np.flatnonzero(bb & (alt != 0))
    if len(with_alt):
        heads = with_alt[_first_of_runs(rid[with_alt])]
        res_alt[rid[heads]] = alt[heads]
        bb &= (alt == 0) | (alt == res_alt[rid])
    coords = np.zeros((n_res, 3, 3))
    present = np.zeros((n_res, 3), dtype=bool)
    rows = np.flatnonzero(bb)
    for k in range(3):
        sel = rows[which[rows] == k]
        sel = sel[_first_of_runs(rid[sel])]  # the first atom of that name in each residue
        coords[rid[sel], k] = pos[sel]
        present[rid[sel], k] = True

    keep = is_aa.copy()
    alt_only = np.flatnonzero(is_aa & (res_alt != 0))
    if len(alt_only):  # point mutations: rare, so checked residue by residue
        has_plain = np.zeros(n_res, dtype=bool)
        has_plain[rid[np.flatnonzero((which >= 0) & (alt == 0))]] = True
        alt_set = set(alt_only[~has_plain[alt_only]].tolist())
        seen: dict[int, set] = {}
        for r in range(n_res):
            a = first_atom[r]
            key = (int(resnum[a]), int(icode[a]))
            chain_seen = seen.setdefault(int(chain[a]), set())
            if r in alt_set and key in chain_seen:
                keep[r] = False
            chain_seen.add(key)

    kept = np.flatnonzero(keep)
    if not len(kept):
        return []
    kept_chain = chain[first_atom[kept]]
    # one count per position (chain, number, insertion code): alternatives at one position
    # (microheterogeneity) are one residue
    heads = first_atom[np.flatnonzero(unknown)]
    positions = np.stack([chain[heads], resnum[heads].astype(np.int64).view("<u8"),
                          icode[heads].astype(np.uint64)], axis=1)  # fmt: skip
    unknown_chain = np.unique(positions, axis=0)[:, 0] if len(heads) else chain[heads]
    codes, first_seen = np.unique(kept_chain, return_index=True)
    chain_s8, name_s8 = flat.chain_ids[first_atom[kept]], flat.residue_names[first_atom[kept]]
    out = []
    for code, at in sorted(zip(codes, first_seen, strict=True), key=lambda x: x[1]):
        in_chain = kept_chain == code  # chains in file order
        res = kept[in_chain]
        raw_names = name_s8[in_chain].tolist()
        decoded = {b: b.decode("latin-1") for b in set(raw_names)}  # a few distinct names
        names = list(map(decoded.__getitem__, raw_names))
        heads_of = first_atom[res]
        ids = _res_ids(resnum[heads_of].tolist(), icode[heads_of])
        ch = _make_chain(chain_s8[at].decode("latin-1"), names, coords[res], present[res], ids)
        ch.unknown = int(np.count_nonzero(unknown_chain == code))
        out.append(ch)
    return out


def _make_chain(cid: str, names: list[str], rows: list, present: list,
                res_ids: list[str]) -> _Chain:  # fmt: skip
    """Chain from per-residue N/CA/C rows; missing atoms become NaN, bad values an error."""
    coords = np.asarray(rows, dtype=np.float64).reshape(-1, 3, 3)
    have = np.asarray(present, dtype=bool).reshape(-1, 3)
    bad = 0 if np.isfinite(coords).all() else int((~np.isfinite(coords[have])).any(axis=-1).sum())
    if bad:
        raise StructureError(f"non-finite coordinates (nan/inf) in {bad} backbone atoms")
    coords[~have] = np.nan
    return _Chain(cid, names, coords, res_ids)


def _parse_gemmi_pdb(text: str) -> tuple[int, list[_Chain]]:
    import gemmi

    try:
        st = gemmi.read_pdb_string(text)
    except RuntimeError as exc:
        if not str(exc).startswith("Wrong format for charge"):
            raise
        # columns 79-80 (the charge, unused here) hold other data in some files (BM5's bound
        # entries: a number and a segment through columns 67-80); gemmi reads them without
        # those two columns, rather than handing the file to biotite (10x slower, float32)
        st = gemmi.read_pdb_string(text, max_line_length=78)
    n_models = len(st)
    if n_models == 0:
        return 0, []
    return n_models, _chains_from_gemmi(st)


def _parse_gemmi_cif(text: str) -> tuple[int, list[_Chain], int]:
    import gemmi

    doc = gemmi.cif.read_string(text)
    blocks = [b for b in doc if len(b.find_loop("_atom_site.id")) > 0]
    if not blocks:
        return 0, [], 0
    st = gemmi.make_structure_from_block(blocks[0])
    n_models = len(st)
    if n_models == 0:
        return 0, [], len(blocks)
    return n_models, _chains_from_gemmi(st), len(blocks)


# --------------------------------------------------------------------------- biotite backend


def _chains_from_atom_array(atoms) -> list[_Chain]:
    import biotite.structure as struc

    if atoms.array_length() == 0:
        return []
    amino = [n for n in np.unique(atoms.res_name).tolist() if amino_letter(str(n)) is not None]
    is_aa = np.isin(atoms.res_name, amino)
    atoms = atoms[is_aa | np.isin(atoms.atom_name, BACKBONE_ATOMS)]  # waters, ligands: out
    if atoms.array_length() == 0:
        return []
    starts = struc.get_residue_starts(atoms, add_exclusive_stop=True)
    chains: dict[str, tuple[list, list, list, list]] = {}
    unknown: dict[str, int] = {}
    for s, e in zip(starts[:-1], starts[1:], strict=True):
        res = atoms[s:e]
        xyz = np.zeros((3, 3))
        have = [False, False, False]
        for k, atom_name in enumerate(BACKBONE_ATOMS):
            hit = np.flatnonzero(res.atom_name == atom_name)
            if hit.size:
                xyz[k] = res.coord[hit[0]]
                have[k] = True
        cid = str(res.chain_id[0])
        if str(res.res_name[0]) not in amino:
            if all(have):  # no known amino acid, but N, CA and C: dropped and counted
                unknown[cid] = unknown.get(cid, 0) + 1
            continue
        names, rows, present, ids = chains.setdefault(cid, ([], [], [], []))
        names.append(str(res.res_name[0]))
        rows.append(xyz)
        present.append(have)
        ids.append(f"{int(res.res_id[0])}{str(res.ins_code[0]).strip()}")
    out = [_make_chain(cid, *parts) for cid, parts in chains.items()]
    for ch in out:
        ch.unknown = unknown.get(ch.chain_id, 0)
    return out


def _parse_biotite_pdb(text: str) -> tuple[int, list[_Chain]]:
    from biotite.structure.io.pdb import PDBFile

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. "elements were guessed from atom name"
        pdb = PDBFile.read(io.StringIO(text))
        n_models = pdb.get_model_count()
        if n_models == 0:
            return 0, []
        atoms = pdb.get_structure(model=1, altloc="first")
    return n_models, _chains_from_atom_array(atoms)


def _parse_biotite_bcif(raw: bytes) -> tuple[int, list[_Chain]]:
    from biotite.structure.io import pdbx

    bcif = pdbx.BinaryCIFFile.read(io.BytesIO(raw))
    block = bcif.block
    if "atom_site" not in block:
        return 0, []
    n_models = pdbx.get_model_count(bcif)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        atoms = pdbx.get_structure(bcif, model=1, altloc="first", use_author_fields=True)
    return n_models, _chains_from_atom_array(atoms)


# --------------------------------------------------------------------------- reading


def _parse(
    path: str, max_bytes: int = DEFAULT_MAX_BYTES, data: bytes | None = None
) -> tuple[int, list[_Chain], str]:
    """Parse a file, or ``data`` named ``path``: (number of models, amino-acid chains of the
    first model, model note)."""
    fmt = _format_of(path)
    if data is None:
        raw = _read_bytes(path, max_bytes, text=fmt != "bcif")
    else:
        raw = _bytes_given(data, path, max_bytes, text=fmt != "bcif")
    if fmt == "bcif":
        try:
            n_models, chains = _parse_biotite_bcif(raw)
        except StructureError:
            raise
        except Exception as exc:  # noqa: BLE001 - any reader error is a bad file
            raise StructureError(f"unreadable BinaryCIF ({_short(exc)})") from None
        return n_models, chains, ""
    text = _decode_text(raw)
    if fmt == "pdb" and text.lstrip().startswith("data_"):
        fmt = "cif"  # mmCIF content under a PDB-like name
    if fmt == "cif":
        try:
            n_models, chains, n_blocks = _parse_gemmi_cif(text)
        except StructureError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise StructureError(f"unreadable mmCIF ({_short(exc)})") from None
        if n_blocks > 1:
            return max(n_models, n_blocks), chains, f" ({n_blocks} data blocks with coordinates)"
        return n_models, chains, ""
    # PDB
    if not any(rec in raw[:65536] for rec in _PDB_RECORDS):
        raise StructureError("no PDB records found (not a structure file?)")
    _check_pdb_complete(text)
    parts = _split_pdb_models_on_end(text)
    note = f" ({len(parts)} END-separated models)" if len(parts) > 1 else ""
    try:
        n_models, chains = _parse_gemmi_pdb(parts[0])
    except StructureError:
        raise
    except Exception as gemmi_exc:  # noqa: BLE001 - fall back to biotite, then give up
        try:
            n_models, chains = _parse_biotite_pdb(parts[0])
        except StructureError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise StructureError(
                f"unreadable PDB (gemmi: {_short(gemmi_exc)}; biotite: {_short(exc)})"
            ) from None
    return max(n_models, len(parts)), chains, note


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:120]


def _degenerate(coords: np.ndarray) -> str:
    """Why a chain's N/CA/C coordinates (L, 3, 3) cannot describe a protein, or "".

    Refused: consecutive CA atoms closer than 0.5 A for more than half of the chain (all-zero or
    repeated coordinates; real ones are 2.9-3.8 A apart), or N, CA and C within 0.5 A of each
    other in more than half of the residues (bonds are 1.5 A).
    """
    length = len(coords)
    ca = coords[:, 1]
    if length >= 2:
        close = int(np.count_nonzero(np.linalg.norm(np.diff(ca, axis=0), axis=1) < 0.5))
        if close * 2 > length - 1:
            return (f"degenerate backbone: {close} of {length - 1} consecutive CA-CA distances "
                    "< 0.5 A (all-zero or repeated coordinates?)")  # fmt: skip
    bond = np.minimum(np.linalg.norm(coords[:, 0] - ca, axis=1),
                      np.linalg.norm(coords[:, 2] - ca, axis=1))  # fmt: skip
    squashed = int(np.count_nonzero(bond < 0.5))
    if squashed * 2 > length:
        return (f"degenerate backbone: N, CA and C within 0.5 A of each other in {squashed} of "
                f"{length} residues")  # fmt: skip
    return ""


def read_backbones(
    path: str | os.PathLike,
    chains: str = "skip-multi",
    models: str = "skip-multi",
    max_bytes: int = DEFAULT_MAX_BYTES,
    data: bytes | None = None,
    min_chain_len: int = MIN_CHAIN_LEN,
) -> list[Backbone]:
    """Read the protein backbones of a structure file.

    Parameters
    ----------
    path : str or PathLike
        A PDB, mmCIF or BinaryCIF file, optionally gzipped.
    chains : {"skip-multi", "split", "first", "complex"}
        More than one protein chain: skip the file (the reference design's behaviour), return each
        chain (ids ``STEM_CHAIN``), return the first one only, or return them all as one
        complex: one Backbone (id ``STEM``) holding the chains of the model one after the other,
        in file order (``Backbone.chains`` says where each begins). A file with one protein
        chain gives the same Backbone under every policy.
    models : {"skip-multi", "first"}
        More than one model (NMR ensembles, END-separated models, several mmCIF data blocks):
        skip the file, or use the first model.
    max_bytes : int
        The most bytes read from the file or inflated from its gzip stream
        (:data:`DEFAULT_MAX_BYTES`); a larger file fails.
    data : bytes, optional
        The file's content, already in memory (a member of an archive): ``path`` is then only
        its name, which gives the format and the id, and is never opened.
    min_chain_len : int
        ``chains="complex"``, several protein chains: those with fewer residues are dropped
        from the complex and recorded in ``Backbone.dropped_chains`` (and their residues in
        ``dropped``); the complex is kept when at least one chain is left
        (:data:`MIN_CHAIN_LEN`). A file with one protein chain gives it whatever its length.

    Returns
    -------
    list of Backbone
        One per protein chain kept (one in all for ``"complex"``). A protein chain is a chain
        with at least one amino-acid residue that has N, CA and C.

    Raises
    ------
    StructureError
        The file cannot be read (empty, truncated, not a structure, larger than ``max_bytes``,
        non-finite coordinates, a degenerate backbone ...); with ``chains="complex"`` also
        chains that clash (:data:`CLASH_PAIRS` residue pairs of different chains with CA atoms
        closer than :data:`CLASH_DISTANCE`: the same coordinates twice, superposed models), a
        chain id used for two chains (residue numbers repeat within it: copies or models
        concatenated under one id) and a chain id the chain layout cannot record.
    SkipStructure
        The file is readable but yields nothing under the policy (no protein, multi-model,
        multi-chain with ``"skip-multi"``, no chain of ``min_chain_len`` residues ...).
    """
    if chains not in CHAIN_POLICIES:
        raise ValueError(f"chains must be one of {', '.join(CHAIN_POLICIES)}, not {chains!r}")
    if models not in MODEL_POLICIES:
        raise ValueError(f"models must be skip-multi or first, not {models!r}")
    path = os.fspath(path)
    n_models, raw_chains, note = _parse(path, max_bytes, data)
    if n_models == 0:
        raise SkipStructure("no atoms")
    if n_models > 1 and models == "skip-multi":
        raise SkipStructure(f"multi-model: {n_models} models{note}; --models first (models="
                            "'first') reads the first")  # fmt: skip
    kept: list[tuple[_Chain, np.ndarray]] = []
    n_dropped_total = 0
    for ch in raw_chains:
        ok = ~np.isnan(ch.coords).any(axis=(1, 2))
        n_dropped_total += int((~ok).sum()) + ch.unknown
        if ok.any():
            kept.append((ch, ok))
    if not kept:
        if raw_chains:
            raise SkipStructure(
                "no protein residue has N, CA and C "
                f"({n_dropped_total} amino-acid residues dropped)"
            )
        raise SkipStructure("no protein chain (no amino-acid residues)")
    if len(kept) > 1:
        if chains == "skip-multi":
            ids = ",".join(ch.chain_id or "' '" for ch, _ in kept)
            raise SkipStructure(
                f"multi-chain: {len(kept)} protein chains ({ids}); --chains split (an image "
                "per chain), first or complex (all in one image) (chains='split', 'first' or "
                "'complex') reads them"
            )
        if chains == "first":
            kept = kept[:1]
    stem = structure_id(path)
    out = []
    for ch, ok in kept:
        coords = ch.coords[ok]
        why = _degenerate(coords)
        if why:
            raise StructureError(why if len(kept) == 1 else f"chain {ch.chain_id!r}: {why}")
        keep = ok.tolist()
        names = [n for n, k in zip(ch.res_names, keep, strict=True) if k]
        letters = {n: one_letter(n) for n in set(names)}  # a few distinct names
        # a chain id is any string in mmCIF / BinaryCIF ("../../e"): made safe by chain_output_id
        bid = chain_output_id(stem, ch.chain_id) if chains == "split" else stem
        out.append(
            Backbone(
                id=bid,
                sequence="".join(map(letters.__getitem__, names)),
                coords=coords,
                chain_id=ch.chain_id,
                dropped=int((~ok).sum()) + ch.unknown,
                res_names=names,
                res_ids=[r for r, k in zip(ch.res_ids, keep, strict=True) if k],
            )
        )
    if chains == "complex":
        return [_complex(stem, out, min_chain_len)]
    return out


def _complex(stem: str, parts: list[Backbone], min_chain_len: int) -> Backbone:
    """One Backbone of the chains ``parts`` (each read as one chain), in order: chains shorter
    than ``min_chain_len`` dropped and recorded, then the checks of ``chains="complex"``."""
    if len(parts) == 1:  # one chain: what chains="first" gives, whatever its length
        _check_chain(parts[0])
        return parts[0]
    short = [bb for bb in parts if len(bb) < min_chain_len]
    parts = [bb for bb in parts if len(bb) >= min_chain_len]
    dropped_chains = tuple((bb.chain_id, len(bb)) for bb in short)
    if not parts:
        raise SkipStructure(
            f"no protein chain of {min_chain_len} residues or more "
            f"({format_chains(dropped_chains)} dropped)"
        )
    seen: set[str] = set()
    for bb in parts:
        _check_chain(bb)
        if bb.chain_id in seen:  # two runs of one id (not merged by the reader)
            raise StructureError(f"chain id {bb.chain_id!r} used for two chains")
        seen.add(bb.chain_id)
    _check_clashes(parts)
    return Backbone(
        id=stem,
        sequence="".join(bb.sequence for bb in parts),
        coords=np.concatenate([bb.coords for bb in parts]),
        chain_id=parts[0].chain_id,
        dropped=sum(bb.dropped for bb in (*parts, *short)) + sum(len(bb) for bb in short),
        res_names=[n for bb in parts for n in bb.res_names],
        res_ids=[r for bb in parts for r in bb.res_ids],
        chains=tuple((bb.chain_id, len(bb)) for bb in parts),
        dropped_chains=dropped_chains,
    )


def _check_chain(bb: Backbone) -> None:
    """A chain of a complex: an id the chain layout can record, and no residue id twice (the
    same chain id used for two chains: copies or models concatenated under one id)."""
    if not _CHAIN_ID_RE.fullmatch(bb.chain_id):
        raise StructureError(
            f"chain id {bb.chain_id[:20]!r} cannot be recorded in a chain layout "
            "(at most 4 characters, no ',', ':', '=' or white space)"
        )
    if len(set(bb.res_ids)) != len(bb.res_ids):
        first: dict[str, int] = {}
        for i, r in enumerate(bb.res_ids):
            if r in first:
                raise StructureError(
                    f"chain {bb.chain_id!r} holds residue {r} twice (residues {first[r] + 1} "
                    f"and {i + 1} of the chain): two chains under one id (copies or models "
                    "concatenated without MODEL records?)"
                )
            first[r] = i


def _check_clashes(parts: list[Backbone]) -> None:
    """Refuse chains that overlap: :data:`CLASH_PAIRS` or more residue pairs of different chains
    with CA atoms closer than :data:`CLASH_DISTANCE` (a k-d tree, scipy's cKDTree)."""
    if len(parts) < 2:
        return
    from scipy.spatial import cKDTree

    ca = np.concatenate([bb.ca for bb in parts])
    which = np.repeat(np.arange(len(parts)), [len(bb) for bb in parts])
    pairs = cKDTree(ca).query_pairs(CLASH_DISTANCE, output_type="ndarray")
    pairs = pairs[which[pairs[:, 0]] != which[pairs[:, 1]]]
    if len(pairs) >= CLASH_PAIRS:
        a, b = which[pairs[0]]
        d = float(np.linalg.norm(ca[pairs[0, 0]] - ca[pairs[0, 1]]))
        raise StructureError(
            f"chains clash: {len(pairs)} residue pairs of different chains have CA atoms closer "
            f"than {CLASH_DISTANCE:g} A (e.g. chains {parts[a].chain_id!r} and "
            f"{parts[b].chain_id!r}, {d:.2f} A): overlapping copies or superposed models, "
            "not one complex"
        )


#: Chain ids that a chain layout (``A:120,B:98``) records: up to 4 characters (mmCIF allows
#: more; the PDB's own ids have 1-4), none of ``,`` ``:`` ``=`` or white space; the blank id too.
_CHAIN_ID_RE = re.compile(r"[^,:=\s]{0,4}")


def chain_index(chains) -> np.ndarray:
    """(L,) int array: the index of each residue's chain in a layout ``((id, n), ...)``."""
    counts = [int(n) for _, n in chains]
    return np.repeat(np.arange(len(counts)), counts)


def format_chains(chains) -> str:
    """A chain layout as text: ``(("A", 120), ("B", 98))`` -> ``"A:120,B:98"``."""
    return ",".join(f"{c}:{int(n)}" for c, n in chains)


def parse_chains(text: str, length: int | None = None) -> tuple[tuple[str, int], ...]:
    """A chain layout from text (:func:`format_chains`), checked: ``"A:120,B:98"`` ->
    ``(("A", 120), ("B", 98))``.

    Raises
    ------
    ValueError
        Not a layout (an item without ``:``, a count that is no positive integer, a bad chain
        id, a repeated chain id), or its counts do not sum to ``length`` (when given).
    """
    text = str(text).strip()
    if len(text) > 100_000:
        raise ValueError(f"chain layout of {len(text)} characters: too long")
    out = []
    for item in text.split(","):
        cid, sep, count = item.rpartition(":")
        if not sep or not count.isdigit() or len(count) > 7 or int(count) < 1:
            raise ValueError(f"bad chain layout {text[:60]!r}: expected ID:RESIDUES,...")
        if not _CHAIN_ID_RE.fullmatch(cid):
            raise ValueError(f"bad chain layout {text[:60]!r}: chain id {cid[:20]!r}")
        out.append((cid, int(count)))
    if len({c for c, _ in out}) != len(out):
        raise ValueError(f"bad chain layout {text[:60]!r}: a chain id repeats")
    total = sum(n for _, n in out)
    if length is not None and total != length:
        raise ValueError(
            f"chain layout {text[:60]!r} sums to {total} residues, not the length {length}"
        )
    return tuple(out)


# --------------------------------------------------------------------------- writing


def structure_to_text(
    atoms,
    sequence: str | None = None,
    fmt: str = "pdb",
    chain_id: str = "A",
    name: str = "protoken",
    chains=None,
    res_ids=None,
) -> str:
    """Build a structure file from per-residue atom coordinates (written with gemmi): one chain,
    or several (``chains``), with their own residue numbering (``res_ids``).

    Parameters
    ----------
    atoms : dict of str to ndarray (L, 3), or ndarray (L, 3)
        Atom name -> coordinates in Angstrom, one row per residue, in the order the atoms are
        written within each residue (e.g. ``{"N": ..., "CA": ..., "C": ..., "O": ..., "CB": ...}``).
        A bare array is written as one CB atom per residue.
    sequence : str, optional
        One-letter sequence of length L; residues are named from it (``X`` -> ``UNK``).
        Without it (or with ``""``) every residue is ``UNK``.
    fmt : {"pdb", "cif"}
        Output format. PDB separates the chains with TER records.
    chain_id : str
        Chain identifier of a one-chain structure (``chains`` not given).
    chains : sequence of (str, int), optional
        The chain layout, (chain id, residues) per chain in residue order (as
        ``Backbone.chains``); the counts must sum to L and the ids differ. PDB files take chain
        ids of at most 2 characters (use mmCIF beyond).
    res_ids : sequence of str, optional
        Residue number and insertion code of each residue (``"12"``, ``"12A"``, ``"-3"``, as
        ``Backbone.res_ids``); default 1..n within each chain.

    Returns
    -------
    str
        The file's text.
    """
    import gemmi

    if not isinstance(atoms, dict):
        atoms = {"CB": atoms}
    sequence = sequence or None
    if not atoms:
        raise ValueError("no atoms to write")
    length = len(next(iter(atoms.values())))
    if sequence is not None and len(sequence) != length:
        raise ValueError(f"sequence has {len(sequence)} residues, coordinates {length}")
    if fmt not in ("pdb", "cif"):
        raise ValueError(f"fmt must be 'pdb' or 'cif', not {fmt!r}")
    layout = ((chain_id, length),) if chains is None else tuple((str(c), int(n)) for c, n in chains)
    if sum(n for _, n in layout) != length or any(n < 1 for _, n in layout):
        raise ValueError(f"chain layout {format_chains(layout)} does not cover {length} residues")
    if len({c for c, _ in layout}) != len(layout):
        raise ValueError(f"chain layout {format_chains(layout)}: a chain id repeats")
    if fmt == "pdb" and any(len(c) > 2 for c, _ in layout):
        raise ValueError("PDB files hold chain ids of at most 2 characters: write mmCIF (.cif)")
    seqids = _seqids(res_ids, layout, length)
    arrays = {k: np.asarray(v, dtype=np.float64) for k, v in atoms.items()}
    elements = {k: gemmi.Element(k[0]) for k in arrays}
    st = gemmi.Structure()
    st.name = name
    model = gemmi.Model(1)
    serial = 0
    i = 0
    for cid, count in layout:
        chain = gemmi.Chain(cid)
        for _ in range(count):
            res = gemmi.Residue()
            res.name = ONE_TO_THREE.get(sequence[i], "UNK") if sequence else "UNK"
            res.seqid = gemmi.SeqId(*seqids[i])
            res.entity_type = gemmi.EntityType.Polymer
            for atom_name, xyz in arrays.items():
                serial += 1
                atom = gemmi.Atom()
                atom.name = atom_name
                atom.element = elements[atom_name]
                atom.pos = gemmi.Position(*xyz[i])
                atom.occ = 1.0
                atom.serial = serial
                res.add_atom(atom)
            chain.add_residue(res)
            i += 1
        model.add_chain(chain)
    st.add_model(model)
    st.setup_entities()
    if fmt == "cif":
        return st.make_mmcif_document().as_string()
    return st.make_pdb_string()


_RES_ID_RE = re.compile(r"(-?[0-9]{1,6})([A-Za-z]?)")


def _seqids(res_ids, layout, length: int) -> list[tuple[int, str]]:
    """(number, insertion code) of each residue, from ``res_ids`` or 1..n per chain."""
    if res_ids is None:
        return [(k + 1, " ") for _, n in layout for k in range(n)]
    res_ids = list(res_ids)
    if len(res_ids) != length:
        raise ValueError(f"{len(res_ids)} residue ids for {length} residues")
    out = []
    for r in res_ids:
        m = _RES_ID_RE.fullmatch(str(r).strip())
        if m is None:
            raise ValueError(f"bad residue id {str(r)[:20]!r}: expected a number and an "
                             "optional insertion letter (12, 12A, -3)")  # fmt: skip
        out.append((int(m.group(1)), m.group(2) or " "))
    return out


def write_structure(path: str | os.PathLike, atoms: dict[str, np.ndarray], **kwargs) -> None:
    """Write :func:`structure_to_text` to ``path`` (format from the extension, ``.cif`` or PDB),
    atomically: a temporary file in the same folder, then a rename. Keyword arguments as
    :func:`structure_to_text` (``sequence``, ``chains``, ``res_ids`` ...)."""
    path = os.fspath(path)
    fmt = "cif" if path.lower().endswith((".cif", ".mmcif")) else "pdb"
    atomic_write(path, structure_to_text(atoms, fmt=fmt, **kwargs))
