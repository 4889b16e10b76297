"""Archive inputs of protoken convert: tar archives and Foldcomp databases, read in place."""

from __future__ import annotations

import csv
import gzip
import io
import itertools
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest

from protoken.archives import (
    SEP,
    find_sources,
    is_foldcomp_db,
    iter_foldcomp,
    iter_tar,
    read_member,
)
from protoken.convert import ConvertOptions, convert
from protoken.structure import read_backbones

foldcomp = pytest.importorskip("foldcomp")

# foldcomp.compress itself crashes (SIGSEGV) on d3mkbb_, so the database is built from the
# others; a crash while *decoding* an entry is contained by convert's worker processes.
_FOLDCOMP_CRASHES = ("d3mkbb_",)


def _rows(out: Path) -> list[dict]:
    rows = []
    for name in sorted(os.listdir(out)):
        if name.startswith("manifest") and name.endswith(".tsv"):
            with open(out / name, newline="") as fh:
                rows += list(csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE))
    return rows


@pytest.fixture(scope="module")
def mixed_files(structures_dir) -> list[Path]:
    """Real files of every kind a proteome tar holds: PDB, gzipped mmCIF, multi-chain."""
    names = [
        "foldseek__d1asha_.pdb", "foldseek__d1it2a_.pdb", "cathtools__1bmv2.pdb.gz",
        "biopython__1A8O.cif", "gemmi__1pfe.cif.gz", "foldseek__1tim.pdb.gz",
    ]  # fmt: skip
    files = [structures_dir / n for n in names if (structures_dir / n).exists()]
    assert len(files) >= 5, "expected files of ../shared/data/structures are missing"
    return files


@pytest.fixture(scope="module")
def foldcomp_db(tmp_path_factory, structures_dir) -> tuple[Path, list[Path]]:
    from helpers import make_foldcomp_db

    files = [
        f
        for f in sorted(structures_dir.glob("foldseek__d*.pdb"))
        if not any(bad in f.name for bad in _FOLDCOMP_CRASHES)
    ]
    db = tmp_path_factory.mktemp("fcdb") / "scope_db"
    make_foldcomp_db(files, db)
    return db, files


def _tar(path: Path, files, mode="w:gz", prefix="proteome/") -> Path:
    with tarfile.open(path, mode) as tf:
        for f in files:
            tf.add(f, arcname=prefix + f.name)
    return path


def test_tar_members_convert_as_the_loose_files(tmp_path, mixed_files):
    archive = _tar(tmp_path / "p.tar.gz", mixed_files)
    opts = {"chains": "split", "models": "first"}
    convert([str(archive)], ConvertOptions(out=str(tmp_path / "a"), **opts), 2, progress=False)
    convert([str(f) for f in mixed_files], ConvertOptions(out=str(tmp_path / "b"), **opts), 2,
            progress=False)  # fmt: skip
    a, b = _rows(tmp_path / "a"), _rows(tmp_path / "b")
    assert {r["source"] for r in a} == {f"{archive}{SEP}proteome/{f.name}" for f in mixed_files}
    ok_a = {r["id"]: r for r in a if r["status"] == "ok"}
    ok_b = {r["id"]: r for r in b if r["status"] == "ok"}
    assert len(ok_a) >= 6 and ok_a.keys() == ok_b.keys()
    for image_id, row in ok_a.items():
        png_a = (tmp_path / "a" / row["bin"] / f"{image_id}.png").read_bytes()
        assert png_a == (tmp_path / "b" / row["bin"] / f"{image_id}.png").read_bytes()
        assert row["sequence"] == ok_b[image_id]["sequence"]


def test_plain_tar_nested_names_and_links_are_never_paths(tmp_path, mixed_files):
    archive = tmp_path / "p.tar"
    with tarfile.open(archive, "w") as tf:
        tf.add(mixed_files[0], arcname="../../escape.pdb")
        tf.add(mixed_files[1], arcname="a/b/c/deep.pdb")
        link = tarfile.TarInfo("link.pdb")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(link)
        tf.addfile(tarfile.TarInfo("notes.txt"), io.BytesIO(b""))
    names = [m.name for m in iter_tar(str(archive))]
    assert names == ["../../escape.pdb", "a/b/c/deep.pdb"]  # no link, no text file
    out = tmp_path / "out"
    convert([str(archive)], ConvertOptions(out=str(out)), 1, progress=False)
    assert sorted(p.name for p in out.glob("bin_*/*.png")) == ["deep.png", "escape.png"]
    assert not (tmp_path / "escape.png").exists()


