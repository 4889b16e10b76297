"""Checkpoints: weights_only loading only, refusal of pickled objects (nothing runs), format 1
still read for inference, RNG states as plain values, atomic save, describe."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

from helpers import MICRO
from protoken import checkpoint
from protoken.codec import CodecSettings
from protoken.model import HierarchicalConfig, build_model, config_to_dict


class _Payload:
    """Unpickling this runs code: it creates the file ``marker``."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _model_payload() -> dict:
    cfg = HierarchicalConfig.preset("tiny", **MICRO)
    model = build_model(cfg)
    return {
        "model": model.state_dict(),
        "model_config": config_to_dict(cfg),
        "codec": CodecSettings().to_dict(),
    }


def test_a_pickled_object_is_refused_in_one_line_and_nothing_runs(tmp_path, converted8):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({**_model_payload(), "format": 2, "extra": _Payload(str(marker))}, evil)
    # the file really would run code when unpickled the old way
    torch.load(evil, weights_only=False)
    assert marker.exists()
    marker.unlink()

    with pytest.raises(
        checkpoint.CheckpointError,
        match=f"refusing to load {evil}: it holds pickled Python objects \\(.*open\\)",
    ):
        checkpoint.load(str(evil))
    assert not marker.exists()
    png = next((converted8 / "bin_65_128").glob("*.png"))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "protoken",
            "encode",
            str(png),
            "--checkpoint",
            str(evil),
            "--out",
            str(tmp_path / "tokens.npz"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and str(evil) in lines[0] and "refusing" in lines[0], done.stderr
    assert not marker.exists() and not (tmp_path / "tokens.npz").exists()


def test_resume_refuses_a_pickled_last_pt_before_running_anything(tmp_path):
    from protoken.cli import main

    run = tmp_path / "run"
    run.mkdir()
    marker = tmp_path / "pwned"
    torch.save({"format": 2, "x": _Payload(str(marker))}, run / "last.pt")
    (run / "config.json").write_text(json.dumps({"data": str(tmp_path), "out": str(run)}))
    assert main(["train", "--out", str(run), "--resume"]) == 2
    assert not marker.exists()


def test_saved_checkpoints_hold_plain_values_only(tmp_path):
    path = str(tmp_path / "c.pt")
    payload = {
        **_model_payload(),
        "rng": [checkpoint.rng_state()],
        "step": 3,
        "best_val": float("inf"),
    }
    checkpoint.save(path, payload)
    raw = torch.load(path, weights_only=True)  # plain torch, no allow-list
    assert raw["format"] == checkpoint.FORMAT == 2 and raw["step"] == 3
    with pytest.raises(TypeError, match=r"checkpoint\['bad'\] is a float64"):
        checkpoint.save(str(tmp_path / "d.pt"), {**payload, "bad": np.float64(1.0)})
    assert not (tmp_path / "d.pt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temporary file left
    text = checkpoint.describe(checkpoint.load(path), path)
    assert "format 2" in text and "family hierarchical" in text and "step 3" in text


def test_rng_states_round_trip_as_plain_values():
    random.seed(1)
    np.random.seed(2)  # noqa: NPY002
    torch.manual_seed(3)
    state = checkpoint.rng_state()
    want = (random.random(), np.random.random(), torch.rand(1).item())  # noqa: NPY002
    random.seed(9)
    np.random.seed(9)  # noqa: NPY002
    torch.manual_seed(9)
    checkpoint.set_rng_state(state)
    assert (random.random(), np.random.random(), torch.rand(1).item()) == want  # noqa: NPY002
    assert isinstance(state["python"], list) and isinstance(state["numpy"][1], list)


def test_format_1_checkpoints_load_for_inference_and_resume_says_what_to_do(tmp_path):
    """A checkpoint as protoken 0.1 wrote it (numpy RNG state inside) loads with
    weights_only=True for encode/decode; --resume refuses it with one line saying what to do."""
    path = str(tmp_path / "old.pt")
    payload = _model_payload()
    payload["model_config"].pop("family")  # format 1 had no family
    rng = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),  # noqa: NPY002
        "torch": torch.get_rng_state(),
    }
    torch.save(
        {
            **payload,
            "format": 1,
            "version": "0.1.0",
            "step": 5,
            "rng": [rng],
            "optimizer": {},
            "scaler": {},
            "config": {},
            "best_val": 1.0,
            "batches_consumed": 5,
        },
        path,
    )
    with pytest.raises(Exception, match="Weights only load failed"):
        torch.load(path, weights_only=True)
    ckpt = checkpoint.load(path)
    assert ckpt["format"] == 1 and ckpt["rng"][0]["numpy"][0] == "MT19937"
    model = checkpoint.model_from_checkpoint(ckpt)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, payload["model"][k])
    with pytest.raises(checkpoint.CheckpointError, match="format 1.*start a new run.*encode"):
        checkpoint.validate(ckpt, path, training=True)
