"""Tokenizer: decode(encode(x)) is the model's reconstruction; token files; CLI."""

from __future__ import annotations

import math

import gemmi
import numpy as np
import pytest
import torch

from helpers import MICRO
from protoken import checkpoint as ckpt_io
from protoken.cli import main
from protoken.codec import CodecSettings, read_image
from protoken.model import VQVAE, VQVAEConfig, config_to_dict
from protoken.structure import read_backbones
from protoken.tokenizer import Tokenizer, load_tokens, save_tokens

NAMES = ["foldseek__d1asha_.pdb", "kortemme__1CTF_A.pdb", "cathtools__1avyA00.pdb",
         "biotite__1aki.pdb"]  # fmt: skip


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, structures_dir) -> str:
    """A micro model whose codebooks were initialised on real images (one training forward)."""
    torch.manual_seed(0)
    cfg = VQVAEConfig.preset("tiny", **MICRO)
    model = VQVAE(cfg)
    tok = Tokenizer(model, CodecSettings(), device="cpu")
    items = [tok.prepare(structures_dir / n)[0] for n in NAMES]
    x, mask, _ = tok._batch([it.image for it in items])
    model.train()
    model(x, mask)  # data-dependent codebook initialisation
    path = str(tmp_path_factory.mktemp("ckpt") / "best.pt")
    ckpt_io.save(
        path,
        {
            "model": model.state_dict(),
            "model_config": config_to_dict(cfg),
            "codec": CodecSettings().to_dict(),
        },
    )
    return path


@pytest.fixture(scope="module")
def tok(checkpoint) -> Tokenizer:
    return Tokenizer.from_checkpoint(checkpoint, device="cpu")


def test_decode_of_encode_is_the_models_reconstruction(tok, structures_dir):
    items = [tok.prepare(structures_dir / n)[0] for n in NAMES]
    images = [it.image for it in items]
    levels, decoded = tok.roundtrip(images)
    x, mask, lengths = tok._batch(images)
    with torch.no_grad():
        recon = tok.model(x, mask).recon
    for i, n in enumerate(lengths):
        want = recon[i, :, :n, :n].clamp(-1, 1).numpy()
        np.testing.assert_allclose(decoded[i], want, atol=1e-6)
    # grids are the valid squares: ceil(L / s) a side, coarsest level first
    scales = sorted(tok.config.level_scales, reverse=True)
    for lv, n in zip(levels, lengths, strict=True):
        assert [g.shape for g in lv] == [(math.ceil(n / s),) * 2 for s in scales]
        assert all(g.min() >= 0 and g.max() < tok.config.codebook_size for g in lv)


def test_single_protein_api(tok, structures_dir):
    t = tok.encode(structures_dir / "foldseek__d1asha_.pdb")
    bb = read_backbones(structures_dir / "foldseek__d1asha_.pdb")[0]
    assert (t.id, t.length, t.sequence) == ("foldseek__d1asha_", 147, bb.sequence)
    image = tok.decode(t)
    assert image.shape == (3, 147, 147) and np.abs(image).max() <= 1
    rec = tok.decode_structure(t)
    assert rec.cb.shape == (147, 3) and np.isfinite(rec.cb).all()


def test_structure_and_its_png_give_the_same_tokens(tok, structures_dir, converted8):
    a = tok.encode(structures_dir / "foldseek__d1asha_.pdb")
    b = tok.encode(converted8 / "bin_129_192" / "foldseek__d1asha_.png")
    for ga, gb in zip(a.levels, b.levels, strict=True):
        np.testing.assert_array_equal(ga, gb)


def test_token_files_round_trip_and_read_with_plain_numpy(tok, structures_dir, tmp_path):
    tokens = list(tok.encode_many([structures_dir / n for n in NAMES]))
    path = str(tmp_path / "t.npz")
    save_tokens(path, tokens, tok.meta())
    back, meta = load_tokens(path)
    assert meta["checkpoint"] == tok.checkpoint and meta["codec"]["dmax"] == 80.0
    for a, b in zip(tokens, back, strict=True):
        assert (a.id, a.length, a.sequence) == (b.id, b.length, b.sequence)
        for ga, gb in zip(a.levels, b.levels, strict=True):
            np.testing.assert_array_equal(ga, gb)
    # the documented layout, without protoken
    z = np.load(path)
    assert str(z["format"]) == "protoken-tokens/1" and z["level0_codes"].dtype == np.uint16
    i = 2
    n = int(z["lengths"][i])
    k = math.ceil(n / meta["level_scales_coarse_first"][0])
    off = z["level0_offsets"]
    np.testing.assert_array_equal(
        z["level0_codes"][off[i] : off[i + 1]].reshape(k, k), tokens[i].levels[0]
    )


def test_encode_and_decode_cli(checkpoint, structures_dir, tmp_path, capsys):
    src = [str(structures_dir / n) for n in NAMES[:2]] + [
        str(structures_dir / "foldseek__1tim.pdb.gz")
    ]
    out = tmp_path / "t.npz"
    assert main(["encode", *src, "-c", checkpoint, "-o", str(out), "--no-progress"]) == 0
    text = capsys.readouterr()
    assert "encoded 2 proteins (1 inputs skipped)" in text.out
    assert "multi-chain" in text.err
    dec = tmp_path / "dec"
    assert main(["decode", str(out), "-c", checkpoint, "-o", str(dec), "--no-progress"]) == 0
    png = dec / "foldseek__d1asha_.png"
    assert read_image(png).shape == (3, 147, 147)
    assert __import__("imagecodecs").png_decode(png.read_bytes()).dtype == np.uint16
    st = gemmi.read_structure(str(dec / "foldseek__d1asha_.pdb"))
    residues = list(st[0][0])
    bb = read_backbones(structures_dir / "foldseek__d1asha_.pdb")[0]
    assert len(residues) == 147 and all(len(r) == 1 and r[0].name == "CB" for r in residues)
    assert "".join(gemmi.find_tabulated_residue(r.name).one_letter_code.upper()
                   for r in residues) == bb.sequence  # fmt: skip
