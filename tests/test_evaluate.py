"""Evaluation: comparisons with references, reference and sequence lookup, summaries, and
protoken evaluate's honest metrics (a perfect decoder scores RMSD ~0, TM ~1) with its report."""

from __future__ import annotations

import csv
import json
import math
import shutil

import numpy as np
import pytest

from protoken.codec import CodecSettings, dequantize, features_to_image, quantize
from protoken.evaluate import (
    ReferenceIndex,
    SequenceLookup,
    compare_with_reference,
    evaluate,
    summarize,
)
from protoken.geometry import sixd, virtual_cb
from protoken.reconstruct import reconstruct
from protoken.report import EVALUATE_COLUMNS as COLUMNS
from protoken.structure import read_backbones
from protoken.tokenizer import Tokenizer

NAMES = ["foldseek__d1asha_.pdb", "kortemme__1CTF_A.pdb", "cathtools__1avyA00.pdb"]


class IdentityTokenizer(Tokenizer):
    """A 'perfect tokenizer': decoding returns the input image exactly."""

    decodes_coordinates = False  # its decoder makes images
    family = "hierarchical"

    def __init__(self, bit_depth: int = 16):
        self.codec = CodecSettings(bit_depth=bit_depth)
        self.checkpoint = "identity"
        self.batch_size = 8
        self.config = type("Cfg", (), {"codebook_size": 256, "level_scales": (4,)})()
        self._encoded: list = []

    def encode_images(self, images, chains=None):
        self._encoded = [np.array(im, copy=True) for im in images]  # what decoding returns
        return [[np.zeros((math.ceil(im.shape[-1] / 4),) * 2, dtype=np.int64)] for im in images]

    def decode_levels(self, levels, lengths, chains=None):
        assert [im.shape[-1] for im in self._encoded] == list(lengths)
        return self._encoded

    def roundtrip(self, images):
        levels = self.encode_images(images)
        return levels, self.decode_levels(levels, [im.shape[-1] for im in images])


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
    # the ceiling (input image -> 3D, no tokenizer) equals the decoded here, by construction
    assert summary["ceiling_tm_score"]["min"] > 0.999
    assert summary["ceiling_cb_rmsd"]["max"] < 0.01
    assert [(b["lengths"], b["proteins"]) for b in summary["by_length"]] == [
        ("40-99", 2), ("100-199", 1)]  # fmt: skip
    assert summary["by_length"][1]["tm_score"] > 0.999
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
    assert "ceiling median" in report and "| 100-199 | 1 |" in report
    # which hand MDS returns is arbitrary; the report counts it as the summary does
    assert f"Mirrored before fix: {summary['mirrored_before_fix']} of 3" in report
    # TM against the fraction of clipped pairs: 1avyA00 has 30 of its 2278 pairs beyond 80 A
    assert [(b["clipped"], b["proteins"]) for b in summary["by_clipped"]] == [
        ("none", 2), ("1-10%", 1)]  # fmt: skip
    assert "| 1-10% | 1 | 1.0000 | 1.0000 | 0 | 1.0000 | 1.0000 |" in report
    assert summary["handedness_undetermined"] == 0


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


class LayoutlessTokenizer(IdentityTokenizer):
    """The perfect tokenizer whose items lose their chain layout (``Item.chains`` empty)."""

    def _from_backbone(self, bb):
        item = super()._from_backbone(bb)
        item.chains = ()
        return item


@pytest.mark.slow
def test_complexes_are_scored_by_interface_with_their_ceiling(structures_dir, tmp_path):
    """--chains complex: a heterodimer (one image of both chains) and a single chain through
    the perfect tokenizer: DockQ ~1 and complex TM-score ~1, as their ceiling; the report
    shows the interface scores and the medians by complex size."""
    out = tmp_path / "report"
    names = ["biotite__5zng.pdb.gz", NAMES[1]]
    summary = evaluate(IdentityTokenizer(), [str(structures_dir / n) for n in names],
                       str(out), workers=1, progress=False, chains="complex")  # fmt: skip
    assert summary["proteins"] == 2 and summary["complexes"] == 1
    # backbone rebuilt from a 16-bit image: atoms within a few hundredths of an Angstrom
    assert summary["dockq"]["min"] > 0.99 and summary["ceiling_dockq"]["min"] > 0.99
    assert summary["fnat"]["min"] == 1.0 and summary["irmsd"]["max"] < 0.1
    assert summary["complex_tm_score"]["min"] > 0.999
    assert summary["dockq_classes"] == {"acceptable": 1.0, "medium": 1.0, "high": 1.0}
    size = summary["by_complex_size"]
    assert [(e["chains"], e["complexes"]) for e in size["chains"]] == [("1", 1), ("2", 1)]
    assert "dockq" not in size["chains"][0] and size["chains"][1]["dockq"] > 0.99
    rows = {r.split("\t")[0]: r.split("\t") for r in (out / "metrics.tsv").read_text().splitlines()}
    header = rows["id"]
    dimer = dict(zip(header, rows["biotite__5zng"], strict=True))
    assert dimer["chains"] == "A:79,C:62" and dimer["n_chains"] == "2"
    assert dimer["interfaces"] == "1" and float(dimer["ceiling_dockq"]) > 0.99
    single = dict(zip(header, rows[NAMES[1].split(".")[0]], strict=True))
    assert single["n_chains"] == "1" and single["dockq"] == ""
    report = (out / "report.md").read_text()
    assert "## Complexes" in report and "| DockQ | " in report
    assert "By complex size (chains; medians)" in report and "| 2 | 1 | 0.99" in report


