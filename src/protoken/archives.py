"""Structure archives read as streams of members: tar archives and Foldcomp databases.

The AlphaFold DB and ESMAtlas are distributed as archives, not as loose files: per-proteome
tar archives of ``.cif.gz`` / ``.pdb.gz`` files, and Foldcomp databases (the MMseqs2 layout:
a data file ``DB`` with ``DB.index``, ``DB.lookup`` and ``DB.dbtype`` beside it). ``protoken
convert`` reads them in place, never unpacking anything to disk:

- :func:`is_tar` / :func:`iter_tar`: a tar archive (plain, or compressed with gzip, bzip2 or
  xz), read as a stream in one pass by :class:`_TarStream`: headers are parsed with
  :meth:`tarfile.TarInfo.frombuf` (checksums checked), data is read and skipped in chunks of at
  most 1 MiB (a plain tar seeks), and nothing is kept of the members passed. So memory does
  not grow with the number of members or with what a header claims, and skipping a member
  (too large, not a structure, another shard) costs time linear in its size: a compressed tar
  bomb is skipped, not inflated into memory. Only regular files whose name is a structure
  name are members; links, devices and folders are ignored, and a member's name never becomes
  a path (its id is the safe id of its base name, :func:`protoken.inputs.structure_id`).
- :func:`is_foldcomp_db` / :func:`iter_foldcomp`: a Foldcomp database, read through its index
  (``key<TAB>offset<TAB>length`` per line) and lookup (``key<TAB>name<TAB>file`` per line),
  both streamed line by line, each line at most :data:`MAX_LINE` bytes, so memory does not
  grow with the database (214 M entries for the AFDB) or with a damaged line. Index entries
  are checked against the data file and each other (:func:`_checked_rows`: inside the file,
  no overlap, at most :data:`MAX_FOLDCOMP_ENTRY` bytes), and each entry's bytes against the
  format (the ``FCMP`` magic first, the NUL Foldcomp writes last) before they are read with
  one seek and read. A line that is no index entry is one failed member; the stream goes on.
- :func:`read_member`: the backbones of a member, from its bytes (in a convert worker).
  Foldcomp entries are decoded with the ``foldcomp`` package (its C++ decoder runs in the
  worker process, so a crash on a hostile entry costs that entry only), and a decoded chain
  with consecutive CA atoms outside :data:`CA_CA_RANGE` is refused (:func:`implausible_chain`):
  the format has no checksum, and damaged bytes decode to chains no protein has.

Every member has a *source*, ``ARCHIVE::MEMBER`` (:data:`SEP`), which is what the manifest
records and what resume and ``--shard`` key on. A member larger than ``max_bytes`` is not read
(it is recorded failed, naming ``--max-bytes``); a truncated or corrupt archive (cut short, a
header with a bad checksum, a damaged compressed stream) ends its stream with one failed row
naming the archive, the byte where reading stopped and how many members were read.

One module of ~1000 lines on purpose: tar archives and Foldcomp databases share the member
model, the bounds and the error policy, and the hostile-input checks (our own tar block
reader, Foldcomp index checks) must be read beside the readers they guard.
"""

from __future__ import annotations

