"""Reading real structure files: every file of ../shared against its MANIFEST tags."""

from __future__ import annotations

import gzip
import shutil

import gemmi
import numpy as np
import pytest

from protoken.structure import (
    AMINO_ACIDS,
    NONSTANDARD,
    SkipStructure,
    StructureError,
    read_backbones,
    structure_to_text,
)

# Amino-acid residues of these files that are outside the seed's 145-entry map and gemmi's
# component table (biotite's CCD-based count in MANIFEST.tsv includes them; here they are
# dropped and counted in `dropped`, see test_unknown_modified_residues_are_counted), or fixtures
# whose altloc layout biotite reads residue by residue. (M3L of se3diff__1PRW.pdb is in gemmi's
# table, so its 148 residues are read.)
LENGTH_EXCEPTIONS = {
    "biopython__2n0n_M1.pdb": 10,  # PH8
    "cathtools__non_std_amino_acid_hetatm_1.pdb": 2,  # HOX
    "gemmi__1pfe.cif.gz": 6,  # N2C, NCY
    "cathtools__residue_name_reused_later_on_1.pdb": 6,  # altloc B is a shifted register
    "pdbtools__dummy_altloc2.pdb": 4,  # microheterogeneity fixture
}


def expected_outcome(row: dict[str, str]) -> tuple[str, tuple[str, ...]]:
    """(status, accepted reason prefixes) of read_backbones' default policy, from the tags."""
    tags = set(row["notes"].split(","))
    if "no_atoms" in tags:
        return "skipped", ("no atoms", "no protein chain")
    many_models = int(row["n_models"]) > 1 or tags & {"multi_block", "end_separated_models"}
    if many_models and "multichain" in tags:
        return "skipped", ("multi-model", "multi-chain")
    if many_models:
        return "skipped", ("multi-model",)
    if "no_protein" in tags:
        return "skipped", ("no protein",)
    if "multichain" in tags:
        return "skipped", ("multi-chain", "multi-model")
    return "ok", ()


def outcome(path) -> tuple[str, str, list]:
    try:
        return "ok", "", read_backbones(path)
    except SkipStructure as exc:
        return "skipped", str(exc), []
    except StructureError as exc:
        return "failed", str(exc), []


def test_every_shared_structure_matches_its_manifest_tags(structures_dir, manifest):
    problems = []
    for name, row in manifest.items():
        status, reason, backbones = outcome(structures_dir / name)
        want, prefixes = expected_outcome(row)
        if status != want or (prefixes and not reason.startswith(prefixes)):
            problems.append(f"{name}: got {status} ({reason}), expected {want} {prefixes}")
            continue
        if status == "ok":
            expected_len = LENGTH_EXCEPTIONS.get(name, int(row["n_protein_residues_first_chain"]))
            if len(backbones) != 1 or len(backbones[0]) != expected_len:
                problems.append(f"{name}: {len(backbones[0])} residues, expected {expected_len}")
    assert not problems, "\n".join(problems)


def test_files_one_reader_rejects_are_still_read(structures_dir, manifest):
    """gemmi fails on these (charge column, MODEL without ENDMDL); gemmi without the charge
    columns, or the biotite fallback, reads them."""
    rescued = [
        n for n, r in manifest.items()
        if "parse_error:gemmi" in r["notes"] and "parse_error:biotite" not in r["notes"]
    ]  # fmt: skip
    assert len(rescued) >= 5
    for name in rescued:
        status, reason, _ = outcome(structures_dir / name)
        assert status != "failed", f"{name}: {reason}"


def test_garbage_in_the_charge_columns_is_read_by_gemmi_without_them(structures_dir, tmp_path):
    """BM5's bound entries hold a number and a segment through columns 67-80, so gemmi rejects
    the charge (79-80); the file is read by gemmi without those columns: the same float64
    coordinates as the clean file (biotite's fallback would give float32 ones)."""
    src = structures_dir / "biotite__1aki.pdb"
    lines = src.read_text().splitlines(keepends=True)
    dirty = [
        f"{line[:66]:<66}   1  B   1930\n" if line.startswith(("ATOM  ", "HETATM")) else line
        for line in lines
    ]
    path = tmp_path / "dirty.pdb"
    path.write_text("".join(dirty))
    with pytest.raises(RuntimeError, match="charge"):
        gemmi.read_pdb_string("".join(dirty))
    clean, read = read_backbones(src)[0], read_backbones(path)[0]
    assert read.sequence == clean.sequence
    np.testing.assert_array_equal(read.coords, clean.coords)


