"""Finding the inputs of every command: folder walks, structure names, ids and shards.

One place decides which files a command reads and what each is called:

- :func:`walk_files`: the files under a folder, streamed with ``os.scandir`` (constant memory,
  even for one flat folder of millions of files);
- :func:`find_structures` (``protoken convert``), :func:`find_images` (``protoken
  reconstruct``) and :func:`find_inputs` (``encode`` / ``evaluate``: PNGs or structures) turn
  the paths given on the command line into a stream of files;
- :func:`structure_id` and :func:`image_id`: the id of a file (the stem every output is named
  after);
- :func:`in_shard` / :func:`parse_shard`: ``--shard I/N``, by the md5 of each input's path
  relative to the folder it was found in, so that a shard is the same whatever the root.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator

__all__ = [
    "STRUCTURE_EXTENSIONS",
    "STRUCTURE_SUFFIXES",
    "find_images",
    "find_inputs",
    "find_structures",
    "image_id",
    "in_shard",
    "is_structure_name",
    "parse_shard",
    "structure_id",
    "walk_files",
]

#: File extensions read as structures (each also with ``.gz``).
STRUCTURE_EXTENSIONS = (".pdb", ".ent", ".cif", ".mmcif", ".bcif")
#: The same, with and without ``.gz``.
STRUCTURE_SUFFIXES = tuple(ext + gz for ext in STRUCTURE_EXTENSIONS for gz in ("", ".gz"))

Shard = tuple[int, int]


def walk_files(root: str | os.PathLike, suffixes: tuple[str, ...] | None = None) -> Iterator[str]:
    """Yield the files under ``root`` recursively, streamed with os.scandir.

    Files are yielded in the order the file system lists them, as they are listed, so even one
    flat folder of millions of files is walked in constant memory; only the names of
    subfolders are kept (visited in sorted order). Hidden entries (``.name``) are skipped.
    ``suffixes``, when given, keeps only names ending with one of them (case-insensitive).
    ``root`` may itself be a file.
    """
    root = os.fspath(root)
    if not os.path.isdir(root):
        if os.path.isfile(root) and (suffixes is None or root.lower().endswith(suffixes)):
            yield root
        return
    stack = [root]
    while stack:
        folder = stack.pop()
        subdirs = []
        try:
            with os.scandir(folder) as it:
                for entry in it:
                    if entry.name.startswith("."):
                        continue
                    try:
                        if entry.is_dir():
                            subdirs.append(entry.path)
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
    """File name without its structure and compression extensions (``1abc.cif.gz`` -> ``1abc``)."""
    name = os.path.basename(os.fspath(path))
    if name.lower().endswith(".gz"):
        name = name[:-3]
    stem, ext = os.path.splitext(name)
    return stem if ext.lower() in STRUCTURE_EXTENSIONS else name


def image_id(path: str | os.PathLike) -> str:
    """The id of an image file: its name without ``.png``."""
    name = os.path.basename(os.fspath(path))
    return name[:-4] if name.lower().endswith(".png") else name


def in_shard(key: str, shard: Shard | None) -> bool:
    """Whether ``key`` (an input path relative to its root) belongs to shard (I, N)."""
    if shard is None:
        return True
    index, count = shard
    digest = hashlib.md5(key.encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:8], "big") % count == index


def parse_shard(text: str) -> Shard:
    """``"I/N"`` -> (I, N) with 0 <= I < N; ValueError otherwise."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ValueError(f"expected I/N, e.g. 0/4, not {text!r}") from None
    if not (n >= 1 and 0 <= i < n):
        raise ValueError(f"shard I/N needs 0 <= I < N, not {text!r}")
    return i, n


def find_structures(inputs: Iterable[str], shard: Shard | None = None) -> Iterator[str]:
    """Stream the structure files of ``inputs`` (files, or folders walked recursively).

    Files named explicitly are always taken; inside folders, names that
    :func:`is_structure_name` accepts. With ``shard=(I, N)`` only the files whose path relative
    to their input folder (a file's own name for a file given explicitly) hashes to shard I are
    yielded.

    Raises
    ------
    FileNotFoundError
        An input does not exist (raised when the stream reaches it).
    """
    for item in inputs:
        item = os.fspath(item)
        if os.path.isdir(item):
            for path in walk_files(item):
                if is_structure_name(os.path.basename(path)):
                    if in_shard(os.path.relpath(path, item), shard):
                        yield path
        elif os.path.exists(item):
            if in_shard(os.path.basename(item), shard):
                yield item
        else:
            raise FileNotFoundError(f"input not found: {item}")


def find_images(inputs: Iterable[str], shard: Shard | None = None) -> Iterator[str]:
    """Stream the ``.png`` files of ``inputs`` (files, or folders walked recursively); sharded
    as :func:`find_structures`. Raises FileNotFoundError for an input that does not exist."""
    for item in inputs:
        item = os.fspath(item)
        if not os.path.exists(item):
            raise FileNotFoundError(f"input not found: {item}")
        for path in walk_files(item, (".png",)):
            key = os.path.relpath(path, item) if path != item else os.path.basename(item)
            if in_shard(key, shard):
                yield path


def find_inputs(inputs: Iterable[str], shard: Shard | None = None) -> Iterator[str]:
    """Stream structure files or PNG images: a folder holding any PNG is read as images, any
    other input as structures (:func:`find_structures`); sharded alike."""
    for item in inputs:
        item = os.fspath(item)
        pngs = False
        if os.path.isdir(item):
            for path in walk_files(item, (".png",)):
                pngs = True
                if in_shard(os.path.relpath(path, item), shard):
                    yield path
        if not pngs:
            yield from find_structures([item], shard)
