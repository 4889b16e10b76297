"""What a converted folder records about how it was made: ``OUT/convert.json``.

``protoken convert`` writes the settings that change its outputs (:data:`OUTPUT_SETTINGS`:
dmax, bit depth, chain, model and length policies, format) into ``OUT/convert.json`` and
refuses a later run into the same folder with other values (:func:`record_settings`). Whoever
reads the images later takes dmax and bit depth from there: training (its config may not
contradict them), the codec reading an image (:func:`settings_beside`: the ``convert.json`` of
the image's folder or the one above), ``reconstruct --dmax``, and the images of a sharded
folder. This module is the one reader and writer of that file, and :func:`agreed` the one
check that a value asked for agrees with the recorded one.
"""

from __future__ import annotations

import json
import os
from typing import Any

from protoken.fileio import atomic_write

__all__ = [
    "OUTPUT_SETTINGS",
    "SETTINGS_FILE",
    "agreed",
    "read_settings",
    "record_settings",
    "settings_beside",
]

#: The file ``protoken convert`` records its output-changing settings in, in OUT.
SETTINGS_FILE = "convert.json"

#: Settings recorded in ``OUT/convert.json`` that change what a run writes; a run with other
#: values into the same OUT is refused.
OUTPUT_SETTINGS = ("dmax", "bit_depth", "chains", "models", "min_len", "max_len", "format")


def read_settings(folder: str | os.PathLike) -> dict | None:
    """The settings a folder was converted with (``FOLDER/convert.json``), or None.

    Raises
    ------
    ValueError
        The file exists but is unreadable or not a JSON object (one line naming it).
    """
    path = os.path.join(os.fspath(folder), SETTINGS_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as fh:
            settings = json.load(fh)
    except (OSError, ValueError) as exc:
        raise ValueError(f"unreadable {path}: {' '.join(str(exc).split())}") from None
    if not isinstance(settings, dict):
        raise ValueError(f"{path} is not a JSON object")
    return settings


def settings_beside(image_path: str | os.PathLike) -> dict | None:
    """The settings recorded by ``protoken convert`` for an image: ``convert.json`` in the
    image's folder or the one above it (``OUT/bin_65_128/ID.png`` -> ``OUT/convert.json``);
    None for an image from elsewhere.

    Raises
    ------
    ValueError
        As :func:`read_settings`.
    """
    folder = os.path.dirname(os.path.abspath(os.fspath(image_path)))
    for candidate in (folder, os.path.dirname(folder)):
        settings = read_settings(candidate)
        if settings is not None:
            return settings
    return None


def agreed(settings: dict, key: str, asked: Any, what: str) -> Any:
    """The value of ``key`` for data converted with ``settings``: the recorded one, else
    ``asked`` (None when neither is known).

    Parameters
    ----------
    settings : dict
        What ``convert.json`` holds (``{}`` when there is none).
    key : str
        ``"dmax"`` or ``"bit_depth"``.
    asked : optional
        The value the caller was given (a flag, a config value), None when not given.
    what : str
        The data, for the message: ``"the images of DIR"``.

    Raises
    ------
    ValueError
        ``asked`` contradicts the recorded value: reading 40 A images as 80 A would make every
        distance twice as large.
    """
    recorded = settings.get(key)
    if recorded is None:
        return asked
    if asked is not None and asked != recorded:
        raise ValueError(
            f"{what} was converted with {key}={recorded} ({SETTINGS_FILE}), not {key}={asked}"
        )
    return recorded


def record_settings(out: str, settings: dict) -> None:
    """Write ``OUT/convert.json`` (``settings``, the values of :data:`OUTPUT_SETTINGS`), or
    check that a rerun into ``out`` uses the recorded values.

    Images of one folder must share dmax and bit depth, since training and decoding read them
    from here, and a rerun with another chain, model or length policy would otherwise report
    inputs as done under a policy they were never judged by.

    Raises
    ------
    ValueError
        The file is unreadable, or a recorded value differs (naming every difference).
    """
    old = read_settings(out)
    if old is None:
        atomic_write(os.path.join(out, SETTINGS_FILE), json.dumps(settings, indent=1) + "\n")
        return
    diffs = [k for k in OUTPUT_SETTINGS if k in old and old[k] != settings[k]]
    if diffs:
        was = ", ".join(f"{k}={old[k]}" for k in diffs)
        now = ", ".join(f"{k}={settings[k]}" for k in diffs)
        raise ValueError(
            f"{out} was converted with {was}; refusing to add outputs with {now} "
            "(use another --out)"
        )
