"""benchmarks/average_weights.py (how stage 10 of the bundled `residue` was made): the weights
are the mean of the inputs', the output loads for inference and as `--init`, and checkpoints of
different models are refused in one line, never averaged."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch

from conftest import REPO
from helpers import MICRO, random_residue_checkpoint
from protoken import checkpoint

spec = importlib.util.spec_from_file_location(
    "average_weights", REPO / "benchmarks" / "average_weights.py"
)
avg = importlib.util.module_from_spec(spec)
sys.modules["average_weights"] = avg
spec.loader.exec_module(avg)


def _two_runs(tmp_path):
    a = random_residue_checkpoint(tmp_path / "a.pt")
    ck = checkpoint.load(a)
    torch.manual_seed(1)
    ck["model"] = {k: v + torch.randn_like(v) if v.is_floating_point() else v
                   for k, v in ck["model"].items()}  # fmt: skip
    b = str(tmp_path / "b.pt")
    checkpoint.save(b, {k: ck[k] for k in ("model", "model_config", "codec")})
    return a, b


def test_the_average_is_the_mean_of_the_weights_and_names_its_parents(tmp_path):
    a, b = _two_runs(tmp_path)
    out = tmp_path / "soup" / "last.pt"
    assert avg.main([a, b, "--out", str(out)]) == 0
    ca, cb, co = checkpoint.load(a), checkpoint.load(b), checkpoint.load(str(out))
    floats = [k for k, v in ca["model"].items() if v.is_floating_point()]
    assert floats and set(co["model"]) == set(ca["model"])
    for k in floats:
        assert not torch.equal(ca["model"][k], cb["model"][k])
        torch.testing.assert_close(co["model"][k], (ca["model"][k] + cb["model"][k]) / 2)
    parents = co["lineage"]["average_of"]
    assert [p["checkpoint"] for p in parents] == [str(tmp_path / "a.pt"), b]
    assert all(len(p["sha256"]) == 12 for p in parents)
    assert "step" not in co  # the random checkpoints hold no step; runs of one length keep it
    # a model-only checkpoint: it decodes, and a new run can start from it
    model = checkpoint.model_from_checkpoint(co)
    assert sum(p.numel() for p in model.parameters()) > 0
    from protoken.codec import CodecSettings
    from protoken.model import ResidueConfig, ResidueVQVAE
    from protoken.train import init_from

    lineage = init_from(ResidueVQVAE(ResidueConfig.preset("residue-tiny")), str(out),
                        CodecSettings())  # fmt: skip
    assert lineage["init_provenance"]["lineage"]["average_of"][1]["checkpoint"] == b


def test_different_models_are_refused_in_one_line_and_nothing_is_written(tmp_path, capsys):
    from protoken.codec import CodecSettings
    from protoken.model import HierarchicalConfig, build_model, config_to_dict

    a, _ = _two_runs(tmp_path)
    cfg = HierarchicalConfig.preset("tiny", **MICRO)
    other = str(tmp_path / "hier.pt")
    checkpoint.save(other, {"model": build_model(cfg).state_dict(),
                            "model_config": config_to_dict(cfg),
                            "codec": CodecSettings().to_dict()})  # fmt: skip
    out = tmp_path / "soup.pt"
    assert avg.main([a, other, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "model_config" in err and "hier.pt" in err
    assert not out.exists()
    with pytest.raises(ValueError, match="at least two"):
        avg.average([a])


def test_an_existing_output_is_never_overwritten(tmp_path, capsys):
    a, b = _two_runs(tmp_path)
    out = tmp_path / "keep.pt"
    out.write_bytes(b"user data")
    assert avg.main([a, b, "--out", str(out)]) == 2
    assert out.read_bytes() == b"user data" and "exists" in capsys.readouterr().err


def test_set_changes_a_field_without_weights_and_refuses_one_with_weights(tmp_path, capsys):
    a, b = _two_runs(tmp_path)
    out = tmp_path / "blind.pt"
    assert avg.main([a, b, "--out", str(out), "--set", "encoder_chains=false"]) == 0
    co = checkpoint.load(str(out))
    assert co["model_config"]["encoder_chains"] is False
    assert checkpoint.model_from_checkpoint(co).config.encoder_chains is False
    for bad in ("d_model=64", "nonsense=1", "encoder_chains"):
        dst = tmp_path / f"{bad.split('=')[0]}.pt"
        assert avg.main([a, b, "--out", str(dst), "--set", bad]) == 2
        assert not dst.exists()
    err = capsys.readouterr().err
    assert "changes the model's weights" in err and "expected KEY=VALUE" in err


def test_runs_trained_with_other_loss_weights_average_and_other_shapes_do_not(tmp_path, capsys):
    """The loss's weights (``interface_weight``: stage 11d against 11b) hold no weights: such
    runs average, the first run's loss is recorded and said; a field that shapes the model
    (``d_model``) is still refused."""
    a, b = _two_runs(tmp_path)
    cb = checkpoint.load(b)
    cb["model_config"]["loss"] = {**cb["model_config"].get("loss", {}), "interface_weight": 6.0}
    checkpoint.save(b, cb)
    out = tmp_path / "soup.pt"
    assert avg.main([a, b, "--out", str(out)]) == 0
    co, ca = checkpoint.load(str(out)), checkpoint.load(a)
    assert co["model_config"] == ca["model_config"] != cb["model_config"]
    err = capsys.readouterr().err
    assert "other loss weights" in err and "b.pt" in err
    cb["model_config"] = {**ca["model_config"], "d_model": ca["model_config"]["d_model"] * 2}
    checkpoint.save(b, cb)
    assert avg.main([a, b, "--out", str(tmp_path / "no.pt")]) == 2
    assert "differ in model_config" in capsys.readouterr().err
    assert not (tmp_path / "no.pt").exists()
