"""Hostile archives, Foldcomp databases and PNGs (issue 24): time, peak memory and rows of
``protoken convert`` / ``protoken encode`` on each case, as a user runs them.

    python benchmarks/hostile_archives.py [--cases NAME ...] [--src DIR] [--timeout 120]
                                          [--mem-cap-gb 4] [--tmp DIR]

Each case is built once into ``--tmp`` (default: a folder under the system's temporary
folder, reused by later runs), then the command runs in a fresh subprocess (``python -m
protoken ...`` with ``PYTHONPATH=--src``, so ``--src`` of an older checkout measures the code
before a fix), in its own session, each process capped at ``--mem-cap-gb`` of address space
(``RLIMIT_AS``, as the probe's 4 GB cap) and killed after ``--timeout`` seconds. The peak
resident memory of the whole process tree (the command and its workers) is sampled from
``/proc`` every 50 ms. Printed per case: seconds, peak tree RSS (MB), exit code, manifest
rows (ok / failed / skipped) and the failed rows' reasons (or the last stderr line).

Cases: ``bomb_bz2`` / ``bomb_xz`` (before.pdb, 2.2 GB of zeros, after.pdb), ``bomb_xz_200m``
(a 200 MB member, ``--max-bytes 100M``), ``gz_500m`` (a 500 MB member of a .tar.gz, skipped:
``--max-bytes 100M``),
``pax_huge`` (a pax header saying size=10^15; convert and encode), ``hdr_8g`` (a ustar header
claiming 8 GB; encode), ``cut_3rd`` / ``badsum_3rd`` (a 4-member tar cut at, or with a bad
checksum in, its 3rd header; convert and encode), ``many_members`` (200,000 members),
``fc_halved`` / ``fc_overlap`` / ``fc_random`` (damaged Foldcomp entries), ``fc_index_3g``
(a sparse 3 GB index line), ``fc_badline`` (a bad index line after 300 entries, run twice),
``fc_sparse_data`` (index entries of 900 MB into a sparse data file), ``png_junk`` (a PNG whose
IDAT inflates to more data than the image holds, all zeros; encode).
"""

from __future__ import annotations

import argparse
import bz2
import csv
import io
import lzma
import os
import random
import resource
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SHARED = os.environ.get("PROTOKEN_SHARED", os.path.join(os.path.dirname(ROOT), "shared"))
STRUCTURES = os.path.join(SHARED, "data", "structures")
PROMOD3 = os.path.join(SHARED, "data", "promod3", "promod3")
BEFORE, AFTER = "foldseek__d1asha_.pdb", "foldseek__d1it2a_.pdb"
MB = 1 << 20


# --------------------------------------------------------------------------- building cases


def _header(name: str, size: int, fmt=tarfile.USTAR_FORMAT, pax: dict | None = None) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    info.pax_headers = {k: str(v) for k, v in (pax or {}).items()}
    return info.tobuf(format=fmt)


def _member(name: str, data: bytes) -> bytes:
    return _header(name, len(data)) + data + bytes(-len(data) % 512)


def _zero_bomb(path: str, size: int, compressor) -> None:
    """before.pdb, then ``zeros.pdb`` of ``size`` zero bytes, then after.pdb, as one
    compressed stream (one stream, as tar writes it), written without holding the member."""
    with open(os.path.join(STRUCTURES, BEFORE), "rb") as fh:
        before = fh.read()
    with open(os.path.join(STRUCTURES, AFTER), "rb") as fh:
        after = fh.read()
    block = bytes(MB)
    with open(path, "wb") as out:
        out.write(compressor.compress(_member("before.pdb", before)))
        out.write(compressor.compress(_header("zeros.pdb", size)))
        left = size + (-size % 512)
        while left:
            out.write(compressor.compress(block[: min(left, MB)]))
            left -= min(left, MB)
        out.write(compressor.compress(_member("after.pdb", after) + bytes(1024)))
        out.write(compressor.flush())


def _four_member_tar() -> bytes:
    buf = io.BytesIO()
    names = ["foldseek__d1asha_.pdb", "foldseek__d1it2a_.pdb", "foldseek__d1cg5a_.pdb",
             "foldseek__d1mbaa_.pdb"]  # fmt: skip
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for n in names:
            tf.add(os.path.join(STRUCTURES, n), arcname=n)
    return buf.getvalue()


def _header_offsets(data: bytes) -> list[int]:
    offsets, pos = [], 0
    while data[pos : pos + 512].strip(b"\0"):
        offsets.append(pos)
        size = int(data[pos + 124 : pos + 136].strip(b" \0") or b"0", 8)
        pos += 512 + size + (-size % 512)
    return offsets


def _foldcomp_db(path: str, entries: list[bytes]) -> None:
    offset = 0
    with open(path, "wb") as data, open(path + ".index", "w") as index:
        for key, entry in enumerate(entries):
            data.write(entry)
            index.write(f"{key}\t{offset}\t{len(entry)}\n")
            offset += len(entry)
    with open(path + ".dbtype", "wb") as fh:
        fh.write(struct.pack("<i", 0))


