"""Finding the inputs of every command: folder walks, structure names, ids and shards.

One place decides which files a command reads and what each is called:

- :func:`walk_files`: the files under a folder, streamed with ``os.scandir`` (constant memory,
  even for one flat folder of millions of files);
- :func:`find_structures` (``protoken convert``) and :func:`find_images` (``protoken
  reconstruct``) turn the paths given on the command line into a stream of files (what
  ``encode`` and ``evaluate`` read, structures or images, is
  :func:`protoken.archives.find_inputs`);
- :func:`structure_id` and :func:`image_id`: the id of a file (the stem every output is named
  after), always a *safe id* (:func:`safe_id`);
- :func:`safe_id`, :func:`is_safe_id`, :func:`check_under` and :func:`safe_output_path`: names
  that come from data (file names, chain ids, ids stored in token files) never become paths
  unchecked;
- :func:`in_shard` / :func:`parse_shard`: ``--shard I/N``, by the md5 of each input's id, so
  that a shard is the same whatever the root and inputs sharing an id share a shard.

Safe ids
--------
Every output is named ``ID + suffix`` inside a folder the user chose, and ``ID`` comes from data:
a file name, a chain id (any string in mmCIF and BinaryCIF, e.g. ``../../e``), an id stored in a
token file. One mapping, :func:`safe_id`, turns any such text into a file name that stays where
it is put:

- the characters ``A-Z a-z 0-9 . _ -`` are kept; every other character (``/``, ``%``, spaces,
  non-ASCII ...) becomes its UTF-8 bytes written ``%XX`` (upper-case hex), as in URLs; bytes of
  undecodable file names (surrogate escapes) are written as the bytes they were;
- a leading ``.`` becomes ``%2E``: an id is never ``.`` or ``..`` and never a hidden file;
- an id longer than :data:`MAX_ID_LENGTH` characters is cut (never inside a ``%XX``) and ends
  with ``~`` and 16 hex digits of the sha256 of the original text.

The mapping is injective (``%`` itself is encoded, and ``~`` only ever appears in a cut id), so
two different names never share an id by accident; ids of ordinary names (``1abc``,
``AF-P12345-F1-model_v4``) are unchanged. :func:`is_safe_id` says whether a text is such an id,
and :func:`safe_output_path` refuses anything else, so a hostile id read back from a file (a
token file's ``../escaped``) is refused rather than written outside ``--out``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Callable, Iterable, Iterator

__all__ = [
    "MAX_ID_LENGTH",
    "STRUCTURE_EXTENSIONS",
    "STRUCTURE_SUFFIXES",
    "UnsafePath",
    "chain_output_id",
    "check_under",
    "find_images",
    "find_structures",
    "image_id",
    "in_shard",
    "is_safe_id",
    "is_structure_name",
    "parse_shard",
    "safe_id",
    "safe_output_path",
    "shard_from_environment",
    "structure_id",
    "walk_files",
]

logger = logging.getLogger(__name__)

#: File extensions read as structures (each also with ``.gz``).
STRUCTURE_EXTENSIONS = (".pdb", ".ent", ".cif", ".mmcif", ".bcif")
#: The same, with and without ``.gz``.
STRUCTURE_SUFFIXES = tuple(ext + gz for ext in STRUCTURE_EXTENSIONS for gz in ("", ".gz"))

Shard = tuple[int, int]

#: Longest id :func:`safe_id` returns (characters, all ASCII): with ``.fasta`` and a temporary
#: suffix, a file name stays well below the 255 bytes most file systems allow.
MAX_ID_LENGTH = 200
_SAFE_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-")
_SAFE_ID = re.compile(r"[A-Za-z0-9_\-%~][A-Za-z0-9._\-%~]*\Z")
_PLAIN = re.compile(r"[A-Za-z0-9_\-][A-Za-z0-9._\-]*\Z")  # kept as it is by safe_id


class UnsafePath(ValueError):
    """A name from data that would be written outside the output folder (or is no safe id)."""


# --------------------------------------------------------------------------- safe ids


def safe_id(text: str) -> str:
    """The safe id of a name that comes from data (see the module docstring).

    >>> safe_id("1abc"), safe_id("../../e"), safe_id(".."), safe_id("a b%")
    ('1abc', '%2E.%2F..%2Fe', '%2E.', 'a%20b%25')

    Raises
    ------
    ValueError
        ``text`` is empty.
    """
    if not text:
        raise ValueError("an empty name has no id")
    return _capped(_encoded(text), text)


def _encoded(text: str) -> str:
    if _PLAIN.match(text):  # the common case, at regex speed
        return text
    parts = []
    for k, c in enumerate(text):
        if c in _SAFE_CHARS and not (k == 0 and c == "."):
            parts.append(c)
        else:
            parts.append("".join(f"%{b:02X}" for b in c.encode("utf-8", "surrogateescape")))
    return "".join(parts)


def _capped(encoded: str, original: str) -> str:
    """``encoded`` cut to :data:`MAX_ID_LENGTH` characters with ``~`` and a hash of
    ``original``, if longer."""
    if len(encoded) <= MAX_ID_LENGTH:
        return encoded
    digest = hashlib.sha256(original.encode("utf-8", "surrogateescape")).hexdigest()[:16]
    keep = MAX_ID_LENGTH - 17
    cut = encoded[:keep]
    pct = cut.rfind("%", max(0, keep - 2))
    if pct >= 0:  # never cut inside a %XX
        cut = cut[:pct]
    return f"{cut}~{digest}"


def chain_output_id(stem: str, chain_id: str) -> str:
    """The id of one chain in ``--chains split`` mode: ``STEM_CHAIN``, the chain id made safe as
    :func:`safe_id` does (a blank chain id is ``_``), the whole capped at
    :data:`MAX_ID_LENGTH` (``stem`` is a safe id already).

    >>> chain_output_id("1abc", "A"), chain_output_id("x", "../../e"), chain_output_id("x", "")
    ('1abc_A', 'x_%2E.%2F..%2Fe', 'x__')
    """
    encoded = f"{stem}_{_encoded(chain_id) if chain_id else '_'}"
    return _capped(encoded, f"{stem}\0{chain_id}")


def is_safe_id(text: object) -> bool:
    """Whether ``text`` is an id :func:`safe_id` can return: a non-empty string of at most
    :data:`MAX_ID_LENGTH` characters from ``A-Z a-z 0-9 . _ - % ~``, not starting with ``.``
    (so never ``.``, ``..``, a hidden name or anything holding a path separator)."""
    return (
        isinstance(text, str)
        and 0 < len(text) <= MAX_ID_LENGTH
        and _SAFE_ID.match(text) is not None
    )


def check_under(out_dir: str | os.PathLike, path: str | os.PathLike) -> str:
    """``path``, made absolute, if it lies strictly inside ``out_dir``; UnsafePath otherwise.

    The check is on the normalised absolute paths (``..`` resolved as text), not on where
    symlinks point: a folder the user linked inside ``out_dir`` on purpose stays usable, while a
    name from data cannot climb out (with safe ids it holds no separator or ``..`` anyway).
    Outputs are written to a temporary name and renamed, which replaces a symlink in the way
    rather than writing through it.
    """
    root = os.path.abspath(os.fspath(out_dir))
    full = os.path.abspath(os.path.join(root, os.fspath(path)))
    if os.path.commonpath([root, full]) != root or full == root:
        raise UnsafePath(f"{os.fspath(path)!r} is not inside {root}")
    return full


def safe_output_path(out_dir: str | os.PathLike, id: str, suffix: str) -> str:
    """``out_dir/ID+suffix`` for an ``id`` that is a safe id (:func:`is_safe_id`), checked to lie
    inside ``out_dir`` (:func:`check_under`).

    This is how an id read back from a file (a token file, a manifest) becomes a path: an id
    that is not safe (``../escaped``, ``/etc/x``, ``..``, ``""``) is refused with UnsafePath
    rather than re-encoded, because it cannot have been written by protoken.

    >>> safe_output_path("/out", "1abc_A", ".png")
    '/out/1abc_A.png'
    """
    if not is_safe_id(id):
        raise UnsafePath(f"unsafe id {id!r}: ids are made of A-Z a-z 0-9 . _ - % ~ only")
    if suffix and ("/" in suffix or os.sep in suffix):
        raise UnsafePath(f"unsafe suffix {suffix!r}")
    return check_under(out_dir, id + suffix)


# --------------------------------------------------------------------------- folder walks


def walk_files(
    root: str | os.PathLike,
    suffixes: tuple[str, ...] | None = None,
    follow_links: bool = False,
    on_skip: Callable[[str, str], None] | None = None,
) -> Iterator[str]:
    """Yield the files under ``root`` recursively, streamed with os.scandir.

    Files are yielded in the order the file system lists them, as they are listed, so even one
    flat folder of millions of files is walked in constant memory; only the names of
    subfolders are kept (visited in sorted order). Hidden entries (``.name``) are skipped.
    ``suffixes``, when given, keeps only names ending with one of them (case-insensitive).
    ``root`` may itself be a file, or a symlink to a folder.

    Symlinked folders inside ``root`` are not entered unless ``follow_links`` (a downloaded tree
    may hold ``evil -> /``); ``on_skip(path, reason)`` (default: a logged warning) hears of each.
    Every folder is walked at most once, by device and inode, so a loop (``loop -> ..``) ends
    with every real folder walked once. Symlinked files are read.
    """
    root = os.fspath(root)
    if not os.path.isdir(root):
        if os.path.isfile(root) and (suffixes is None or root.lower().endswith(suffixes)):
            yield root
        return
    if on_skip is None:

        def on_skip(path: str, reason: str) -> None:
            logger.warning("%s: %s", path, reason)

    seen: set[tuple[int, int]] = set()
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            st = os.stat(folder)
        except OSError:
            continue
        if (st.st_dev, st.st_ino) in seen:
            if folder != root:
                on_skip(folder, "folder already walked (a symlink loop?): not walked again")
            continue
        seen.add((st.st_dev, st.st_ino))
        subdirs = []
        try:
            with os.scandir(folder) as it:
                for entry in it:
                    if entry.name.startswith("."):
                        continue
                    try:
                        if entry.is_dir():
                            if follow_links or not entry.is_symlink():
                                subdirs.append(entry.path)
                            else:
                                on_skip(entry.path, "symlinked folder not followed "
                                        "(use --follow-links)")  # fmt: skip
                        elif entry.is_file() and (
                            suffixes is None or entry.name.lower().endswith(suffixes)
                        ):
                            yield entry.path
                    except OSError:
                        continue
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            continue
        stack.extend(sorted(subdirs, reverse=True))


def is_structure_name(name: str) -> bool:
    """Whether a file name found in a folder is read as a structure: a structure extension
    (.pdb .ent .cif .mmcif .bcif, optionally .gz) or no extension at all (PDB files, as the
    reference design accepts)."""
    low = name.lower()
    if low.endswith(STRUCTURE_SUFFIXES):
        return True
    base = low[:-3] if low.endswith(".gz") else low
    return "." not in base


def structure_id(path: str | os.PathLike) -> str:
    """The safe id (:func:`safe_id`) of a structure file: its name without structure and
    compression extensions (``1abc.cif.gz`` -> ``1abc``, ``a b.pdb`` -> ``a%20b``)."""
    name = os.path.basename(os.fspath(path))
    if name.lower().endswith(".gz") and len(name) > 3:
        name = name[:-3]
    stem, ext = os.path.splitext(name)
    return safe_id(stem if stem and ext.lower() in STRUCTURE_EXTENSIONS else name)


def image_id(path: str | os.PathLike) -> str:
    """The id of an image file: its name without ``.png``, kept as it is when it already is a
    safe id (as every image protoken writes), else made one with :func:`safe_id`."""
    name = os.path.basename(os.fspath(path))
    stem = name[:-4] if name.lower().endswith(".png") and len(name) > 4 else name
    return stem if is_safe_id(stem) else safe_id(stem)


def in_shard(key: str, shard: Shard | None) -> bool:
    """Whether ``key`` (an input's id) belongs to shard (I, N): md5 of the key, modulo N."""
    if shard is None:
        return True
    index, count = shard
    digest = hashlib.md5(key.encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:8], "big") % count == index


