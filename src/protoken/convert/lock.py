"""One writer per output folder and shard, and the cleanup after a killed run.

A conversion holds a lock (:class:`Lock`, ``flock``, released by the kernel when the process
ends, so a killed run never leaves a stale lock) for as long as it writes ``OUT``: a second
run into the same OUT and shard is refused at once (:class:`ConvertBusy`), while the shards of
one OUT run side by side. A marker file left by a killed run tells the next run of the same
tag to remove that run's temporary files (:func:`remove_leftovers`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket

__all__ = ["ConvertBusy", "Lock", "remove_leftovers", "run_tag"]


class ConvertBusy(RuntimeError):
    """Another ``protoken convert`` is writing the same OUT (and shard)."""


def run_tag(shard: tuple[int, int] | None) -> str:
    """What names a run's lock, marker, temporary files and shards: ``all`` or
    ``shard-I-of-N``."""
    return "all" if shard is None else f"shard-{shard[0]}-of-{shard[1]}"


class Lock:
    """One writer per OUT and shard, with ``flock`` (released by the kernel when the process
    ends, so a killed run never leaves a stale lock).

    An unsharded run holds ``OUT/.protoken-convert.lock`` exclusively; a shard holds it shared
    and its own ``OUT/.protoken-convert.shard-I-of-N.lock`` exclusively: shards run side by
    side, a second run of one shard (or an unsharded run beside shards) is refused at once.
    A marker ``OUT/.protoken-convert.TAG.running`` stays behind when a run is killed, so the
    next run of that tag knows to remove its temporary files.
    """

    def __init__(self, out: str, shard: tuple[int, int] | None):
        self.handles: list = []
        self.tag = run_tag(shard)
        self.marker = os.path.join(out, f".protoken-convert.{self.tag}.running")
        main = os.path.join(out, ".protoken-convert.lock")
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX: no locking
            return
        try:
            self._take(fcntl, main, fcntl.LOCK_EX if shard is None else fcntl.LOCK_SH, out)
            if shard is not None:
                own = os.path.join(out, f".protoken-convert.{self.tag}.lock")
                self._take(fcntl, own, fcntl.LOCK_EX, out)
        except BaseException:
            self.release()
            raise

    def _take(self, fcntl, path: str, mode: int, out: str) -> None:
        fh = open(path, "a+")  # noqa: SIM115 - kept open while the lock is held
        try:
            fcntl.flock(fh, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            fh.close()
            raise ConvertBusy(
                f"{out} is being written by another protoken convert ({holder}); "
                "wait for it to finish, or use another --out (shards of one OUT may run "
                "side by side)"
            ) from None
        except OSError as exc:  # a file system without locks (some network mounts)
            fh.close()
            logging.getLogger(__name__).warning(
                "%s: cannot lock %s (%s): runs into the same OUT are not kept apart", out, path,
                exc.strerror or exc,
            )  # fmt: skip
            return
        self.handles.append((fh, bool(mode & fcntl.LOCK_EX)))
        if mode & fcntl.LOCK_EX:
            fh.seek(0)
            fh.truncate()
            fh.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
            fh.flush()

    def release(self) -> None:
        for fh, exclusive in self.handles:
            if exclusive:  # no stale "pid N" for the next run's message
                with contextlib.suppress(OSError):
                    fh.truncate(0)
            fh.close()
        self.handles = []


def remove_leftovers(out: str, fasta_folder: str, tag: str) -> int:
    """Remove the temporary files a killed run of this tag left in OUT's bins and FASTA folder
    (an unsharded run, which excludes every other, removes those of any tag, and the
    ``NAME.tmpPID`` files of protoken versions before the tags)."""
    needle = ".tmp" if tag == "all" else f".tmp.{tag}."
    folders = [fasta_folder]
    with os.scandir(out) as it:
        folders += [e.path for e in it if e.name.startswith("bin_") and e.is_dir()]
    removed = 0
    for folder in folders:
        if not os.path.isdir(folder):
            continue
        with os.scandir(folder) as it:
            for entry in it:
                if needle in entry.name and entry.is_file(follow_symlinks=False):
                    with contextlib.suppress(OSError):
                        os.unlink(entry.path)
                        removed += 1
    return removed
