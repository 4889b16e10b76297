"""The image codec: 6D features <-> 3-channel image in [-1, 1] <-> 8- or 16-bit PNG.

Image layout (the reference design's): an array of shape (3, L, L), pixel (i, j) describing
residues i and j:

- channel 0: lower triangle (diagonal included) d / dmax * 2 - 1, strict upper triangle omega / pi;
- channel 1: theta / pi;
- channel 2: phi / pi * 2 - 1.

PNG storage (RGB, row i = residue i):

- 8-bit, the reference design's rule: v = floor((x + 1) / 2 * 255), clipped to 0..255. Decoded
  at bin centres, x = (v + 0.5) / 255 * 2 - 1 clipped to 1, which halves the error of its
  v / 255 * 2 - 1.
- 16-bit: v = round((x + 1) / 2 * 65535); decoded as v / 65535 * 2 - 1 (error <= 1.5e-5).

PNGs are written and read with imagecodecs (libpng), which handles 16-bit RGB (Pillow does not)
and decodes several times faster than Pillow at either depth.

Images are untrusted input: :func:`decode_png` reads the PNG header (:func:`png_header`)
before any pixel is decoded and refuses what is not a square RGB (or RGBA) image of 8 or 16
bits, or is larger than ``max_len`` (default :data:`MAX_IMAGE_SIDE`), so a 33 KB PNG that
claims 3000 x 3000 pixels costs nothing; libpng's errors and its warnings about the image data
(``IDAT``: a compressed stream holding more or other data than the image, which libpng only
warns about and decodes anyway) make it refused, never an image of whatever was decoded.
:func:`check_image` refuses degenerate images (a constant channel: all-0 or all-255 PNGs),
and :func:`read_converted_image` reads an image with the settings ``protoken convert``
recorded beside it.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import struct
import threading
from dataclasses import asdict, dataclass

import numpy as np

from protoken.convert_settings import agreed, settings_beside
from protoken.fileio import atomic_write
from protoken.geometry import DMAX, SixD

logger = logging.getLogger(__name__)

__all__ = [
    "MAX_IMAGE_SIDE",
    "NORMALIZE_ALIASES",
    "REFERENCE_MEAN",
    "REFERENCE_STD",
    "CodecSettings",
    "check_image",
    "check_png_header",
    "decode_png",
    "dequantize",
    "encode_pixels",
    "encode_png",
    "features_to_image",
    "features_to_pixels",
    "image_to_distances",
    "image_to_features",
    "png_header",
    "quantize",
    "read_converted_image",
    "read_image",
    "reference_dequantize",
    "standardize",
    "unstandardize",
    "write_png",
]

#: The reference design's per-channel normalisation of pixels scaled to [0, 1] (its data
#: loader's constants): ``normalize="reference"``.
REFERENCE_MEAN = (0.4081, 0.5336, 0.4414)
REFERENCE_STD = (0.2538, 0.2752, 0.2157)
#: Normalisation names of older versions -> current ones ("seed" now means only an RNG seed):
#: the one place the old name is read (checkpoints, run configs, the data options).
NORMALIZE_ALIASES = {"seed": "reference"}


@dataclass(frozen=True)
class CodecSettings:
    """Everything needed to turn model inputs back into geometry (stored in checkpoints).

    Attributes
    ----------
    dmax : float
        Distance cut-off of channel 0, Angstrom.
    bit_depth : int
        8 or 16: the PNG depth of the training images.
    normalize : str
        ``"none"`` (model sees [-1, 1] images) or ``"reference"`` (per-channel standardisation
        with the reference design's mean and std, applied to pixels scaled to [0, 1]; called
        ``"seed"`` before, a name still read).
    """

    dmax: float = DMAX
    bit_depth: int = 8
    normalize: str = "none"

    def __post_init__(self):
        if self.bit_depth not in (8, 16):
            raise ValueError(f"bit_depth must be 8 or 16, not {self.bit_depth}")
        object.__setattr__(self, "normalize", NORMALIZE_ALIASES.get(self.normalize, self.normalize))
        if self.normalize not in ("none", "reference"):
            raise ValueError(f"normalize must be 'none' or 'reference', not {self.normalize!r}")
        if not (self.dmax > 0 and math.isfinite(self.dmax)):
            raise ValueError(f"dmax must be positive and finite, not {self.dmax}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> CodecSettings:
        return cls(**{k: d[k] for k in ("dmax", "bit_depth", "normalize") if k in d})

    @property
    def mean_std(self) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
        return (REFERENCE_MEAN, REFERENCE_STD) if self.normalize == "reference" else None


def features_to_image(features: SixD, dmax: float = DMAX) -> np.ndarray:
    """Normalise and merge 6D features into the reference design's 3-channel image.

    Parameters
    ----------
    features : SixD
        ``d``, ``omega``, ``theta``, ``phi``, each (L, L), from :func:`protoken.geometry.sixd`.
    dmax : float
        The cut-off the features were computed with.

    Returns
    -------
    ndarray, shape (3, L, L), float64
        Values in [-1, 1]. A channels-first view of a channels-last buffer, so that
        :func:`quantize` (PNG rows are RGB-interleaved) needs no transposing copy.
    """
    d, omega, theta, phi = features
    length = d.shape[0]
    image = np.empty((length, length, 3), dtype=np.float64).transpose(2, 0, 1)
    lower = np.tri(length, dtype=bool)  # i >= j
    np.divide(omega, np.pi, out=image[0])
    np.copyto(image[0], d / dmax * 2.0 - 1.0, where=lower)
    np.divide(theta, np.pi, out=image[1])
    np.multiply(phi, 2.0 / np.pi, out=image[2])
    image[2] -= 1.0
    return image


def image_to_features(image: np.ndarray, dmax: float = DMAX) -> SixD:
    """Invert :func:`features_to_image`.

    ``d`` comes from channel 0's lower triangle and ``omega`` from its upper triangle, each
    mirrored to a symmetric matrix; the diagonal of ``d`` is 0 and of ``omega`` 0.

    Parameters
    ----------
    image : ndarray, shape (3, L, L)
        Values in [-1, 1].

    Returns
    -------
    SixD
        Features in Angstrom and radians.
    """
    image = np.asarray(image, dtype=np.float64)
    d = image_to_distances(image, dmax)
    upper = np.triu(image[0], k=1) * np.pi
    omega = upper + upper.T
    return SixD(d=d, omega=omega, theta=image[1] * np.pi, phi=(image[2] + 1.0) * (np.pi / 2.0))


def image_to_distances(image: np.ndarray, dmax: float = DMAX) -> np.ndarray:
    """Cb-Cb distances from channel 0's lower triangle: d = (x + 1) / 2 * dmax.

    Parameters
    ----------
    image : ndarray, shape (3, L, L) or (L, L)
        The image, or its channel 0.

    Returns
    -------
    ndarray, shape (L, L), float64
        Symmetric, zero diagonal, Angstrom. Pairs at d >= dmax come back as dmax.
    """
    ch0 = np.asarray(image, dtype=np.float64)
    if ch0.ndim == 3:
        ch0 = ch0[0]
    lower = np.tril(ch0, k=-1)
    d = (lower + lower.T + 1.0) * (dmax / 2.0)
    np.fill_diagonal(d, 0.0)
    return d


def quantize(image: np.ndarray, bit_depth: int = 8) -> np.ndarray:
    """Image (3, L, L) in [-1, 1] -> PNG pixel array (L, L, 3) of uint8 or uint16.

    8-bit follows the reference design exactly: floor((x + 1) / 2 * 255) clipped to 0..255.
    16-bit: round((x + 1) / 2 * 65535).
    """
    if bit_depth not in (8, 16):
        raise ValueError(f"bit_depth must be 8 or 16, not {bit_depth}")
    x = np.asarray(image, dtype=np.float64).transpose(1, 2, 0) + 1.0  # a new (L, L, 3) array
    x *= 0.5  # exact, as the reference design's / 2
    if bit_depth == 8:
        x *= 255.0
        return np.clip(np.floor(x, out=x), 0, 255, out=x).astype(np.uint8)
    x *= 65535.0
    return np.clip(np.rint(x, out=x), 0, 65535, out=x).astype(np.uint16)


def features_to_pixels(features: SixD, dmax: float = DMAX, bit_depth: int = 8) -> np.ndarray:
    """``quantize(features_to_image(features, dmax), bit_depth)``, bit for bit, in less time.

    The same floating-point operations in the same order, one channel at a time through one
    (L, L) float64 buffer written straight into the (L, L, 3) pixels: no (L, L, 3) float64
    image and no copy of it (what :mod:`protoken.convert` writes).

    Raises
    ------
    ValueError
        A pixel of the image would be non-finite (``features_to_image`` would hold NaN or inf).
    """
    if bit_depth not in (8, 16):
        raise ValueError(f"bit_depth must be 8 or 16, not {bit_depth}")
    d, omega, theta, phi = features
    length = d.shape[0]
    top = 255.0 if bit_depth == 8 else 65535.0
    pixels = np.empty((length, length, 3), dtype=np.uint8 if bit_depth == 8 else np.uint16)
    x = np.empty((length, length))
    scaled = np.empty((length, length))
    for k in range(3):
        if k == 0:  # omega / pi, and d / dmax * 2 - 1 on the lower triangle (diagonal included)
            np.divide(omega, np.pi, out=x)
            np.divide(d, dmax, out=scaled)
            scaled *= 2.0
            scaled -= 1.0
            np.copyto(x, scaled, where=np.tri(length, dtype=bool))
        elif k == 1:
            np.divide(theta, np.pi, out=x)
        else:
            np.multiply(phi, 2.0 / np.pi, out=x)
            x -= 1.0
        if not math.isfinite(float(x.sum())):  # |x| <= 1 where finite: no overflow
            raise ValueError("non-finite 6D features")
        x += 1.0  # quantize's (x + 1) * 0.5 * top, floor (8-bit) or rint (16-bit), clip
        x *= 0.5
        x *= top
        (np.floor if bit_depth == 8 else np.rint)(x, out=x)
        np.clip(x, 0, top, out=x)
        pixels[:, :, k] = x
    return pixels


def dequantize(pixels: np.ndarray, dtype=np.float32) -> np.ndarray:
    """PNG pixel array (L, L, 3) -> image (3, L, L) in [-1, 1].

    uint8 is decoded at bin centres ((v + 0.5) / 255 * 2 - 1, clipped to 1): the exact inverse
    in expectation of the reference design's floor rule. uint16 is decoded as v / 65535 * 2 - 1.
    """
    pixels = np.asarray(pixels)
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"expected an (L, L, 3) RGB pixel array, got shape {pixels.shape}")
    chw = pixels.transpose(2, 0, 1).astype(np.float64)
    if pixels.dtype == np.uint8:
        out = np.minimum((chw + 0.5) * (2.0 / 255.0) - 1.0, 1.0)
    elif pixels.dtype == np.uint16:
        out = chw * (2.0 / 65535.0) - 1.0
    else:
        raise ValueError(f"expected uint8 or uint16 pixels, got {pixels.dtype}")
    return out.astype(dtype, copy=False)


def reference_dequantize(pixels: np.ndarray) -> np.ndarray:
    """The reference design's decoding of 8-bit pixels, v / 255 * 2 - 1 (for comparison only)."""
    return np.asarray(pixels, dtype=np.float64).transpose(2, 0, 1) / 255.0 * 2.0 - 1.0


