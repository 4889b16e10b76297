"""Structure archives read as streams of members: tar archives and Foldcomp databases.

The AlphaFold DB and ESMAtlas are distributed as archives, not as loose files: per-proteome
tar archives of ``.cif.gz`` / ``.pdb.gz`` files, and Foldcomp databases (the MMseqs2 layout:
a data file ``DB`` with ``DB.index``, ``DB.lookup`` and ``DB.dbtype`` beside it). ``protoken
convert`` reads them in place, never unpacking anything to disk:

- :func:`is_tar` / :func:`iter_tar`: a tar archive (plain, or compressed with gzip, bzip2 or
  xz), read as a stream (:mod:`tarfile`'s ``r|*`` mode: one pass, no seeking, so a ``.tar.gz``
  is inflated once). Only regular files whose name is a structure name are members; links,
  devices and folders are ignored, and a member's name never becomes a path (its id is the
  safe id of its base name, :func:`protoken.inputs.structure_id`).
- :func:`is_foldcomp_db` / :func:`iter_foldcomp`: a Foldcomp database, read through its index
  (``key<TAB>offset<TAB>length`` per line) and lookup (``key<TAB>name<TAB>file`` per line),
  both streamed line by line, so memory does not grow with the database (214 M entries for the
  AFDB). Each entry's bytes are read with one seek and read, checked against the data
  file's size first.
- :func:`read_member`: the backbones of a member, from its bytes (in a convert worker).
  Foldcomp entries are decoded with the ``foldcomp`` package (its C++ decoder runs in the
  worker process, so a crash on a hostile entry costs that entry only).

Every member has a *source*, ``ARCHIVE::MEMBER`` (:data:`SEP`), which is what the manifest
records and what resume and ``--shard`` key on. A member larger than ``max_bytes`` is not read
(it is recorded failed); a truncated or corrupt archive ends its stream with one failed row
naming the archive and how far it was read.
"""

from __future__ import annotations

import functools
import importlib.util
import itertools
import logging
import os
import tarfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from protoken.inputs import (
    STRUCTURE_SUFFIXES,
    Shard,
    find_structures,
    in_shard,
    is_structure_name,
    structure_id,
)

__all__ = [
    "SEP",
    "Member",
    "find_inputs",
    "find_sources",
    "is_foldcomp_db",
    "is_tar",
    "iter_archive",
    "iter_foldcomp",
    "iter_tar",
    "read_at",
    "read_member",
]

logger = logging.getLogger(__name__)

#: Separates an archive's path from a member's name in a source: ``ARCHIVE::MEMBER``.
SEP = "::"

#: Names read as tar archives (case-insensitive).
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")

#: Files beside a Foldcomp database's data file ``DB`` (``DB.lookup`` is optional: without it
#: the entries are named by their keys).
FOLDCOMP_SIDECARS = (".index", ".dbtype")


@dataclass
class Member:
    """One member of an archive.

    Attributes
    ----------
    source : str
        ``ARCHIVE::NAME``: the manifest's source, what resume and sharding key on.
    name : str
        The member's name inside the archive (a tar path, or a Foldcomp entry name).
    kind : str
        ``"tar"`` or ``"foldcomp"``.
    error : str
        Why the member cannot be read ("" when it can): too large, truncated archive ...
    offset, size : int
        Where its bytes are: in the data file (Foldcomp), or in the tar stream, decompressed
        (tar); -1 when unknown. :func:`read_at` reads them again later, in any process.
    """

    source: str
    name: str
    kind: str
    error: str = ""
    offset: int = -1
    size: int = -1
    _read: Callable[[], bytes] | None = None

    @property
    def id(self) -> str:
        """The member's id: the safe id of its base name without structure extensions."""
        return member_id(self.name)

    def __str__(self) -> str:
        return self.source

    def read(self) -> bytes:
        """The member's bytes. For a tar member, valid only until the stream moves on."""
        if self._read is None:
            raise ValueError(self.error or "no data")
        try:
            return self._read()
        except (tarfile.TarError, EOFError, zlib.error) as exc:  # a corrupt archive
            reason = " ".join(str(exc).split())[:160]
            raise ValueError(f"unreadable archive member ({reason})") from None


