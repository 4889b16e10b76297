"""Untrusted input (issue 12): nothing escapes --out, nothing hangs or explodes, nothing is
silently wrong. One test (or more) per case the issue lists, each against what a hostile or
broken file really does: files are crafted from the real structures of ../shared, workers
really crash (os._exit, SIGSEGV) and really hang (inside C code), and the commands are run as a
user runs them.
"""

from __future__ import annotations

import csv
import gzip
import json
import logging
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import gemmi
import numpy as np
import pytest

import helpers
from protoken.cli import main
from protoken.codec import decode_png, features_to_image, read_image, write_png
from protoken.convert import ConvertBusy, ConvertOptions, convert, read_manifest
from protoken.convert.lock import Lock
from protoken.geometry import sixd
from protoken.inputs import (
    MAX_ID_LENGTH,
    UnsafePath,
    chain_output_id,
    check_under,
    find_structures,
    image_id,
    is_safe_id,
    safe_id,
    safe_output_path,
    structure_id,
    walk_files,
)
from protoken.structure import StructureError, read_backbones

DATA = Path(__file__).parent / "data"
CHECKPOINT = str(DATA / "old-checkpoint.pt")
D1ASHA = "foldseek__d1asha_.pdb"  # a 147-residue SCOPe domain, one chain
FEW = ["foldseek__d1asha_.pdb", "kortemme__1CTF_A.pdb", "cathtools__1cukA.pdb"]


def rows_by_source(out: Path) -> dict[str, list[dict]]:
    rows: dict[str, list[dict]] = {}
    for path in sorted(out.glob("manifest*.tsv")):
        if path.name.endswith(".retried.tsv"):
            continue
        for row in read_manifest(str(path)):
            rows.setdefault(row["source"], []).append(row)
    return rows


def files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() or p.is_symlink()}


def one_chain(structures_dir: Path, chain: str, dst: Path) -> Path:
    """d1asha_ as mmCIF with its chain renamed (any string is a legal mmCIF chain id)."""
    st = gemmi.read_structure(str(structures_dir / D1ASHA))
    st.setup_entities()
    st.remove_ligands_and_waters()
    st[0][0].name = chain
    st.setup_entities()
    dst.parent.mkdir(parents=True, exist_ok=True)
    st.make_mmcif_document().write_file(str(dst))
    return dst


def image_of(bb) -> np.ndarray:
    return features_to_image(sixd(bb.n, bb.ca, bb.c))


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line(err: str) -> str:
    """stderr of a refused command: exactly one line, no traceback."""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# --------------------------------------------------------------------------- safe names


def test_safe_id_mapping_keeps_ordinary_names_and_encodes_the_rest():
    for name in ("1abc", "AF-P12345-F1-model_v4", "d1asha_", "B4DXN4.DomSerf.1", "x.y-z_9"):
        assert safe_id(name) == name and is_safe_id(name)
    assert safe_id("../../e") == "%2E.%2F..%2Fe"
    assert safe_id("/../../../../../escaped") == "%2F..%2F..%2F..%2F..%2F..%2Fescaped"
    assert safe_id(".") == "%2E" and safe_id("..") == "%2E." and safe_id(".hidden") == "%2Ehidden"
    assert safe_id("a b%") == "a%20b%25" and safe_id("é") == "%C3%A9"
    assert safe_id("bad\udcffname") == "bad%FFname"  # undecodable bytes of a file name
    for text in ("../../e", "a/b", "..", ".", "x\n", "\x00", "é" * 300, "a" * 1000, "~"):
        sid = safe_id(text)
        assert is_safe_id(sid) and "/" not in sid and sid not in (".", "..")
        assert len(sid) <= MAX_ID_LENGTH
    # injective: different names, different ids (also once cut to the maximum length)
    names = ["a%2F", "a/", "a" * 300, "a" * 301, "é" * 150, "é" * 151, "x~", "x%7E"]
    assert len({safe_id(n) for n in names}) == len(names)
    with pytest.raises(ValueError):
        safe_id("")
    assert chain_output_id("1abc", "A") == "1abc_A" and chain_output_id("x", "") == "x__"
    assert len(chain_output_id("s" * 199, "B")) <= MAX_ID_LENGTH


def test_ids_of_files_are_safe_ids_whatever_the_file_is_called():
    assert structure_id("/x/1abc.cif.gz") == "1abc"
    assert structure_id("/x/a b.pdb") == "a%20b" and structure_id("/x/.gz") == "%2Egz"
    assert structure_id("/x/..pdb") == "%2E.pdb"  # never ".." (leading dots: no extension)
    assert image_id("/o/a%20b.png") == "a%20b"  # written by protoken: kept
    assert image_id("/o/a b.png") == "a%20b" and image_id("/o/.png") == "%2Epng"


def test_output_paths_from_ids_stay_under_out(tmp_path):
    out = tmp_path / "out"
    assert safe_output_path(out, "1abc_A", ".png") == str(out / "1abc_A.png")
    for bad in ("../escaped", "/etc/passwd", "..", ".", "", "a/b", ".hidden", "x" * 201, 5):
        with pytest.raises(UnsafePath):
            safe_output_path(out, bad, ".png")
    assert check_under(out, "bin_40_64/x.png") == str(out / "bin_40_64" / "x.png")
    for bad in ("../x", "/tmp/x", "a/../../x", ""):
        with pytest.raises(UnsafePath):
            check_under(out, bad)


@pytest.mark.filterwarnings("ignore:Attribute:UserWarning")  # biotite, on the crafted BinaryCIF
def test_split_chain_ids_cannot_leave_their_bin(tmp_path, structures_dir):
    """mmCIF chain '../../e' and BinaryCIF chain '/../../../../../escaped' (issue: they wrote
    outside the bin, three levels above --out, and left .tmp files)."""
    from biotite.structure.io import pdbx

    src = tmp_path / "in"
    evil_cif = one_chain(structures_dir, "../../e", src / "evil.cif")
    far = one_chain(structures_dir, "/../../../../../escaped", tmp_path / "far.cif")
    atoms = pdbx.get_structure(pdbx.CIFFile.read(str(far)), model=1)
    atoms.set_annotation("chain_id", np.full(atoms.array_length(), "/../../../../../escaped"))
    bcif = pdbx.BinaryCIFFile()
    pdbx.set_structure(bcif, atoms)
    bcif.write(str(src / "evil2.bcif"))
    far.unlink()
    out = tmp_path / "a" / "b" / "c" / "d" / "out"  # deep enough for ../../../../.. to land here
    before = files_under(tmp_path)
    code = main(["convert", str(src), "--out", str(out), "--chains", "split", "--no-progress",
                 "--workers", "1"])  # fmt: skip
    assert code == 0
    new = {f for f in files_under(tmp_path) - before}
    assert all(f.startswith("a/b/c/d/out/") for f in new), sorted(new)
    rows = rows_by_source(out)
    (cif_row,) = rows[str(evil_cif)]
    (bcif_row,) = rows[str(src / "evil2.bcif")]
    assert cif_row["status"] == bcif_row["status"] == "ok"
    assert cif_row["id"] == "evil_%2E.%2F..%2Fe"
    assert bcif_row["id"] == "evil2_%2F..%2F..%2F..%2F..%2F..%2Fescaped"
    for row in (cif_row, bcif_row):
        assert (out / row["bin"] / f"{row['id']}.png").is_file()
        assert (out / "fasta" / f"{row['id']}.fasta").read_text().startswith(f">{row['id']}\n")
    assert not list(out.rglob("*.tmp*"))