@pytest.mark.parametrize("entry", ["biotite__1aki", "biotite__1dix", "biotite__1o1z"])
def test_every_format_of_one_entry_gives_the_same_backbone(structures_dir, entry):
    files = sorted(p for p in structures_dir.iterdir() if p.name.split(".")[0] == entry)
    formats = {p.name[len(entry) :] for p in files}
    assert any(".bcif" in f for f in formats) and any(".cif" in f for f in formats), formats
    backbones = [read_backbones(p)[0] for p in files]
    for other in backbones[1:]:
        assert other.sequence == backbones[0].sequence
        np.testing.assert_allclose(other.coords, backbones[0].coords, atol=1e-3)


def test_sequence_maps_nonstandard_residues(structures_dir):
    # 1A8O holds selenomethionines (MSE), read as M
    st = gemmi.read_structure(str(structures_dir / "biopython__1A8O.pdb"))
    names = [r.name for r in st[0][0] if r.name in AMINO_ACIDS]
    assert "MSE" in names
    bb = read_backbones(structures_dir / "biopython__1A8O.pdb")[0]
    expected = "".join(AMINO_ACIDS[n] for n in names)
    assert bb.sequence == expected
    assert bb.sequence[names.index("MSE")] == "M"
    assert NONSTANDARD["MSE"] == "MET" and len(NONSTANDARD) == 145


def test_waters_ligands_and_missing_backbone_atoms_are_not_residues(structures_dir):
    # 1y1vS: 70 complete residues and 104 CA-only ones (dropped), no waters or ligands kept
    path = structures_dir / "cathtools__1y1vS.pdb"
    bb = read_backbones(path)[0]
    assert (len(bb), bb.dropped) == (70, 104)
    assert np.isfinite(bb.coords).all()
    # 1A7G: 82 amino acids in a chain that also holds waters and ligands
    st = gemmi.read_structure(str(structures_dir / "biopython__1A7G.cif"))
    assert sum(len(ch) for ch in st[0]) > 82
    assert len(read_backbones(structures_dir / "biopython__1A7G.cif")[0]) == 82
    # every residue kept has a sane N-CA and CA-C bond
    assert np.all(np.abs(np.linalg.norm(bb.ca - bb.n, axis=1) - 1.46) < 0.1)
    assert np.all(np.abs(np.linalg.norm(bb.c - bb.ca, axis=1) - 1.52) < 0.1)


def test_insertion_codes_are_separate_residues(structures_dir):
    st = gemmi.read_structure(str(structures_dir / "biopython__1GBT.cif.gz"))
    icodes = [r for r in st[0][0] if r.seqid.icode != " " and r.name in AMINO_ACIDS]
    assert icodes, "fixture should hold insertion codes"
    bb = read_backbones(structures_dir / "biopython__1GBT.cif.gz")[0]
    assert len(bb) == 223  # MANIFEST count, insertion-code residues included


def test_chain_policies(structures_dir):
    path = structures_dir / "foldseek__1tim.pdb.gz"
    with pytest.raises(SkipStructure, match="multi-chain: 2 protein chains"):
        read_backbones(path)
    split = read_backbones(path, chains="split")
    assert [b.id for b in split] == ["foldseek__1tim_A", "foldseek__1tim_B"]
    assert [len(b) for b in split] == [247, 247]
    first = read_backbones(path, chains="first")
    assert len(first) == 1 and first[0].id == "foldseek__1tim"
    np.testing.assert_array_equal(first[0].coords, split[0].coords)


def test_model_policies(structures_dir):
    path = structures_dir / "biotite__1l2y.pdb.gz"
    with pytest.raises(SkipStructure, match="multi-model: 38 models"):
        read_backbones(path)
    bb = read_backbones(path, models="first")[0]
    assert len(bb) == 20 and bb.sequence == "NLYIQWLKDGGPSSGRPPPS"
    # the mmCIF copy must be checked for models too (the seed forgets)
    with pytest.raises(SkipStructure, match="multi-model"):
        read_backbones(structures_dir / "biotite__1l2y.cif.gz")