def encode_png(image: np.ndarray, bit_depth: int = 8) -> bytes:
    """Image (3, L, L) in [-1, 1] -> PNG bytes (RGB, 8 or 16 bit)."""
    return encode_pixels(quantize(image, bit_depth))


def encode_pixels(pixels: np.ndarray) -> bytes:
    """PNG pixel array (L, L, 3) of uint8 or uint16 (:func:`quantize`) -> PNG bytes."""
    import imagecodecs

    pixels = np.ascontiguousarray(pixels)
    # zlib level 1 with the RLE strategy and the SUB filter: 2-3x faster than libpng's defaults
    # for the same size on these images (benchmarks/convert.py)
    return bytes(imagecodecs.png_encode(pixels, level=1, strategy=3, filter=16))


#: Largest image side :func:`decode_png` accepts when no ``max_len`` is given (the commands
#: pass their ``--max-len``, default 1024): 4096 x 4096 16-bit RGB is 100 MB of pixels.
MAX_IMAGE_SIDE = 4096

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_COLOUR_TYPES = {0: "greyscale", 2: "RGB", 3: "palette", 4: "greyscale+alpha", 6: "RGBA"}


def png_header(data: bytes) -> tuple[int, int, int, str]:
    """(width, height, bit depth, colour type name) from a PNG's IHDR chunk, without decoding.

    The PNG specification fixes the layout: the 8-byte signature, then the IHDR chunk (length,
    ``IHDR``, width and height as big-endian uint32, bit depth, colour type). Reading those 26
    bytes is all it takes, so no library is asked to decode an image it may not fit in memory.

    Raises
    ------
    ValueError
        Not a PNG (no signature or no IHDR chunk first).
    """
    if len(data) < 26 or data[:8] != _PNG_SIGNATURE:
        raise ValueError("not a readable PNG (no PNG signature)")
    if data[12:16] != b"IHDR":
        raise ValueError("not a readable PNG (no IHDR header)")
    width, height, depth, colour = struct.unpack(">IIBB", data[16:26])
    return width, height, depth, _COLOUR_TYPES.get(colour, f"colour type {colour}")