import bisect
import bz2
import functools
import gzip
import importlib.util
import itertools
import logging
import lzma
import os
import re
import tarfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from protoken.inputs import (
    STRUCTURE_SUFFIXES,
    Shard,
    find_images,
    find_structures,
    in_shard,
    is_structure_name,
    structure_id,
    walk_files,
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
        except OSError as exc:  # the file system: one line, never a trace
            raise ValueError(f"unreadable archive member ({_one_line(exc)})") from None


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
    """Stream what ``protoken encode`` and ``protoken evaluate`` read, structures or images:
    a folder written by ``convert --format shards`` gives its images
    (:class:`protoken.shards.ShardImage`), a folder holding any PNG its PNGs
    (:func:`protoken.inputs.find_images`), and any other input what :func:`find_sources`
    finds (structure files, and the members of tar archives and Foldcomp databases
    (:class:`Member`), read in place). Whether a folder is read as images does not depend on
    ``shard``, so the shards of a run partition what an unsharded run reads.

    Raises
    ------
    FileNotFoundError
        An input does not exist (raised when the stream reaches it).
    """
    from protoken.shards import index_files, iter_shard_images

    for item in inputs:
        item = os.fspath(item)
        if os.path.isdir(item) and index_files(item):
            yield from iter_shard_images(item, shard)
        elif os.path.isdir(item) and next(walk_files(item, (".png",), follow_links), None):
            yield from find_images([item], shard, follow_links)
        else:
            yield from find_sources([item], shard, follow_links)


# --------------------------------------------------------------------------- tar

#: The largest extended header (pax, GNU long name) read from a tar: one is held in memory
#: whole, so a hostile archive claiming gigabytes of header would exhaust it.
MAX_TAR_HEADER = 1 << 20

#: The most bytes a member is read or skipped by at a time (so memory stays bounded whatever a
#: header claims, and skipping costs time linear in the member's size).
_CHUNK = 1 << 20

_BLOCK = tarfile.BLOCKSIZE
_ZERO_BLOCK = bytes(_BLOCK)
_PAX_TYPES = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE)
_LONG_TYPES = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK)
_PAX_RECORD = re.compile(rb"(\d{1,20}) ([^=\n]+)=")
#: Errors of the decompressors (gzip, bzip2, xz) on a damaged stream.
_STREAM_ERRORS = (OSError, EOFError, zlib.error, lzma.LZMAError)


class TarError(ValueError):
    """A tar archive cannot be read further (truncated, a bad header, a corrupt stream):
    ``str()`` says why, ``at`` at which byte of the (decompressed) archive."""

    def __init__(self, reason: str, at: int):
        super().__init__(reason)
        self.at = at


def _too_large(size: int, max_bytes: int | None) -> str:
    """Why a member of ``size`` bytes is not read, or "": more than ``max_bytes``, or when none
    is given (``protoken encode``) than :data:`protoken.structure.DEFAULT_MAX_BYTES`."""
    from protoken.structure import DEFAULT_MAX_BYTES

    limit = DEFAULT_MAX_BYTES if max_bytes is None else max_bytes
    if size <= limit:
        return ""
    what = "the read limit" if max_bytes is None else "--max-bytes"
    return f"larger than {what} ({limit} bytes): {size} bytes"


def iter_tar(
    path: str, shard: Shard | None = None, max_bytes: int | None = None
) -> Iterator[Member]:
    """Stream the structure members of a tar archive (see the module docstring).

    The archive is read by :class:`_TarStream` (headers parsed by
    :meth:`tarfile.TarInfo.frombuf`; pax and GNU long-name headers read here), one pass over
    the decompressed bytes in blocks of at most 1 MiB, keeping nothing of the members already
    passed: memory does not grow with the number of members, and a member that is not read
    (not a structure, outside the shard, larger than ``max_bytes``) is skipped in time linear
    in its size (a seek in a plain tar).

    Members are yielded in archive order; a member's :meth:`Member.read` must be called before
    the next one is asked for. With ``shard`` only members whose id is in the shard are
    yielded. A member larger than ``max_bytes`` (default: the read limit of structure files,
    :data:`protoken.structure.DEFAULT_MAX_BYTES`) is yielded with ``error`` set and no data,
    after it was skipped: when the archive ends inside it (a header claiming more than the
    archive holds), that one member says so and the stream ends. Otherwise an archive that
    cannot be read to its end-of-archive block (truncated, a header with a bad checksum, a
    corrupt compressed stream) ends the stream with one member named ``""`` whose ``error``
    says at which byte it stopped and after how many members.
    """
    count = 0
    try:
        stream = _TarStream(path)
    except OSError as exc:
        yield Member(f"{path}{SEP}", "", "tar", error=f"unreadable tar archive ({exc})")
        return
    with stream:
        entries = stream.entries()
        try:
            for entry in entries:
                count += 1
                if not entry.regular:  # folders, links, devices: never followed
                    continue
                base = entry.name.rstrip("/").rsplit("/", 1)[-1]
                if not base or base.startswith(".") or not is_structure_name(base):
                    continue
                member = Member(f"{path}{SEP}{entry.name}", entry.name, "tar",
                                offset=entry.start, size=entry.size)  # fmt: skip
                if not in_shard(member.id, shard):
                    continue
                if entry.sparse:
                    member.error = "a sparse tar member (not supported)"
                elif too_large := _too_large(entry.size, max_bytes):
                    member.error = too_large
                    try:
                        stream.skip_to(entry.end)
                    except TarError as exc:  # the archive ends inside it: one row says all
                        member.error = (
                            f"{too_large}; truncated or corrupt tar archive: it ends at byte "
                            f"{exc.at}, {entry.end - exc.at} bytes short of this member's end"
                        )
                        yield member
                        return
                else:
                    member._read = functools.partial(stream.read_member, entry)
                yield member
        except TarError as exc:
            yield Member(
                f"{path}{SEP}",
                "",
                "tar",
                error=f"truncated or corrupt tar archive: {exc} at byte {exc.at}, after "
                f"{count} members",
            )


