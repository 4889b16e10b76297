"""Archive inputs of protoken convert: tar archives and Foldcomp databases, read in place."""

from __future__ import annotations

import csv
import gzip
import io
import itertools
import os
import tarfile
import zlib
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
from protoken.cli import main
from protoken.convert import ConvertOptions, convert
from protoken.structure import StructureError, read_backbones

foldcomp = pytest.importorskip("foldcomp")

CHECKPOINT = str(Path(__file__).parent / "data" / "old-checkpoint.pt")  # a small tokenizer

# foldcomp.compress itself crashes (SIGSEGV) on d3mkbb_, so the database is built from the
# others; a crash while *decoding* an entry is contained by convert's worker processes.
_FOLDCOMP_CRASHES = ("d3mkbb_",)
# d1x9fc_'s first peptide bond is broken in the file (C-N 3.5 A): Foldcomp, which stores ideal
# bond lengths, decodes its first residue 1.82 A from the second, and the entry is refused
# (test_foldcomp_chain_with_implausible_geometry_is_refused).
_FOLDCOMP_IMPLAUSIBLE = ("d1x9fc_",)


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
        if not any(bad in f.name for bad in _FOLDCOMP_CRASHES + _FOLDCOMP_IMPLAUSIBLE)
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


# --------------------------------------------------------------------------- hostile tars


def _header(name: str, size: int, pax: dict | None = None) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    if pax:
        info.pax_headers = {k: str(v) for k, v in pax.items()}
        return info.tobuf(format=tarfile.PAX_FORMAT)
    return info.tobuf(format=tarfile.USTAR_FORMAT)


def _member_bytes(name: str, data: bytes) -> bytes:
    return _header(name, len(data)) + data + bytes(-len(data) % 512)


def _zero_bomb(path: Path, size: int, compressor, before: bytes, after: bytes) -> Path:
    """before.pdb, zeros.pdb (``size`` zero bytes), after.pdb: one compressed stream, as tar
    writes it, built without holding the member in memory."""
    block = bytes(1 << 20)
    with open(path, "wb") as out:
        out.write(compressor.compress(_member_bytes("before.pdb", before)))
        out.write(compressor.compress(_header("zeros.pdb", size)))
        for start in range(0, size, len(block)):
            out.write(compressor.compress(block[: min(len(block), size - start)]))
        out.write(compressor.compress(_member_bytes("after.pdb", after) + bytes(1024)))
        out.write(compressor.flush())
    return path


def _traced_peak(fn) -> tuple[object, int]:
    """``fn()`` and the peak of memory allocated through Python while it ran (bytes)."""
    import tracemalloc

    tracemalloc.start()
    try:
        result = fn()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _compressors():
    import bz2
    import lzma
    import zlib

    return {
        "tar.bz2": lambda: bz2.BZ2Compressor(9),
        "tar.xz": lambda: lzma.LZMACompressor(preset=0),
        "tar.gz": lambda: zlib.compressobj(6, zlib.DEFLATED, 31),
    }


@pytest.mark.parametrize("suffix", ["tar.bz2", "tar.xz", "tar.gz"])
def test_compressed_tar_bomb_is_skipped_with_bounded_memory(tmp_path, mixed_files, suffix):
    """A .tar.bz2 of a few KB holding before.pdb, gigabytes of zeros, then after.pdb: tarfile
    inflated the zeros into one buffer and skipped them by copying what remained of it in
    10 KB steps (quadratic: MemoryError for bz2, still running at 300 s for xz; 25 s for a
    500 MB zero member of a .tar.gz). Now the zeros are skipped in 1 MiB reads: memory stays
    at a few MB whatever the member's size, and the members before and after it are read."""
    before, after = mixed_files[0].read_bytes(), mixed_files[1].read_bytes()
    size = 64 << 20
    bomb = _zero_bomb(tmp_path / f"bomb.{suffix}", size, _compressors()[suffix](), before, after)
    assert bomb.stat().st_size < 200_000  # 64 MB of zeros in a few KB

    def read_all():
        return [(m.name, m.error, m.read() if not m.error else None)
                for m in iter_tar(str(bomb), max_bytes=1 << 20)]  # fmt: skip

    members, peak = _traced_peak(read_all)
    assert [m[0] for m in members] == ["before.pdb", "zeros.pdb", "after.pdb"]
    assert members[0][2] == before and members[2][2] == after
    assert members[1][1] == f"larger than --max-bytes ({1 << 20} bytes): {size} bytes"
    assert peak < 8 << 20, peak  # the member is 64 MB: never held, not even in parts


