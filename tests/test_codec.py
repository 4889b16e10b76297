"""Image codec: the seed's layout and 8-bit rule, 16-bit storage, and exact inverses."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from protoken.codec import (
    REFERENCE_MEAN,
    REFERENCE_STD,
    CodecSettings,
    decode_png,
    dequantize,
    encode_png,
    features_to_image,
    features_to_pixels,
    image_to_distances,
    image_to_features,
    quantize,
    read_image,
    reference_dequantize,
    standardize,
    unstandardize,
    write_png,
)
from protoken.geometry import sixd, virtual_cb
from protoken.structure import read_backbones


def png_decode_plain(data: bytes) -> tuple[dict, np.ndarray]:
    """A minimal PNG reader written from the specification (RGB, 8/16 bit, no interlace)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, header = 8, b"", {}
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            w, h, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", body)
            header = {"width": w, "height": h, "bit_depth": depth, "color_type": color}
            assert interlace == 0
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    raw = zlib.decompress(idat)
    bpp = 3 * header["bit_depth"] // 8
    stride = header["width"] * bpp
    rows, prev = [], bytearray(stride)
    for r in range(header["height"]):
        ftype, line = (
            raw[r * (stride + 1)],
            bytearray(raw[r * (stride + 1) + 1 : (r + 1) * (stride + 1)]),
        )
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b, c = prev[i], prev[i - bpp] if i >= bpp else 0
            if ftype == 1:
                line[i] = (line[i] + a) & 255
            elif ftype == 2:
                line[i] = (line[i] + b) & 255
            elif ftype == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif ftype == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                pred = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
                line[i] = (line[i] + pred) & 255
        rows.append(bytes(line))
        prev = line
    dtype = ">u2" if header["bit_depth"] == 16 else "u1"
    pixels = np.frombuffer(b"".join(rows), dtype=dtype).reshape(
        header["height"], header["width"], 3
    )
    return header, pixels


@pytest.fixture(scope="module")
def image(structures_dir):
    bb = read_backbones(structures_dir / "foldseek__d1asha_.pdb")[0]
    return features_to_image(sixd(bb.n, bb.ca, bb.c))


@pytest.mark.parametrize("bit_depth", [8, 16])
@pytest.mark.parametrize("dmax", [80.0, 20.0])
def test_features_to_pixels_is_quantize_of_the_image_bit_for_bit(structures_dir, bit_depth, dmax):
    """convert's fused path gives exactly the pixels of quantize(features_to_image(...)),
    values outside [-1, 1] (clipped) included."""
    bb = read_backbones(structures_dir / "foldseek__d1asha_.pdb")[0]
    f = sixd(bb.n, bb.ca, bb.c, dmax=dmax)
    for features in (f, f._replace(d=f.d * 1.7 - 3.0, phi=f.phi * 1.2)):
        want = quantize(features_to_image(features, dmax), bit_depth)
        got = features_to_pixels(features, dmax, bit_depth)
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got, want)
    theta = f.theta.copy()
    theta[3, 5] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        features_to_pixels(f._replace(theta=theta), dmax, bit_depth)


def test_image_layout_is_the_seeds(structures_dir):
    bb = read_backbones(structures_dir / "foldseek__d1asha_.pdb")[0]
    f = sixd(bb.n, bb.ca, bb.c, dmax=80.0)
    img = features_to_image(f, 80.0)
    length = len(bb)
    i, j = np.tril_indices(length)  # diagonal included
    np.testing.assert_allclose(img[0][i, j], f.d[i, j] / 80.0 * 2 - 1)
    i, j = np.triu_indices(length, k=1)
    np.testing.assert_allclose(img[0][i, j], f.omega[i, j] / np.pi)
    np.testing.assert_allclose(img[1], f.theta / np.pi)
    np.testing.assert_allclose(img[2], f.phi / np.pi * 2 - 1)
    assert np.all(np.diag(img[0]) == 1.0)  # d = dmax on the diagonal, as in the seed
    assert img.min() >= -1 and img.max() <= 1


def test_image_to_features_inverts_features_to_image(structures_dir):
    bb = read_backbones(structures_dir / "foldseek__d1asha_.pdb")[0]
    f = sixd(bb.n, bb.ca, bb.c)
    back = image_to_features(features_to_image(f))
    d = f.d.copy()
    np.fill_diagonal(d, 0.0)
    np.testing.assert_allclose(back.d, d, atol=1e-12)
    np.testing.assert_allclose(back.omega, f.omega, atol=1e-12)
    np.testing.assert_allclose(back.theta, f.theta, atol=1e-12)
    np.testing.assert_allclose(back.phi, f.phi, atol=1e-12)
    cb = virtual_cb(bb.n, bb.ca, bb.c)
    true = np.linalg.norm(cb[:, None] - cb[None], axis=-1)
    np.testing.assert_allclose(image_to_distances(features_to_image(f)), true, atol=1e-9)