def shard_from_environment(env: dict | None = None) -> tuple[Shard, str]:
    """The shard of this task of a SLURM job array, and a sentence saying how it was found.

    Task ``SLURM_ARRAY_TASK_ID`` of an array ``MIN-MAX[:STEP]`` is shard
    ``(ID - MIN) // STEP`` of ``SLURM_ARRAY_TASK_COUNT`` (or ``(MAX - MIN) // STEP + 1``), so
    ``--array=0-63`` and ``--array=1-64`` both give shards 0/64 ... 63/64.

    Raises
    ------
    ValueError
        Not in a job array, or an array that is no range (``--array=1,5,7``).
    """
    env = os.environ if env is None else env
    names = ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_MAX",
             "SLURM_ARRAY_TASK_STEP", "SLURM_ARRAY_TASK_COUNT")  # fmt: skip
    got = {k: env.get(k) for k in names if env.get(k) not in (None, "")}
    if "SLURM_ARRAY_TASK_ID" not in got:
        raise ValueError(
            "--shard auto needs a SLURM job array (SLURM_ARRAY_TASK_ID is not set); "
            "give --shard I/N instead"
        )
    try:
        task = int(got["SLURM_ARRAY_TASK_ID"])
        low = int(got.get("SLURM_ARRAY_TASK_MIN", 0))
        step = int(got.get("SLURM_ARRAY_TASK_STEP", 1)) or 1
        if "SLURM_ARRAY_TASK_COUNT" in got:
            count = int(got["SLURM_ARRAY_TASK_COUNT"])
        elif "SLURM_ARRAY_TASK_MAX" in got:
            count = (int(got["SLURM_ARRAY_TASK_MAX"]) - low) // step + 1
        else:
            raise ValueError("neither SLURM_ARRAY_TASK_COUNT nor SLURM_ARRAY_TASK_MAX is set")
    except ValueError as exc:
        raise ValueError(f"--shard auto: unusable SLURM array variables ({exc})") from None
    index, rest = divmod(task - low, step)
    seen = ", ".join(f"{k}={v}" for k, v in got.items())
    if rest or not 0 <= index < count:
        raise ValueError(
            f"--shard auto: task {task} is not in a range array ({seen}); "
            "use --array=A-B[:S], or give --shard I/N"
        )
    return (index, count), f"--shard auto: {seen} -> shard {index}/{count}"


