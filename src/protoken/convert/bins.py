"""Length bins: the folders a conversion sorts its images into, ``bin_LO_HI``.

As the reference design: ``bin_40_64``, ``bin_65_128``, ..., ``bin_961_1024`` (steps of 64);
lengths outside 40-1024 (with ``--min-len`` / ``--max-len``) extend the scheme: ``bin_1_39``
below, ``bin_1025_1088``, ... above.
"""

from __future__ import annotations

import re

__all__ = ["bin_name", "bin_range", "is_bin", "side_limit"]

_BIN_RE = re.compile(r"bin_(\d+)_(\d+)")


def bin_name(length: int) -> str:
    """The bin folder of a protein of ``length`` residues (``100`` -> ``"bin_65_128"``)."""
    if length < 1:
        raise ValueError(f"length must be positive, not {length}")
    if length < 40:
        return "bin_1_39"
    if length <= 64:
        return "bin_40_64"
    lo = (length - 1) // 64 * 64 + 1
    return f"bin_{lo}_{lo + 63}"


def is_bin(name: str) -> bool:
    """Whether ``name`` is a bin folder name."""
    return _BIN_RE.fullmatch(name) is not None


def bin_range(name: str) -> tuple[int, int]:
    """``"bin_65_128"`` -> ``(65, 128)`` (both ends inclusive).

    Raises
    ------
    ValueError
        ``name`` is not a bin folder name.
    """
    m = _BIN_RE.fullmatch(name)
    if m is None:
        raise ValueError(f"not a bin folder name (bin_LO_HI): {name!r}")
    return int(m.group(1)), int(m.group(2))


def side_limit(folder_name: str) -> int | None:
    """The largest image side read from a folder: for a bin, the default ``--max-len`` (1024)
    or the bin's upper length if that is larger (``bin_1985_2048`` -> 2048); None (the codec's
    :data:`~protoken.codec.MAX_IMAGE_SIDE`) for a folder that is no bin."""
    m = _BIN_RE.fullmatch(folder_name)
    return max(1024, int(m.group(2))) if m else None
