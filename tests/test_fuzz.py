"""Fuzzing convert with real files of ../shared, mutated as downloads and tools break them:
truncated anywhere, bytes flipped, lines dropped or duplicated, columns swapped, compressed
streams damaged. Whatever the bytes, convert never crashes or hangs, every input gets exactly
one manifest row with a one-line reason, and every image it writes is a whole, finite image of
the length its row says.

The seeds are fixed (a failure reproduces); a few hundred of them on small files keep it
within seconds.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np
import pytest

from protoken.codec import read_image
from protoken.convert import MANIFEST_COLUMNS, ConvertOptions, convert, read_manifest

#: Small real files of every format: PDB, mmCIF, BinaryCIF, plain and gzipped.
BASES = [
    "kortemme__1CTF_A.pdb",
    "cathtools__1c56A.pdb",
    "gemmi__5e5z.pdb",
    "biotite__1aki.cif.gz",
    "gemmi__1pfe.cif.gz",
    "biotite__res_ids.cif",
    "biotite__1aki.bcif",
    "biotite__1l2y.bcif.gz",
    "pdbtools__dummy_altloc.pdb",
    "foldcomp__test_af.pdb",
]
SEEDS = 300


def truncate(data: bytes, rng: np.random.Generator) -> bytes:
    return data[: int(rng.integers(0, len(data)))]


def flip_bytes(data: bytes, rng: np.random.Generator) -> bytes:
    buf = bytearray(data)
    for at in rng.integers(0, len(buf), size=int(rng.integers(1, 20))):
        buf[at] = int(rng.integers(0, 256))
    return bytes(buf)


def drop_lines(data: bytes, rng: np.random.Generator) -> bytes:
    lines = data.splitlines(keepends=True)
    keep = rng.random(len(lines)) > rng.uniform(0.01, 0.5)
    return b"".join(line for line, k in zip(lines, keep, strict=True) if k)


def duplicate_lines(data: bytes, rng: np.random.Generator) -> bytes:
    lines = data.splitlines(keepends=True)
    out = []
    for line in lines:
        out.append(line)
        if rng.random() < 0.1:
            out.extend([line] * int(rng.integers(1, 4)))
    return b"".join(out)


def swap_columns(data: bytes, rng: np.random.Generator) -> bytes:
    """Swap two fields of every atom record: two of PDB's fixed columns (e.g. x with the residue
    name), or two whitespace-separated values of an mmCIF atom_site row."""
    lines = data.splitlines(keepends=True)
    atoms = [i for i, ln in enumerate(lines) if ln.startswith((b"ATOM", b"HETATM"))]
    if b"_atom_site." in data:
        k, m = (int(x) for x in rng.choice(12, size=2, replace=False))
        for i in atoms:
            parts = lines[i].split()
            if len(parts) > max(k, m):
                parts[k], parts[m] = parts[m], parts[k]
                lines[i] = b" ".join(parts) + b"\n"
        return b"".join(lines)
    spans = [(12, 16), (17, 20), (21, 22), (22, 26), (30, 38), (38, 46), (46, 54), (54, 60)]
    i, j = sorted(int(x) for x in rng.choice(len(spans), size=2, replace=False))
    (a0, a1), (b0, b1) = spans[i], spans[j]
    for n in atoms:
        ln = lines[n]
        if len(ln) >= b1:
            lines[n] = ln[:a0] + ln[b0:b1] + ln[a1:b0] + ln[a0:a1] + ln[b1:]
    return b"".join(lines)


TEXT_MUTATIONS = [truncate, flip_bytes, drop_lines, duplicate_lines, swap_columns]


def mutate(raw: bytes, rng: np.random.Generator) -> bytes:
    """Damage a file: its content, or (for gzip) its compressed stream, once or twice."""
    gz = raw[:2] == b"\x1f\x8b"
    if gz and rng.random() < 0.3:  # damage the compressed bytes themselves
        return (truncate if rng.random() < 0.5 else flip_bytes)(raw, rng)
    data = gzip.decompress(raw) if gz else raw
    for _ in range(int(rng.integers(1, 3))):
        fn = TEXT_MUTATIONS[int(rng.integers(len(TEXT_MUTATIONS)))]
        data = fn(data, rng)
    return gzip.compress(data, compresslevel=1) if gz else data


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory, structures_dir) -> Path:
    root = tmp_path_factory.mktemp("fuzz") / "in"
    root.mkdir()
    originals = {name: (structures_dir / name).read_bytes() for name in BASES}
    for seed in range(SEEDS):
        rng = np.random.default_rng(seed)
        name = BASES[seed % len(BASES)]
        stem, dot, ext = name.partition(".")
        (root / f"s{seed:03d}_{stem}.{ext}").write_bytes(mutate(originals[name], rng))
    return root


def test_mutated_files_never_crash_or_hang_convert(fuzzed, tmp_path):
    out = tmp_path / "out"
    summary = convert([str(fuzzed)], ConvertOptions(out=str(out), min_len=1, timeout=60),
                      workers=2, progress=False, log=lambda m: None)  # fmt: skip
    inputs = sorted(str(p) for p in fuzzed.iterdir())
    rows = list(read_manifest(str(out / "manifest.tsv")))
    assert sorted(r["source"] for r in rows) == inputs  # exactly one row per input
    assert summary.files == len(inputs) == SEEDS
    lines = (out / "manifest.tsv").read_text().splitlines()
    assert len(lines) == SEEDS + 1 and all(ln.count("\t") == len(MANIFEST_COLUMNS) - 1
                                           for ln in lines)  # fmt: skip
    statuses = {r["status"] for r in rows}
    assert statuses <= {"ok", "skipped", "failed"} and {"ok", "failed"} <= statuses
    for row in rows:
        assert row["reason"] or row["status"] == "ok", row
        assert "\n" not in row["reason"] and len(row["reason"]) < 400
        # a parser that dies or hangs is contained, but none of these files should need it
        assert not row["reason"].startswith(("worker crashed", "timed out")), row
        if row["status"] == "ok":
            image = read_image(out / row["bin"] / f"{row['id']}.png")
            assert image.shape == (3, int(row["length"]), int(row["length"]))
            assert np.isfinite(image).all() and len(row["sequence"]) == int(row["length"])
    assert not list(out.rglob("*.tmp*"))
    assert len(list(out.glob("bin_*/*.png"))) == summary.converted


def test_the_mutations_really_damage_the_files(fuzzed, structures_dir):
    """The fuzz test cannot pass by leaving the files intact (compared uncompressed)."""

    def content(raw: bytes) -> bytes:
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError, zlib.error):
            return raw

    changed = 0
    for path in fuzzed.iterdir():
        base = path.name.split("_", 1)[1]
        changed += content(path.read_bytes()) != content((structures_dir / base).read_bytes())
    assert changed >= 0.95 * SEEDS