@dataclass
class _TarEntry:
    """A member's header: its name, the size and offset of its data in the stream."""

    name: str
    size: int
    start: int
    regular: bool
    sparse: bool

    @property
    def end(self) -> int:
        """Where the next header starts (the data padded to whole blocks)."""
        return self.start + self.size + (-self.size % _BLOCK)


class _TarStream:
    """The bytes of a tar archive, decompressed as they are read (gzip, bzip2 and xz are
    recognised from their first bytes, as ``tarfile``'s ``r|*`` mode does), with a position.

    The decompressors are the standard library's file objects, which inflate at most what is
    asked for (bounded memory, linear time, multi-stream files as ``tar`` writes them with
    ``pigz`` or ``pbzip2``); a plain tar skips by seeking.
    """

    def __init__(self, path: str):
        self.raw = open(path, "rb")  # noqa: SIM115 - closed by close()
        try:
            magic = self.raw.read(6)
            self.raw.seek(0)
            self.size = os.fstat(self.raw.fileno()).st_size
            self.plain = False
            if magic[:2] == b"\x1f\x8b":
                self.fh = gzip.GzipFile(fileobj=self.raw, mode="rb")
            elif magic[:3] == b"BZh":
                self.fh = bz2.BZ2File(self.raw)
            elif magic == b"\xfd7zXZ\x00":
                self.fh = lzma.LZMAFile(self.raw)
            else:
                self.fh, self.plain = self.raw, True
        except BaseException:
            self.raw.close()
            raise
        self.pos = 0
        self.current: _TarEntry | None = None  # the member whose data is next

    def __enter__(self) -> _TarStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.current = None
        if self.fh is not self.raw:
            self.fh.close()
        self.raw.close()

    def read(self, n: int) -> bytes:
        """Up to ``n`` bytes (fewer only at the end of the archive), read in bounded chunks."""
        chunks = []
        left = n
        while left > 0:
            try:
                chunk = self.fh.read(min(left, _CHUNK))
            except _STREAM_ERRORS as exc:
                raise TarError(f"corrupt compressed stream ({_one_line(exc)})", self.pos) from None
            if not chunk:
                break
            chunks.append(chunk)
            self.pos += len(chunk)
            left -= len(chunk)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def skip_to(self, end: int) -> None:
        """Move to byte ``end`` (forward); TarError when the archive ends before it."""
        if self.pos >= end:
            return
        if self.plain:
            target = min(end, self.size)
            self.raw.seek(target)
            self.pos = target
        else:
            while self.pos < end:
                if not self.read(min(end - self.pos, _CHUNK)):
                    break
        if self.pos < end:
            raise TarError("the archive ends inside a member", self.pos)

    def read_member(self, entry: _TarEntry) -> bytes:
        """The data of the member whose header was just read (:meth:`Member.read`)."""
        if self.current is not entry or self.pos != entry.start:
            raise ValueError(f"{entry.name}: a tar member is read after the stream moved on")
        data = self.read(entry.size)
        if len(data) != entry.size:
            raise ValueError(
                f"truncated member: the archive ends {len(data)} bytes into its {entry.size} bytes"
            )
        return data

    def _extended(self, size: int, start: int) -> bytes:
        if size > MAX_TAR_HEADER:
            raise TarError(f"extended header of {size} bytes (more than {MAX_TAR_HEADER})", start)
        data = self.read(size)
        if len(data) != size:
            raise TarError("the archive ends inside an extended header", start)
        self.skip_to(self.pos + (-size % _BLOCK))
        return data

    def entries(self) -> Iterator[_TarEntry]:
        """The members' headers, in archive order, up to the end-of-archive block.

        Raises
        ------
        TarError
            The archive ends before its end-of-archive block, or a header is damaged (bad
            checksum, bad number, a malformed pax record): tar offers no way to find the next
            member after a bad header, so reading stops there.
        """
        global_pax: dict[str, str] = {}
        pax: dict[str, str] = {}
        long_name = ""
        while True:
            start = self.pos
            block = self.read(_BLOCK)
            if not block:
                raise TarError("the archive ends without an end-of-archive block", start)
            if len(block) < _BLOCK:
                raise TarError("the archive ends inside a header", start)
            if block == _ZERO_BLOCK:
                # the end of the archive, unless more follows: then this is a header wiped
                # out (tarfile stops there, dropping the members after it)
                if self.read(_BLOCK).strip(b"\0"):
                    raise TarError("a block of zeros where a header should be", start)
                return
            try:
                info = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
            except tarfile.HeaderError as exc:
                raise TarError(f"bad header ({exc})", start) from None
            size = info.size
            if size < 0:
                raise TarError("bad header (negative size)", start)
            if info.type in _PAX_TYPES:
                records = _pax_records(self._extended(size, start), start)
                (global_pax if info.type == tarfile.XGLTYPE else pax).update(records)
                continue
            if info.type in _LONG_TYPES:
                data = self._extended(size, start)
                if info.type == tarfile.GNUTYPE_LONGNAME:
                    long_name = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                continue
            if info.type == tarfile.GNUTYPE_SPARSE and block[482]:
                extended = True  # old GNU sparse: more sparse maps in the blocks that follow
                while extended:
                    ext = self.read(_BLOCK)
                    if len(ext) < _BLOCK:
                        raise TarError("the archive ends inside a header", start)
                    extended = bool(ext[504])
            fields = {**global_pax, **pax}
            name = fields.get("path") or long_name or info.name
            if "size" in fields:
                text = fields["size"]
                if not (text.isascii() and text.isdigit() and len(text) <= 20):
                    raise TarError(f"bad pax size {text[:40]!r}", start)
                size = int(text)
            sparse = info.type == tarfile.GNUTYPE_SPARSE or any(
                k.startswith("GNU.sparse.") for k in fields
            )
            # as tarfile: links, folders and devices have no data, whatever their size says
            has_data = (
                info.type in tarfile.REGULAR_TYPES or info.type not in tarfile.SUPPORTED_TYPES
            )
            regular = info.type in tarfile.REGULAR_TYPES
            entry = _TarEntry(name, size if has_data else 0, self.pos, regular, sparse)
            pax, long_name = {}, ""
            self.current = entry
            yield entry
            self.current = None
            self.skip_to(entry.end)