def test_tar_bomb_converts_the_members_around_it(tmp_path, mixed_files):
    """The issue's case as a user runs it: convert gives the bomb one failed row naming
    --max-bytes, and converts before.pdb and after.pdb."""
    import bz2

    bomb = _zero_bomb(tmp_path / "bomb.tar.bz2", 32 << 20, bz2.BZ2Compressor(9),
                      mixed_files[0].read_bytes(), mixed_files[1].read_bytes())  # fmt: skip
    out = tmp_path / "out"
    code = main(["convert", str(bomb), "--out", str(out), "--max-bytes", "1M", "--workers", "1",
                 "--no-progress"])  # fmt: skip
    assert code == 0
    rows = {r["source"].split(SEP)[1]: r for r in _rows(out)}
    assert rows.keys() == {"before.pdb", "zeros.pdb", "after.pdb"}
    assert rows["before.pdb"]["status"] == rows["after.pdb"]["status"] == "ok"
    assert rows["zeros.pdb"]["status"] == "failed"
    assert rows["zeros.pdb"]["reason"].startswith("larger than --max-bytes (1048576 bytes)")


def _evil_tar(path: Path, before: bytes, huge: bytes) -> Path:
    """before.pdb, then the header ``huge`` of a member claiming far more than follows (200 KB
    of zeros, no end-of-archive block)."""
    path.write_bytes(_member_bytes("before.pdb", before) + huge + bytes(200_000))
    return path


def _ustar_8gb(name: str) -> bytes:
    """A ustar header claiming the most its 11 octal digits hold: 8 GB - 1."""
    block = bytearray(_header(name, 0))
    block[124:136] = b"77777777777\0"
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


def test_tar_member_claiming_petabytes_is_one_failed_row(tmp_path, mixed_files, capsys):
    """A 200 KB tar whose pax header says size=10^15: convert looped in tarfile's seek with no
    rows, encode died with MemoryError; a ustar header claiming 8 GB did the same to encode
    under a 4 GB memory cap. Now: one failed row (convert) / one skipped line (encode) naming
    the member, its size and the limit, and the member before it is read."""
    before = mixed_files[0].read_bytes()
    pax = _evil_tar(tmp_path / "pax.tar", before, _header("huge.pdb", 0, {"size": 10**15}))
    ustar = _evil_tar(tmp_path / "ustar.tar", before, _ustar_8gb("huge.pdb"))
    out = tmp_path / "out"
    convert([str(pax)], ConvertOptions(out=str(out)), 1, progress=False)
    rows = {r["source"]: r for r in _rows(out)}
    assert rows.keys() == {f"{pax}{SEP}before.pdb", f"{pax}{SEP}huge.pdb"}
    huge = rows[f"{pax}{SEP}huge.pdb"]
    assert huge["status"] == "failed"
    assert huge["reason"].startswith(f"larger than --max-bytes ({1 << 30} bytes): {10**15} bytes")
    assert "truncated or corrupt tar archive: it ends at byte" in huge["reason"]
    for archive, size in ((pax, 10**15), (ustar, 8 * 2**30 - 1)):
        tokens = tmp_path / f"{archive.stem}.npz"
        code = main(["encode", str(archive), "-c", CHECKPOINT, "-o", str(tokens),
                     "--no-progress"])  # fmt: skip
        out_text, err = capsys.readouterr()
        assert code == 0 and "encoded 1 protein (1 input skipped)" in out_text
        (line,) = [ln for ln in err.splitlines() if "skipped" in ln]
        assert line.startswith(f"protoken encode: skipped {archive}{SEP}huge.pdb: larger than "
                               f"the read limit ({1 << 30} bytes): {size} bytes")  # fmt: skip