def test_decode_refuses_a_token_file_with_an_unsafe_or_repeated_id(tmp_path, structures_dir,
                                                                   capsys):  # fmt: skip
    """A token file whose id is ../escaped made decode write next to --out (issue)."""
    from protoken.token_files import save_tokens
    from protoken.tokenizer import Tokenizer

    tok = Tokenizer.load(CHECKPOINT)
    good = tok.encode(structures_dir / D1ASHA)
    work = tmp_path / "work"
    work.mkdir()
    for name, ids in (("escape", ["../escaped"]), ("twice", ["x", "x"])):
        tokens = [type(good)(i, good.length, good.sequence, good.levels) for i in ids]
        path = work / f"{name}.npz"
        save_tokens(str(path), tokens, tok.meta())
        out = work / "dec"
        before = files_under(tmp_path)
        code, _, err = run_cli(["decode", str(path), "-c", CHECKPOINT, "-o", str(out),
                                "--no-progress"], capsys)  # fmt: skip
        assert code == 2
        line = one_line(err)
        assert str(path) in line and ("unsafe id" in line or "share an id" in line)
        assert files_under(tmp_path) - before <= {"work/dec"}  # nothing written at all


# --------------------------------------------------------------------------- walks that end


def test_symlink_loops_end_with_one_row_per_real_file(tmp_path, structures_dir, caplog):
    """A folder holding loop -> .. never finished (370,103 rows for one real file)."""
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    shutil.copy(structures_dir / D1ASHA, src / "sub" / "real.pdb")
    os.symlink("..", src / "sub" / "loop")
    os.symlink(".", src / "self")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(structures_dir / "kortemme__1CTF_A.pdb", elsewhere / "other.pdb")
    os.symlink(elsewhere, src / "linked")
    with caplog.at_level(logging.WARNING, logger="protoken.inputs"):
        found = list(find_structures([str(src)]))
    assert [os.path.basename(p) for p in found] == ["real.pdb"]
    assert "symlinked folder not followed" in caplog.text
    followed = sorted(os.path.basename(p) for p in find_structures([str(src)], follow_links=True))
    assert followed == ["other.pdb", "real.pdb"]  # each real folder once: the loops end
    # through the command: one row per real file, either way
    for flag, want in (([], 1), (["--follow-links"], 2)):
        out = tmp_path / f"out{len(flag)}"
        assert main(["convert", str(src), "--out", str(out), "--no-progress", "--workers", "1",
                     *flag]) == 0  # fmt: skip
        rows = rows_by_source(out)
        assert sum(len(r) for r in rows.values()) == want
    # a loop reached twice is walked once (the walk remembers device and inode)
    assert len(list(walk_files(src, follow_links=True, on_skip=lambda *a: None))) == 2


# --------------------------------------------------------------------------- bombs


def _peak_rss_mb(script: str, *args: str) -> tuple[str, float]:
    """Run python code in a fresh process; its stdout and its own peak RSS (VmHWM, which
    unlike ru_maxrss does not inherit the forking test process's size)."""
    code = script + "\nprint(open('/proc/self/status').read().split('VmHWM:')[1].split()[0])"
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    lines = out.stdout.strip().splitlines()
    assert out.returncode == 0 and lines, out.stderr
    return "\n".join(lines[:-1]), int(lines[-1]) / 1024