def member_id(name: str) -> str:
    """The id of a member name (``proteome/AF-P1-F1-model_v4.cif.gz`` -> ``AF-P1-F1-model_v4``)."""
    try:
        return structure_id(name.rstrip("/").rsplit("/", 1)[-1] or "%00")
    except ValueError:
        return "%00"


def is_tar(path: str) -> bool:
    """Whether ``path`` is read as a tar archive (by its name: :data:`TAR_SUFFIXES`)."""
    return os.path.isfile(path) and path.lower().endswith(TAR_SUFFIXES)


def is_foldcomp_db(path: str) -> bool:
    """Whether ``path`` is a Foldcomp database's data file: ``path.index`` and
    ``path.dbtype`` exist beside it."""
    return os.path.isfile(path) and all(os.path.isfile(path + s) for s in FOLDCOMP_SIDECARS)


def iter_archive(
    path: str, shard: Shard | None = None, max_bytes: int | None = None
) -> Iterator[Member] | None:
    """The members of ``path`` if it is a tar archive or a Foldcomp database
    (:func:`iter_tar`, :func:`iter_foldcomp`), else None (a plain file)."""
    if _may_be_foldcomp(path):
        return iter_foldcomp(path, shard, max_bytes)
    if is_tar(path):
        return iter_tar(path, shard, max_bytes)
    return None


def _may_be_foldcomp(path: str) -> bool:
    """A Foldcomp data file has no structure extension (saves two stats per loose file)."""
    return not path.lower().endswith(STRUCTURE_SUFFIXES) and is_foldcomp_db(path)


def find_sources(
    inputs, shard: Shard | None = None, follow_links: bool = False, max_bytes: int | None = None
) -> Iterator[str | Member]:
    """Stream what ``protoken convert`` reads: structure files (their paths) and the members
    of archives (:class:`Member`), from files and folders (walked recursively, as
    :func:`protoken.inputs.find_structures`; tar archives and Foldcomp databases inside a
    folder are read too). ``shard`` partitions files and members alike, by id.

    Raises
    ------
    FileNotFoundError
        An input does not exist (raised when the stream reaches it).
    """

    def expand(path: str) -> Iterator[Member] | None:
        return iter_archive(path, shard, max_bytes)

    return find_structures(inputs, shard, follow_links, expand)


def find_inputs(inputs, shard: Shard | None = None, follow_links: bool = False) -> Iterator:
    """Stream what ``protoken encode`` reads: as :func:`protoken.inputs.find_inputs` (a folder
    holding PNGs is read as images, other inputs as structures), plus the images of folders
    written by ``convert --format shards`` (:class:`protoken.shards.ShardImage`) and the
    members of tar archives and Foldcomp databases (:class:`Member`), read in place."""
    from protoken.inputs import find_inputs as find_files
    from protoken.shards import index_files, iter_shard_images

    for item in inputs:
        item = os.fspath(item)
        if os.path.isdir(item) and index_files(item):
            yield from iter_shard_images(item, shard)
        elif os.path.isdir(item):
            pngs = False
            for found in find_files([item], shard, follow_links):
                if found.lower().endswith(".png"):
                    pngs = True
                    yield found
                else:
                    break
            if not pngs:
                yield from find_sources([item], shard, follow_links)
        else:
            members = iter_archive(item, shard)
            yield from find_files([item], shard, follow_links) if members is None else members


# --------------------------------------------------------------------------- tar