def check_png_header(data: bytes, max_len: int | None = None) -> tuple[int, int]:
    """(side, bit depth) of a PNG that protoken can read as an image; ValueError otherwise.

    Refused, before any pixel is decoded: not a PNG; not square; not RGB or RGBA (alpha is
    ignored); not 8 or 16 bits per channel; a side larger than ``max_len`` (default
    :data:`MAX_IMAGE_SIDE`).
    """
    width, height, depth, colour = png_header(data)
    if width != height or colour not in ("RGB", "RGBA") or width == 0:
        raise ValueError(f"not a square RGB image: {width} x {height} pixels, {colour}")
    if depth not in (8, 16):
        raise ValueError(f"not an 8- or 16-bit PNG: {depth} bits per channel")
    limit = MAX_IMAGE_SIDE if max_len is None else max_len
    if width > limit:
        what = "the largest side read" if max_len is None else "--max-len"
        raise ValueError(f"too large: {width} x {height} pixels, more than {what} ({limit})")
    return width, depth


def decode_png(data: bytes, max_len: int | None = None) -> np.ndarray:
    """PNG bytes -> pixel array (L, L, 3), uint8 or uint16.

    The header is checked first (:func:`check_png_header`: square RGB(A), 8 or 16 bits, side at
    most ``max_len`` or :data:`MAX_IMAGE_SIDE`), so memory is bounded before decoding.

    Raises
    ------
    ValueError
        Not a PNG, not a square RGB image, another bit depth, too large, or corrupt (a libpng
        error, or a libpng warning about the image data: :data:`_DATA_WARNINGS`).
    """
    import imagecodecs

    side, depth = check_png_header(data, max_len)
    _collect_libpng_warnings()
    warnings = _decoding.warnings = []
    try:
        pixels = imagecodecs.png_decode(data)
    except Exception as exc:  # noqa: BLE001 - imagecodecs raises its own error types
        raise ValueError(f"not a readable PNG ({' '.join(str(exc).split())[:120]})") from None
    finally:
        _decoding.warnings = None
    for warning in warnings:
        if any(word in warning for word in _DATA_WARNINGS):
            what = " ".join(warning.split("warning:", 1)[-1].split())[:120]
            raise ValueError(f"not a readable PNG (libpng: {what})")
        logger.warning("%s", warning)  # about an ancillary chunk: the pixels are intact
    want = np.uint8 if depth == 8 else np.uint16
    if pixels.ndim != 3 or pixels.shape[:2] != (side, side) or pixels.shape[2] not in (3, 4):
        raise ValueError(f"not a square RGB image: shape {pixels.shape}")
    if pixels.dtype != want:
        raise ValueError(f"decoded {pixels.dtype} pixels from a {depth}-bit PNG")
    return pixels[:, :, :3]


