"""The manifest: written one flushed line per row, a torn last line repaired, read back in
full (dicts) and fast (the ok rows' id, bin and length), failed rows moved aside for a retry."""

from __future__ import annotations

from protoken.convert.manifest import (
    MANIFEST_COLUMNS,
    HashedSet,
    ManifestWriter,
    Row,
    done_sources,
    drop_failed_rows,
    manifest_files,
    manifest_path,
    ok_rows,
    read_manifest,
)

ROWS = [
    Row("/in/a b\tc.pdb", "a", "ok", "", 120, 0, "bin_65_128", "M" * 120),
    Row("/in/x.pdb", "x", "failed", "empty file"),
    Row("/in/t.tar::m.cif", "m", "skipped", "too short: 12 residues < 40", 12, 0, "", "G" * 12),
    Row("/in/b.pdb", "b", "ok", "", 45, 2, "bin_40_64", "A" * 45),
]


def write(path, rows):
    writer = ManifestWriter(str(path))
    for row in rows:
        writer.write(row)
    writer.close()


def test_rows_round_trip_and_a_torn_last_line_is_repaired(tmp_path):
    path = manifest_path(str(tmp_path), None)
    write(path, ROWS[:2])
    with open(path, "a") as fh:
        fh.write("/in/killed.pdb\tkilled\tok\t")  # a run killed mid-line
    assert [r["id"] for r in read_manifest(path)] == ["a", "x"]  # the torn line is not a row
    write(path, ROWS[2:])  # the next run cuts it off and appends
    rows = list(read_manifest(path))
    assert [r["id"] for r in rows] == ["a", "x", "m", "b"]
    assert list(rows[0]) == list(MANIFEST_COLUMNS)
    assert rows[0]["source"] == "/in/a b c.pdb"  # a tab in a name cannot split a row
    assert rows[0]["sequence"] == "M" * 120 and rows[1]["reason"] == "empty file"
    assert list(ok_rows(path)) == [("a", "bin_65_128", 120), ("b", "bin_40_64", 45)]


def test_done_sources_are_every_source_of_every_manifest(tmp_path):
    write(manifest_path(str(tmp_path), None), ROWS[:2])
    write(manifest_path(str(tmp_path), (1, 4)), ROWS[2:])
    (tmp_path / "manifest.retried.tsv").write_text("\t".join(MANIFEST_COLUMNS) + "\n")
    assert [p.rsplit("/", 1)[1] for p in manifest_files(str(tmp_path))] == [
        "manifest.shard-1-of-4.tsv", "manifest.tsv"]  # fmt: skip
    done = done_sources(str(tmp_path))
    assert len(done) == 4 and "/in/t.tar::m.cif" in done and "/in/b.pdb" in done
    assert "/in/a b\tc.pdb" in done and "/in/a b c.pdb" in done  # as the manifest writes it
    assert "/in/other.pdb" not in done and "/in/t.tar::m" not in done
    assert "x" not in HashedSet() and "x" in HashedSet(["x"])


def test_retrying_moves_the_failed_rows_aside(tmp_path):
    path = manifest_path(str(tmp_path), None)
    write(path, ROWS)
    assert drop_failed_rows([path]) == 1
    assert [r["id"] for r in read_manifest(path)] == ["a", "m", "b"]
    retried = tmp_path / "manifest.retried.tsv"
    assert [r["id"] for r in read_manifest(str(retried))] == ["x"]
    assert drop_failed_rows([path]) == 0  # nothing left to move
