"""The README's main job, `protoken demo`, end to end at CI size (a few training steps)."""

from __future__ import annotations

import json

from protoken.cli import main
from protoken.demo import bundled_structures


def test_bundled_structures_are_packaged():
    from pathlib import Path

    files = sorted(Path(bundled_structures()).glob("*.gz"))
    assert len(files) == 48
    manifest = (Path(bundled_structures()) / "MANIFEST.tsv").read_text().splitlines()
    assert len(manifest) == 49 and manifest[0].startswith("file\tsource_repo")


def test_demo_uses_the_pretrained_tokenizer(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--workers", "2"]) == 0
    text = capsys.readouterr().out
    assert "converted 48, skipped 0, failed 0" in text
    assert "pretrained tokenizer 'default'" in text and "TM-score median" in text
    assert "protoken encode YOUR_FILES" in text  # what to do next
    # which proteins, and why the others of the 48 are left out; the model card's test set named
    from protoken import pretrained
    from protoken.demo import heldout_structures

    n = len(heldout_structures())
    assert 30 <= n < 48
    assert f"the {n} bundled proteins held out from its training (the other {48 - n} share" in text
    assert f"the figures above are of the {n} held-out bundled proteins" in text
    card_set = pretrained.info("default")["results"]["proteins"]
    assert f"its test set of {card_set} proteins" in text
    summary = json.loads((out / "report" / "summary.json").read_text())
    assert summary["proteins"] == n and summary["tm_score"]["median"] > 0.5
    assert summary["provenance"]["step"] > 0 and summary["by_length"]
    report = (out / "report" / "report.md").read_text()
    assert "ceiling median" in report and "Mirrored before fix" in report


def test_demo_train_runs_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--train", "--out", str(out), "--max-steps", "12", "--workers", "2"]) == 0
    text = capsys.readouterr().out
    assert "converted 48, skipped 0, failed 0" in text
    assert "report: " in text and "TM-score median" in text
    report = out / "report"
    summary = json.loads((report / "summary.json").read_text())
    assert summary["proteins"] >= 5  # the held-out split of the 48 bundled proteins
    assert "bb_rmsd" in summary and summary["mirror_images"] >= 0
    for name in ("report.md", "metrics.tsv", "hist_tm.png", "overlay_best.png"):
        assert (report / name).stat().st_size > 0
    (run,) = out.glob("run-*")
    assert (run / "best.pt").exists() and (run / "metrics.jsonl").exists()
