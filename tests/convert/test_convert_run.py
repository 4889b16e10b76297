"""Batch conversion on the real structures and bad inputs of ../shared."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from protoken.cli import main
from protoken.codec import read_image
from protoken.convert import MANIFEST_COLUMNS, ConvertOptions, bin_name, convert, read_manifest
from protoken.inputs import in_shard, structure_id
from protoken.structure import read_backbones
from test_geometry import plain_sixd
from test_structure import BAD, LENGTH_EXCEPTIONS, expected_outcome

REFERENCE_BINS = ["bin_40_64"] + [f"bin_{lo}_{lo + 63}" for lo in range(65, 1024, 64)]


def rows_by_source(out: Path) -> dict[str, list[dict]]:
    rows: dict[str, list[dict]] = {}
    for path in sorted(out.glob("manifest*.tsv")):
        for row in read_manifest(str(path)):
            rows.setdefault(row["source"], []).append(row)
    return rows


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, structures_dir, bad_inputs_dir):
    """Every structure of ../shared plus every bad input, two workers, default options."""
    out = tmp_path_factory.mktemp("full")
    summary = convert([str(structures_dir), str(bad_inputs_dir)], ConvertOptions(out=str(out)),
                      workers=2, progress=False)  # fmt: skip
    return out, summary


def test_every_input_gets_one_row_with_the_expected_outcome(full_run, structures_dir, manifest):
    out, summary = full_run
    rows = rows_by_source(out)
    header = (out / "manifest.tsv").read_text().splitlines()[0].split("\t")
    assert tuple(header) == MANIFEST_COLUMNS
    problems = []
    for name, mrow in manifest.items():
        got = rows.get(str(structures_dir / name))
        if not got or len(got) != 1:
            problems.append(f"{name}: {len(got or [])} manifest rows")
            continue
        row = got[0]
        want, prefixes = expected_outcome(mrow)
        n = LENGTH_EXCEPTIONS.get(name, int(mrow["n_protein_residues_first_chain"]))
        if want == "ok" and not 40 <= n <= 1024:
            want, prefixes = "skipped", ("too short", "too long")
        if (
            want == "ok"
            and row["status"] == "skipped"
            and row["reason"].startswith(("outputs already exist", "duplicate id"))
        ):
            continue  # the same entry in another format was converted first (1aki.pdb/.cif)
        if row["status"] != want or (prefixes and not row["reason"].startswith(prefixes)):
            problems.append(f"{name}: {row['status']} {row['reason']!r}, expected {want}")
        if row["status"] == "ok" and int(row["length"]) != n:
            problems.append(f"{name}: length {row['length']} != {n}")
    assert not problems, "\n".join(problems)
    assert summary.converted == sum(r[0]["status"] == "ok" for r in rows.values())
    assert summary.converted >= 150


def test_bad_inputs_are_recorded_and_yield_no_image(full_run, bad_inputs_dir):
    out, summary = full_run
    rows = rows_by_source(out)
    for name, (status, prefix) in BAD.items():
        (row,) = rows[str(bad_inputs_dir / name)]
        assert row["status"] == status and row["reason"].startswith(prefix), row
        assert not list(out.glob(f"bin_*/{structure_id(name)}.png"))
    assert summary.failed  # the run went on past them
    assert (bad_inputs_dir / "empty.pdb").exists()  # inputs untouched


def test_outputs_are_complete_and_consistent(full_run):
    out, _ = full_run
    rows = [r[0] for r in rows_by_source(out).values()]
    ok = [r for r in rows if r["status"] == "ok"]
    assert {p.name for p in out.iterdir() if p.is_dir()} <= set(REFERENCE_BINS) | {"fasta"}
    pngs = sorted(out.glob("bin_*/*.png"))
    assert len(pngs) == len(ok) == len(list((out / "fasta").glob("*.fasta")))
    for row in ok:
        length = int(row["length"])
        assert row["bin"] == bin_name(length)
        img = read_image(out / row["bin"] / f"{row['id']}.png")
        assert img.shape == (3, length, length)
        fasta = (out / "fasta" / f"{row['id']}.fasta").read_text()
        assert fasta == f">{row['id']}\n{row['sequence']}\n"
        assert len(row["sequence"]) == length
    assert not list(out.rglob("*.tmp*"))


def test_manifest_records_the_fraction_of_clipped_pairs(full_run, structures_dir):
    """The ``clipped`` column: the fraction of residue pairs at or beyond dmax, counted here from
    the Cb of the files, and equal to the image's pixels at the top of the range."""
    from protoken.geometry import pairwise_distances, virtual_cb

    out, _ = full_run
    rows = {r[0]["id"]: r[0] for r in rows_by_source(out).values() if r[0]["status"] == "ok"}
    assert all(r["clipped"] != "" for r in rows.values())
    for sid, name in (("cathtools__1avyA00", "cathtools__1avyA00.pdb"),
                      ("foldseek__d1asha_", "foldseek__d1asha_.pdb"),
                      ("graphein__P04629", "graphein__P04629.pdb.gz")):  # fmt: skip
        bb = read_backbones(structures_dir / name)[0]
        d = pairwise_distances(virtual_cb(bb.n, bb.ca, bb.c))
        pairs = len(bb) * (len(bb) - 1) // 2
        want = int(np.count_nonzero(np.triu(d >= 80.0, 1))) / pairs
        assert float(rows[sid]["clipped"]) == pytest.approx(want, rel=1e-5), sid
        img = read_image(out / rows[sid]["bin"] / f"{sid}.png")
        assert np.count_nonzero(np.tril(img[0] >= 1.0, -1)) == round(want * pairs)
    assert float(rows["cathtools__1avyA00"]["clipped"]) == pytest.approx(30 / 2278, rel=1e-5)
    assert rows["foldseek__d1asha_"]["clipped"] == "0"