def _four_member_tar(files) -> tuple[bytes, list[int]]:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for i, f in enumerate(files[:4]):
            tf.add(f, arcname=f"m{i}_{f.name}")
    data = buf.getvalue()
    offsets, pos = [], 0
    while data[pos : pos + 512].strip(b"\0"):
        offsets.append(pos)
        size = int(data[pos + 124 : pos + 136].strip(b" \0"), 8)
        pos += 512 + size + (-size % 512)
    return data, offsets


@pytest.mark.parametrize("damage", ["cut", "checksum", "zeroed"])
def test_tar_damaged_at_a_header_says_where_it_stopped(tmp_path, mixed_files, damage, capsys):
    """A 4-member tar cut at its 3rd header, or with a bad checksum there (or zeros): exit 0,
    "converted 2", no failed row (tarfile takes a bad header for the end). Now the archive gets
    a failed row saying at which byte reading stopped and after how many members; encode says
    the same."""
    pdbs = [f for f in mixed_files if f.name.endswith(".pdb")]
    data, offsets = _four_member_tar((pdbs * 4)[:4])
    third = offsets[2]
    if damage == "cut":
        data = data[:third]
        why = "the archive ends without an end-of-archive block"
    elif damage == "checksum":
        data = bytearray(data)
        data[third + 148 : third + 156] = b"000000\0 "
        why = "bad header (bad checksum)"
    else:  # a header wiped out: tarfile takes the zeros for the end of the archive
        data = data[:third] + bytes(512) + data[third + 512 :]
        why = "a block of zeros where a header should be"
    archive = tmp_path / "four.tar"
    archive.write_bytes(bytes(data))
    reason = f"truncated or corrupt tar archive: {why} at byte {third}, after 2 members"
    out = tmp_path / "out"
    convert([str(archive)], ConvertOptions(out=str(out), chains="first"), 1, progress=False)
    rows = _rows(out)
    assert sorted(r["status"] for r in rows) == ["failed", "ok", "ok"]
    (failed,) = [r for r in rows if r["status"] == "failed"]
    assert failed["source"] == f"{archive}{SEP}" and failed["reason"] == reason
    code = main(["encode", str(archive), "-c", CHECKPOINT, "-o", str(tmp_path / "t.npz"),
                 "--chains", "first", "--no-progress"])  # fmt: skip
    out_text, err = capsys.readouterr()
    assert code == 0 and "encoded 2 proteins (1 input skipped)" in out_text
    assert f"protoken encode: skipped {archive}{SEP}: {reason}" in err


def test_tar_reading_keeps_nothing_per_member(tmp_path):
    """tarfile kept every member's header (0.5 KB each: 443 MB for 400k members); the stream
    keeps none: memory is the same for 1,000 and 10,000 members."""
    peaks = []
    for n in (1_000, 10_000):
        archive = tmp_path / f"many{n}.tar"
        with open(archive, "wb") as fh:
            for i in range(n):
                fh.write(_header(f"notes/{i:07d}.txt", 0))
            fh.write(_member_bytes("last.pdb", b"ATOM\n") + bytes(1024))
        members, peak = _traced_peak(lambda a=archive: [m.name for m in iter_tar(str(a))])
        assert members == ["last.pdb"]
        peaks.append(peak)
    assert peaks[1] < peaks[0] + 100_000, peaks  # tarfile: + 9,000 x 0.5 KB = 4.5 MB