READ = """import sys
from protoken.structure import read_backbones
try:
    read_backbones(sys.argv[1], max_bytes=int(sys.argv[2]))
except Exception as exc:
    print(type(exc).__name__, exc)"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc (Linux)")
def test_gzip_bombs_are_refused_without_inflating_them(tmp_path):
    """A 14 MB .pdb.gz of zeros was inflated to 6.4 GB in memory; a 2 GiB one was reported as
    'corrupt or truncated gzip'."""
    zeros = tmp_path / "zeros.pdb.gz"  # one gzip member of 256 MB of zeros, 250 KB on disk
    with gzip.open(zeros, "wb", compresslevel=1) as fh:
        block = b"\0" * (1 << 24)
        for _ in range(16):
            fh.write(block)
    text, peak = _peak_rss_mb(READ, str(zeros), str(1 << 30))
    assert text == "StructureError binary data, not a text structure file"
    assert peak < 200, f"{peak:.0f} MB"  # the stream was not inflated
    # 2 GiB of text (valid PDB lines: no early refusal), concatenated gzip members
    line = b"ATOM      1  N   ALA A   1      11.104   6.134  -6.504  1.00  0.00           N\n"
    member = gzip.compress(line * ((1 << 20) // len(line)), compresslevel=1)
    text_bomb = tmp_path / "text.pdb.gz"
    text_bomb.write_bytes(member * 2048)
    text, peak = _peak_rss_mb(READ, str(text_bomb), str(16 << 20))
    assert text == (
        "StructureError inflates to more than --max-bytes (16777216 bytes): not read further"
    )
    assert peak < 200, f"{peak:.0f} MB"
    # a plain file larger than the cap is not read either
    big = tmp_path / "big.pdb"
    big.write_bytes(line * 300_000)
    with pytest.raises(StructureError, match="larger than --max-bytes"):
        read_backbones(big, max_bytes=1 << 20)


def test_the_byte_cap_is_an_option_and_real_files_pass_the_default(tmp_path, structures_dir):
    out = tmp_path / "out"
    small = structures_dir / D1ASHA
    cap = small.stat().st_size  # d1asha_ fits; 1tim inflates to more (2 chains of 247)
    big = structures_dir / "foldseek__1tim.pdb.gz"
    code = main(["convert", str(small), str(big), "--out", str(out), "--max-bytes", str(cap),
                 "--no-progress", "--workers", "1"])  # fmt: skip
    rows = rows_by_source(out)
    assert code == 0 and rows[str(small)][0]["status"] == "ok"
    (row,) = rows[str(big)]
    assert row["status"] == "failed"
    assert row["reason"] == f"inflates to more than --max-bytes ({cap} bytes): not read further"
    # the largest structure of ../shared reads under the default
    largest = max(structures_dir.iterdir(), key=lambda p: p.stat().st_size)
    try:
        read_backbones(largest, chains="split", models="first")
    except StructureError as exc:
        assert "max-bytes" not in str(exc)


def png_bytes(side: int, valid: bool = True) -> bytes:
    """An 8-bit RGB PNG of side x side zeros: a real, decodable one (tens of KB for 3000), or
    just its header and a first IDAT chunk (a 20000 x 20000 one would take a minute to make)."""
    if valid:
        import imagecodecs

        return imagecodecs.png_encode(np.zeros((side, side, 3), np.uint8))
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    head = b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + chunk
    head += struct.pack(">I", zlib.crc32(chunk))
    idat = zlib.compress(b"\0" * (3 * side + 1) * 16)
    return head + struct.pack(">I", len(idat)) + b"IDAT" + idat + struct.pack(">I", 0)


def test_png_headers_are_refused_before_any_pixel_is_decoded():
    big = png_bytes(3000)
    assert len(big) < 100_000  # a few KB on disk, 27 MB of pixels
    with pytest.raises(ValueError, match=r"too large: 3000 x 3000 pixels, more than --max-len"):
        decode_png(big, max_len=1024)
    with pytest.raises(ValueError, match=r"too large: 20000 x 20000"):
        decode_png(png_bytes(20000, valid=False))  # the codec's own ceiling, no max_len given
    import imagecodecs

    grey = imagecodecs.png_encode(np.zeros((8, 8), np.uint8))
    with pytest.raises(ValueError, match="not a square RGB image: 8 x 8 pixels, greyscale"):
        decode_png(grey)
    with pytest.raises(ValueError, match="not a square RGB image: 9 x 8"):
        decode_png(imagecodecs.png_encode(np.zeros((8, 9, 3), np.uint8)))
    assert decode_png(big, max_len=3000).shape == (3000, 3000, 3)  # allowed when asked for


def _chunk(kind: bytes, data: bytes, crc: int | None = None) -> bytes:
    crc = zlib.crc32(kind + data) if crc is None else crc
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def test_png_whose_idat_holds_more_than_the_image_is_refused(tmp_path, capsys, structures_dir):
    """A PNG with a valid header and an IDAT inflating to twice the image's data (zeros):
    libpng only warned ("IDAT: Too much image data", on stderr) and the image decoded as all
    zeros, which train and encode used. Now decode_png refuses it, naming libpng's reason; the
    same zeros in exactly the image's amount are a valid (all-zero) PNG, and a warning about
    an ancillary chunk (a tEXt chunk with a bad CRC, dropped by libpng) leaves the pixels."""
    import imagecodecs

    side = 64
    head = b"\x89PNG\r\n\x1a\n" + _chunk(
        b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    )
    rows = bytes(side * (1 + 3 * side))  # filter byte 0, then the row's pixels
    junk = head + _chunk(b"IDAT", zlib.compress(rows * 2)) + _chunk(b"IEND", b"")
    with pytest.raises(
        ValueError, match=r"^not a readable PNG \(libpng: IDAT: Too much image data"
    ):
        decode_png(junk)
    exact = head + _chunk(b"IDAT", zlib.compress(rows)) + _chunk(b"IEND", b"")
    assert decode_png(exact).shape == (side, side, 3) and not decode_png(exact).any()
    pixels = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    good = imagecodecs.png_encode(pixels)
    with_text = good[:33] + _chunk(b"tEXt", b"k\0v", crc=0) + good[33:]
    assert np.array_equal(decode_png(with_text), pixels)
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    (imgs / "junk.png").write_bytes(junk)
    write_png(imgs / "good.png", image_of(read_backbones(structures_dir / D1ASHA)[0]), 8)
    code, out, err = run_cli(["encode", str(imgs), "-c", CHECKPOINT, "-o", str(tmp_path / "t.npz"),
                              "--no-progress"], capsys)  # fmt: skip
    assert code == 0 and "encoded 1 protein (1 input skipped)" in out
    assert f"skipped {imgs / 'junk.png'}: not a readable PNG (libpng: IDAT: Too much" in err
    assert "PNG warning" not in err  # judged, not printed


@pytest.fixture()
def bomb_data(tmp_path, converted8) -> Path:
    """Real 40-64 residue images (three copies of each) and, in the same bin, a 3000 x 3000 PNG
    (a few KB) and a 20000 x 20000 header; no manifest, so training walks the bin and meets
    them (both names fall in the training split: md5 of bin_40_64/NAME.png above
    valid_frac)."""
    root = tmp_path / "data" / "bin_40_64"
    root.mkdir(parents=True)
    for png in (converted8 / "bin_40_64").glob("*.png"):
        for k in range(3):
            shutil.copy(png, root / f"{png.stem}_{k}.png")
    (root / "bomb_3000.png").write_bytes(png_bytes(3000))
    (root / "bomb_20000.png").write_bytes(png_bytes(20000, valid=False))
    return root.parent


def test_training_logs_a_bomb_image_once_and_goes_on(bomb_data, tmp_path, caplog):
    """A 33 KB 3000x3000 PNG in a training folder killed protoken train (cannot allocate
    memory, no file named)."""
    from helpers import MICRO
    from protoken.train import TrainConfig, train

    cfg = TrainConfig(data=str(bomb_data), out=str(tmp_path / "run"), preset="tiny",
                      model=dict(MICRO), batch_size=8, num_workers=0, valid_frac=0.2,
                      max_steps=12, eval_interval=100, log_interval=100, ckpt_interval=100,
                      seed=0)  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="protoken.data"):
        last = train(cfg)
    assert last["step"] == 12  # more than two epochs (4-5 batches each)
    for name, reason in (("bomb_3000", "3000 x 3000"), ("bomb_20000", "20000 x 20000")):
        lines = [r.getMessage() for r in caplog.records if f"{name}.png" in r.getMessage()]
        assert len(lines) == 1 and reason in lines[0], lines  # logged once, over epochs


def test_a_dataloader_worker_skips_a_bomb_without_memory_error(bomb_data):
    """A 20000x20000 PNG gave a MemoryError traceback in a loader worker."""
    from torch.utils.data import DataLoader

    from protoken.data import BatchPlan, ImageIndex, IndexedBatches

    index = ImageIndex.build(str(bomb_data))
    plan = BatchPlan(index, index.split_rows("all", 0.0), 4, True, seed=0)
    stream = IndexedBatches(plan, 16, num_batches=plan.batches_per_epoch)
    ids = [i for batch in DataLoader(stream, batch_size=None, num_workers=1) for i in batch["ids"]]
    assert ids and "bomb_3000" not in ids and "bomb_20000" not in ids
    assert len(ids) == len(list((bomb_data / "bin_40_64").glob("*.png"))) - 2


def test_encode_and_reconstruct_refuse_oversized_images(tmp_path, capsys, structures_dir):
    """encode --max-len 1024 encoded a 3000x3000 PNG (246 tokens per residue); reconstruct ran
    past 2 minutes on a 16000x16000 one."""
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    (imgs / "big.png").write_bytes(png_bytes(3000))
    (imgs / "huge.png").write_bytes(png_bytes(16000, valid=False))
    bb = read_backbones(structures_dir / D1ASHA)[0]
    write_png(imgs / "good.png", image_of(bb), 16)
    code, out, err = run_cli(["encode", str(imgs), "-c", CHECKPOINT, "-o", str(tmp_path / "t.npz"),
                              "--max-len", "1024", "--no-progress"], capsys)  # fmt: skip
    assert code == 0 and "encoded 1 protein (2 inputs skipped)" in out
    with open(tmp_path / "t.npz.skipped.tsv", newline="") as fh:
        skipped = {Path(r["source"]).name: r["reason"] for r in csv.DictReader(fh, delimiter="\t")}
    assert skipped["big.png"].startswith("too large: 3000 x 3000 pixels, more than --max-len")
    assert skipped["huge.png"].startswith("too large: 16000 x 16000")
    rec = tmp_path / "rec"
    code, _, err = run_cli(["reconstruct", str(imgs / "huge.png"), str(imgs / "big.png"),
                            "-o", str(rec)], capsys)  # fmt: skip
    assert code == 1  # nothing could be reconstructed
    with open(rec / "failed.tsv", newline="") as fh:
        reasons = {r["id"]: r["reason"] for r in csv.DictReader(fh, delimiter="\t")}
    assert reasons["huge"].startswith("too large: 16000 x 16000")
    assert reasons["big"].startswith("too large: 3000 x 3000 pixels, more than --max-len (1024)")


# --------------------------------------------------------------------------- crash isolation


@pytest.fixture()
def crash_inputs(tmp_path, structures_dir) -> Path:
    src = tmp_path / "in"
    src.mkdir()
    for name in FEW:
        shutil.copy(structures_dir / name, src / name)
    shutil.copy(structures_dir / D1ASHA, src / "crash_me.pdb")
    return src


@pytest.mark.parametrize(
    ("reader", "reason"),
    [
        (helpers.exiting_reader, "worker crashed: exit code 3"),
        (helpers.segfaulting_reader, "worker crashed: signal 11 (SIGSEGV)"),
    ],
)
def test_a_worker_that_dies_costs_one_file(crash_inputs, tmp_path, reader, reason):
    """A segfault or the OOM killer in one worker stopped convert for good (BrokenProcessPool,
    0 rows written, every rerun hit the same file)."""
    out = tmp_path / "out"
    summary = convert([str(crash_inputs)], ConvertOptions(out=str(out), min_len=1), workers=2,
                      progress=False, read=reader, log=lambda m: None)  # fmt: skip
    rows = rows_by_source(out)
    assert sorted(Path(s).name for s in rows) == sorted([*FEW, "crash_me.pdb"])
    assert all(len(r) == 1 for r in rows.values())
    (crashed,) = rows[str(crash_inputs / "crash_me.pdb")]
    assert (crashed["status"], crashed["reason"]) == ("failed", reason)
    assert summary.converted == len(FEW) and summary.crashed == 1
    # the next run does not try it again ...
    again = convert([str(crash_inputs)], ConvertOptions(out=str(out), min_len=1), workers=1,
                    progress=False, read=reader, log=lambda m: None)  # fmt: skip
    assert again.resumed == len(FEW) + 1 and again.files == 0
    # ... unless asked to: with a reader that no longer crashes it converts, and the manifest
    # keeps one row per input (the old row moved to manifest.retried.tsv)
    retry = convert([str(crash_inputs)], ConvertOptions(out=str(out), min_len=1, retry_failed=True),
                    workers=1, progress=False, log=lambda m: None)  # fmt: skip
    assert retry.converted == 1 and retry.retried_rows == 1
    rows = rows_by_source(out)
    assert rows[str(crash_inputs / "crash_me.pdb")][0]["status"] == "ok"
    assert all(len(r) == 1 for r in rows.values())
    retried = list(read_manifest(str(out / "manifest.retried.tsv")))
    assert [r["reason"] for r in retried] == [reason]
    assert not list(out.rglob("*.tmp*"))


def test_a_hang_inside_c_code_is_timed_out_by_the_main_process(crash_inputs, tmp_path):
    """The timeout used SIGALRM, which cannot interrupt C code, and its TimeoutError was taken
    for a corrupt gzip."""
    (crash_inputs / "crash_me.pdb").rename(crash_inputs / "hang_me.pdb")
    out = tmp_path / "out"
    summary = convert([str(crash_inputs)], ConvertOptions(out=str(out), min_len=1, timeout=1.0),
                      workers=2, progress=False, read=helpers.hanging_reader,
                      log=lambda m: None)  # fmt: skip
    rows = rows_by_source(out)
    (hung,) = rows[str(crash_inputs / "hang_me.pdb")]
    assert (hung["status"], hung["reason"]) == ("failed", "timed out after 1 s (worker killed)")
    assert summary.converted == len(FEW) and summary.timed_out == 1
    assert all(len(r) == 1 for r in rows.values()) and len(rows) == len(FEW) + 1


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_a_file_that_blocks_on_open_is_timed_out_from_the_command_line(tmp_path, structures_dir,
                                                                        capsys):  # fmt: skip
    """A named pipe given as an input blocks open() in the kernel: a real hang, no fake reader."""
    fifo = tmp_path / "blocks.pdb"
    os.mkfifo(fifo)
    out = tmp_path / "out"
    code, text, err = run_cli(["convert", str(fifo), str(structures_dir / D1ASHA), "--out",
                               str(out), "--timeout", "1", "--no-progress", "--workers", "1"],
                              capsys)  # fmt: skip
    assert code == 0 and "converted 1, skipped 0, failed 1" in text
    (row,) = rows_by_source(out)[str(fifo)]
    assert row["reason"] == "timed out after 1 s (worker killed)"
    assert f"failed: {fifo}: timed out" in err


# --------------------------------------------------------------------------- concurrent runs


def test_one_writer_per_out_and_shard(tmp_path, structures_dir, capsys):
    """Two converts into one OUT at once wrote 559 rows for 282 inputs (118 false duplicates)."""
    out = tmp_path / "out"
    srcs = [str(structures_dir / n) for n in sorted(os.listdir(structures_dir))[:40:5]]
    args = ["convert", *srcs, "--out", str(out), "--no-progress", "--workers", "1"]
    out.mkdir()
    lock = Lock(str(out), None)  # a run in progress (flock: the same in another process)
    try:
        code, _, err = run_cli(args, capsys)
        assert code == 1 and "is being written by another protoken convert (pid" in one_line(err)
        assert not (out / "manifest.tsv").exists()
    finally:
        lock.release()
    shard0 = Lock(str(out), (0, 2))
    try:
        assert run_cli([*args, "--shard", "1/2"], capsys)[0] == 0  # shards side by side
        for other in ([*args, "--shard", "0/2"], args):  # the same shard, or all of OUT
            code, _, err = run_cli(other, capsys)
            assert code == 1 and "another protoken convert" in one_line(err)
    finally:
        shard0.release()
    assert run_cli(args, capsys)[0] == 0


def test_a_second_process_is_refused_while_the_first_runs(tmp_path, structures_dir, capsys):
    out = tmp_path / "out"
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(structures_dir / D1ASHA, src / "hang_me.pdb")
    script = ("import sys; sys.path.insert(0, sys.argv[1]); import helpers\n"
              "from protoken.convert import ConvertOptions, convert\n"
              "convert([sys.argv[2]], ConvertOptions(out=sys.argv[3], timeout=600), workers=1,"
              " progress=False, read=helpers.hanging_reader)")  # fmt: skip
    first = subprocess.Popen([sys.executable, "-c", script, str(Path(__file__).parent), str(src),
                              str(out)], start_new_session=True)  # fmt: skip
    try:
        lock = out / ".protoken-convert.lock"
        for _ in range(600):
            if lock.exists() and lock.read_text().startswith("pid"):
                break
            time.sleep(0.05)
        code, _, err = run_cli(["convert", str(structures_dir / D1ASHA), "--out", str(out),
                                "--no-progress"], capsys)  # fmt: skip
        assert code == 1
        assert f"pid {first.pid}" in one_line(err)
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    # the killed run left its marker: the next run cleans up and works
    code, text, _ = run_cli(["convert", str(structures_dir / D1ASHA), "--out", str(out),
                             "--no-progress"], capsys)  # fmt: skip
    assert code == 0 and "converted 1" in text


@pytest.mark.parametrize("slow_first", [True, False])
def test_colliding_ids_the_first_input_wins_whatever_the_timing(tmp_path, structures_dir,
                                                                slow_first):  # fmt: skip
    """1abc.pdb and 1abc.cif in two shards interleaved and, with --delete-source, both sources
    were deleted. Shards are by id now (the two share one), and within a run the first in walk
    order wins even when it finishes last."""
    first_dir, second_dir = ("slow", "fast") if slow_first else ("fast", "slow")
    a = tmp_path / first_dir / "x.pdb"
    b = tmp_path / second_dir / "x.pdb"
    a.parent.mkdir()
    b.parent.mkdir()
    shutil.copy(structures_dir / D1ASHA, a)
    shutil.copy(structures_dir / "kortemme__1CTF_A.pdb", b)
    out = tmp_path / "out"
    opts = ConvertOptions(out=str(out), delete_source=True, min_len=1)
    convert([str(a), str(b)], opts, workers=2, progress=False, read=helpers.slow_reader,
            log=lambda m: None)  # fmt: skip
    rows = rows_by_source(out)
    assert rows[str(a)][0]["status"] == "ok"
    assert rows[str(b)][0]["status"] == "skipped"
    assert rows[str(b)][0]["reason"].startswith("duplicate id")
    assert (out / "fasta" / "x.fasta").read_text().split("\n")[1] == rows[str(a)][0]["sequence"]
    assert not a.exists() and b.exists()  # the winner deleted, the loser never


# --------------------------------------------------------------------------- silent garbage


def test_degenerate_backbones_fail_with_a_reason(tmp_path, structures_dir):
    """All-zero coordinates converted to an 'ok' image."""
    st = gemmi.read_structure(str(structures_dir / D1ASHA))
    for cra in st[0].all():
        cra.atom.pos = gemmi.Position(0, 0, 0)
    st.write_pdb(str(tmp_path / "zeros.pdb"))
    with pytest.raises(StructureError, match="degenerate backbone: 146 of 146 consecutive CA-CA"):
        read_backbones(tmp_path / "zeros.pdb")
    st = gemmi.read_structure(str(structures_dir / D1ASHA))  # each residue at one point
    for res in st[0][0]:
        first = gemmi.Position(res[0].pos)
        for atom in res:
            atom.pos = first
    st.write_pdb(str(tmp_path / "squashed.pdb"))
    with pytest.raises(StructureError, match="N, CA and C within 0.5 A of each other in 147"):
        read_backbones(tmp_path / "squashed.pdb")
    out = tmp_path / "out"
    convert([str(tmp_path / "zeros.pdb")], ConvertOptions(out=str(out)), workers=1,
            progress=False, log=lambda m: None)  # fmt: skip
    (row,) = rows_by_source(out)[str(tmp_path / "zeros.pdb")]
    assert row["status"] == "failed" and row["reason"].startswith("degenerate backbone")
    assert not list(out.glob("bin_*/*.png"))
    # real structures pass: every one of ../shared that reads is not degenerate
    assert len(read_backbones(structures_dir / D1ASHA)[0]) == 147


@pytest.mark.parametrize("value", [0, 255])
def test_reconstruct_refuses_constant_images(tmp_path, value, capsys):
    """All-0 and all-255 images reconstructed into normal-looking PDBs."""
    path = tmp_path / f"flat{value}.png"
    import imagecodecs

    path.write_bytes(imagecodecs.png_encode(np.full((50, 50, 3), value, np.uint8)))
    code, _, err = run_cli(["reconstruct", str(path), "-o", str(tmp_path / "o")], capsys)
    assert code == 1 and not (tmp_path / "o" / f"flat{value}.pdb").exists()
    assert "degenerate image: channel 0 (distance/omega) is constant" in err


def test_modified_residues_are_read_or_counted(tmp_path, structures_dir, manifest):
    """MLY, M3L ... outside the 145-entry map vanished without being counted in dropped, so
    their neighbours looked adjacent."""
    st = gemmi.read_structure(str(structures_dir / D1ASHA))
    residues = list(st[0][0])
    lys = next(i for i, r in enumerate(residues) if r.name == "LYS")
    residues[lys].name = "MLY"  # N6,N6-dimethyl-lysine, in gemmi's component table
    residues[lys + 3].name = "ZZQ"  # no table knows it: N, CA and C make it a residue
    for k in (lys, lys + 3):
        residues[k].het_flag = "H"
    st.write_pdb(str(tmp_path / "mod.pdb"))
    bb = read_backbones(tmp_path / "mod.pdb")[0]
    plain = read_backbones(structures_dir / D1ASHA)[0]
    assert len(bb) == len(plain) - 1 and bb.dropped == plain.dropped + 1
    assert bb.sequence == plain.sequence[: lys + 3] + plain.sequence[lys + 4 :]  # MLY -> K
    # real files: biotite's CCD-based residue count of MANIFEST.tsv = kept + dropped
    for name in ("se3diff__1PRW.pdb", "biopython__2n0n_M1.pdb", "gemmi__1pfe.cif.gz",
                 "cathtools__non_std_amino_acid_hetatm_1.pdb"):  # fmt: skip
        b = read_backbones(structures_dir / name, chains="first", models="first")[0]
        assert len(b) + b.dropped == int(manifest[name]["n_protein_residues_first_chain"]), name


# --------------------------------------------------------------------------- one line, no traceback


@pytest.fixture(scope="module")
def broken_checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpt")
    raw = Path(CHECKPOINT).read_bytes()
    files = {
        "missing": root / "missing.pt",
        "truncated": root / "truncated.pt",
        "random": root / "random.pt",
        "text": root / "text.pt",
    }
    files["truncated"].write_bytes(raw[: len(raw) // 3])
    files["random"].write_bytes(np.random.default_rng(0).bytes(50_000))
    files["text"].write_text("not a checkpoint\n")
    return files


@pytest.mark.parametrize("kind", ["missing", "truncated", "random", "text"])
def test_broken_checkpoints_are_one_line_in_every_command(kind, broken_checkpoints, tmp_path,
                                                          structures_dir, capsys):  # fmt: skip
    ckpt = str(broken_checkpoints[kind])
    src = str(structures_dir / D1ASHA)
    (tmp_path / "t.npz").write_bytes(b"")
    commands = [
        ["encode", src, "-c", ckpt, "-o", str(tmp_path / "x.npz"), "--no-progress"],
        ["decode", str(tmp_path / "t.npz"), "-c", ckpt, "-o", str(tmp_path / "d")],
        ["evaluate", src, "-c", ckpt, "-o", str(tmp_path / "e"), "--no-progress"],
    ]
    for args in commands:
        code, _, err = run_cli(args, capsys)
        line = one_line(err)
        assert code == 2 and ckpt in line and "checkpoint" in line, (args[0], line)
        assert "weights_only" not in line  # torch's advice to load unsafely is not ours
    run = tmp_path / "run"
    run.mkdir()
    if kind != "missing":
        shutil.copy(ckpt, run / "last.pt")
    (run / "config.json").write_text(json.dumps({"data": str(tmp_path), "out": str(run)}))
    code, _, err = run_cli(["train", "--out", str(run), "--resume"], capsys)
    assert code == 2 and "last.pt" in one_line(err)


def test_broken_token_files_are_one_line(tmp_path, structures_dir, capsys):
    from protoken.token_files import save_tokens
    from protoken.tokenizer import Tokenizer

    tok = Tokenizer.load(CHECKPOINT)
    good = tmp_path / "good.npz"
    save_tokens(str(good), [tok.encode(structures_dir / D1ASHA)], tok.meta())
    with np.load(good) as z:
        arrays = dict(z)
    variants = {
        "not_a_zip": b"PK\x03\x04 this is not a zip",
        "missing_key": {k: v for k, v in arrays.items() if k != "lengths"},
        "short_arrays": {**arrays, "level0_codes": arrays["level0_codes"][:3]},
        "bad_meta": {**arrays, "meta": np.array("{not json")},
    }
    for name, content in variants.items():
        path = tmp_path / f"{name}.npz"
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            np.savez(path, **content)
        code, _, err = run_cli(["decode", str(path), "-c", CHECKPOINT, "-o", str(tmp_path / name),
                                "--no-progress"], capsys)  # fmt: skip
        assert code == 2 and str(path) in one_line(err), name


def test_out_is_checked_before_any_work(tmp_path, structures_dir, capsys):
    src = str(structures_dir / D1ASHA)
    a_file = tmp_path / "file"
    a_file.write_text("mine\n")
    unwritable = "/proc/self/protoken-out"  # not creatable, even by root
    for command in (["convert", src], ["reconstruct", str(tmp_path)],
                    ["evaluate", src, "-c", CHECKPOINT], ["decode", str(tmp_path / "t.npz"),
                                                          "-c", CHECKPOINT]):  # fmt: skip
        for out in (str(a_file), unwritable):
            code, _, err = run_cli([*command, "--out", out], capsys)
            line = one_line(err)
            assert code == 2 and "--out" in line and out in line, (command[0], line)
    assert a_file.read_text() == "mine\n"
    code, _, err = run_cli(["encode", src, "-c", CHECKPOINT, "-o", str(a_file)], capsys)
    assert code == 2 and "exists (not overwritten" in one_line(err)
    assert a_file.read_text() == "mine\n"
    # a folder that does not exist yet is made before the work, not after it
    nested = tmp_path / "nodir" / "x.npz"
    code, _, _ = run_cli(["encode", src, "-c", CHECKPOINT, "-o", str(nested), "--no-progress"],
                         capsys)  # fmt: skip
    assert code == 0 and nested.is_file()


# --------------------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    "extra",
    [
        ["--dmax", "0"], ["--dmax", "nan"], ["--dmax", "inf"], ["--dmax", "-5"],
        ["--min-len", "500", "--max-len", "10"], ["--min-len", "0"], ["--timeout", "0"],
        ["--timeout", "nan"], ["--workers", "1000"], ["--workers", "0"], ["--max-bytes", "0"],
        ["--max-bytes", "lots"],
    ],
)  # fmt: skip
def test_arguments_that_cannot_work_are_refused(extra, tmp_path, structures_dir, capsys):
    out = tmp_path / "out"
    args = ["convert", str(structures_dir / D1ASHA), "--out", str(out), *extra]
    try:
        code = main(args)
    except SystemExit as exc:  # argparse refuses a bad value: usage line, exit 2
        code = exc.code
    err = capsys.readouterr().err
    assert (
        code == 2
        and "Traceback" not in err
        and err.strip().splitlines()[-1].startswith("protoken convert: ")
    )
    assert not out.exists()


def test_min_greater_than_max_is_one_line(tmp_path, structures_dir, capsys):
    code, _, err = run_cli(["convert", str(structures_dir / D1ASHA), "--out", str(tmp_path / "o"),
                            "--min-len", "500", "--max-len", "10"], capsys)  # fmt: skip
    assert code == 2 and "--min-len 500 is larger than --max-len 10" in one_line(err)


def test_settings_that_change_outputs_stick(tmp_path, structures_dir, capsys):
    """A rerun with another --chains policy reported 'already done'."""
    out = tmp_path / "out"
    src = str(structures_dir / "foldseek__1tim.pdb.gz")
    assert run_cli(["convert", src, "--out", str(out), "--no-progress"], capsys)[0] == 0
    changes = [(["--chains", "split"], "chains"), (["--models", "first"], "models"),
               (["--min-len", "30"], "min_len"), (["--max-len", "900"], "max_len"),
               (["--bit-depth", "16"], "bit_depth"), (["--dmax", "40"], "dmax")]  # fmt: skip
    for extra, name in changes:
        code, _, err = run_cli(["convert", src, "--out", str(out), "--no-progress", *extra], capsys)
        assert code == 2 and f"was converted with {name}=" in one_line(err), extra
    assert json.loads((out / "convert.json").read_text())["chains"] == "skip-multi"


def test_reconstruct_takes_dmax_from_convert_json_and_refuses_a_contradiction(
    tmp_path, structures_dir, capsys
):
    """reconstruct --dmax 40 on 80 A images gave 6 A RMSD, no warning."""
    out = tmp_path / "conv"
    convert([str(structures_dir / D1ASHA)], ConvertOptions(out=str(out), dmax=40.0, bit_depth=16),
            workers=1, progress=False)  # fmt: skip
    code, _, err = run_cli(["reconstruct", str(out), "-o", str(tmp_path / "r"), "--dmax", "80"],
                           capsys)  # fmt: skip
    assert code == 2 and "converted with dmax=40.0" in one_line(err)
    ref = str(structures_dir / D1ASHA)
    code, _, _ = run_cli(["reconstruct", str(out), "-o", str(tmp_path / "r"), "--reference",
                          ref], capsys)  # fmt: skip
    assert code == 0
    with open(tmp_path / "r" / "metrics.tsv", newline="") as fh:
        (row,) = list(csv.DictReader(fh, delimiter="\t"))
    assert float(row["cb_rmsd"]) < 0.01  # read as 40 A: right
    # an image whose bit depth contradicts its convert.json is a foreign file
    png = next(out.glob("bin_*/*.png"))
    write_png(png.with_name("foreign.png"), read_image(png), 8)
    code, _, err = run_cli(["reconstruct", str(png.with_name("foreign.png")), "-o",
                            str(tmp_path / "r2")], capsys)  # fmt: skip
    assert code == 1 and "the PNG is 8-bit, but its convert.json says bit_depth=16" in err


# --------------------------------------------------------------------------- exit codes


def test_exit_codes_follow_one_policy(tmp_path, structures_dir, bad_inputs_dir, capsys):
    """convert exited 0 when every input failed, reconstruct 1 when 1 of 10 failed, evaluate 2."""
    bad = [str(bad_inputs_dir / n) for n in ("empty.pdb", "truncated_gzip.pdb.gz")]
    code, _, err = run_cli(["convert", *bad, "--out", str(tmp_path / "c"), "--no-progress"],
                           capsys)  # fmt: skip
    assert code == 1 and "nothing could be converted: every input failed" in err
    code, _, _ = run_cli(["convert", *bad, str(structures_dir / D1ASHA), "--out",
                          str(tmp_path / "c2"), "--no-progress"], capsys)  # fmt: skip
    assert code == 0  # processed, failures recorded in the manifest
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_cli(["convert", str(empty), "--out", str(tmp_path / "c3")], capsys)[0] == 1
    assert run_cli(["reconstruct", str(empty), "--out", str(tmp_path / "r")], capsys)[0] == 1
    code, _, err = run_cli(["evaluate", *bad, "-c", CHECKPOINT, "-o", str(tmp_path / "e"),
                            "--no-progress"], capsys)  # fmt: skip
    assert code == 1 and (tmp_path / "e" / "skipped.tsv").is_file()
    assert run_cli(["convert", str(tmp_path / "missing"), "--out", str(tmp_path / "c4")],
                   capsys)[0] == 2  # fmt: skip


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_convert_with_128_plus_n_and_no_worker_left(tmp_path, sig):
    fifo = tmp_path / "blocks.pdb"
    os.mkfifo(fifo)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "protoken", "convert", str(fifo), "--out",
                             str(out), "--no-progress", "--workers", "2"],
                            stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
    try:
        marker = out / ".protoken-convert.all.running"
        for _ in range(600):
            if marker.exists():
                break
            time.sleep(0.05)
        time.sleep(0.5)  # the workers have started
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 128 + sig
    assert f"protoken convert: stopped ({signal.Signals(sig).name})" in err
    assert "Traceback" not in err
    with pytest.raises(ProcessLookupError):  # no worker of the group is left
        for _ in range(100):
            os.killpg(proc.pid, 0)
            time.sleep(0.05)


def test_leftovers_of_a_killed_run_are_removed(tmp_path, structures_dir):
    out = tmp_path / "out"
    convert([str(structures_dir / D1ASHA)], ConvertOptions(out=str(out)), workers=1,
            progress=False)  # fmt: skip
    # what a run killed with SIGKILL leaves: its marker and temporary files (also of a shard, and
    # of protoken before the tags)
    (out / ".protoken-convert.all.running").write_text("pid 1\n")
    left = [out / "bin_40_64" / "x.png.tmp.all.123", out / "fasta" / "x.fasta.tmp.all.123",
            out / "fasta" / "y.fasta.tmp.shard-0-of-2.77",
            out / "fasta" / "z.fasta.tmp4242"]  # fmt: skip
    for path in left:
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"partial")
    before = {p.name for p in out.rglob("*.png")}
    summary = convert([str(structures_dir / D1ASHA)], ConvertOptions(out=str(out)), workers=1,
                      progress=False)  # fmt: skip
    assert summary.leftovers_removed == 4 and not list(out.rglob("*.tmp*"))
    assert {p.name for p in out.rglob("*.png")} == before  # outputs untouched
    assert not (out / ".protoken-convert.all.running").exists()


def test_busy_is_an_error_of_the_library_too(tmp_path, structures_dir):
    out = tmp_path / "out"
    out.mkdir()
    lock = Lock(str(out), (1, 3))
    try:
        with pytest.raises(ConvertBusy):
            convert([str(structures_dir / D1ASHA)], ConvertOptions(out=str(out)), workers=1,
                    shard=(1, 3), progress=False)  # fmt: skip
    finally:
        lock.release()


# --------------------------------------------------------------------------- rough edges (24)


def test_decode_refuses_a_sequence_shorter_than_its_codes_and_writes_nothing(
    tmp_path, structures_dir, capsys
):
    """decode of a file whose third sequence was cut wrote the first PNGs, then failed."""
    from protoken.token_files import load_tokens, save_tokens
    from protoken.tokenizer import Tokenizer

    tok = Tokenizer.load(CHECKPOINT)
    names = [D1ASHA, "kortemme__1CTF_A.pdb", "cathtools__1avyA00.pdb", "biotite__1aki.pdb"]
    good = tmp_path / "good.npz"
    save_tokens(str(good), tok.encode_many([structures_dir / n for n in names]), tok.meta())
    with np.load(good) as z:
        arrays = {k: z[k] for k in z.files}
    seqs = arrays["sequences"].tolist()
    seqs[2] = seqs[2][:-5]
    arrays["sequences"] = np.array(seqs)
    cut = tmp_path / "cut.npz"
    np.savez(cut, **arrays)
    with pytest.raises(ValueError, match=r"cathtools__1avyA00: a sequence of 63 residues for 68"):
        load_tokens(str(cut))
    out = tmp_path / "dec"
    code, _, err = run_cli(["decode", str(cut), "-c", CHECKPOINT, "-o", str(out),
                            "--no-progress"], capsys)  # fmt: skip
    assert code == 2 and str(cut) in one_line(err) and "a sequence of 63" in err
    assert not list(out.iterdir())  # nothing decoded, not even the first proteins


@pytest.fixture()
def shard_folder(tmp_path, structures_dir) -> Path:
    """Three structures converted to tar shards, with their index."""
    out = tmp_path / "shards"
    names = [D1ASHA, "kortemme__1CTF_A.pdb", "cathtools__1avyA00.pdb"]
    convert([str(structures_dir / n) for n in names],
            ConvertOptions(out=str(out), format="shards"), workers=1, progress=False)  # fmt: skip
    return out


@pytest.mark.parametrize("damage", ["header", "unsafe id", "parent path"])
def test_a_hostile_shard_index_is_one_line_naming_it(shard_folder, tmp_path, capsys, damage):
    """A shard index with a bad header, an unsafe id or a ../ shard path was reported through
    the unexpected-error path ('error: ValueError ... PROTOKEN_DEBUG=1')."""
    (index,) = (shard_folder / "shards").glob("index.*.tsv")
    lines = index.read_text().splitlines()
    cols = lines[2].split("\t")
    if damage == "header":
        lines[0] = "shard\tmember\tsomething\telse"
    elif damage == "unsafe id":
        cols[4] = "../escaped"
    else:
        cols[0] = "../../elsewhere.tar"
    lines[2] = "\t".join(cols)
    index.write_text("\n".join(lines) + "\n")
    code, _, err = run_cli(["encode", str(shard_folder), "-c", CHECKPOINT, "-o",
                            str(tmp_path / "t.npz"), "--no-progress"], capsys)  # fmt: skip
    line = one_line(err)
    assert code == 2 and str(index) in line and "PROTOKEN_DEBUG" not in line, line
    assert not (tmp_path / "t.npz").exists()


def test_a_repeated_shard_index_row_trains_and_encodes_once(shard_folder, tmp_path, capsys,
                                                            caplog):  # fmt: skip
    """A duplicate index row trained the image twice."""
    from protoken.data import ImageIndex

    (index,) = (shard_folder / "shards").glob("index.*.tsv")
    lines = index.read_text().splitlines()
    index.write_text("\n".join([*lines, lines[1]]) + "\n")  # the first image listed twice
    with caplog.at_level(logging.WARNING, logger="protoken.data"):
        built = ImageIndex.build(shard_folder, cache_dir=tmp_path / "cache")
    assert len(built) == 3 and len({built.id(i) for i in range(3)}) == 3
    assert any("listed twice" in r.getMessage() for r in caplog.records)
    code, out, err = run_cli(["encode", str(shard_folder), "-c", CHECKPOINT, "-o",
                              str(tmp_path / "t.npz"), "--no-progress"], capsys)  # fmt: skip
    assert code == 0 and "encoded 3 proteins (1 input skipped)" in out and "duplicate id" in err


def test_sharded_encode_of_a_folder_of_a_png_and_a_structure_is_the_unsharded_run(
    tmp_path, structures_dir
):
    """Shard 0 took the PNG and shard 1 the structure file: the union of the shards was not
    what an unsharded run reads (the PNG only: a folder holding PNGs is read as images)."""
    from protoken.archives import find_inputs
    from protoken.inputs import image_id, in_shard, structure_id

    folder = tmp_path / "mixed"
    folder.mkdir()
    bb = read_backbones(structures_dir / D1ASHA)[0]
    png = next(f"p{k}.png" for k in range(100) if in_shard(image_id(f"p{k}.png"), (0, 2)))
    pdb = next(f"s{k}.pdb" for k in range(100) if in_shard(structure_id(f"s{k}.pdb"), (1, 2)))
    write_png(folder / png, image_of(bb), 8)
    shutil.copy(structures_dir / D1ASHA, folder / pdb)
    whole = sorted(map(str, find_inputs([str(folder)])))
    assert whole == [str(folder / png)]
    union = sorted(str(x) for i in range(2) for x in find_inputs([str(folder)], (i, 2)))
    assert union == whole


def test_resume_names_a_config_that_is_not_json_and_takes_a_moved_run(tmp_path, converted8,
                                                                       capsys):  # fmt: skip
    """--resume with a damaged config.json gave a message without the file's name; a run
    folder given with a trailing slash, or moved, could not be resumed ('cannot change out').
    Training wrote its index cache into the data folder (read-only data must work)."""
    from helpers import MICRO
    from protoken.checkpoint import load

    data = tmp_path / "data"  # (without the cache other tests' indexing left in the fixture)
    shutil.copytree(converted8, data, ignore=shutil.ignore_patterns(".protoken-index"))
    run = tmp_path / "run"
    args = ["train", "--data", str(data), "--out", str(run), "--preset", "tiny", "--set",
            f"model={json.dumps(MICRO)}", "--set", 'only_bins=["bin_40_64"]',
            "--batch-size", "4", "--num-workers", "0",
            "--max-steps", "2", "--set", "eval_interval=100", "--set", "eval_structures=0",
            "--set", "eval_batches=1", "--set", "valid_frac=0.3"]  # fmt: skip
    assert main(args) == 0
    assert not (data / ".protoken-index").exists() and (run / ".protoken-index").is_dir()
    config = run / "config.json"
    saved = config.read_text()
    config.write_text(saved[: len(saved) // 2])
    code, _, err = run_cli(["train", "--out", str(run), "--resume"], capsys)
    assert code == 2 and f"{config}: not valid JSON" in one_line(err)
    config.write_text(saved)
    assert main(["train", "--out", f"{run}/", "--resume", "--max-steps", "3"]) == 0
    moved = tmp_path / "elsewhere" / "run"
    moved.parent.mkdir()
    run.rename(moved)
    assert main(["train", "--out", str(moved), "--resume", "--max-steps", "4"]) == 0
    assert load(str(moved / "last.pt"))["step"] == 4