def test_complexes_need_items_that_carry_their_chain_layout(structures_dir, tmp_path):
    with pytest.raises(ValueError, match="carry no chain layout"):
        evaluate(LayoutlessTokenizer(), [str(structures_dir / "biotite__5zng.pdb.gz")],
                 str(tmp_path), workers=1, progress=False, chains="complex")  # fmt: skip


# --------------------------------------------------------------------------- the parts


@pytest.fixture(scope="module")
def protein(structures_dir):
    """d1asha_, a 147-residue SCOPe domain."""
    return read_backbones(structures_dir / "foldseek__d1asha_.pdb")[0]


def test_compare_accepts_cb_references_and_rejects_another_length(protein):
    image = features_to_image(sixd(protein.n, protein.ca, protein.c))
    rec = reconstruct(dequantize(quantize(image, 16), np.float64))
    m = compare_with_reference(rec, virtual_cb(protein.n, protein.ca, protein.c))
    assert m["cb_rmsd"] < 1e-3 and m["length"] == len(protein)
    with pytest.raises(ValueError):
        compare_with_reference(rec, protein.coords[:-1])
    with pytest.raises(ValueError):
        compare_with_reference(rec, np.zeros((len(protein), 4)))


def test_compare_flags_a_mirror_image(protein):
    image = features_to_image(sixd(protein.n, protein.ca, protein.c))
    rec = reconstruct(dequantize(quantize(image, 16), np.float64))
    rec.cb = rec.cb * np.array([1.0, 1.0, -1.0])  # what a reflection-blind pipeline returns
    m = compare_with_reference(rec, protein)
    assert m["mirror_image"] and m["cb_rmsd"] > 5.0 and m["tm_score"] < 0.5


def test_summarize_counts_and_statistics():
    rows = [
        {"cb_rmsd": 1.0, "tm_score": 0.95, "mirror_image": False, "mirrored_before_fix": True},
        {"cb_rmsd": 3.0, "tm_score": 0.40, "mirror_image": True, "mirrored_before_fix": False},
        {"cb_rmsd": 8.0, "tm_score": 0.60, "mirror_image": False, "mirrored_before_fix": True},
    ]
    s = summarize(rows)
    assert s["cb_rmsd"] == {"median": 3.0, "mean": 4.0, "min": 1.0, "max": 8.0}
    assert s["tm_score"]["median"] == 0.60
    assert s["fraction_tm_above_0.5"] == pytest.approx(2 / 3)
    assert s["fraction_tm_above_0.9"] == pytest.approx(1 / 3)
    assert (s["mirror_images"], s["mirrored_before_fix"]) == (1, 2)
    assert "lddt" not in s and "bb_rmsd" not in s  # only what the rows hold
    assert summarize([]) == {"mirror_images": 0, "mirrored_before_fix": 0}


def test_references_are_found_by_id_and_by_chain(structures_dir, tmp_path):
    folder = tmp_path / "refs" / "deeper"
    folder.mkdir(parents=True)
    for name in ("foldseek__1tim.pdb.gz", "foldseek__d1asha_.pdb"):
        shutil.copy(structures_dir / name, folder / name)
    index = ReferenceIndex(tmp_path / "refs")
    assert sorted(index.files) == ["foldseek__1tim", "foldseek__d1asha_"]
    assert len(index.find("foldseek__d1asha_")) == 147
    chain_b = index.find("foldseek__1tim_B")  # an id of protoken convert --chains split
    assert chain_b.id == "foldseek__1tim_B" and chain_b.chain_id == "B"
    assert index.find("foldseek__1tim_Z") is None and index.find("nothing") is None
    assert not ReferenceIndex(None) and ReferenceIndex(folder / "foldseek__d1asha_.pdb")