def _promod3_entries(n: int) -> list[bytes]:
    out = []
    with open(PROMOD3 + ".index") as index, open(PROMOD3, "rb") as data:
        for line in index:
            _, offset, length = (int(x) for x in line.split())
            data.seek(offset)
            out.append(data.read(length))
            if len(out) == n:
                break
    return out


def build(case: str, folder: str) -> list[list[str]]:
    """Build a case's files under ``folder``; return the command lines (protoken arguments,
    ``OUT`` standing for a fresh output path) to run on them."""
    os.makedirs(folder, exist_ok=True)
    p = lambda *names: os.path.join(folder, *names)  # noqa: E731
    done = p(".built")
    if case in ("bomb_bz2", "bomb_xz", "bomb_xz_200m", "gz_500m"):
        size, comp, suffix = {
            "bomb_bz2": (2200 * MB, lambda: bz2.BZ2Compressor(9), ".tar.bz2"),
            "bomb_xz": (2200 * MB, lambda: lzma.LZMACompressor(preset=6), ".tar.xz"),
            "bomb_xz_200m": (200 * MB, lambda: lzma.LZMACompressor(preset=6), ".tar.xz"),
            "gz_500m": (500 * MB, lambda: zlib.compressobj(9, zlib.DEFLATED, 31), ".tar.gz"),
        }[case]
        archive = p("bomb" + suffix)
        if not os.path.exists(done):
            _zero_bomb(archive, size, comp())
        extra = ["--max-bytes", "100M"] if case in ("bomb_xz_200m", "gz_500m") else []
        runs = [["convert", archive, "--out", "OUT", "--workers", "1", *extra]]
    elif case in ("pax_huge", "hdr_8g"):
        archive = p("evil.tar")
        if not os.path.exists(done):
            with open(os.path.join(STRUCTURES, BEFORE), "rb") as fh:
                before = fh.read()
            with open(archive, "wb") as out:
                out.write(_member("before.pdb", before))
                if case == "pax_huge":
                    out.write(_header("huge.pdb", 0, tarfile.PAX_FORMAT, {"size": 10**15}))
                else:  # the largest size a ustar header holds: 8 GB - 1
                    block = bytearray(_header("huge.pdb", 0))
                    block[124:136] = b"77777777777\0"
                    block[148:156] = b" " * 8
                    block[148:156] = b"%06o\0 " % sum(block)
                    out.write(bytes(block))
                out.write(bytes(200_000))  # what follows the header: 200 KB of zeros
        runs = [["encode", archive, "--out", "OUT.npz"]]
        if case == "pax_huge":
            runs.insert(0, ["convert", archive, "--out", "OUT", "--workers", "1"])
    elif case in ("cut_3rd", "badsum_3rd"):
        archive = p("four.tar")
        if not os.path.exists(done):
            data = _four_member_tar()
            third = _header_offsets(data)[2]
            if case == "cut_3rd":
                data = data[:third]
            else:
                data = bytearray(data)
                data[third + 148 : third + 156] = b"000000\0 "
                data = bytes(data)
            with open(archive, "wb") as fh:
                fh.write(data)
        runs = [["convert", archive, "--out", "OUT", "--workers", "1"],
                ["encode", archive, "--out", "OUT.npz"]]  # fmt: skip
    elif case == "many_members":
        archive = p("many.tar")
        if not os.path.exists(done):
            with tarfile.open(archive, "w", format=tarfile.USTAR_FORMAT) as tf:
                tf.add(os.path.join(STRUCTURES, BEFORE), arcname="before.pdb")
                info = tarfile.TarInfo()
                for i in range(200_000):
                    info.name = f"notes/{i:07d}.txt"
                    tf.addfile(info)
        runs = [["convert", archive, "--out", "OUT", "--workers", "1"]]
    elif case.startswith("fc_"):
        db = p("db")
        if not os.path.exists(done):
            if case == "fc_badline":
                entries = _promod3_entries(400)
            else:
                entries = _promod3_entries(6)
            if case == "fc_random":
                rng = random.Random(24)
                damaged = []
                for e in entries:
                    e = bytearray(e)
                    for _ in range(20):
                        e[rng.randrange(len(e) - 1)] = rng.randrange(256)
                    damaged.append(bytes(e))
                entries = damaged
            _foldcomp_db(db, entries)
            lines = open(db + ".index").read().splitlines(keepends=True)
            if case == "fc_halved":
                k, o, n = lines[2].split()
                lines[2] = f"{k}\t{o}\t{int(n) // 2}\n"
            elif case == "fc_overlap":
                k0, o0, n0 = lines[0].split()
                k1 = lines[1].split()[0]
                lines[1] = f"{k1}\t{o0}\t{n0}\n"
            elif case == "fc_badline":
                lines[300] = "300\tnot-a-number\t5\n"
            elif case == "fc_sparse_data":
                size = os.path.getsize(db)
                with open(db, "r+b") as fh:
                    fh.truncate(size + 4 * 900 * MB + MB)
                lines += [f"{6 + i}\t{size + i * 900 * MB}\t{900 * MB}\n" for i in range(4)]
            if case == "fc_index_3g":
                with open(db + ".index", "wb") as fh:
                    fh.write("".join(lines[:3]).encode())
                    fh.truncate(3 * 1024 * MB)  # one 3 GB line of NULs, no newline
            else:
                with open(db + ".index", "w") as fh:
                    fh.writelines(lines)
        runs = [["convert", db, "--out", "OUT", "--workers", "2"]]
        if case == "fc_badline":
            runs.append(runs[0])  # the rerun must get past the bad line
    elif case == "png_junk":
        folder_png = p("pngs")
        if not os.path.exists(done):
            os.makedirs(folder_png, exist_ok=True)
            side = 64
            ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
            body = zlib.compress(bytes(2 * side * (1 + 3 * side)))  # twice the image's data

            def chunk(kind: bytes, data: bytes) -> bytes:
                return (
                    struct.pack(">I", len(data))
                    + kind
                    + data
                    + struct.pack(">I", zlib.crc32(kind + data))
                )

            png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body)
            with open(os.path.join(folder_png, "junk.png"), "wb") as fh:
                fh.write(png + chunk(b"IEND", b""))
        runs = [["encode", folder_png, "--out", "OUT.npz"]]
    else:
        raise SystemExit(f"unknown case {case}")
    open(done, "w").close()
    return runs