def _pax_records(data: bytes, start: int) -> dict[str, str]:
    """The ``LENGTH KEY=VALUE\\n`` records of a pax header (POSIX.1-2001), as tarfile reads
    them (names decoded as UTF-8, undecodable bytes kept as surrogates)."""
    records: dict[str, str] = {}
    pos = 0
    while pos < len(data) and data[pos] != 0:
        match = _PAX_RECORD.match(data, pos)
        length = int(match.group(1)) if match else 0
        end = pos + length
        if not match or end <= match.end() or end > len(data) or data[end - 1] != 0x0A:
            raise TarError("malformed pax header", start)
        key = match.group(2).decode("utf-8", "surrogateescape")
        records[key] = data[match.end() : end - 1].decode("utf-8", "surrogateescape")
        pos = end
    return records


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:160] or type(exc).__name__


# --------------------------------------------------------------------------- Foldcomp

#: The longest line read from a Foldcomp database's index or lookup (an index line is three
#: numbers, a lookup line a key, a name and a number). A longer line is skipped in bounded
#: chunks, never held in memory: one failed row for the index, ignored (logged) in the lookup.
MAX_LINE = 4096

#: The first bytes of every Foldcomp entry (the format's magic number).
FOLDCOMP_MAGIC = b"FCMP"