def parse_shard(text: str) -> Shard:
    """``"I/N"`` -> (I, N) with 0 <= I < N, or ``"auto"``: the SLURM array task's shard
    (:func:`shard_from_environment`); ValueError otherwise."""
    if text.strip().lower() == "auto":
        return shard_from_environment()[0]
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ValueError(f"expected I/N, e.g. 0/4, not {text!r}") from None
    if not (n >= 1 and 0 <= i < n):
        raise ValueError(f"shard I/N needs 0 <= I < N, not {text!r}")
    return i, n


def find_structures(
    inputs: Iterable[str],
    shard: Shard | None = None,
    follow_links: bool = False,
    expand: Callable[[str], Iterator | None] | None = None,
) -> Iterator:
    """Stream the structure files of ``inputs`` (files, or folders walked recursively with
    :func:`walk_files`).

    Files named explicitly are always taken; inside folders, names that
    :func:`is_structure_name` accepts. With ``shard=(I, N)`` only the files whose id
    (:func:`structure_id`) hashes to shard I are yielded: inputs that share an id (``1abc.pdb``
    and ``1abc.cif``) always share a shard, and a shard is the same whatever the root.
    ``expand(path)``, when given, is asked first about every file: an iterator of what the
    file holds (an archive's members, :func:`protoken.archives.find_sources`) is yielded in
    its place; None means a plain file.

    Raises
    ------
    FileNotFoundError
        An input does not exist (raised when the stream reaches it).
    """
    for item in inputs:
        item = os.fspath(item)
        if os.path.isdir(item):
            paths = walk_files(item, follow_links=follow_links)
            named = False
        elif os.path.exists(item):
            paths, named = (item,), True
        else:
            raise FileNotFoundError(f"input not found: {item}")
        for path in paths:
            members = expand(path) if expand is not None else None
            if members is not None:
                yield from members
            elif named or is_structure_name(os.path.basename(path)):
                if in_shard(structure_id(path), shard):
                    yield path


def find_images(
    inputs: Iterable[str], shard: Shard | None = None, follow_links: bool = False
) -> Iterator[str]:
    """Stream the ``.png`` files of ``inputs`` (files, or folders walked recursively); sharded
    by :func:`image_id` as :func:`find_structures`. Raises FileNotFoundError for an input that
    does not exist."""
    for item in inputs:
        item = os.fspath(item)
        if not os.path.exists(item):
            raise FileNotFoundError(f"input not found: {item}")
        for path in walk_files(item, (".png",), follow_links=follow_links):
            if in_shard(image_id(path), shard):
                yield path