CASES = ["bomb_bz2", "bomb_xz", "bomb_xz_200m", "gz_500m", "pax_huge", "hdr_8g", "cut_3rd",
         "badsum_3rd", "many_members", "fc_halved", "fc_overlap", "fc_random", "fc_index_3g",
         "fc_badline", "fc_sparse_data", "png_junk"]  # fmt: skip


# --------------------------------------------------------------------------- measuring


def _tree_rss(root: int) -> int:
    """Resident bytes of ``root`` and all its descendants (from /proc)."""
    parent: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as fh:
                    stat = fh.read()
                parent[int(name)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    tree, grew = {root}, True
    while grew:
        new = {pid for pid, pp in parent.items() if pp in tree} - tree
        grew = bool(new)
        tree |= new
    total = 0
    for pid in tree:
        try:
            with open(f"/proc/{pid}/status") as fh:
                for line in fh:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def run(args: list[str], src: str, timeout: float, cap_gb: float) -> dict:
    env = dict(os.environ, PYTHONPATH=src, PYTHONUNBUFFERED="1")
    cap = int(cap_gb * (1 << 30))

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
        os.nice(10)

    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "protoken", *args, "--no-progress"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, preexec_fn=limit)  # fmt: skip
    peak = [0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _tree_rss(proc.pid))
            stop.wait(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        out, err = proc.communicate(timeout=timeout)
        code = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        out, err = proc.communicate()
        code = "killed"
    stop.set()
    sampler.join()
    return {"seconds": time.perf_counter() - start, "peak_mb": peak[0] / MB, "code": code,
            "stdout": out, "stderr": err}  # fmt: skip


def manifest_rows(out: str) -> list[dict]:
    rows = []
    if os.path.isdir(out):
        for name in sorted(os.listdir(out)):
            if name.startswith("manifest") and name.endswith(".tsv"):
                with open(os.path.join(out, name), newline="") as fh:
                    rows += list(csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", default=CASES, choices=CASES)
    parser.add_argument("--src", default=os.path.join(ROOT, "src"))
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--mem-cap-gb", type=float, default=4.0)
    parser.add_argument("--tmp", default=os.path.join(tempfile.gettempdir(), "protoken-hostile"))
    args = parser.parse_args()
    print(f"code: {args.src}; cap {args.mem_cap_gb:g} GB per process; timeout {args.timeout:g} s")
    for case in args.cases:
        t = time.perf_counter()
        runs = build(case, os.path.join(args.tmp, case))
        built = time.perf_counter() - t
        work = tempfile.mkdtemp(prefix=f"{case}-", dir=args.tmp)
        out = os.path.join(work, "out")
        for i, argv in enumerate(runs):
            argv = [a.replace("OUT", out) for a in argv]
            r = run(argv, args.src, args.timeout, args.mem_cap_gb)
            what = f"{case} {argv[0]}" + (f" (run {i + 1})" if runs.count(runs[i]) > 1 else "")
            line = (f"{what}: {r['seconds']:.1f} s, peak {r['peak_mb']:.0f} MB, exit {r['code']}"
                    f" (built in {built:.1f} s)")  # fmt: skip
            if argv[0] == "convert":
                rows = manifest_rows(out)
                count = {
                    s: sum(r["status"] == s for r in rows) for s in ("ok", "failed", "skipped")
                }
                line += "; rows: " + ", ".join(f"{n} {s}" for s, n in count.items())
                print(line)
                for row in rows:
                    if row["status"] == "failed":
                        print(f"    {row['status']}: {row['source'].replace(args.tmp, '')}: "
                              f"{row['reason'][:200]}")  # fmt: skip
            else:
                print(line + f"; stdout: {r['stdout'].strip()[-200:]!r}")
            tail = [x for x in r["stderr"].strip().splitlines() if x.strip()][-3:]
            for x in tail:
                print(f"    stderr: {x[:220]}")
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