#: The largest index entry read as a Foldcomp entry. The format counts residues in 16 bits
#: (at most 65,535), about 14 bytes each (8 for the backbone, the rest side chains and
#: B-factors): real entries are under 1 MB (median 3.5 kB in the ProMod3 database).
MAX_FOLDCOMP_ENTRY = 16 << 20

#: Separate byte ranges of a data file the overlap check of the index keeps (entries written
#: one after the other merge into one range, so a database written by one or a few writers
#: keeps a handful); past this many the check stops, with a warning.
MAX_EXTENTS = 1 << 20

#: Consecutive CA atoms of a decoded Foldcomp chain must be this far apart, in Angstrom (cis
#: 2.9, trans 3.8; all 20,678 chains of the ProMod3 database lie within 2.52-4.37). Foldcomp
#: stores one unbroken chain of torsion angles, so there is no recorded break to allow for.
CA_CA_RANGE = (2.4, 4.5)


def _lines(path: str) -> Iterator[tuple[int, bytes | None]]:
    """``(number, line)`` of each line of a (regular) file, a line longer than
    :data:`MAX_LINE` being ``(number, None)`` (the rest of it read in 1 MiB chunks and
    dropped)."""
    with open(path, "rb") as fh:
        number = 0
        while line := fh.readline(MAX_LINE + 1):
            number += 1
            if len(line) <= MAX_LINE:
                yield number, line
                continue
            while not line.endswith(b"\n") and (line := fh.read(_CHUNK)):
                end = line.find(b"\n")
                if end >= 0:  # the next line starts after it
                    fh.seek(end + 1 - len(line), os.SEEK_CUR)
                    break
            yield number, None


def _index_rows(path: str) -> Iterator[tuple[int, int, int, int, str]]:
    """``(line number, key, offset, length, error)`` of each line of an MMseqs2 index; a line
    that is no index entry has key -1 and the reason in ``error``."""
    for number, line in _lines(path + ".index"):
        if line is None:
            yield number, -1, 0, 0, f"index line {number} is longer than {MAX_LINE} bytes"
            continue
        parts = line.split()
        if not parts:
            continue
        numbers = parts[:3]
        if len(numbers) < 3 or not all(x.isdigit() and len(x) <= 18 for x in numbers):
            yield number, -1, 0, 0, f"index line {number} is not KEY OFFSET LENGTH"
            continue
        key, offset, length = (int(x) for x in numbers)
        yield number, key, offset, length, ""


class _Extents:
    """The byte ranges of a data file used by the index entries seen so far, as sorted
    disjoint ``[start, end)`` ranges (adjacent ones merged), to find overlapping entries."""

    def __init__(self):
        self.starts: list[int] = []
        self.ends: list[int] = []
        self.full = False

    def add(self, start: int, end: int) -> tuple[int, int] | None:
        """Add ``[start, end)``; the range it overlaps instead (then nothing is added)."""
        if self.full:
            return None
        starts, ends = self.starts, self.ends
        i = bisect.bisect_right(starts, start)
        if i and ends[i - 1] > start:
            return starts[i - 1], ends[i - 1]
        if i < len(starts) and starts[i] < end:
            return starts[i], ends[i]
        left = i > 0 and ends[i - 1] == start
        right = i < len(starts) and starts[i] == end
        if left and right:
            ends[i - 1] = ends[i]
            del starts[i], ends[i]
        elif left:
            ends[i - 1] = end
        elif right:
            starts[i] = start
        else:
            starts.insert(i, start)
            ends.insert(i, end)
            if len(starts) > MAX_EXTENTS:
                self.full = True
                logger.warning(
                    "more than %d separate ranges of data file in the index: "
                    "overlapping entries are no longer looked for",
                    MAX_EXTENTS,
                )
        return None