def test_manifests_without_the_clipped_column_still_read_and_resume(tmp_path, structures_dir):
    """A manifest written before the ``clipped`` column: read as before, and a resumed run
    appends rows in its own columns."""
    from protoken.data import ImageIndex

    out = tmp_path / "out"
    first = structures_dir / "foldseek__d1asha_.pdb"
    convert([str(first)], ConvertOptions(out=str(out)), workers=1, progress=False)
    path = out / "manifest.tsv"
    lines = [ln.split("\t") for ln in path.read_text().splitlines()]
    assert lines[0][-1] == "clipped"
    path.write_text("".join("\t".join(cols[:-1]) + "\n" for cols in lines))  # the old layout
    convert([str(first), str(structures_dir / "cathtools__1avyA00.pdb")],
            ConvertOptions(out=str(out)), workers=1, progress=False)  # fmt: skip
    lines = [ln.split("\t") for ln in path.read_text().splitlines()]
    assert len(lines) == 3 and {len(cols) for cols in lines} == {len(MANIFEST_COLUMNS) - 1}
    rows = list(read_manifest(str(path)))
    assert [r["status"] for r in rows] == ["ok", "ok"] and "clipped" not in rows[0]
    assert len(ImageIndex.build(out)) == 2


def test_pixels_equal_a_plain_implementation_of_the_seed(full_run, structures_dir):
    out, _ = full_run
    name = "foldseek__d1asha_.pdb"
    bb = read_backbones(structures_dir / name)[0]
    d, omega, theta, phi = plain_sixd(bb.n, bb.ca, bb.c, 80.0)
    ch0 = np.where(np.tri(len(bb), dtype=bool), d / 80 * 2 - 1, omega / np.pi)
    img = np.stack([ch0, theta / np.pi, phi / np.pi * 2 - 1])
    want = np.clip(np.floor((img + 1) / 2 * 255), 0, 255).astype(np.uint8).transpose(1, 2, 0)
    import imagecodecs

    got = imagecodecs.png_decode((out / bin_name(len(bb)) / "foldseek__d1asha_.png").read_bytes())
    # a value exactly on a bin edge may round either way between implementations
    diff = np.abs(got.astype(int) - want.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3


def test_sixteen_bit_images_decode_within_one_level(converted16, structures_dir):
    bb = read_backbones(structures_dir / "biotite__1aki.pdb")[0]
    d, omega, theta, phi = plain_sixd(bb.n, bb.ca, bb.c, 80.0)
    ch0 = np.where(np.tri(len(bb), dtype=bool), d / 80 * 2 - 1, omega / np.pi)
    img = np.stack([ch0, theta / np.pi, phi / np.pi * 2 - 1])
    back = read_image(converted16 / bin_name(len(bb)) / "biotite__1aki.png", dtype=np.float64)
    assert np.abs(back - img).max() <= 2.0 / 65535  # one 16-bit level


def test_image_invariant_under_rotation_and_translation(tmp_path, structures_dir):
    import gemmi

    src = structures_dir / "foldseek__d1asha_.pdb"
    st = gemmi.read_structure(str(src))
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    q *= np.sign(np.linalg.det(q))
    tr = gemmi.Transform(gemmi.Mat33(q.tolist()), gemmi.Vec3(*rng.normal(scale=30, size=3)))
    st[0].transform_pos_and_adp(tr)
    moved = tmp_path / "in" / "moved.pdb"
    moved.parent.mkdir()
    st.write_pdb(str(moved))
    shutil.copy(src, tmp_path / "in" / "orig.pdb")
    convert([str(tmp_path / "in")], ConvertOptions(out=str(tmp_path / "out")), workers=1,
            progress=False)  # fmt: skip
    a = read_image(tmp_path / "out" / "bin_129_192" / "orig.png")
    b = read_image(tmp_path / "out" / "bin_129_192" / "moved.png")
    diff = np.abs(a - b)
    # omega (upper triangle of channel 0) and theta are angles: -pi and +pi are one value
    circular = np.zeros(a.shape, dtype=bool)
    circular[0] = np.triu(np.ones(a.shape[1:], dtype=bool), k=1)
    circular[1] = True
    diff[circular] = np.minimum(diff[circular], 2.0 - diff[circular])
    # the moved file holds coordinates rounded to 3 decimals again: a level or two in a few
    # pixels (angles of close pairs are sensitive); exact invariance is tested in test_geometry
    diff = diff * 255 / 2
    assert diff.max() <= 2.0 + 1e-5 and (diff > 0.5).mean() < 0.05


def test_resume_after_kill(tmp_path, structures_dir):
    """kill -9 in the middle of a run, run again: complete, nothing truncated, no duplicates."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "protoken", "convert", str(structures_dir), "--out", str(out),
           "--workers", "1", "--no-progress"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    manifest = out / "manifest.tsv"
    while time.time() < deadline:
        if manifest.exists() and manifest.read_text().count("\n") > 40:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = rows_by_source(out)
    assert 0 < len(first) < 282, "the run should have been killed part-way"
    for png in out.glob("bin_*/*.png"):  # everything in place is whole
        read_image(png)
    for fasta in (out / "fasta").glob("*.fasta"):
        assert list(out.glob(f"bin_*/{fasta.stem}.png")), f"FASTA without PNG: {fasta}"

    assert main(["convert", str(structures_dir), "--out", str(out), "--workers", "2",
                 "--no-progress"]) == 0  # fmt: skip
    ref = tmp_path / "ref"
    convert([str(structures_dir)], ConvertOptions(out=str(ref)), workers=2, progress=False)
    rows, ref_rows = rows_by_source(out), rows_by_source(ref)
    assert rows.keys() == ref_rows.keys()
    assert all(len(v) == 1 for v in rows.values()), "a source was recorded twice"
    for src, (row,) in rows.items():
        (want,) = ref_rows[src]
        if row["status"] != want["status"]:  # converted, but its row was lost in the kill
            assert want["status"] == "ok" and row["reason"].startswith("outputs already exist")
    names = sorted(p.relative_to(out) for p in out.glob("bin_*/*.png"))
    assert names == sorted(p.relative_to(ref) for p in ref.glob("bin_*/*.png"))
    assert not list(out.rglob("*.tmp*"))  # the killed run's temporary files were removed
    for name in names:
        np.testing.assert_array_equal(read_image(out / name), read_image(ref / name))


def test_delete_source_deletes_only_verified_conversions(tmp_path, structures_dir, bad_inputs_dir):
    src = tmp_path / "src"
    src.mkdir()
    ok = ["foldseek__d1asha_.pdb", "biotite__1aki.cif.gz"]
    kept = ["foldseek__1tim.pdb.gz", "biotite__1l2y.pdb.gz", "biotite__1bna.pdb"]
    for name in ok + kept:
        shutil.copy(structures_dir / name, src / name)
    for name in ("empty.pdb", "ca_only_trace.pdb", "truncated_gzip.pdb.gz"):
        shutil.copy(bad_inputs_dir / name, src / name)
    out = tmp_path / "out"
    summary = convert([str(src)], ConvertOptions(out=str(out), delete_source=True), workers=2,
                      progress=False)  # fmt: skip
    assert summary.deleted == 2
    left = sorted(p.name for p in src.iterdir())
    assert left == sorted(kept + ["empty.pdb", "ca_only_trace.pdb", "truncated_gzip.pdb.gz"])
    for name in ok:
        assert (out / "fasta" / f"{structure_id(name)}.fasta").exists()


def test_existing_outputs_are_never_overwritten(tmp_path, structures_dir):
    """Two inputs with one id (1aki as PDB and mmCIF): the second is recorded, not written."""
    out = tmp_path / "out"
    convert([str(structures_dir / "biotite__1aki.pdb")], ConvertOptions(out=str(out)), workers=1,
            progress=False)  # fmt: skip
    png = out / "bin_129_192" / "biotite__1aki.png"
    before = png.read_bytes()
    os.utime(png, (1, 1))
    convert([str(structures_dir / "biotite__1aki.cif.gz")], ConvertOptions(out=str(out)),
            workers=1, progress=False)  # fmt: skip
    assert png.read_bytes() == before and png.stat().st_mtime == 1
    rows = rows_by_source(out)
    (row,) = rows[str(structures_dir / "biotite__1aki.cif.gz")]
    assert row["status"] == "skipped" and row["reason"].startswith("outputs already exist")


def test_duplicate_ids_within_one_run(tmp_path, structures_dir):
    src = tmp_path / "a"
    (tmp_path / "b").mkdir()
    src.mkdir()
    shutil.copy(structures_dir / "foldseek__d1asha_.pdb", src / "x.pdb")
    shutil.copy(structures_dir / "foldseek__d1b0ba_.pdb", tmp_path / "b" / "x.pdb")
    out = tmp_path / "out"
    summary = convert([str(src), str(tmp_path / "b")], ConvertOptions(out=str(out)), workers=2,
                      progress=False)  # fmt: skip
    assert summary.converted == 1
    statuses = sorted(r[0]["status"] for r in rows_by_source(out).values())
    assert statuses == ["ok", "skipped"]


def test_shards_partition_the_inputs(tmp_path, structures_dir):
    names = sorted(p.name for p in structures_dir.glob("foldseek__*"))[:40]
    src = tmp_path / "src"
    src.mkdir()
    for name in names:
        shutil.copy(structures_dir / name, src / name)
    out = tmp_path / "out"
    for i in range(3):
        assert main(["convert", str(src), "--out", str(out), "--shard", f"{i}/3", "--workers", "1",
                     "--no-progress"]) == 0  # fmt: skip
    per_shard = [
        {r["source"] for r in read_manifest(str(out / f"manifest.shard-{i}-of-3.tsv"))}
        for i in range(3)
    ]
    assert sum(map(len, per_shard)) == len(names) == len(set.union(*per_shard))
    assert all(per_shard)  # each shard got some
    # membership is a pure function of the id, whatever the root
    assert [in_shard(structure_id(n), (0, 3)) for n in names] == [
        str(src / n) in per_shard[0] for n in names
    ]


def test_split_chains_and_first_model(tmp_path, structures_dir):
    out = tmp_path / "out"
    opts = ConvertOptions(out=str(out), chains="split", models="first", min_len=10)
    inputs = [str(structures_dir / n) for n in ("foldseek__1tim.pdb.gz", "biotite__1l2y.pdb.gz")]
    convert(inputs, opts, workers=1, progress=False)
    rows = rows_by_source(out)
    tim = rows[inputs[0]]
    assert [(r["id"], r["status"], r["length"]) for r in tim] == [
        ("foldseek__1tim_A", "ok", "247"), ("foldseek__1tim_B", "ok", "247")
    ]  # fmt: skip
    (trp,) = rows[inputs[1]]
    assert (trp["status"], trp["length"], trp["bin"]) == ("ok", "20", "bin_1_39")


def test_length_limits(tmp_path, structures_dir):
    out = tmp_path / "out"
    convert([str(structures_dir / "foldseek__d1asha_.pdb")],
            ConvertOptions(out=str(out), max_len=100), workers=1, progress=False)  # fmt: skip
    (row,) = next(iter(rows_by_source(out).values()))
    assert row["status"] == "skipped" and row["reason"] == "too long: 147 residues > 100"


def test_cli_reports_a_summary(tmp_path, structures_dir, capsys):
    code = main(["convert", str(structures_dir / "foldseek__d1asha_.pdb"), "--out",
                 str(tmp_path / "o"), "--bit-depth", "16", "--no-progress"])  # fmt: skip
    assert code == 0
    text = capsys.readouterr().out
    assert "converted 1, skipped 0, failed 0" in text
    pixels = __import__("imagecodecs").png_decode(
        (tmp_path / "o" / "bin_129_192" / "foldseek__d1asha_.png").read_bytes()
    )
    assert pixels.dtype == np.uint16
    assert main(["convert", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2


# --------------------------------------------------------------------------- complexes

COMPLEXES = {
    "graphein__4hhb.cif.gz": "A:141,B:146,C:141,D:146",  # hemoglobin tetramer
    "biotite__5zng.pdb.gz": "A:79,C:62",  # heterodimer
    "graphein__input_pdb_cryst1.pdb.gz": "L:112,H:123,A:223",  # Fab (L, H) and its antigen
    "foldseek__d1asha_.pdb": "A:147",  # a single chain
}


@pytest.fixture(scope="module")
def complex_run(tmp_path_factory, structures_dir):
    """The test complexes, a single chain and complexes to refuse, with --chains complex,
    16-bit PNGs and shards."""
    refused = ["biotite__1igy.cif.gz", "se3diff__pentamer.pdb.gz", "tmtools__7ok9.pdb.gz",
               "cathtools__B4DXN4.multiple_superposed_models.pdb"]  # fmt: skip
    names = [*COMPLEXES, *refused]
    inputs = [str(structures_dir / n) for n in names]
    root = tmp_path_factory.mktemp("complexes")
    for fmt in ("png", "shards"):
        opts = ConvertOptions(out=str(root / fmt), chains="complex", models="first", bit_depth=16,
                              format=fmt, max_len=1100)  # fmt: skip
        convert(inputs, opts, workers=1, progress=False)
    return root, {Path(s).name: r for s, (r,) in rows_by_source(root / "png").items()}


def test_complex_rows_record_the_chain_layout_and_the_reasons(complex_run):
    root, rows = complex_run
    header = (root / "png" / "manifest.tsv").read_text().splitlines()[0].split("\t")
    assert header[-2:] == ["chains", "clipped"]
    for name, layout in COMPLEXES.items():
        row = rows[name]
        assert (row["status"], row["chains"], row["id"]) == ("ok", layout, name.split(".")[0])
        assert int(row["length"]) == sum(int(x.split(":")[1]) for x in layout.split(","))
    # 1igy (an IgG: 2 x (213 + 434) residues) is above --max-len as a whole: not split
    igg = rows["biotite__1igy.cif.gz"]
    assert igg["status"] == "skipped" and igg["chains"] == "A:213,B:434,C:213,D:434"
    assert igg["reason"].startswith("too long: complex of 4 chains, 1294 residues > 1100")
    assert "not split" in igg["reason"]
    pentamer = rows["se3diff__pentamer.pdb.gz"]
    assert pentamer["status"] == "failed" and "holds residue 221 twice" in pentamer["reason"]
    superposed = rows["cathtools__B4DXN4.multiple_superposed_models.pdb"]
    assert superposed["status"] == "failed" and superposed["reason"].startswith("chains clash")
    fragments = rows["tmtools__7ok9.pdb.gz"]  # 6097 residues, and eight 3-4 residue fragments
    assert fragments["status"] == "skipped" and fragments["reason"].startswith("too long")
    assert fragments["chains"].endswith("P:5,Q:5") and "R:" not in fragments["chains"]


def test_complex_image_is_the_image_of_the_concatenated_backbone(complex_run, structures_dir):
    """The PNG of a complex equals the 6D image (geometry.sixd) of its chains' N, CA, C read
    one by one (--chains split) and concatenated; an inter-chain pixel is the Cb distance
    gemmi's own atoms give."""
    import gemmi
    import imagecodecs

    from protoken.codec import features_to_pixels
    from protoken.geometry import sixd, virtual_cb

    root, rows = complex_run
    for name in COMPLEXES:
        split = read_backbones(structures_dir / name, chains="split", models="first")
        coords = np.concatenate([b.coords for b in split])
        want = features_to_pixels(sixd(coords[:, 0], coords[:, 1], coords[:, 2], dmax=80.0),
                                  80.0, 16)  # fmt: skip
        row = rows[name]
        png = (root / "png" / row["bin"] / f"{row['id']}.png").read_bytes()
        got = imagecodecs.png_decode(png)
        np.testing.assert_array_equal(got, want)
    # hemoglobin: Cb of alpha1 Val 1 and beta1 His 2, from gemmi directly
    st = gemmi.read_structure(str(structures_dir / "graphein__4hhb.cif.gz"))
    res_a, res_b = st[0]["A"][0], st[0]["B"][1]

    def cb(res):
        n, ca, c = (np.array(res.find_atom(a, "*").pos.tolist()) for a in ("N", "CA", "C"))
        return virtual_cb(n[None], ca[None], c[None])[0]

    d = float(np.linalg.norm(cb(res_a) - cb(res_b)))
    row = rows["graphein__4hhb.cif.gz"]
    img = read_image(root / "png" / row["bin"] / "graphein__4hhb.png", dtype=np.float64)
    assert 0 < d < 80 and abs((img[0, 141 + 1, 0] + 1) / 2 * 80 - d) < 80 / 65535


def test_complex_layout_is_in_the_fasta_header_and_the_shard_json(complex_run):
    import json
    import tarfile

    root, rows = complex_run
    for name, layout in COMPLEXES.items():
        row = rows[name]
        fasta = (root / "png" / "fasta" / f"{row['id']}.fasta").read_text()
        assert fasta == f">{row['id']} length={row['length']} chains={layout}\n{row['sequence']}\n"
        assert len(row["sequence"]) == int(row["length"])  # no letter for a chain break
    metas = {}
    for tar in (root / "shards" / "shards").rglob("*.tar"):
        with tarfile.open(tar) as tf:
            for member in tf.getnames():
                if member.endswith(".json"):
                    meta = json.load(tf.extractfile(member))
                    metas[meta["id"]] = meta
    assert {metas[rows[n]["id"]]["chains"] for n in COMPLEXES} == set(COMPLEXES.values())


def test_single_chain_files_give_the_same_image_under_complex(tmp_path, structures_dir):
    name = "foldseek__d1asha_.pdb"
    for chains in ("first", "complex"):
        convert([str(structures_dir / name)], ConvertOptions(out=str(tmp_path / chains),
                chains=chains), workers=1, progress=False)  # fmt: skip
    png = f"{bin_name(147)}/foldseek__d1asha_.png"
    assert (tmp_path / "first" / png).read_bytes() == (tmp_path / "complex" / png).read_bytes()


def test_resume_reads_the_layout_and_old_manifests_keep_their_columns(tmp_path, structures_dir):
    """A complex whose FASTA exists is skipped with its layout from the header; a manifest
    written before the chains column is appended in its own columns and still read."""
    src = structures_dir / "biotite__5zng.pdb.gz"
    out = tmp_path / "out"
    opts = ConvertOptions(out=str(out), chains="complex", min_len=10)
    convert([str(src)], opts, workers=1, progress=False)
    manifest = out / "manifest.tsv"
    lines = manifest.read_text().splitlines()
    # the same output folder, its manifest as an older protoken wrote it (no chains column and
    # no clipped column)
    old = ["\t".join(ln.split("\t")[:-2]) for ln in lines]
    manifest.write_text("\n".join(old[:1]) + "\n")  # the row gone: the FASTA says it is done
    copy = tmp_path / "copy"
    copy.mkdir()
    shutil.copy(src, copy / src.name)
    convert([str(copy / src.name)], opts, workers=1, progress=False)
    text = manifest.read_text().splitlines()
    assert text[0] == old[0] and all(ln.count("\t") == old[0].count("\t") for ln in text)
    (row,) = read_manifest(str(manifest))
    assert row["status"] == "skipped" and row["reason"].startswith("outputs already exist")
    assert row["length"] == "141" and "chains" not in row and "clipped" not in row
    # a new manifest has the column, filled from the FASTA header
    out2 = tmp_path / "out2"
    convert([str(src)], ConvertOptions(out=str(out2), chains="complex", min_len=10,
            fasta_dir=str(out / "fasta")), workers=1, progress=False)  # fmt: skip
    (row,) = read_manifest(str(out2 / "manifest.tsv"))
    assert row["chains"] == "A:79,C:62" and row["reason"].startswith("outputs already exist")


def test_the_layout_survives_convert_shards_encode_decode(complex_run, tmp_path):
    """Issue 22: a complex converted to PNGs or shards, encoded from there (no structure file
    in sight) and decoded, comes back as one structure with its chains; the layout is the
    manifest's."""
    import gemmi

    from protoken.archives import find_inputs
    from protoken.structure import parse_chains
    from protoken.tokenizer import Tokenizer, decode_to_files

    root, rows = complex_run
    tok = Tokenizer.load("residue", device="cpu")
    for fmt in ("shards", "png"):
        sources = list(find_inputs([str(root / fmt)]))
        tokens = {t.id: t for t in tok.encode_many(sources)}
        for name, layout in COMPLEXES.items():
            t = tokens[rows[name]["id"]]
            want = parse_chains(layout) if "," in layout else ()
            assert tuple(t.chains) == want, (fmt, name)
            if not want:
                continue
            out = tmp_path / fmt / name
            out.mkdir(parents=True)
            decode_to_files(tok, [t], str(out), "pdb")
            st = gemmi.read_pdb_string((out / f"{t.id}.pdb").read_text())
            assert [(ch.name, len(ch)) for ch in st[0]] == list(want), (fmt, name)
