"""The bundled tokenizers: load by name offline, without pickle, checked against their sha256;
encode -> decode round-trips real held-out structures (a smoke test of the weights)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from protoken import pretrained
from protoken.checkpoint import CheckpointError
from protoken.cli import main
from protoken.demo import heldout_structures
from protoken.evaluate import compare_with_reference
from protoken.structure import read_backbones
from protoken.tokenizer import Tokenizer

BUNDLED = ("default", "residue")


def test_the_bundle_lists_its_models_with_weights_cards_and_results():
    assert set(BUNDLED) <= set(pretrained.names())
    for name in BUNDLED:
        meta = pretrained.info(name)
        assert meta["sha256"] and meta["model_config"]["family"] in ("residue", "hierarchical")
        r = meta["results"]
        assert r["proteins"] >= 40 and 0 < r["tm_score_median"] <= 1
        card = pretrained.card(name)
        for section in ("## Training data", "## Compute", "## Held-out results",
                        "## Limitations", "## Reproduce"):  # fmt: skip
            assert section in card
        assert f"{r['tm_score_median']:.3f}" in card  # the card shows the JSON's figures
    assert pretrained.info("residue")["model_config"]["family"] == "residue"
    with pytest.raises(KeyError, match="no bundled tokenizer"):
        pretrained.resolve("nonexistent")


def test_weights_are_safetensors_and_a_tampered_file_is_refused(tmp_path, monkeypatch):
    root = tmp_path / "pretrained"
    shutil.copytree(pretrained._root(), root)
    monkeypatch.setattr(pretrained, "_root", lambda: str(root))
    assert pretrained.load("residue")["model"]  # loads from the copy
    weights = root / "residue.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        pretrained.load("residue")


@pytest.mark.parametrize("name", BUNDLED)
def test_encode_decode_round_trips_held_out_structures(name):
    tok = Tokenizer.from_pretrained(name, device="cpu")
    assert tok.checkpoint.startswith(name) and tok.provenance["step"] > 0
    files = heldout_structures()
    assert len(files) >= 30
    # 8 of the held-out bundled proteins of 60-200 residues, spread over the list
    sized = [f for f in files if 60 <= len(read_backbones(f, "first", "first")[0]) <= 200]
    picked = sized[:: max(1, len(sized) // 8)][:8]
    assert len(picked) == 8
    tms = []
    for path in picked:
        t = next(iter(tok.encode_many([path], "first", "first")))
        if name == "residue":
            assert t.family == "residue" and t.codes.shape == (t.length,)
        rec = tok.decode_structure(t)
        bb = read_backbones(path, "first", "first")[0]
        tms.append(compare_with_reference(rec, bb.coords)["tm_score"])
    assert np.median(tms) > 0.5, tms


def test_the_bundled_residue_keeps_the_folds_of_a_complexs_chains(structures_dir):
    """3U8V (a held-out homodimer, 2 x 83 residues) encoded as one complex at 1 stage and
    decoded in one pass: each chain keeps its fold (TM > 0.5 on its own; stage 10's weights with
    the chain layout in the encoder, as stages 6-10 were trained, gave 0.23 / 0.28), and they
    come back as chains A and B."""
    from protoken.geometry import virtual_cb
    from protoken.metrics import tm_score

    tok = Tokenizer.from_pretrained("residue", device="cpu")
    assert tok.model.config.encoder_chains is False
    tok.stages, tok.refine = 1, 0
    path = structures_dir / "openfold__3u8v.cif.gz"
    t = next(iter(tok.encode_many([path], chains="complex", models="first")))
    assert t.chains == (("A", 83), ("B", 83))
    pred = tok.decode_structure(t).atoms["CB"]
    bb = np.concatenate([b.coords for b in read_backbones(path, "split", "first")])
    true = virtual_cb(bb[:, 0], bb[:, 1], bb[:, 2])
    tms = [tm_score(pred[s : s + 83], true[s : s + 83]) for s in (0, 83)]
    assert min(tms) > 0.5, tms


def test_a_bundled_name_works_wherever_a_checkpoint_does(structures_dir, tmp_path, capsys):
    assert main(["pretrained"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in BUNDLED)
    assert main(["pretrained", "residue"]) == 0
    assert "## Held-out results" in capsys.readouterr().out
    src = str(structures_dir / "foldseek__d1asha_.pdb")
    fasta = tmp_path / "t.fasta"
    assert main(["encode", src, "-c", "residue", "--format", "fasta", "-o", str(fasta),
                 "--no-progress"]) == 0  # fmt: skip
    assert len(fasta.read_text().splitlines()[1].split()) == 147
    npz = tmp_path / "t.npz"
    assert main(["encode", src, "-o", str(npz), "--no-progress"]) == 0  # -c default
    meta = json.loads(str(np.load(npz)["meta"]))
    assert meta["checkpoint"].startswith("default-")
    assert main(["decode", str(npz), "-o", str(tmp_path / "d"), "--no-progress"]) == 0
    assert (tmp_path / "d" / "foldseek__d1asha_.pdb").stat().st_size > 0
    assert main(["pretrained", "nonexistent"]) == 2


def test_a_release_may_reuse_the_figures_of_the_same_weights_only(tmp_path, monkeypatch):
    """``benchmarks/pretrained.py release --reuse-results``: the same weights (sha256) under a
    new model config keep their held-out figures; other weights are refused in one line and
    nothing bundled changes."""
    import importlib.util
    import sys

    from conftest import REPO
    from helpers import random_residue_checkpoint
    from protoken import checkpoint

    spec = importlib.util.spec_from_file_location("release", REPO / "benchmarks" / "pretrained.py")
    release = importlib.util.module_from_spec(spec)
    monkeypatch.setattr(sys, "path", [str(REPO / "benchmarks"), *sys.path])
    spec.loader.exec_module(release)
    root = tmp_path / "bundle"
    root.mkdir()
    monkeypatch.setattr(pretrained, "_root", lambda: str(root))
    ckpt = random_residue_checkpoint(tmp_path / "a.pt")
    meta = json.load(open(pretrained.export(ckpt, "tiny", cpu_hours=0.1)))
    meta["results"] = {"proteins": 3, "tm_score_median": 0.5}
    (root / "tiny.json").write_text(json.dumps(meta))
    notes = tmp_path / "notes.yaml"
    notes.write_text("summary: s\ndata: d\ncompute: c\nlimitations: l\nreproduce: r\n")
    monkeypatch.setattr(release, "score_all", lambda *a: pytest.fail("re-scored"))
    monkeypatch.setattr(release, "write_card", lambda *a: "card")
    monkeypatch.setattr(release, "add_probe_section", lambda *a: False)
    blind = checkpoint.load(ckpt)
    blind["model_config"] = {**blind["model_config"], "encoder_chains": False}
    checkpoint.save(
        str(tmp_path / "b.pt"), {k: blind[k] for k in ("model", "model_config", "codec")}
    )
    args = ["release", "tiny", "--config", "configs/residue.yaml", "--cpu-hours", "0.2",
            "--notes", str(notes), "--reuse-results"]  # fmt: skip
    assert release.main([*args[:2], str(tmp_path / "b.pt"), *args[2:]]) == 0
    now = pretrained.info("tiny")
    assert now["results"] == meta["results"] and now["sha256"] == meta["sha256"]
    assert now["model_config"]["encoder_chains"] is False and now["cpu_hours"] == 0.2
    other = checkpoint.load(ckpt)
    other["model"] = {k: v + 1 if v.is_floating_point() else v for k, v in other["model"].items()}
    checkpoint.save(
        str(tmp_path / "c.pt"), {k: other[k] for k in ("model", "model_config", "codec")}
    )
    weights = (root / "tiny.safetensors").read_bytes()
    assert release.main([*args[:2], str(tmp_path / "c.pt"), *args[2:]]) == 2
    assert (root / "tiny.safetensors").read_bytes() == weights
    assert pretrained.info("tiny") == now
