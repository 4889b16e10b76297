"""protoken evaluate: honest metrics (a perfect decoder scores RMSD ~0, TM ~1) and the report."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from protoken.codec import CodecSettings
from protoken.evaluate import COLUMNS, evaluate
from protoken.tokenizer import Tokenizer

NAMES = ["foldseek__d1asha_.pdb", "kortemme__1CTF_A.pdb", "cathtools__1avyA00.pdb"]


class IdentityTokenizer(Tokenizer):
    """A 'perfect tokenizer': decoding returns the input image exactly."""

    def __init__(self, bit_depth: int = 16):
        self.codec = CodecSettings(bit_depth=bit_depth)
        self.checkpoint = "identity"
        self.batch_size = 8
        self.config = type("Cfg", (), {"codebook_size": 256, "level_scales": (4,)})()

    def roundtrip(self, images):
        levels = [[np.zeros((math.ceil(im.shape[-1] / 4),) * 2, dtype=np.int64)] for im in images]
        return levels, [np.array(im, copy=True) for im in images]


@pytest.mark.parametrize("backbone", [False, True])
def test_a_perfect_decoder_scores_perfectly(structures_dir, tmp_path, backbone):
    out = tmp_path / "report"
    summary = evaluate(IdentityTokenizer(), [str(structures_dir / n) for n in NAMES], str(out),
                       backbone=backbone, workers=2, progress=False)  # fmt: skip
    assert summary["proteins"] == 3
    # 16-bit images: MDS Cb to ~1e-4 A; the refined backbone's ideal Cb to a few hundredths
    assert summary["cb_rmsd"]["max"] < (0.1 if backbone else 0.01)
    assert summary["tm_score"]["min"] > 0.999
    assert summary["lddt"]["min"] > 0.99
    assert summary["image_mse"]["max"] == 0 and summary["mirror_images"] == 0
    assert summary["fraction_tm_above_0.9"] == 1.0
    if backbone:
        assert summary["bb_rmsd"]["median"] < 0.2 and summary["ca_tm_score"]["min"] > 0.98
    for name in ("metrics.tsv", "summary.json", "report.md", "hist_rmsd.png", "hist_tm.png",
                 "images_best.png", "images_median.png", "images_worst.png",
                 "overlay_best.png", "overlay_median.png", "overlay_worst.png"):  # fmt: skip
        assert (out / name).stat().st_size > 0, name
    rows = (out / "metrics.tsv").read_text().splitlines()
    assert rows[0].split("\t")[: len(COLUMNS)] == list(COLUMNS) and len(rows) == 4
    assert json.loads((out / "summary.json").read_text())["proteins"] == 3
    report = (out / "report.md").read_text()
    assert "![Cb RMSD](hist_rmsd.png)" in report and "foldseek__d1asha_" in report


def test_eight_bit_images_lose_little(structures_dir, tmp_path):
    summary = evaluate(IdentityTokenizer(bit_depth=8), [str(structures_dir / NAMES[0])],
                       str(tmp_path), workers=1, progress=False)  # fmt: skip
    assert 0 < summary["cb_rmsd"]["max"] < 0.1
    assert summary["distance_mae"]["max"] < 0.2  # half a level is 80/255/2 = 0.16 A


def test_bad_inputs_are_skipped_with_a_reason(structures_dir, bad_inputs_dir, tmp_path):
    messages = []
    summary = evaluate(IdentityTokenizer(), [str(structures_dir / NAMES[0]),
                       str(bad_inputs_dir / "empty.pdb")], str(tmp_path), workers=1,
                       progress=False, log=messages.append)  # fmt: skip
    assert summary["proteins"] == 1 and summary["skipped_inputs"] == 1
    assert any("empty.pdb" in m and "empty file" in m for m in messages)
    with pytest.raises(ValueError, match="no protein"):
        evaluate(IdentityTokenizer(), [str(bad_inputs_dir / "empty.pdb")], str(tmp_path),
                 workers=1, progress=False, log=messages.append)  # fmt: skip