@pytest.mark.parametrize("mode, suffix", [("w", ".tar"), ("w:gz", ".tar.gz")])
def test_references_in_tar_archives(structures_dir, tmp_path, mode, suffix):
    """A proteome tar (plain, as the AlphaFold DB ships them, or gzipped): each member is found
    by its id and read from where the index saw it, also for a chain of ``--chains split``."""
    import pickle
    import tarfile

    names = ["foldseek__d1asha_.pdb", "foldseek__1tim.pdb.gz"]
    archive = tmp_path / f"refs{suffix}"
    with tarfile.open(archive, mode) as tf:
        for name in names:
            tf.add(structures_dir / name, arcname=f"proteome/{name}")
    index = ReferenceIndex(archive)
    assert sorted(index.members) == ["foldseek__1tim", "foldseek__d1asha_"] and not index.files
    where = index.locate("foldseek__d1asha_")
    assert len(pickle.dumps(where)) < 500  # what a worker task carries
    got = index.find("foldseek__d1asha_")
    want = read_backbones(structures_dir / names[0])[0]
    np.testing.assert_array_equal(got.coords, want.coords)
    chain_b = index.find("foldseek__1tim_B")
    assert chain_b.chain_id == "B" and len(chain_b) == 247
    assert index.find("foldseek__d1it2a_") is None


def test_references_in_a_foldcomp_database(structures_dir, tmp_path):
    pytest.importorskip("foldcomp")
    from helpers import make_foldcomp_db

    files = [structures_dir / n for n in ("foldseek__d1asha_.pdb", "foldseek__d1it2a_.pdb")]
    db = tmp_path / "db"
    make_foldcomp_db(files, db)
    index = ReferenceIndex(db)
    assert sorted(index.members) == ["foldseek__d1asha_", "foldseek__d1it2a_"]
    for f in files:
        want = read_backbones(f)[0]
        got = index.find(want.id)
        assert got.sequence == want.sequence
        # Foldcomp's coordinates are lossy (internal angles): RMSD ~0.05 A, at most 0.2 A
        err = np.sqrt(np.mean(np.sum((got.coords - want.coords) ** 2, axis=-1)))
        assert err < 0.1 and np.abs(got.coords - want.coords).max() < 0.5
    folder = tmp_path  # a folder holding the database (and its sidecar files)
    assert sorted(ReferenceIndex(folder).members) == sorted(index.members)


def test_evaluate_compares_pngs_with_references_from_an_archive(structures_dir, tmp_path):
    """PNG inputs with ``reference``: compared with the true structure found by id (here in a
    Foldcomp database), not with their own reconstruction; an id not found falls back to it."""
    pytest.importorskip("foldcomp")
    from helpers import make_foldcomp_db
    from protoken.codec import write_png

    db = tmp_path / "db"
    make_foldcomp_db([structures_dir / "foldseek__d1asha_.pdb"], db)
    pngs = tmp_path / "pngs"
    pngs.mkdir()
    bb = read_backbones(structures_dir / "foldseek__d1asha_.pdb")[0]
    image = features_to_image(sixd(bb.n, bb.ca, bb.c))
    write_png(pngs / "foldseek__d1asha_.png", image, 16)
    write_png(pngs / "unknown.png", image, 16)
    inputs = sorted(str(p) for p in pngs.glob("*.png"))
    out = tmp_path / "out"
    summary = evaluate(IdentityTokenizer(), inputs, str(out), workers=1, progress=False,
                       reference=str(db))  # fmt: skip
    assert summary["compared_with_references"] == 1
    with open(out / "metrics.tsv", newline="") as fh:
        rows = {r["id"]: r for r in csv.DictReader(fh, delimiter="\t")}
    assert rows["foldseek__d1asha_"]["reference"] == "reference"
    assert rows["unknown"]["reference"] == "image"
    # against the Foldcomp copy (coordinates to ~0.05 A) rather than its own reconstruction
    assert 1e-3 < float(rows["foldseek__d1asha_"]["cb_rmsd"]) < 0.3
    assert float(rows["unknown"]["cb_rmsd"]) < 1e-3


def test_sequences_from_a_fasta_file_or_folder(tmp_path):
    (tmp_path / "a.fasta").write_text(">a desc\nMKV\nLL\n")
    (tmp_path / "b.fa").write_text(">whatever\nGG\n")
    folder = SequenceLookup(tmp_path, n_images=2)
    assert (folder.get("a"), folder.get("b"), folder.get("c")) == ("MKVLL", "GG", None)
    one = SequenceLookup(tmp_path / "a.fasta", n_images=1)
    assert one.get("a") == one.get("any id") == "MKVLL"  # one record serves one image
    assert SequenceLookup(tmp_path / "a.fasta", n_images=2).get("other") is None
    assert SequenceLookup(None, n_images=1).get("a") is None


# --------------------------------------------------------------------------- streaming, memory