def test_tar_extended_headers_and_names(tmp_path, mixed_files):
    """The stream reads what tarfile writes in every format: pax and GNU long names, global
    pax headers, ustar prefixes; links and folders are no members."""
    data = mixed_files[0].read_bytes()
    long_dir = "d" * 120 + "/" + "e" * 80
    for fmt in (tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT):
        archive = tmp_path / f"f{fmt}.tar.gz"
        with tarfile.open(archive, "w:gz", format=fmt) as tf:
            for name in ("a.pdb", f"{long_dir}/b.pdb", "c" * 150 + ".pdb"):
                if fmt == tarfile.USTAR_FORMAT and name.startswith("c"):
                    continue  # more than ustar's 100 characters, and no folder to split off
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
            link = tarfile.TarInfo("l.pdb")
            link.type, link.linkname = tarfile.SYMTYPE, "a.pdb"
            tf.addfile(link)
            folder = tarfile.TarInfo("folder.pdb")
            folder.type = tarfile.DIRTYPE
            tf.addfile(folder)
        with tarfile.open(archive) as tf:
            want = [m.name for m in tf if m.isfile()]
        got = [(m.name, m.read()) for m in iter_tar(str(archive))]
        assert [g[0] for g in got] == want and all(g[1] == data for g in got)
        assert len(want) == (2 if fmt == tarfile.USTAR_FORMAT else 3)
    archive = tmp_path / "global.tar"
    with tarfile.open(archive, "w", format=tarfile.PAX_FORMAT,
                      pax_headers={"comment": "x"}) as tf:  # fmt: skip
        tf.add(mixed_files[0], arcname="g.pdb")
    assert [m.read() for m in iter_tar(str(archive))] == [data]


# --------------------------------------------------------------------------- hostile Foldcomp


@pytest.fixture(scope="module")
def promod3_entries(shared) -> list[bytes]:
    """The first 8 entries of the ProMod3 Foldcomp database of ../shared (each ends with NUL)."""
    db = shared / "data" / "promod3" / "promod3"
    out = []
    with open(f"{db}.index") as index, open(db, "rb") as data:
        for line in itertools.islice(index, 8):
            _, offset, length = (int(x) for x in line.split())
            data.seek(offset)
            out.append(data.read(length))
    return out


def _db(path: Path, entries: list[bytes], lines: list[str] | None = None) -> Path:
    """A Foldcomp database of ``entries`` written one after the other; ``lines`` replaces its
    index (default: ``KEY OFFSET LENGTH`` of each entry, :func:`_index_lines`)."""
    import struct

    path.write_bytes(b"".join(entries))
    lines = _index_lines(entries) if lines is None else lines
    Path(f"{path}.index").write_text("".join(lines))
    Path(f"{path}.dbtype").write_bytes(struct.pack("<i", 0))
    return path


def _index_lines(entries: list[bytes]) -> list[str]:
    offsets = np.cumsum([0] + [len(e) for e in entries])
    return [f"{k}\t{offsets[k]}\t{len(e)}\n" for k, e in enumerate(entries)]


def _convert_rows(db: Path, out: Path, **kw) -> dict[str, dict]:
    convert([str(db)], ConvertOptions(out=str(out), min_len=1, **kw), 2, progress=False)
    return {r["source"].split(SEP, 1)[1]: r for r in _rows(out)}


def test_foldcomp_entry_with_a_wrong_length_is_refused(tmp_path, promod3_entries):
    """An index entry whose length was halved was converted (142 residues from half the
    bytes, CA-CA up to 5.5 A): an entry must end with the NUL Foldcomp writes after it."""
    entries = promod3_entries[:4]
    lines = _index_lines(entries)
    key, offset, length = lines[2].split()
    lines[2] = f"{key}\t{offset}\t{int(length) // 2}\n"
    rows = _convert_rows(_db(tmp_path / "db", entries, lines), tmp_path / "out")
    assert [rows[k]["status"] for k in "0123"] == ["ok", "ok", "failed", "ok"]
    assert "index entry 2 does not end with the NUL Foldcomp writes" in rows["2"]["reason"]