def _checked_rows(path: str, size: int) -> Iterator[tuple[int, int, int, int, str]]:
    """:func:`_index_rows` with the reason each entry cannot be a Foldcomp entry: past the end
    of the data file, too short or too long, or overlapping another entry.

    Entries are checked against every entry before them (:class:`_Extents`) and against the
    one after them (rows are yielded one line late): so in an index sorted by offset (as
    Foldcomp and MMseqs2 write one) both entries of an overlapping pair are refused, whichever
    of the two lines is damaged; in an index out of offset order, the later of the two.
    """
    extents = _Extents()
    held: list | None = None
    for number, key, offset, length, error in _index_rows(path):
        end = offset + length
        if key >= 0 and not error:
            error = _entry_error(key, offset, length, size)
        if key >= 0 and not error and (hit := extents.add(offset, end)) is not None:
            error = (
                f"index entry {key} (bytes {offset}-{end}) overlaps bytes {hit[0]}-{hit[1]} "
                "of the entries before it: damaged index?"
            )
            if held is not None and held[1] >= 0 and not held[4]:
                h_start, h_end = held[2], held[2] + held[3]
                if h_start < end and offset < h_end:
                    held[4] = (
                        f"index entry {held[1]} (bytes {h_start}-{h_end}) overlaps index "
                        f"entry {key} (bytes {offset}-{end}): damaged index?"
                    )
        if held is not None:
            yield tuple(held)
        held = [number, key, offset, length, error]
    if held is not None:
        yield tuple(held)


def _entry_error(key: int, offset: int, length: int, size: int) -> str:
    if offset + length > size:
        return (
            f"index entry {key} points past the end of the data file "
            f"({offset} + {length} > {size} bytes): truncated database?"
        )
    if length <= len(FOLDCOMP_MAGIC):
        return f"index entry {key} has {length} bytes, too few for a Foldcomp entry"
    if length > MAX_FOLDCOMP_ENTRY:
        return (
            f"index entry {key} claims {length} bytes, more than a Foldcomp entry holds "
            f"({MAX_FOLDCOMP_ENTRY} bytes: 65,535 residues at most): damaged index?"
        )
    return ""