#: Words of libpng warnings about the image data itself (libpng only warns when the compressed
#: stream holds more data than the image, "IDAT: Too much image data", and decodes the first
#: part): :func:`decode_png` refuses such a PNG.
_DATA_WARNINGS = ("IDAT", "image data", "compressed data")

#: The libpng warnings of the decode running in this thread (None: not decoding).
_decoding = threading.local()


class _LibpngWarnings(logging.Filter):
    """Takes the warnings imagecodecs logs for libpng (logger ``imagecodecs``) while
    :func:`decode_png` runs in the same thread, for it to judge; others pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        sink = getattr(_decoding, "warnings", None)
        if sink is None:
            return True
        sink.append(record.getMessage())
        return False


@functools.lru_cache(maxsize=1)
def _collect_libpng_warnings() -> None:
    logging.getLogger("imagecodecs").addFilter(_LibpngWarnings())


def read_image(path: str | os.PathLike, dtype=np.float32, max_len: int | None = None) -> np.ndarray:
    """Read a PNG of protoken (or of the reference design) as an image (3, L, L) in [-1, 1].
    ``max_len``: the largest side accepted (:func:`decode_png`)."""
    with open(path, "rb") as fh:
        return dequantize(decode_png(fh.read(), max_len), dtype=dtype)


def read_converted_image(
    path: str | os.PathLike,
    dmax: float | None = None,
    max_len: int | None = None,
    dtype=np.float32,
) -> tuple[np.ndarray, float]:
    """Read an image with the settings ``protoken convert`` recorded beside it.

    The ``convert.json`` of the image's folder or the one above
    (:func:`protoken.convert_settings.settings_beside`) says which dmax and bit depth the image
    was made with. Returns (image (3, L, L) in [-1, 1], dmax): the recorded dmax, else
    ``dmax``, else the default 80 A.

    Raises
    ------
    ValueError
        ``dmax`` is given and contradicts the recorded one (the image would be misread: a
        40 A image read as 80 A comes back twice as large); the PNG's bit depth is not the
        recorded one (a foreign file); or the PNG itself is refused (:func:`decode_png`).
    """
    settings = settings_beside(path) or {}
    with open(path, "rb") as fh:
        data = fh.read()
    return decode_converted(data, settings, dmax, max_len, dtype)


def decode_converted(
    data: bytes,
    settings: dict,
    dmax: float | None = None,
    max_len: int | None = None,
    dtype=np.float32,
) -> tuple[np.ndarray, float]:
    """:func:`read_converted_image` for PNG bytes (an image in a tar shard) and the settings
    recorded with them (the output folder's ``convert.json``, ``{}`` if none)."""
    recorded = agreed(settings, "dmax", dmax, "the image")
    pixels = decode_png(data, max_len)
    depth = 8 if pixels.dtype == np.uint8 else 16
    if settings.get("bit_depth") not in (None, depth):
        raise ValueError(
            f"the PNG is {depth}-bit, but its convert.json says bit_depth={settings['bit_depth']}"
        )
    return dequantize(pixels, dtype=dtype), float(DMAX if recorded is None else recorded)


def check_image(image: np.ndarray) -> None:
    """Refuse a degenerate image: fewer than 2 residues, or a channel whose every pixel has one
    value (an all-0 or all-255 PNG; no real protein gives a constant distance, theta or phi
    channel), which MDS would turn into a normal-looking but meaningless structure.

    Raises
    ------
    ValueError
        With the reason.
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[0] != 3 or image.shape[1] != image.shape[2]:
        raise ValueError(f"expected an image of shape (3, L, L), got {image.shape}")
    if image.shape[-1] < 2:
        raise ValueError(f"degenerate image: {image.shape[-1]} residue(s)")
    if not np.isfinite(image).all():
        raise ValueError("degenerate image: non-finite values")
    for k, name in enumerate(("distance/omega", "theta", "phi")):
        channel = image[k]
        if channel.max() == channel.min():
            raise ValueError(
                f"degenerate image: channel {k} ({name}) is constant ({float(channel.flat[0]):g} "
                "everywhere)"
            )


def write_png(path: str | os.PathLike, image: np.ndarray, bit_depth: int = 8) -> None:
    """Write an image as PNG atomically (temporary file in the same folder, then rename)."""
    atomic_write(path, encode_png(image, bit_depth))


def standardize(image, mean=REFERENCE_MEAN, std=REFERENCE_STD):
    """Per-channel standardisation of an image in [-1, 1] (numpy or torch, channels first
    at axis -3): ((x + 1) / 2 - mean) / std, as the reference design's ToTensor + Normalize."""
    m, s = _channel_constants(image, mean, std)
    return ((image + 1.0) / 2.0 - m) / s


def unstandardize(image, mean=REFERENCE_MEAN, std=REFERENCE_STD):
    """Inverse of :func:`standardize`: back to [-1, 1]."""
    m, s = _channel_constants(image, mean, std)
    return (image * s + m) * 2.0 - 1.0


def _channel_constants(image, mean, std):
    shape = (3, 1, 1)
    if type(image).__module__.startswith("torch"):
        import torch

        m = torch.tensor(mean, dtype=image.dtype, device=image.device).view(shape)
        s = torch.tensor(std, dtype=image.dtype, device=image.device).view(shape)
        return m, s
    return np.asarray(mean).reshape(shape), np.asarray(std).reshape(shape)