@pytest.mark.parametrize("damaged", [0, 1])
def test_overlapping_foldcomp_index_entries_are_both_refused(tmp_path, promod3_entries, damaged):
    """An index line pointing at another entry's bytes: that entry's structure was recorded
    ok under the damaged line's name. Whichever of the two lines is damaged (the first or the
    second), neither is converted: the index cannot say which one is right."""
    entries = promod3_entries[:4]
    lines = _index_lines(entries)
    other = 1 - damaged
    lines[damaged] = f"{damaged}\t" + lines[other].split("\t", 1)[1]
    rows = _convert_rows(_db(tmp_path / "db", entries, lines), tmp_path / "out")
    assert [rows[k]["status"] for k in "0123"] == ["failed", "failed", "ok", "ok"]
    assert all("overlaps" in rows[k]["reason"] for k in "01")
    # an index out of offset order, without overlaps, is fine
    order = [2, 0, 3, 1]
    shuffled = [_index_lines(entries)[k] for k in order]
    rows = _convert_rows(_db(tmp_path / "db2", entries, shuffled), tmp_path / "out2")
    assert all(r["status"] == "ok" for r in rows.values()) and len(rows) == 4


def test_implausible_chain_checks_consecutive_ca_distances():
    from protoken.archives import implausible_chain

    rng = np.random.default_rng(0)
    steps = rng.normal(size=(30, 3))
    steps *= (3.8 / np.linalg.norm(steps, axis=1))[:, None]
    steps[7] *= 2.9 / 3.8  # a cis peptide
    ca = np.cumsum(steps, axis=0)
    assert implausible_chain(ca) == ""
    broken = ca.copy()
    broken[12:] += [0.0, 0.0, 1.7]  # residues 12 -> 13 now 3.8 A plus a jump
    why = implausible_chain(broken)
    d = np.linalg.norm(broken[12] - broken[11])
    assert why == f"CA-CA {d:.3g} A between residues 12 and 13 (1 of 29 steps outside 2.4-4.5 A)"
    broken[20] = np.nan
    assert implausible_chain(broken).startswith("CA-CA nan A between residues 20 and 21 (3 of 29")
    assert implausible_chain(ca[:1]) == ""


def test_damaged_foldcomp_bytes_are_refused_before_an_image_is_made(tmp_path, promod3_entries):
    """20 random bytes per entry: 5 of 6 entries were converted, one with a CA-CA distance of
    5.8e6 A. Foldcomp has no checksum; a decoded chain whose consecutive CA atoms are not
    2.4-4.5 A apart is refused. Here the same damage (20 random bytes per entry, seeded), in
    workers (the decoder may crash on it): no entry may be ok unless it decodes to exactly the
    undamaged chain's image."""
    import random

    rng = random.Random(24)
    entries = promod3_entries[:6]
    damaged = []
    for entry in entries:
        entry = bytearray(entry)
        for _ in range(20):
            entry[rng.randrange(len(entry) - 1)] = rng.randrange(256)
        damaged.append(bytes(entry))
    rows = _convert_rows(_db(tmp_path / "bad", damaged), tmp_path / "bad_out")
    good = _convert_rows(_db(tmp_path / "good", entries), tmp_path / "good_out")
    assert all(r["status"] == "ok" for r in good.values()) and len(good) == 6
    assert len(rows) == 6
    for key, row in rows.items():
        if row["status"] == "ok":
            png = (tmp_path / "bad_out" / row["bin"] / f"{row['id']}.png").read_bytes()
            ref = good[key]
            assert png == (tmp_path / "good_out" / ref["bin"] / f"{ref['id']}.png").read_bytes()
        else:
            assert row["status"] == "failed", row
    reasons = " ".join(r["reason"] for r in rows.values())
    assert "implausible Foldcomp chain: CA-CA" in reasons
    # in this process, a damage that decodes without crashing: the discretizers' floats
    for entry in entries[:3]:
        flipped = bytearray(entry[:-1])
        flipped[40:60] = bytes(b ^ 0xFF for b in flipped[40:60])
        with pytest.raises(StructureError, match=r"implausible Foldcomp chain: CA-CA .* steps "
                           r"outside 2.4-4.5 A\): a damaged entry"):  # fmt: skip
            read_member("x", "foldcomp", bytes(flipped))


