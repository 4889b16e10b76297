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
from protoken.model import HierarchicalConfig, HierarchicalVQVAE, config_to_dict
from protoken.structure import SkipStructure, read_backbones
from protoken.token_files import load_tokens
from protoken.tokenizer import Tokenizer

DATA = Path(__file__).parent / "data"

NAMES = ["foldseek__d1asha_.pdb", "kortemme__1CTF_A.pdb", "cathtools__1avyA00.pdb",
         "biotite__1aki.pdb"]  # fmt: skip


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, structures_dir) -> str:
    """A micro model whose codebooks were initialised on real images (one training forward)."""
    torch.manual_seed(0)
    cfg = HierarchicalConfig.preset("tiny", **MICRO)
    model = HierarchicalVQVAE(cfg)
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
    return Tokenizer.load(checkpoint, device="cpu")


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
    tok = Tokenizer.load(str(DATA / "old-checkpoint.pt"), device="cpu")
    old, meta = load_tokens(str(DATA / "old-tokens.npz"))
    assert meta["model_config"]["latent_dim"] == 8 and "attn_dim" not in meta["model_config"]
    assert tok.config.attn_dim == 8
    assert HierarchicalConfig.from_dict(meta["model_config"]) == tok.config
    run_config = json.loads((DATA / "old-run-config.json").read_text())
    assert HierarchicalConfig.preset(run_config["preset"], **run_config["model"]) == tok.config
    # today's code encodes the same structures to the same tokens, and decodes as before
    new = list(tok.encode_many([structures_dir / f"{t.id}.pdb" for t in old]))
    assert [(t.id, t.length, t.sequence) for t in new] == [(t.id, t.length, t.sequence)
                                                          for t in old]  # fmt: skip
    for a, b in zip(old, new, strict=True):
        for ga, gb in zip(a.levels, b.levels, strict=True):
            np.testing.assert_array_equal(ga, gb)
    np.testing.assert_allclose(tok.decode(old[0]), np.load(DATA / "old-decoded-0.npy"), atol=1e-6)


@pytest.mark.parametrize("name", ["default", "residue"])
def test_token_files_of_format_2_load_and_the_bundled_tokenizers_give_the_same_tokens(name):
    """Token files written before the token meta said "family" (tests/data/make_token_files.py)
    still load, and the bundled tokenizers encode the same structures to the same tokens."""
    from importlib import resources

    old, meta = load_tokens(str(DATA / f"tokens-v2-{name}.npz"))
    tok = Tokenizer.load(name, device="cpu")
    assert len(old) == 3 and meta["codebook_size"] == tok.config.codebook_size
    folder = resources.files("protoken").joinpath("resources/structures")
    new = list(tok.encode_many([str(folder.joinpath(f"{t.id}.pdb.gz")) for t in old]))
    assert [(t.id, t.length, t.sequence) for t in new] == [(t.id, t.length, t.sequence)
                                                          for t in old]  # fmt: skip
    if meta["checkpoint"] != tok.meta()["checkpoint"]:
        # the bundled weights were replaced since (a new release: residue of issue 21): the
        # file names the weights that made it, and the same tokens from the same weights are
        # checked on the first design's fixture (test_model_residue.py, residue-v1-tiny)
        assert meta["checkpoint"].startswith(f"{name}-") and name == "residue"
        assert all(a.family == b.family and a.stages.shape[0] == b.stages.shape[0]
                   for a, b in zip(old, new, strict=True))  # fmt: skip
        image = tok.decode(old[0])
        assert image.shape == (3, old[0].length, old[0].length) and np.isfinite(image).all()
        return
    for a, b in zip(old, new, strict=True):
        assert len(a.levels) == len(b.levels) and a.family == b.family
        if a.family == "residue":  # format 2 holds (L,) codes: one stage
            np.testing.assert_array_equal(a.stages, b.stages)
            continue
        for ga, gb in zip(a.levels, b.levels, strict=True):
            np.testing.assert_array_equal(ga, gb)
    image = tok.decode(old[0])
    assert image.shape == (3, old[0].length, old[0].length) and np.isfinite(image).all()


# --------------------------------------------------------------------------- per-residue family


@pytest.fixture(scope="module")
def residue_checkpoint(tmp_path_factory) -> str:
    from helpers import random_residue_checkpoint

    return random_residue_checkpoint(tmp_path_factory.mktemp("rckpt") / "best.pt")