def iter_tar(
    path: str, shard: Shard | None = None, max_bytes: int | None = None
) -> Iterator[Member]:
    """Stream the structure members of a tar archive (see the module docstring).

    Members are yielded in archive order; a member's :meth:`Member.read` must be called before
    the next one is asked for (the archive is read in one pass). With ``shard`` only members
    whose id is in the shard are yielded (the others are skipped without being read). A
    member larger than ``max_bytes`` is yielded with ``error`` set and no data. A truncated or
    corrupt archive ends the stream with one member named ``""`` whose ``error`` says so.
    """
    n = 0
    try:
        with tarfile.open(path, mode="r|*", tarinfo=_BoundedTarInfo) as tf:
            for info in tf:
                if not info.isfile():  # folders, links, devices: never followed
                    continue
                base = info.name.rstrip("/").rsplit("/", 1)[-1]
                if not base or base.startswith(".") or not is_structure_name(base):
                    continue
                member = Member(f"{path}{SEP}{info.name}", info.name, "tar",
                                offset=info.offset_data, size=info.size)  # fmt: skip
                if not in_shard(member.id, shard):
                    continue
                n += 1
                if max_bytes is not None and info.size > max_bytes:
                    member.error = f"larger than --max-bytes ({max_bytes} bytes): {info.size} bytes"
                else:
                    member._read = _tar_reader(tf, info)
                yield member
    except (tarfile.TarError, OSError, EOFError, ValueError) as exc:
        # zlib / lzma errors arrive as tarfile.ReadError or OSError subclasses
        reason = " ".join(str(exc).split())[:160] or type(exc).__name__
        yield Member(
            f"{path}{SEP}",
            "",
            "tar",
            error=f"truncated or corrupt tar archive after {n} members ({reason})",
        )


#: The largest extended header (pax, GNU long name) read from a tar: tarfile holds one in
#: memory whole, so a hostile archive claiming gigabytes of header would exhaust it.
MAX_TAR_HEADER = 1 << 20

_EXTENDED = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE,
             tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE)  # fmt: skip


class _BoundedTarInfo(tarfile.TarInfo):
    """A TarInfo that refuses extended headers larger than :data:`MAX_TAR_HEADER` before
    tarfile reads them into memory."""

    def _proc_member(self, tarfile_):
        if self.type in _EXTENDED and self.size > MAX_TAR_HEADER:
            raise tarfile.HeaderError(
                f"extended header of {self.size} bytes (more than {MAX_TAR_HEADER})"
            )
        return super()._proc_member(tarfile_)


def _tar_reader(tf: tarfile.TarFile, info: tarfile.TarInfo) -> Callable[[], bytes]:
    def read() -> bytes:
        if tf.closed or tf.offset > info.offset_data + info.size + tarfile.BLOCKSIZE:
            raise ValueError(f"{info.name}: a tar member is read while the stream is at it")
        fh = tf.extractfile(info)
        if fh is None:
            raise ValueError(f"{info.name}: not a regular file")
        data = fh.read(info.size + 1)
        if len(data) != info.size:
            raise ValueError(f"{info.name}: truncated member")
        return data

    return read


# --------------------------------------------------------------------------- Foldcomp


def _index_rows(path: str) -> Iterator[tuple[int, int, int]]:
    """``(key, offset, length)`` of each line of an MMseqs2 index; ValueError on a bad line."""
    with open(path + ".index", encoding="ascii", errors="replace") as fh:
        for number, line in enumerate(fh, 1):
            parts = line.split()
            if not parts:
                continue
            try:
                key, offset, length = (int(x) for x in parts[:3])
            except ValueError:
                raise ValueError(f"{path}.index: line {number} is not KEY OFFSET LENGTH") from None
            if key < 0 or offset < 0 or length < 0:
                raise ValueError(f"{path}.index: line {number} has a negative number")
            yield key, offset, length


def _lookup_names(path: str) -> Callable[[int], str]:
    """A function key -> entry name, from ``path.lookup`` streamed in key order alongside the
    index (both are sorted by key in MMseqs2 databases); a lookup out of key order is read
    into a dict once (memory O(entries), logged). Keys without a name are named by the key."""
    lookup = path + ".lookup"
    if not os.path.isfile(lookup):
        return str

    def rows() -> Iterator[tuple[int, str]]:
        with open(lookup, encoding="utf-8", errors="surrogateescape") as fh:
            for line in fh:
                parts = line.rstrip("\n").split("\t")
                if len(parts) >= 2 and parts[0].isdigit() and parts[1]:
                    yield int(parts[0]), parts[1]

    it = rows()
    state: dict = {"row": next(it, None), "last": -1, "table": None}

    def name(key: int) -> str:
        table = state["table"]
        if table is None and key < state["last"]:  # index out of order: fall back
            logger.warning("%s: index not in key order; reading the lookup into memory", path)
            table = state["table"] = dict(rows())
        if table is not None:
            return table.get(key, str(key))
        state["last"] = key
        row = state["row"]
        while row is not None and row[0] < key:
            row = next(it, None)
        state["row"] = row
        return row[1] if row is not None and row[0] == key else str(key)

    return name