def test_evaluate_memory_does_not_grow_with_the_number_of_proteins(structures_dir, tmp_path):
    """80 proteins take no more memory than 10: inputs and decoded images are dropped once
    measured (held as before, 70 more proteins' two float images cost ~4 MB here); what grows
    is the rows of metrics."""
    from helpers import linked_images, peak_python_memory, small_images

    small = small_images(structures_dir, tmp_path / "small")
    peaks = {}
    for n in (10, 80):
        folder = linked_images(small, tmp_path / f"in{n}", n)
        out = tmp_path / f"report{n}"
        summary, peaks[n] = peak_python_memory(lambda folder=folder, out=out: evaluate(
            IdentityTokenizer(), sorted(map(str, folder.iterdir())), str(out), workers=1,
            progress=False))  # fmt: skip
        assert summary["proteins"] == n and summary["tm_score"]["min"] > 0.999
        assert len((out / "metrics.tsv").read_text().splitlines()) == n + 1
        assert all((out / f"images_{w}.png").is_file() for w in ("best", "median", "worst"))
    from protoken.codec import read_image

    side = np.mean([read_image(p).shape[-1] for p in small])  # 40, 46 and 57 residues
    held_extra = (80 - 10) * 2 * 3 * side * side * 4  # input + decoded float32 images
    growth = peaks[80] - peaks[10]
    assert growth < 0.25 * held_extra, (peaks, held_extra)


def test_picture_picks_hold_few_proteins_and_find_best_median_worst():
    from protoken.evaluate import Picture, PicturePicks

    rng = np.random.default_rng(1)
    for order in ("random", "ascending", "descending"):
        tms = rng.random(5000)
        tms = {"random": tms, "ascending": np.sort(tms), "descending": np.sort(tms)[::-1]}[order]
        picks, made = PicturePicks(sample=8), []

        def make(i, made=made):
            made.append(i)
            return Picture(i, np.zeros((3, 1, 1), np.float16), None, None, None)

        for i, tm in enumerate(tms):
            picks.offer(i, float(tm), lambda i=i: make(i))
        held = {id(p) for p in (*picks.reservoir, picks.best, picks.worst, picks.near_median)}
        assert len(held) <= 8 + 3
        shown = picks.picks()
        assert shown["best"].index == int(np.argmax(tms))
        assert shown["worst"].index == int(np.argmin(tms))
        quantile = np.mean(tms < tms[shown["median"].index])
        assert abs(quantile - 0.5) < 0.1, (order, quantile)
        if order == "random":  # pictures built only for the proteins kept (a few dozen)
            assert len(made) < 200
    # up to `sample` proteins the median is exact: sorted(tms)[n // 2]
    for n in range(1, 9):
        tms = rng.random(n)
        picks = PicturePicks(sample=8)
        for i, tm in enumerate(tms):
            picks.offer(i, float(tm), lambda i=i: Picture(i, None, None, None, None))
        assert tms[picks.picks()["median"].index] == np.sort(tms)[n // 2]


def test_reconstruct_writes_a_complex_with_its_chains_and_compares_it(structures_dir, tmp_path):
    """An image of --chains complex and its FASTA (chains= in the header) -> one PDB with the
    chains A and C, named residues, and the complex's scores against the structure file."""
    import gemmi

    from protoken.convert import ConvertOptions, convert
    from protoken.evaluate import reconstruct_images

    src = structures_dir / "biotite__5zng.pdb.gz"
    conv = tmp_path / "conv"
    convert([str(src)], ConvertOptions(out=str(conv), chains="complex", bit_depth=16), 1,
            progress=False)  # fmt: skip
    images = sorted(str(p) for p in conv.glob("bin_*/*.png"))
    out = tmp_path / "rec"
    rows, summary = reconstruct_images(images, str(out), fasta=str(conv / "fasta"),
                                       reference=str(src), workers=1)  # fmt: skip
    (row,) = rows
    assert row["chains"] == "A:79,C:62" and row["n_chains"] == 2 and not row["note"]
    assert row["complex_tm_score"] > 0.999 and row["chain_tm_min"] > 0.999
    assert "dockq" not in row  # DockQ needs the backbone (--backbone)
    st = gemmi.read_structure(str(out / "biotite__5zng.pdb"))
    assert [(ch.name, len(ch)) for ch in st[0]] == [("A", 79), ("C", 62)]
    (cx,) = read_backbones(src, chains="complex")
    names = "".join(gemmi.find_tabulated_residue(r.name).one_letter_code.upper()
                    for ch in st[0] for r in ch)  # fmt: skip
    assert names == cx.sequence
    header = (out / "metrics.tsv").read_text().splitlines()[0].split("\t")
    assert {"chains", "complex_tm_score", "dockq"} <= set(header)
    assert summary["complex_tm_score"]["min"] > 0.999