def test_end_separated_models_and_multi_block_cif_count_as_models(structures_dir):
    with pytest.raises(SkipStructure, match="END-separated"):
        read_backbones(structures_dir / "cathtools__B4DXN4.multiple_END_separated_models.pdb")
    with pytest.raises(SkipStructure, match="data blocks"):
        read_backbones(structures_dir / "se3diff__symmetric_pentamer.cif.gz")
    first = read_backbones(structures_dir / "se3diff__symmetric_pentamer.cif.gz", models="first")
    assert len(first[0]) == 517


BAD = {
    "empty.pdb": ("failed", "empty file"),
    "truncated_mid_record.pdb": ("failed", "truncated"),
    "truncated_gzip.pdb.gz": ("failed", "corrupt or truncated gzip"),
    "not_really_gzipped.cif.gz": ("failed", "named .gz but not gzip"),
    # a gzip stream of a tar archive, cut short: refused after its first block
    "binary_garbage.cif": ("failed", "binary data, not a text structure file"),
    "html_error_page.pdb": ("failed", "an HTML"),
    "truncated_header_only.cif": ("skipped", "no atoms"),
    "only_hetatm.pdb": ("skipped", "no protein chain"),
    "ca_only_trace.pdb": ("skipped", "no protein residue has N, CA and C"),
    "nan_coordinates.pdb": ("failed", "non-finite coordinates"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_inputs_give_a_clear_reason(bad_inputs_dir, name):
    status, reason, _ = outcome(bad_inputs_dir / name)
    assert (status, reason[: len(BAD[name][1])]) == BAD[name]
    assert "\n" not in reason


def test_gzip_is_detected_by_content_not_name(structures_dir, tmp_path):
    plain = tmp_path / "d1asha_"  # extension-less: a PDB file, as the seed accepts
    plain.write_bytes(gzip.compress((structures_dir / "foldseek__d1asha_.pdb").read_bytes()))
    bb = read_backbones(plain)[0]
    ref = read_backbones(structures_dir / "foldseek__d1asha_.pdb")[0]
    np.testing.assert_array_equal(bb.coords, ref.coords)
    assert bb.id == "d1asha_"


@pytest.mark.parametrize("fmt", ["pdb", "cif"])
def test_written_structure_reads_back(structures_dir, tmp_path, fmt):
    bb = read_backbones(structures_dir / "biotite__1aki.pdb")[0]
    text = structure_to_text({"N": bb.n, "CA": bb.ca, "C": bb.c}, bb.sequence, fmt=fmt)
    out = tmp_path / f"x.{fmt}"
    out.write_text(text)
    back = read_backbones(out)[0]
    assert back.sequence == bb.sequence
    np.testing.assert_allclose(back.coords, bb.coords, atol=1e-3)  # 3 decimals in PDB


def test_writer_without_sequence_names_residues_unk(tmp_path):
    xyz = np.arange(12.0).reshape(4, 3)
    text = structure_to_text({"CB": xyz})
    st = gemmi.read_pdb_string(text)
    assert [r.name for r in st[0][0]] == ["UNK"] * 4
    assert [r.seqid.num for r in st[0][0]] == [1, 2, 3, 4]


def test_reader_does_not_modify_the_input(structures_dir, tmp_path):
    src = tmp_path / "copy.pdb.gz"
    shutil.copy(structures_dir / "biotite__1l2y.pdb.gz", src)
    before = src.read_bytes()
    with pytest.raises(SkipStructure):
        read_backbones(src)
    assert src.read_bytes() == before


# --------------------------------------------------------------------------- complexes

TETRAMER = "graphein__4hhb.cif.gz"  # hemoglobin: alpha, beta, alpha, beta
HETERODIMER = "biotite__5zng.pdb.gz"  # two different chains, A and C
FAB = "graphein__input_pdb_cryst1.pdb.gz"  # antibody L and H (Kabat insertion codes), antigen


def _gemmi_residues(path) -> list[tuple[str, str, np.ndarray]]:
    """(chain, residue id, N/CA/C) of every amino acid with N, CA and C of the first model,
    read with gemmi's object model (independent of read_backbones' flat-table code)."""
    st = gemmi.read_structure(str(path))
    st.setup_entities()
    out = []
    for chain in st[0]:
        for res in chain:
            if not gemmi.find_tabulated_residue(res.name).is_amino_acid():
                continue
            atoms = [res.find_atom(a, "*") for a in ("N", "CA", "C")]
            if all(atoms):
                rid = f"{res.seqid.num}{res.seqid.icode.strip()}"
                xyz = np.array([[a.pos.x, a.pos.y, a.pos.z] for a in atoms])
                out.append((chain.name, rid, xyz))
    return out


@pytest.mark.parametrize("name", [TETRAMER, HETERODIMER, FAB])
def test_complex_is_its_chains_in_file_order(structures_dir, name):
    path = structures_dir / name
    (cx,) = read_backbones(path, chains="complex", models="first")
    split = read_backbones(path, chains="split", models="first")
    assert cx.id == name.split(".")[0]
    assert cx.chains == tuple((b.chain_id, len(b)) for b in split)
    np.testing.assert_array_equal(cx.coords, np.concatenate([b.coords for b in split]))
    assert cx.sequence == "".join(b.sequence for b in split)
    index = np.concatenate([np.full(len(b), k) for k, b in enumerate(split)])
    np.testing.assert_array_equal(cx.chain_index, index)
    # chains, numbering and coordinates as gemmi's own object model reads them
    ref = _gemmi_residues(path)
    assert [(c, r) for c, r, _ in ref] == list(zip(cx.chain_ids, cx.res_ids, strict=True))
    np.testing.assert_allclose(np.stack([x for _, _, x in ref]), cx.coords, atol=1e-6)


def test_complex_layouts_of_the_test_complexes(structures_dir):
    def layout(name):
        return read_backbones(structures_dir / name, chains="complex", models="first")[0]

    assert layout(TETRAMER).chains == (("A", 141), ("B", 146), ("C", 141), ("D", 146))
    assert layout(HETERODIMER).chains == (("A", 79), ("C", 62))
    fab = layout(FAB)
    assert fab.chains == (("L", 112), ("H", 123), ("A", 223))
    # Kabat numbering: CDR insertions are residues of their own, numbered 52A, 100A ...
    heavy = fab.res_ids[112:235]
    assert {"52A", "100A", "100B"} <= set(heavy)
    assert heavy.index("52A") == heavy.index("52") + 1


def test_single_chain_files_give_under_complex_what_first_gives(structures_dir, single_chain):
    for name in single_chain[::6]:
        (a,) = read_backbones(structures_dir / name, chains="first", models="first")
        (b,) = read_backbones(structures_dir / name, chains="complex", models="first")
        assert (a.id, a.sequence, a.res_ids, a.chains) == (b.id, b.sequence, b.res_ids, b.chains)
        assert b.chains == ((a.chain_id, len(a)),)
        np.testing.assert_array_equal(a.coords, b.coords)


def test_short_chains_are_dropped_from_a_complex_and_recorded(structures_dir, tmp_path):
    # 7ok9: twelve large chains, two pentapeptides (kept) and eight 3-4 residue fragments
    (cx,) = read_backbones(structures_dir / "tmtools__7ok9.pdb.gz", chains="complex")
    assert [c for c, _ in cx.chains][-2:] == ["P", "Q"] and cx.chains[-1][1] == 5
    assert cx.dropped_chains == tuple(
        (c, n) for c, n in zip("RSTUVWXY", [4] * 5 + [3] * 3, strict=True)
    )
    assert cx.dropped >= sum(n for _, n in cx.dropped_chains)
    assert len(cx) == sum(n for _, n in cx.chains)
    # a complex of fragments only is skipped with the reason
    with pytest.raises(SkipStructure, match=r"no protein chain of 5 residues or more \(A:2,B:2"):
        read_backbones(structures_dir / "cathtools__tally_multi_chain.pdb", chains="complex")


def test_multi_chain_skip_names_the_chain_options(structures_dir):
    options = r"multi-chain: 2 protein chains .*--chains split .*first or complex"
    with pytest.raises(SkipStructure, match=options):
        read_backbones(structures_dir / "foldseek__1tim.pdb.gz")


def _pdb_records(path) -> list[str]:
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt") as fh:
        return [line for line in fh if line.startswith(("ATOM  ", "HETATM"))]


def test_overlapping_chains_are_refused(structures_dir, tmp_path):
    # the same chain twice under two ids: the same coordinates twice
    lines = [ln for ln in _pdb_records(structures_dir / HETERODIMER) if ln[21] == "A"]
    twice = tmp_path / "twice.pdb"
    twice.write_text("".join(lines) + "TER\n" + "".join(ln[:21] + "B" + ln[22:] for ln in lines))
    with pytest.raises(StructureError, match="chains clash: 79 residue pairs"):
        read_backbones(twice, chains="complex")
    assert len(read_backbones(twice, chains="split")) == 2  # the other policies read it
    # a real file: superposed models of two homologues given as chains A and B
    with pytest.raises(StructureError, match="chains clash"):
        read_backbones(structures_dir / "cathtools__B4DXN4.multiple_superposed_models.pdb",
                       chains="complex")  # fmt: skip


def test_one_chain_id_for_two_chains_is_refused(structures_dir, tmp_path):
    # two models concatenated without MODEL records: chain ids A and C both repeat
    lines = _pdb_records(structures_dir / HETERODIMER)
    doubled = tmp_path / "doubled.pdb"
    doubled.write_text("".join(lines) + "".join(lines))
    with pytest.raises(StructureError, match=r"chain 'A' holds residue \S+ twice"):
        read_backbones(doubled, chains="complex")
    # a real file: five copies of chain A, numbering restarted
    with pytest.raises(StructureError, match="two chains under one id"):
        read_backbones(structures_dir / "se3diff__pentamer.pdb.gz", chains="complex")


@pytest.mark.parametrize("fmt", ["pdb", "cif"])
def test_written_complex_reads_back_with_its_chains_and_numbering(structures_dir, tmp_path, fmt):
    from protoken.geometry import virtual_cb
    from protoken.structure import write_structure

    (cx,) = read_backbones(structures_dir / FAB, chains="complex", models="first")
    atoms = {"N": cx.n, "CA": cx.ca, "C": cx.c, "CB": virtual_cb(cx.n, cx.ca, cx.c)}
    out = tmp_path / f"fab.{fmt}"
    write_structure(out, atoms, sequence=cx.sequence, chains=cx.chains, res_ids=cx.res_ids)
    (back,) = read_backbones(out, chains="complex")
    assert back.chains == cx.chains and back.res_ids == cx.res_ids
    assert back.sequence == cx.sequence
    np.testing.assert_allclose(back.coords, cx.coords, atol=1e-3)
    st = gemmi.read_structure(str(out))
    assert [ch.name for ch in st[0]] == ["L", "H", "A"]
    assert [len(ch) for ch in st[0]] == [112, 123, 223]
    if fmt == "pdb":  # a TER record closes each chain, after its last residue
        ter = [ln[17:26] for ln in out.read_text().splitlines() if ln.startswith("TER")]
        assert ter == [f"{cx.res_names[i - 1]} {c}{cx.res_ids[i - 1]:>4}"
                       for c, i in (("L", 112), ("H", 235), ("A", 458))]  # fmt: skip


def test_writer_refuses_layouts_it_cannot_write():
    xyz = np.zeros((4, 3))
    with pytest.raises(ValueError, match="does not cover 4"):
        structure_to_text({"CA": xyz}, chains=[("A", 3)])
    with pytest.raises(ValueError, match="a chain id repeats"):
        structure_to_text({"CA": xyz}, chains=[("A", 2), ("A", 2)])
    with pytest.raises(ValueError, match="at most 2 characters"):
        structure_to_text({"CA": xyz}, chains=[("ABC", 4)])
    assert "ABC" in structure_to_text({"CA": xyz}, fmt="cif", chains=[("ABC", 4)])
    with pytest.raises(ValueError, match="bad residue id"):
        structure_to_text({"CA": xyz}, res_ids=["1", "2", "3", "x"])


def test_chain_layout_text_round_trip_and_refusals():
    from protoken.structure import format_chains, parse_chains

    layout = (("A", 120), ("B", 98), ("", 3))
    assert format_chains(layout) == "A:120,B:98,:3"
    assert parse_chains("A:120,B:98,:3", length=221) == layout
    for bad in ("A120", "A:0", "A:x", "A:1,A:2", "A,B:3:4", "A B:3", "ABCDE:3"):
        with pytest.raises(ValueError, match="chain layout"):
            parse_chains(bad)
    with pytest.raises(ValueError, match="sums to 218 residues, not the length 219"):
        parse_chains("A:120,B:98", length=219)