def test_truncated_archive_and_large_member_are_recorded_not_fatal(tmp_path, mixed_files):
    good = _tar(tmp_path / "good.tar.gz", mixed_files[:3])
    data = good.read_bytes()
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(data[: len(data) * 2 // 3])
    out = tmp_path / "out"
    convert([str(cut), str(good)], ConvertOptions(out=str(out), max_bytes=10**7), 1,
            progress=False)  # fmt: skip
    rows = _rows(out)
    failed = [r for r in rows if r["source"].startswith(f"{cut}{SEP}") and r["status"] == "failed"]
    assert failed and "truncated or corrupt tar archive" in failed[-1]["reason"]
    # the batch went on: every member of the intact archive has its row (those sharing an id
    # with a member converted from the truncated one are skipped, not overwritten)
    assert {r["source"] for r in rows if r["source"].startswith(f"{good}{SEP}")} == {
        f"{good}{SEP}proteome/{f.name}" for f in mixed_files[:3]
    }
    small = tmp_path / "small"
    convert([str(good)], ConvertOptions(out=str(small), max_bytes=2000), 1, progress=False)
    reasons = {r["reason"].split(":")[0] for r in _rows(small)}
    assert reasons == {"larger than --max-bytes (2000 bytes)"}


def test_foldcomp_entries_match_their_decompressed_pdb_text(foldcomp_db):
    db, files = foldcomp_db
    assert is_foldcomp_db(str(db))
    members = list(iter_foldcomp(str(db)))
    assert [m.name for m in members] == [f.name.split(".")[0] for f in files]
    starts: set[int] = set()
    for m, f in zip(members, files, strict=True):
        data = m.read()
        (fast,) = read_member(m.name, "foldcomp", data)
        _, text = foldcomp.decompress(data)
        text = text.encode() if isinstance(text, str) else text
        (slow,) = read_backbones(m.name + ".pdb", chains="first", models="first", data=text)
        (orig,) = read_backbones(f)
        assert fast.id == m.name and fast.sequence == slow.sequence == orig.sequence
        assert np.abs(fast.coords - slow.coords).max() < 1e-3  # the PDB text's 3 decimals
        # residue numbers from the entry's header, as foldcomp.decompress writes them; the
        # original numbering when it is consecutive (Foldcomp keeps only the first number)
        assert fast.res_ids == slow.res_ids
        start = int(orig.res_ids[0])
        if orig.res_ids == [str(k) for k in range(start, start + len(orig))]:
            assert fast.res_ids == orig.res_ids
            starts.add(start)
        # Foldcomp is lossy (torsion angles): CA positions within a few Angstrom
        assert np.sqrt(((fast.ca - orig.ca) ** 2).sum(-1).mean()) < 1.0
    assert {0, 1, 2, 3} <= starts  # d1asha_ starts at 0, d1tu9a_ at 2, d1q1fa_ at 3


def test_foldcomp_database_converts_shards_and_resumes_per_member(tmp_path, foldcomp_db,
                                                                  mixed_files):  # fmt: skip
    db, files = foldcomp_db
    archive = _tar(tmp_path / "p.tar.gz", mixed_files)
    out = tmp_path / "out"
    opts = ConvertOptions(out=str(out), chains="split", models="first")
    s0 = convert([str(db)], opts, 2, shard=(0, 2), progress=False)
    s1 = convert([str(db)], opts, 2, shard=(1, 2), progress=False)
    assert s0.files and s1.files and s0.files + s1.files == len(files)
    rows = _rows(out)
    sources = [r["source"] for r in rows]
    assert len(sources) == len(set(sources)) == len(files)
    assert all(r["status"] == "ok" for r in rows)
    # a run over the database and a tar: the database's members are already done
    s = convert([str(db), str(archive)], opts, 2, progress=False)
    assert s.resumed == len(files) and s.files == len(mixed_files)
    rows = _rows(out)
    db_rows = [r["source"] for r in rows if r["source"].startswith(f"{db}{SEP}")]
    assert sorted(db_rows) == sorted(set(db_rows)) and len(db_rows) == len(files)
    assert {r["source"] for r in rows} - set(db_rows) == {
        f"{archive}{SEP}proteome/{f.name}" for f in mixed_files
    }


def test_folder_with_archives_and_loose_files(tmp_path, foldcomp_db, mixed_files):
    db, files = foldcomp_db
    folder = tmp_path / "in"
    folder.mkdir()
    for suffix in ("", ".index", ".lookup", ".dbtype"):
        os.symlink(f"{db}{suffix}", folder / f"afdb{suffix}")
    _tar(folder / "p.tar", mixed_files[:2], mode="w")
    os.symlink(mixed_files[2], folder / mixed_files[2].name)
    found = list(find_sources([str(folder)]))
    loose = [x for x in found if isinstance(x, str)]
    members = [x for x in found if not isinstance(x, str)]
    assert loose == [str(folder / mixed_files[2].name)]
    assert len(members) == len(files) + 2
    assert {m.kind for m in members} == {"foldcomp", "tar"}


def test_hostile_foldcomp_index_is_one_row(tmp_path, foldcomp_db):
    db, files = foldcomp_db
    bad = tmp_path / "bad"
    bad.write_bytes(Path(db).read_bytes()[:3000])  # truncated data file
    for suffix in (".index", ".lookup", ".dbtype"):
        (tmp_path / f"bad{suffix}").write_bytes(Path(f"{db}{suffix}").read_bytes())
    out = tmp_path / "out"
    convert([str(bad)], ConvertOptions(out=str(out)), 1, progress=False)
    rows = _rows(out)
    assert len(rows) == len(files)
    past = [r for r in rows if "points past the end of the data file" in r["reason"]]
    assert len(past) >= len(files) - 2


def test_gzip_member_inflation_is_bounded(tmp_path):
    bomb = gzip.compress(b"ATOM  " + b" " * 50_000_000)
    archive = tmp_path / "b.tar"
    with tarfile.open(archive, "w") as tf:
        info = tarfile.TarInfo("bomb.pdb.gz")
        info.size = len(bomb)
        tf.addfile(info, io.BytesIO(bomb))
    out = tmp_path / "out"
    convert([str(archive)], ConvertOptions(out=str(out), max_bytes=1_000_000), 1,
            progress=False)  # fmt: skip
    (row,) = _rows(out)
    assert row["status"] == "failed" and "more than --max-bytes" in row["reason"]


def test_tar_with_a_huge_extended_header_is_refused_before_it_is_read(tmp_path, mixed_files):
    """A .tar.gz whose pax header claims 100 MB (zeros, 100 kB compressed): refused from its
    header block, not inflated into memory; the archive gets one failed row."""
    header = tarfile.TarInfo("././@PaxHeader")
    header.type, header.size = tarfile.XHDTYPE, 100_000_000
    block = header.tobuf(format=tarfile.USTAR_FORMAT)
    archive = tmp_path / "evil.tar.gz"
    with gzip.open(archive, "wb") as fh:
        fh.write(block)
        for _ in range(100):
            fh.write(b"\0" * 1_000_000)
    out = tmp_path / "out"
    convert([str(archive)], ConvertOptions(out=str(out)), 1, progress=False)
    (row,) = _rows(out)
    assert row["status"] == "failed" and "truncated or corrupt tar archive" in row["reason"]
    assert "extended header of 100000000 bytes" in row["reason"]


def test_encode_reads_archive_members_in_place(tmp_path, mixed_files, foldcomp_db):
    from protoken.archives import Member, find_inputs
    from protoken.tokenizer import Tokenizer

    db, files = foldcomp_db
    archive = _tar(tmp_path / "p.tar.gz", mixed_files[:2])
    tok = Tokenizer.from_pretrained("default")
    found = list(find_inputs([str(archive), str(db)]))  # listed: names only, data not read
    assert all(isinstance(m, Member) for m in found) and len(found) == 2 + len(files)
    with pytest.raises(ValueError):  # a tar member is read as the stream passes it, not later
        found[0].read()
    stream = itertools.islice(find_inputs([str(archive), str(db)]), 4)  # streamed: read in turn
    got = list(tok.encode_many(stream, chains="first", models="first"))
    want = list(tok.encode_many([str(f) for f in mixed_files[:2]], chains="first",
                                models="first"))  # fmt: skip
    assert [t.id for t in got[:2]] == [t.id for t in want]
    for x, y in zip(got[:2], want, strict=True):
        assert all(np.array_equal(u, v) for u, v in zip(x.levels, y.levels, strict=True))
    assert [t.id for t in got[2:]] == [m.id for m in found[2:4]]  # Foldcomp entries


def test_foldcomp_database_without_the_package_is_one_run_level_error(tmp_path, foldcomp_db,
                                                                      monkeypatch):  # fmt: skip
    import importlib.util

    db, _ = foldcomp_db
    real = importlib.util.find_spec

    def find_spec(name, *args):
        return None if name == "foldcomp" else real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(ValueError, match=r"needs the foldcomp package .*protoken\[foldcomp\]"):
        convert([str(db)], ConvertOptions(out=str(tmp_path / "out")), 1, progress=False)