@pytest.fixture(scope="module")
def rtok(residue_checkpoint) -> Tokenizer:
    tok = Tokenizer.load(residue_checkpoint, device="cpu", batch_size=3)
    tok.refine = 5  # the path, cheaply (decoding by inversion: tests/model/test_model_inversion.py)
    return tok


def test_residue_tokens_decode_like_the_forward_pass_from_any_number_of_stages(
    rtok, structures_dir
):
    assert rtok.family == "residue" and rtok.bits_per_token == 12
    K = rtok.model.n_stages
    items = [rtok.prepare(structures_dir / n)[0] for n in NAMES]
    levels, decoded = rtok.roundtrip([it.image for it in items])
    x, mask, lengths = rtok._batch([it.image for it in items])
    with torch.no_grad():
        codes = rtok.model(x, mask).codes
        recon = rtok.model.decode(rtok.model.batch_codes(levels, lengths), lengths)
    for i, n in enumerate(lengths):
        assert levels[i][0].shape == (n, K)
        # the codes of the forward pass (float noise of another padding may move a value of
        # the finest stage across a rounding boundary: 1 / 512 of the first stage's step)
        np.testing.assert_array_equal(levels[i][0][:, 0], codes[i, :n, 0].numpy())
        assert (levels[i][0] == codes[i, :n].numpy()).mean() > 0.99
        want = recon[i, :, :n, :n].clamp(-1, 1).numpy()
        # batches padded differently: float noise, which the untrained decoder's near-coincident
        # atoms amplify in the angles; distances stay tight
        np.testing.assert_allclose(np.tril(decoded[i][0]), np.tril(want[0]), atol=1e-4)
        np.testing.assert_allclose(decoded[i], want, atol=2e-2)
    t = rtok.encode(structures_dir / "foldseek__d1asha_.pdb")
    assert t.family == "residue" and t.codes.shape == (147,) and t.n_tokens == 147 * K
    assert len(t.sequence) == 147 and t.chains == (("A", 147),)
    # decode from the first k stages = decode of the tokens truncated to k stages
    for k in range(1, K + 1):
        rtok.stages = k
        try:
            short = rtok.encode(structures_dir / "foldseek__d1asha_.pdb")
            assert short.stages.shape == (147, k)
            np.testing.assert_array_equal(short.stages, t.stages[:, :k])
            np.testing.assert_array_equal(rtok.decode(t), rtok.decode(t.first_stages(k)))
        finally:
            rtok.stages = None
    with pytest.raises(ValueError, match="stages"):
        rtok.stages = K + 1
    rec = rtok.decode_structure(t)  # the decoder's own backbone
    assert rec.cb.shape == (147, 3) and np.isfinite(rec.cb).all()
    assert list(rec.atoms) == ["N", "CA", "C", "O", "CB"]
    via_image = rtok.decode_structure(t, via="image")
    assert via_image.cb.shape == (147, 3)
    with pytest.raises(ValueError, match="family"):
        tok_grid = Tokenizer.load(str(DATA / "old-checkpoint.pt"), device="cpu")
        tok_grid.decode(t)


def test_a_complex_decodes_to_one_file_with_its_chains_and_numbering(rtok, structures_dir,
                                                                     tmp_path):  # fmt: skip
    """4hhb (four chains) encoded as a complex: its tokens carry the chain layout and the
    author numbering, and decode writes one PDB with those chains (TER between them) and that
    numbering."""
    import gemmi

    from protoken.tokenizer import decode_to_files

    path = structures_dir / "graphein__4hhb.cif.gz"
    t = next(iter(rtok.encode_many([path], chains="complex", models="first")))
    assert [c for c, _ in t.chains] == ["A", "B", "C", "D"] and t.length == 574
    st = gemmi.read_structure(str(path))
    want = [(ch.name, f"{r.seqid.num}{r.seqid.icode.strip()}") for ch in st[0] for r in ch
            if gemmi.find_tabulated_residue(r.name) and r.find_atom("CA", "*")]  # fmt: skip
    assert [r for _, r in want] == list(t.res_ids)
    (tmp_path / "d").mkdir()
    decode_to_files(rtok, [t], str(tmp_path / "d"), "pdb")
    text = (tmp_path / "d" / f"{t.id}.pdb").read_text()
    assert text.count("TER") == 4
    out = gemmi.read_pdb_string(text)
    got = [(ch.name, f"{r.seqid.num}{r.seqid.icode.strip()}") for ch in out[0] for r in ch]
    assert got == want
