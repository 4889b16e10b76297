"""Tokenizer: decode(encode(x)) is the model's reconstruction; token files; files of older
versions."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import MICRO
from protoken import checkpoint as ckpt_io
from protoken.codec import CodecSettings
from protoken.model import VQVAE, VQVAEConfig, config_to_dict
from protoken.structure import SkipStructure, read_backbones
from protoken.tokenizer import Tokenizer, load_tokens, save_tokens

DATA = Path(__file__).parent / "data"

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


def test_encode_many_streams_batches_and_reports_unusable_inputs(tok, structures_dir,
                                                                 bad_inputs_dir):  # fmt: skip
    tok2 = Tokenizer(tok.model, tok.codec, device="cpu", batch_size=2)
    sources = [structures_dir / "foldseek__1tim.pdb.gz", *(structures_dir / n for n in NAMES),
               bad_inputs_dir / "empty.pdb", structures_dir / "foldseek__d1asha_.pdb"]  # fmt: skip
    errors = []

    def on_error(source, exc):
        errors.append((source, exc))

    tokens = list(tok2.encode_many(sources, min_len=100, on_error=on_error))
    # 1tim: two chains (skip-multi); 1CTF_A and 1avyA00: 68 residues (< 100); empty.pdb: unreadable
    assert [type(e).__name__ for _, e in errors] == ["SkipStructure"] * 3 + ["StructureError"]
    assert [str(s).rsplit("/", 1)[1] for s, _ in errors] == [
        "foldseek__1tim.pdb.gz", "kortemme__1CTF_A.pdb", "cathtools__1avyA00.pdb", "empty.pdb",
    ]  # fmt: skip
    assert [t.id for t in tokens] == ["foldseek__d1asha_", "biotite__1aki", "foldseek__d1asha_"]
    # the same tokens as one protein at a time: batching does not change them
    for t in tokens:
        one = tok.encode(structures_dir / f"{t.id}.pdb")
        for a, b in zip(t.levels, one.levels, strict=True):
            np.testing.assert_array_equal(a, b)
    with pytest.raises(SkipStructure):  # without on_error an unusable input raises
        list(tok.encode_many(sources))


def test_files_of_the_previous_version_load_and_give_the_same_tokens(structures_dir):
    """A checkpoint, its run config and a token file written by protoken 8c8b70e, when the
    attention width was called ``latent_dim`` (tests/data/make_old_fixtures.py)."""
    tok = Tokenizer.from_checkpoint(str(DATA / "old-checkpoint.pt"), device="cpu")
    old, meta = load_tokens(str(DATA / "old-tokens.npz"))
    assert meta["model_config"]["latent_dim"] == 8 and "attn_dim" not in meta["model_config"]
    assert tok.config.attn_dim == 8 and VQVAEConfig.from_dict(meta["model_config"]) == tok.config
    run_config = json.loads((DATA / "old-run-config.json").read_text())
    assert VQVAEConfig.preset(run_config["preset"], **run_config["model"]) == tok.config
    # today's code encodes the same structures to the same tokens, and decodes as before
    new = list(tok.encode_many([structures_dir / f"{t.id}.pdb" for t in old]))
    assert [(t.id, t.length, t.sequence) for t in new] == [(t.id, t.length, t.sequence)
                                                          for t in old]  # fmt: skip
    for a, b in zip(old, new, strict=True):
        for ga, gb in zip(a.levels, b.levels, strict=True):
            np.testing.assert_array_equal(ga, gb)
    np.testing.assert_allclose(tok.decode(old[0]), np.load(DATA / "old-decoded-0.npy"), atol=1e-6)