def test_foldcomp_chain_with_implausible_geometry_is_refused(tmp_path, structures_dir):
    """A real case: d1x9fc_'s first peptide bond is broken in its file (C-N 3.5 A); Foldcomp
    stores ideal bond lengths and decodes its first residue 1.82 A from the second."""
    from helpers import make_foldcomp_db

    db = tmp_path / "db"
    make_foldcomp_db([structures_dir / "foldseek__d1x9fc_.pdb"], db)
    (member,) = iter_foldcomp(str(db))
    with pytest.raises(StructureError, match=r"CA-CA 1.82 A between residues 1 and 2 \(1 of"):
        read_member(member.name, "foldcomp", member.read())


def test_foldcomp_index_with_a_huge_line_is_one_failed_row(tmp_path, promod3_entries):
    """A sparse DB.index holding a 3 GB line without a newline: 3.2 GB of memory, then
    MemoryError. Lines are read at most 4 KB at a time: a long line (here 256 MB in the middle,
    then 256 MB at the end, no newline) is one failed row each, and the entries around it are
    read, with memory bounded (skipping the line costs time linear in its length)."""
    entries = promod3_entries[:4]
    db = _db(tmp_path / "db", entries)
    lines = _index_lines(entries)
    with open(f"{db}.index", "wb") as fh:
        fh.write("".join(lines[:2]).encode())
        fh.seek(fh.tell() + (256 << 20))  # a hole: 256 MB of NUL bytes, no disk
        fh.write(b"\n" + "".join(lines[2:]).encode())
        fh.truncate(fh.tell() + (256 << 20))
    members, peak = _traced_peak(lambda: list(iter_foldcomp(str(db))))
    assert peak < 4 << 20, peak
    assert [(m.name, m.error) for m in members] == [
        ("0", ""), ("1", ""), ("line 3", "index line 3 is longer than 4096 bytes"),
        ("2", ""), ("3", ""), ("line 6", "index line 6 is longer than 4096 bytes"),
    ]  # fmt: skip
    assert members[2].source == f"{db}.index{SEP}line 3"