def test_eight_bit_pixels_follow_the_seed_rule(image):
    expected = np.clip(np.floor((image + 1) / 2 * 255), 0, 255).astype(np.uint8).transpose(1, 2, 0)
    np.testing.assert_array_equal(quantize(image, 8), expected)
    data = encode_png(image, 8)
    # read by two independent decoders: Pillow, and the plain reader above
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(data))), expected)
    header, pixels = png_decode_plain(data)
    assert (header["bit_depth"], header["color_type"]) == (8, 2)
    np.testing.assert_array_equal(pixels, expected)


def test_sixteen_bit_png_is_rgb16_and_decodes_within_one_level(image):
    data = encode_png(image, 16)
    header, pixels = png_decode_plain(data)
    assert (header["bit_depth"], header["color_type"]) == (16, 2)  # 16-bit RGB
    expected = np.rint((image + 1) / 2 * 65535).astype(np.uint16).transpose(1, 2, 0)
    np.testing.assert_array_equal(pixels, expected)
    back = dequantize(decode_png(data), dtype=np.float64)
    assert np.abs(back - image).max() <= 1.0 / 65535 + 1e-12  # half a level (1 level = 2/65535)


def test_eight_bit_decodes_at_bin_centres(image):
    pixels = quantize(image, 8)
    ours = dequantize(pixels, dtype=np.float64)
    seed = reference_dequantize(pixels)
    assert np.abs(ours - image).max() <= 1.0 / 255 + 1e-12  # half a bin (1 bin = 2/255)
    # the seed's v/255*2-1 is biased low by half a bin; ours is unbiased
    assert abs((seed - image).mean()) > 0.5 / 255
    assert abs((ours - image).mean()) < 0.1 / 255
    assert ours.max() <= 1.0


def test_write_and_read_png_files(tmp_path, image):
    for depth in (8, 16):
        path = tmp_path / f"x{depth}.png"
        write_png(path, image, depth)
        back = read_image(path, dtype=np.float64)
        assert back.shape == image.shape and back.dtype == np.float64
        assert np.abs(back - image).max() <= (1.0 / 255 if depth == 8 else 1.0 / 65535) + 1e-12
        assert not list(tmp_path.glob("*.tmp*"))


def test_images_of_the_seed_load_and_mean_the_same(tmp_path, image):
    """A PNG written by the seed (Pillow, 8-bit floor rule) reads back with our codec."""
    seed_pixels = np.floor((image + 1) / 2 * 255).clip(0, 255).astype(np.uint8).transpose(1, 2, 0)
    path = tmp_path / "seed.png"
    Image.fromarray(seed_pixels).save(path)
    back = read_image(path, dtype=np.float64)
    assert np.abs(back - image).max() <= 1.0 / 255 + 1e-12


def test_standardize_matches_the_seed_and_inverts(image):
    pixels = quantize(image, 8)
    x = dequantize(pixels, dtype=np.float64)
    z = standardize(x)
    # the seed: ToTensor (v / 255) then Normalize(mean, std); ours uses bin centres (v + 0.5)
    seed = (pixels.transpose(2, 0, 1) / 255.0 - np.reshape(REFERENCE_MEAN, (3, 1, 1))) / np.reshape(
        REFERENCE_STD, (3, 1, 1)
    )
    shifted = seed + 0.5 / 255 / np.reshape(REFERENCE_STD, (3, 1, 1))
    below_top = pixels.transpose(2, 0, 1) < 255  # 255 decodes to 1.0 (clipped), not 1 + 1/255
    np.testing.assert_allclose(z[below_top], shifted[below_top], atol=1e-9)
    np.testing.assert_allclose(unstandardize(z), x, atol=1e-12)
    torch = pytest.importorskip("torch")
    t = torch.from_numpy(x).float()
    np.testing.assert_allclose(standardize(t).numpy(), z, atol=1e-5)
    np.testing.assert_allclose(unstandardize(standardize(t)).numpy(), x, atol=1e-5)


def test_decode_png_rejects_garbage():
    with pytest.raises(ValueError, match="not a readable PNG"):
        decode_png(b"this is not a png")
    grey = io.BytesIO()
    Image.fromarray(np.zeros((4, 5), dtype=np.uint8)).save(grey, format="PNG")
    with pytest.raises(ValueError, match="not a square RGB image"):
        decode_png(grey.getvalue())


def test_codec_settings_validate_and_round_trip():
    s = CodecSettings(dmax=40.0, bit_depth=16, normalize="reference")
    assert CodecSettings.from_dict(s.to_dict()) == s
    assert s.mean_std == (REFERENCE_MEAN, REFERENCE_STD)
    # "seed", the former name, is read as "reference" (old checkpoints)
    assert CodecSettings.from_dict({**s.to_dict(), "normalize": "seed"}) == s
    with pytest.raises(ValueError):
        CodecSettings(bit_depth=12)
    with pytest.raises(ValueError):
        CodecSettings(normalize="imagenet")