def iter_foldcomp(
    path: str, shard: Shard | None = None, max_bytes: int | None = None
) -> Iterator[Member]:
    """Stream the entries of a Foldcomp database (see the module docstring).

    Each entry's bytes are read only when :meth:`Member.read` is called (one read), so
    resuming or sharding skips entries without reading them. An index line pointing outside
    the data file, or longer than ``max_bytes``, gives a member with ``error`` set.

    Raises
    ------
    ValueError
        The foldcomp package is not installed, or the index has a malformed line (raised when
        the stream reaches it).
    """
    if importlib.util.find_spec("foldcomp") is None:  # a run-level error, not one per entry
        raise ValueError(
            f"{path} is a Foldcomp database: reading it needs the foldcomp package "
            "(pip install 'protoken[foldcomp]')"
        )
    size = os.path.getsize(path)
    name_of = _lookup_names(path)
    for key, offset, length in _index_rows(path):
        name = name_of(key)
        member = Member(f"{path}{SEP}{name}", name, "foldcomp", offset=offset, size=length)
        if not in_shard(member.id, shard):
            continue
        if offset + length > size:
            member.error = (
                f"index entry {key} points past the end of the data file "
                f"({offset} + {length} > {size} bytes): truncated database?"
            )
        elif max_bytes is not None and length > max_bytes:
            member.error = f"larger than --max-bytes ({max_bytes} bytes): {length} bytes"
        else:
            member._read = _entry_reader(path, offset, length)
        yield member


def _entry_reader(path: str, offset: int, length: int) -> Callable[[], bytes]:
    def read() -> bytes:
        with open(path, "rb") as fh:
            fh.seek(offset)
            data = fh.read(length)
        if len(data) != length:
            raise ValueError("short read from the data file")
        return data[:-1] if data.endswith(b"\0") else data  # MMseqs2 entries end with NUL

    return read


#: Magic numbers of the compressions a tar archive may come in (what ``r|*`` reads).
_COMPRESSED = ((b"\x1f\x8b", "gzip"), (b"BZh", "bz2"), (b"\xfd7zXZ\x00", "lzma"))


def read_at(path: str, kind: str, offset: int, size: int) -> bytes:
    """The bytes of an archive member from where :class:`Member` says they are (its ``kind``,
    ``offset`` and ``size``), with a file handle of its own: what a worker process reads when
    only the member's location was sent to it (``protoken reconstruct --reference``).

    A Foldcomp entry is one seek and read. A tar member of an uncompressed archive (as the
    AlphaFold DB ships its proteomes) too; in a compressed one the stream is decompressed up to
    the member (time grows with its offset).

    Raises
    ------
    ValueError
        The bytes are not all there (the archive changed or is truncated), or ``kind`` is
        unknown.
    """
    if kind not in ("tar", "foldcomp") or offset < 0 or size < 0:
        raise ValueError(f"{path}: no member at {offset} ({kind}, {size} bytes)")
    if kind == "foldcomp":
        return _entry_reader(path, offset, size)()
    with open(path, "rb") as fh:
        head = fh.read(6)
    opener = open
    for magic, module in _COMPRESSED:
        if head.startswith(magic):
            opener = importlib.import_module(module).open
            break
    try:
        with opener(path, "rb") as fh:
            fh.seek(offset)
            data = fh.read(size)
    except (OSError, EOFError, zlib.error) as exc:
        raise ValueError(
            f"{path}: unreadable archive ({' '.join(str(exc).split())[:160]})"
        ) from None
    if len(data) != size:
        raise ValueError(f"{path}: member at {offset} is truncated ({len(data)} of {size} bytes)")
    return data


# --------------------------------------------------------------------------- reading members