def _lookup_names(path: str) -> Callable[[int], str]:
    """A function key -> entry name, from ``path.lookup`` streamed in key order alongside the
    index (both are sorted by key in MMseqs2 databases); a lookup out of key order is read
    into a dict once (memory O(entries), logged). Keys without a name are named by the key."""
    lookup = path + ".lookup"
    if not os.path.isfile(lookup):
        return str

    def rows() -> Iterator[tuple[int, str]]:
        for number, line in _lines(lookup):
            if line is None:
                logger.warning(
                    "%s: line %d is longer than %d bytes (ignored)", lookup, number, MAX_LINE
                )
                continue
            parts = line.rstrip(b"\r\n").split(b"\t")
            if len(parts) >= 2 and parts[0].isdigit() and parts[1]:
                yield int(parts[0]), parts[1].decode("utf-8", "surrogateescape")

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

    Each entry's bytes are read only when :meth:`Member.read` is called, so resuming or
    sharding skips entries without reading them. The index is checked as it is streamed
    (:func:`_checked_rows`): an entry pointing outside the data file, too short or too long
    for a Foldcomp entry (:data:`MAX_FOLDCOMP_ENTRY`) or for ``max_bytes``, or overlapping
    another entry gives a member with ``error`` set. An index line that is no entry (not three
    numbers, longer than :data:`MAX_LINE`) gives a member with ``error`` set, source
    ``DB.index::line N``, and the stream goes on. :meth:`Member.read` checks that the bytes
    start with :data:`FOLDCOMP_MAGIC` and end with the NUL Foldcomp writes after each entry
    before reading them.

    Raises
    ------
    ValueError
        The foldcomp package is not installed.
    """
    if importlib.util.find_spec("foldcomp") is None:  # a run-level error, not one per entry
        raise ValueError(
            f"{path} is a Foldcomp database: reading it needs the foldcomp package "
            "(pip install 'protoken[foldcomp]')"
        )
    size = os.path.getsize(path)
    name_of = _lookup_names(path)
    for number, key, offset, length, error in _checked_rows(path, size):
        if key < 0:  # not an index entry: recorded, and the stream goes on
            member = Member(f"{path}.index{SEP}line {number}", f"line {number}", "foldcomp", error)
            if in_shard(member.id, shard):
                yield member
            continue
        name = name_of(key)
        member = Member(f"{path}{SEP}{name}", name, "foldcomp", offset=offset, size=length)
        if not in_shard(member.id, shard):
            continue
        if error:
            member.error = error
        elif too_large := _too_large(length, max_bytes):
            member.error = too_large
        else:
            member._read = functools.partial(_read_entry, path, key, offset, length)
        yield member


def _read_entry(path: str, key: int, offset: int, length: int) -> bytes:
    """A Foldcomp entry's bytes without the NUL that ends it, checked first from its first
    and last bytes (so a sparse or overwritten data file costs two small reads); ``key`` -1:
    read by location only (:func:`read_at`)."""
    what = f"index entry {key}" if key >= 0 else f"the entry at byte {offset}"
    with open(path, "rb") as fh:
        fd = fh.fileno()
        if os.pread(fd, len(FOLDCOMP_MAGIC), offset) != FOLDCOMP_MAGIC:
            raise ValueError(
                f"{what} does not start a Foldcomp entry (no "
                f"{FOLDCOMP_MAGIC.decode()} at byte {offset}): damaged index or "
                "data file?"
            )
        if os.pread(fd, 1, offset + length - 1) != b"\0":
            raise ValueError(
                f"{what} does not end with the NUL Foldcomp writes after "
                f"each entry (byte {offset + length - 1}): damaged index?"
            )
        data = os.pread(fd, length, offset)
    if len(data) != length:
        raise ValueError("short read from the data file")
    return data[:-1]


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
        return _read_entry(path, -1, offset, size)
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
    if bb is None:
        try:
            _, text = foldcomp.decompress(data)
        except Exception as exc:  # noqa: BLE001 - any decoder error is a bad entry
            reason = " ".join(str(exc).split())[:120]
            raise StructureError(f"unreadable Foldcomp entry ({reason})") from None
        if isinstance(text, str):
            text = text.encode()
        (bb,) = read_backbones(
            member_id(base) + ".pdb",
            chains="first",
            models="first",
            max_bytes=max_bytes,
            data=text,
        )
    why = implausible_chain(bb.ca)
    if why:
        raise StructureError(
            f"implausible Foldcomp chain: {why}: a damaged entry, or a structure Foldcomp "
            "could not encode"
        )
    return [bb]


def implausible_chain(ca: np.ndarray, limits: tuple[float, float] = CA_CA_RANGE) -> str:
    """Why a chain without breaks cannot be a protein's, or "": a distance between consecutive
    CA atoms (``ca``: (L, 3), Angstrom) outside ``limits`` (:data:`CA_CA_RANGE`) or not
    finite. The reason names the worst step (residues numbered from 1) and how many there are.
    """
    if len(ca) < 2:
        return ""
    steps = np.linalg.norm(np.diff(ca, axis=0), axis=1)
    low, high = limits
    bad = np.flatnonzero(~((steps >= low) & (steps <= high)))  # NaN is bad too
    if not bad.size:
        return ""
    off = np.abs(steps[bad] - 3.8)
    worst = int(bad[np.argmax(np.where(np.isfinite(off), off, np.inf))])
    return (
        f"CA-CA {steps[worst]:.3g} A between residues {worst + 1} and {worst + 2} "
        f"({bad.size} of {len(steps)} steps outside {low:g}-{high:g} A)"
    )


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
    first = _first_residue_number(data)
    return Backbone(
        id=member_id(name),
        sequence=sequence,
        coords=backbone,
        chain_id="A",
        dropped=0,
        res_names=[three[r] for r in sequence],
        res_ids=[str(k) for k in range(first, first + len(sequence))],
    )


def _first_residue_number(data: bytes) -> int:
    """The author number of a Foldcomp entry's first residue: ``idxResidue`` of its header
    (an unsigned 16-bit integer, bytes 8-9 after the ``FCMP`` magic, little-endian; see
    ``CompressedFileHeader`` in Foldcomp's foldcomp.h). Residues are stored consecutively and
    ``foldcomp.decompress`` numbers them from it; ``get_data`` does not return it. 1 when the
    bytes are no Foldcomp header."""
    if len(data) >= 10 and data[:4] == b"FCMP":
        return int.from_bytes(data[8:10], "little")
    return 1
