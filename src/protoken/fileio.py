"""Small file helpers shared by the writers: atomic writes, FASTA, TSV tables."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager

__all__ = [
    "file_sha256",
    "atomic_path",
    "atomic_write",
    "format_value",
    "publish",
    "read_fasta",
    "temp_name",
    "write_tsv",
    "drop_partial_last_line",
]


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 of a file's bytes, as hex (read in 1 MB blocks)."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def temp_name(path: str | os.PathLike, suffix: str = "") -> str:
    """The temporary name a file is written under before it is renamed to ``path``."""
    return f"{os.fspath(path)}.tmp{os.getpid()}{suffix}"


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[str]:
    """Yield a temporary path to write ``path``'s content to; rename it over ``path`` on success.

    Readers see the old file or the whole new one (``os.replace`` is atomic on POSIX). On an
    error the temporary file is removed; a crash leaves at most a ``*.tmp<pid>`` file behind.
    ``suffix`` keeps an extension some writers insist on (``np.savez`` adds ``.npz``).
    """
    tmp = temp_name(path, suffix)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def publish(tmp: str | os.PathLike, path: str | os.PathLike) -> bool:
    """Give the finished file ``tmp`` the name ``path``, unless ``path`` exists: then False,
    and ``tmp`` is left as it is. Never replaces a file, even one that appears meanwhile: a
    hard link, which fails on an existing name; where hard links are not supported (some
    network or FUSE file systems), a check then a rename."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    except OSError:  # no hard links here
        if os.path.lexists(path):
            return False
        os.replace(tmp, path)
        return True
    os.unlink(tmp)
    return True


def atomic_write(path: str | os.PathLike, data: bytes | str, fsync: bool = False) -> None:
    """Write ``data`` (bytes or text) to ``path`` atomically (see :func:`atomic_path`)."""
    mode = "wb" if isinstance(data, bytes | bytearray | memoryview) else "w"
    with atomic_path(path) as tmp, open(tmp, mode) as fh:
        fh.write(data)
        if fsync:
            fh.flush()
            os.fsync(fh.fileno())


def drop_partial_last_line(path: str | os.PathLike) -> None:
    """Cut a torn last line (no final newline: a writer killed mid-line) off an append-only
    text file, so that the next append starts a line of its own."""
    with open(path, "rb+") as fh:
        fh.seek(0, os.SEEK_END)
        size = fh.tell()
        fh.seek(max(0, size - 65536))
        tail = fh.read()
        if tail.endswith(b"\n"):
            return
        cut = tail.rfind(b"\n")
        fh.truncate(size - len(tail) + cut + 1 if cut >= 0 else 0)


def format_value(value) -> str:
    """A metric as written in TSV and Markdown tables: booleans lower-case, floats with 4
    decimals (small non-zero ones with 6 significant digits, so 0.00015 A stays visible)."""
    import numpy as np

    if isinstance(value, bool | np.bool_):
        return str(bool(value)).lower()
    if isinstance(value, float | np.floating):
        return f"{value:.6g}" if abs(value) < 1e-3 and value else f"{value:.4f}"
    return str(value)


def write_tsv(path: str | os.PathLike, columns: Sequence[str], rows: Iterable[Mapping]) -> None:
    """Write a TSV table atomically: a header row of ``columns``, then one line per row with
    its values (missing ones empty) formatted by :func:`format_value`."""
    lines = ["\t".join(columns)]
    lines += ["\t".join(format_value(row.get(c, "")) for c in columns) for row in rows]
    atomic_write(path, "\n".join(lines) + "\n")


def read_fasta(path: str | os.PathLike) -> dict[str, str]:
    """Records of a FASTA file: id (first word of the header) -> sequence (one-letter)."""
    out: dict[str, str] = {}
    name, chunks = None, []
    with open(path) as fh:
        for line in fh:
            line = line.strip()
            if line.startswith(">"):
                if name is not None:
                    out[name] = "".join(chunks)
                name, chunks = (line[1:].split() or [""])[0], []
            elif line and name is not None:
                chunks.append(line)
    if name is not None:
        out[name] = "".join(chunks)
    return out