#: Heavy atoms of each standard residue, in Foldcomp's atom order (N, CA, C, O, side chain).
_HEAVY_ATOMS = dict(zip("ARNDCQEGHILKMFPSTWYV",
                        (5, 11, 8, 8, 6, 9, 9, 4, 10, 8, 8, 9, 8, 11, 7, 6, 7, 14, 12, 7),
                        strict=True))  # fmt: skip


def read_member(
    name: str,
    kind: str,
    data: bytes,
    chains: str = "skip-multi",
    models: str = "skip-multi",
    max_bytes: int | None = None,
) -> list:
    """The backbones of an archive member from its bytes (as
    :func:`protoken.structure.read_backbones` for a file).

    A tar member is parsed as the file it is (format from its name, gzip from its bytes). A
    Foldcomp entry is one chain: its N, CA and C are taken from ``foldcomp.get_data`` when
    every residue is standard (the atoms then come in a known order), else from the PDB text
    ``foldcomp.decompress`` writes, parsed as any PDB file. Its id is the entry's name
    (without extensions) whatever the chain policy.

    Raises
    ------
    StructureError, SkipStructure
        As :func:`protoken.structure.read_backbones`.
    """
    from protoken.structure import DEFAULT_MAX_BYTES, StructureError, read_backbones

    max_bytes = DEFAULT_MAX_BYTES if max_bytes is None else max_bytes
    base = name.rstrip("/").rsplit("/", 1)[-1] or "%00"
    if kind == "tar":
        return read_backbones(base, chains=chains, models=models, max_bytes=max_bytes, data=data)
    if kind != "foldcomp":
        raise ValueError(f"unknown member kind {kind!r}")
    try:
        import foldcomp
    except ImportError:
        raise StructureError(
            "reading Foldcomp databases needs the foldcomp package (pip install foldcomp)"
        ) from None
    bb = _foldcomp_backbone(foldcomp, base, data)
    if bb is not None:
        return [bb]
    try:
        _, text = foldcomp.decompress(data)
    except Exception as exc:  # noqa: BLE001 - any decoder error is a bad entry
        reason = " ".join(str(exc).split())[:120]
        raise StructureError(f"unreadable Foldcomp entry ({reason})") from None
    if isinstance(text, str):
        text = text.encode()
    backbones = read_backbones(
        member_id(base) + ".pdb", chains="first", models="first", max_bytes=max_bytes, data=text
    )
    return backbones


@functools.lru_cache(maxsize=1)
def _three_letter() -> dict[str, str]:
    from protoken.structure import THREE_TO_ONE

    return {v: k for k, v in THREE_TO_ONE.items() if k != "UNK"}


def _foldcomp_backbone(foldcomp, name: str, data: bytes):
    """The backbone of a Foldcomp entry from ``get_data`` (no PDB text), or None when a
    residue is not standard (the atom order is then not known here)."""
    from protoken.structure import Backbone, StructureError, _degenerate

    try:
        got = foldcomp.get_data(data)
    except Exception as exc:  # noqa: BLE001
        raise StructureError(
            f"unreadable Foldcomp entry ({' '.join(str(exc).split())[:120]})"
        ) from None
    sequence = got.get("residues", "")
    counts = [_HEAVY_ATOMS.get(r, 0) for r in sequence]
    atoms = got.get("coordinates", ())
    total = sum(counts)
    if not sequence or 0 in counts or len(atoms) not in (total, total + 1):  # + OXT
        return None
    starts = np.cumsum([0, *counts[:-1]])
    picked = (starts[:, None] + np.arange(3)).ravel().tolist()  # N, CA, C of each residue
    coords = np.fromiter(
        itertools.chain.from_iterable(map(atoms.__getitem__, picked)), np.float64, 3 * len(picked)
    )
    backbone = coords.reshape(-1, 3, 3)  # (L, 3, 3): N, CA, C
    if not np.isfinite(backbone).all():
        raise StructureError("non-finite coordinates")
    why = _degenerate(backbone)
    if why:
        raise StructureError(why)
    three = _three_letter()
    return Backbone(
        id=member_id(name),
        sequence=sequence,
        coords=backbone,
        chain_id="A",
        dropped=0,
        res_names=[three[r] for r in sequence],
    )