def test_bad_foldcomp_index_line_is_recorded_and_the_run_goes_on(tmp_path, promod3_entries,
                                                                capsys):  # fmt: skip
    """A malformed index line after entries in flight ended convert with exit 2 "nothing was
    processed" although rows were written, and every rerun stopped at the same line. Now the
    line is a failed row and the run goes on; a rerun resumes past it."""
    entries = promod3_entries[:6]
    lines = _index_lines(entries)
    lines.insert(4, "4\tnot-a-number\t5\n")
    db = _db(tmp_path / "db", entries, lines)
    out = tmp_path / "out"
    argv = ["convert", str(db), "--out", str(out), "--min-len", "1", "--workers", "2",
            "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    rows = {r["source"]: r for r in _rows(out)}
    assert len(rows) == 7
    bad = rows[f"{db}.index{SEP}line 5"]
    assert bad["status"] == "failed"
    assert bad["reason"] == "index line 5 is not KEY OFFSET LENGTH"
    assert sum(r["status"] == "ok" for r in rows.values()) == 6
    capsys.readouterr()
    assert main(argv) == 0  # the rerun: every row is already done
    assert "already done 7" in capsys.readouterr().out


def test_sparse_foldcomp_data_file_is_refused_from_a_few_bytes(tmp_path, promod3_entries):
    """Index entries of hundreds of MB into a sparse data file: 5.4 GB for the process tree.
    An entry longer than any Foldcomp entry (16 MB: 65,535 residues) is refused from the
    index; a shorter one of zeros from its first bytes (no FCMP), neither read whole."""
    entries = promod3_entries[:2]
    db = _db(tmp_path / "db", entries)
    size = db.stat().st_size
    with open(db, "r+b") as fh:
        fh.truncate(size + (600 << 20))
    lines = _index_lines(entries) + [
        f"2\t{size}\t{500 << 20}\n",
        f"3\t{size + (500 << 20)}\t{8 << 20}\n",
    ]
    Path(f"{db}.index").write_text("".join(lines))
    members = list(iter_foldcomp(str(db)))
    assert members[2].error.startswith(f"index entry 2 claims {500 << 20} bytes, more than a "
                                       "Foldcomp entry holds")  # fmt: skip
    with pytest.raises(ValueError, match=r"index entry 3 does not start a Foldcomp entry \(no "):
        _traced_peak(members[3].read)
    _, peak = _traced_peak(lambda: [m.read() for m in members[:2]])
    assert peak < 1 << 20
    rows = _convert_rows(db, tmp_path / "out")
    assert [rows[k]["status"] for k in "0123"] == ["ok", "ok", "failed", "failed"]


def test_tar_stream_agrees_with_tarfile_and_never_raises(tmp_path, mixed_files):
    """Random tars (ustar, GNU, pax names; plain, gz, bz2, xz), intact or damaged (bytes
    flipped, cut, a block zeroed, the compressed stream damaged): iter_tar never raises (a
    member's read() may, with a ValueError), an intact archive gives tarfile's members and
    bytes, and a damaged one is either read as tarfile reads it or reported."""
    import bz2
    import lzma
    import random

    rng = random.Random(24)
    pdbs = [f.read_bytes()[: rng.randrange(100, 20_000)] for f in mixed_files[:4]]
    compress = {"": bytes, "gz": gzip.compress, "bz2": bz2.compress, "xz": lzma.compress}
    for trial in range(60):
        fmt = rng.choice([tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
            for k in rng.sample(range(len(pdbs)), rng.randrange(1, len(pdbs) + 1)):
                folder = rng.choice(["", "x/", "y" * rng.randrange(1, 150) + "/"])
                name = f"{folder if fmt != tarfile.USTAR_FORMAT else ''}m{k}.pdb"
                info = tarfile.TarInfo(name)
                info.size = len(pdbs[k])
                tf.addfile(info, io.BytesIO(pdbs[k]))
        raw = bytearray(buf.getvalue())
        damage = rng.choice(["none", "flip", "cut", "zero"])
        if damage == "flip":
            for _ in range(rng.randrange(1, 5)):
                raw[rng.randrange(len(raw))] = rng.randrange(256)
        elif damage == "cut":
            raw = raw[: rng.randrange(len(raw))]
        elif damage == "zero":
            start = rng.randrange(len(raw))
            raw[start : start + 512] = bytes(len(raw[start : start + 512]))
        kind = rng.choice(list(compress))
        data = bytearray(compress[kind](bytes(raw)))
        if kind and rng.random() < 0.2:
            damage = "stream"
            data[rng.randrange(len(data))] ^= 0xFF
        path = tmp_path / f"t{trial}.tar{'.' + kind if kind else ''}"
        path.write_bytes(bytes(data))
        got, errors = [], []
        for m in iter_tar(str(path)):
            try:
                got.append((m.name, m.read()))
            except ValueError as exc:
                errors.append(str(exc))
        try:
            with tarfile.open(path) as tf:
                want = [(m.name, tf.extractfile(m).read()) for m in tf if m.isfile()]
        except (tarfile.TarError, OSError, EOFError, zlib.error, lzma.LZMAError):
            want = None
        if damage == "none":
            assert not errors and got == want, trial
        elif want is not None and not errors:
            assert got == want, (trial, damage)
