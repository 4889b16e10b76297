"""Reconstruction speed against L, the round-trip acceptance figures, and extended proteins.

    python benchmarks/reconstruct.py                 # timings, L = 128, 256, 512, 1024
    python benchmarks/reconstruct.py --roundtrip     # all single-chain proteins, 8 and 16 bit
    python benchmarks/reconstruct.py --clipped       # proteins with clipped pairs, before/after

Timings: images of the first L residues of d1y5ia2 (a 1074-residue SCOPe domain, so that every L
is a real chain; from L = 256 on it reaches beyond 80 A, so these images have clipped pairs and
take the clipped-pairs path), at 8 and 16 bit, and a compact protein (1tim, 247 residues, no
clipped pair: the plain MDS path). Per image: ``mds`` alone (eigensolver included),
``reconstruct`` with ``refine=False`` (MDS + handedness) and with refinement (images without
clipped pairs whose MDS is exact skip it), the refinement
(:func:`protoken.reconstruct.refine_distances`) alone, and, with clipped pairs, the shortest-path
fill (:func:`protoken.reconstruct.fill_clipped`) alone. Median of ``--repeat`` runs (wall
seconds; ``cpu_s`` the process time of ``reconstruct``), one JSON line per image.

Round trip: every single-chain protein of ../shared/data/structures (40-1024 residues, one
model) is converted at 8 and 16 bit, reconstructed and compared with the Cb of the original
file. Prints the distributions of Cb RMSD, TM-score and lDDT, the mirror-image count, and the
proteins with clipped pairs with their RMSD and TM-score.

Clipped pairs (``--clipped``, issue 26): the test set is the ``--promod3`` (default 200) chains of
the ProMod3 Foldcomp database (../shared/data/promod3) with the most Cb pairs beyond 80 A, plus
the first chain (40-1024 residues) of every file of ../shared/data/structures with such pairs
(multi-domain proteins, long helices, predicted models with disordered tails). Each is imaged at
every ``--settings`` (bit depth:dmax; default 8:80 and 16:250) and reconstructed twice: *before*,
the pipeline of before issue 26 (classical MDS of the distances as they are, the same
refinement, the hand from omega alone), and *now* (:func:`protoken.reconstruct.reconstruct`).
Prints, over the images with clipped pairs: median and min TM-score (Cb, fixed correspondence),
how many below 0.9 and 0.99, mirror images, hands called undetermined, median CPU seconds; then
TM against the fraction of clipped pairs and the worst images. Selecting the ProMod3 chains reads
all 20,678 entries (~40 s).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from protoken.codec import (
    dequantize,
    features_to_image,
    features_to_pixels,
    image_to_distances,
    image_to_features,
    quantize,
)
from protoken.evaluate import by_clipped, compare_with_reference
from protoken.geometry import pairwise_distances, sixd, virtual_cb
from protoken.metrics import mirror_rmsd, rmsd, tm_score
from protoken.reconstruct import (
    clipped_mask,
    fill_clipped,
    handedness_score,
    mds,
    reconstruct,
    refine_distances,
)
from protoken.structure import read_backbones


def shared_dir() -> Path:
    repo = Path(__file__).resolve().parents[1]
    env = os.environ.get("PROTOKEN_SHARED")
    for cand in ([Path(env)] if env else []) + [repo.parent / "shared", Path("/work/shared")]:
        if (cand / "data" / "structures" / "MANIFEST.tsv").is_file():
            return cand
    raise SystemExit("../shared/data/structures not found (set PROTOKEN_SHARED)")


def single_chain_files(structures: Path, lo: int = 40, hi: int = 1024) -> list[Path]:
    with open(structures / "MANIFEST.tsv", newline="") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    return [
        structures / r["file"]
        for r in sorted(rows, key=lambda r: r["file"])
        if r["n_models"] == "1"
        and r["n_chains"] == "1"
        and lo <= int(r["n_protein_residues_first_chain"]) <= hi
    ]


def _median_time(repeat: int, fn, *args, clock=time.perf_counter, **kwargs) -> float:
    times = []
    for _ in range(repeat):
        t0 = clock()
        fn(*args, **kwargs)
        times.append(clock() - t0)
    return statistics.median(times)


def _timing_row(name: str, n, ca, c, repeat: int) -> dict:
    image = features_to_image(sixd(n, ca, c))
    img16 = dequantize(quantize(image, 16), np.float64)
    img8 = dequantize(quantize(image, 8), np.float64)
    d8 = image_to_distances(img8)
    clipped8 = clipped_mask(img8)
    x8 = mds(fill_clipped(d8, clipped8) if clipped8.any() else d8)
    row = {
        "protein": name,
        "L": len(n),
        "clipped_pairs": int(clipped_mask(img16).sum() // 2),
        "mds_s": _median_time(repeat, lambda im: mds(image_to_distances(im)), img16),
        "mds_handedness_16bit_s": _median_time(repeat, reconstruct, img16, refine=False),
        "reconstruct_16bit_s": _median_time(repeat, reconstruct, img16),
        "refined_16bit": reconstruct(img16).refined,
        "mds_handedness_8bit_s": _median_time(repeat, reconstruct, img8, refine=False),
        "reconstruct_8bit_s": _median_time(repeat, reconstruct, img8),
        "reconstruct_8bit_cpu_s": _median_time(repeat, reconstruct, img8, clock=time.process_time),
        "refine_only_8bit_s": _median_time(repeat, refine_distances, x8, d8, clipped8),
    }
    if clipped8.any():
        row["fill_only_8bit_s"] = _median_time(repeat, fill_clipped, d8, clipped8)
    return row


def timings(sizes: list[int], repeat: int) -> None:
    structures = shared_dir() / "data" / "structures"
    bb = read_backbones(next(structures.glob("foldseek_large__d1y5ia2.*")))[0]
    compact = read_backbones(next(structures.glob("foldseek__1tim.*")))[0]
    rows = [_timing_row("1tim", compact.n, compact.ca, compact.c, repeat)]
    for length in sizes:
        rows.append(_timing_row("d1y5ia2", bb.n[:length], bb.ca[:length], bb.c[:length], repeat))
    for row in rows:
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}))
        sys.stdout.flush()


def _quantiles(values) -> str:
    v = np.asarray(values, dtype=np.float64)
    q = np.quantile(v, [0.0, 0.1, 0.5, 0.9, 1.0])
    return "min {:.4g}  p10 {:.4g}  median {:.4g}  p90 {:.4g}  max {:.4g}".format(*q)


def roundtrip(workers: int, backbone: bool = False) -> list[dict]:
    """Convert, reconstruct and compare every single-chain protein at 8 and 16 bit."""
    from protoken.convert import ConvertOptions, convert

    structures = shared_dir() / "data" / "structures"
    files = single_chain_files(structures)
    all_rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for bit_depth in (16, 8):
            out = Path(tmp) / f"c{bit_depth}"
            convert(
                [str(f) for f in files],
                ConvertOptions(out=str(out), bit_depth=bit_depth),
                workers=workers,
                progress=False,
            )
            with open(out / "manifest.tsv", newline="") as fh:
                manifest = [r for r in csv.DictReader(fh, delimiter="\t") if r["status"] == "ok"]
            rows = []
            for r in manifest:
                png = out / r["bin"] / f"{r['id']}.png"
                ref = read_backbones(r["source"])[0]
                t0 = time.perf_counter()
                rec = reconstruct(png, backbone=backbone)
                seconds = time.perf_counter() - t0
                m = compare_with_reference(rec, ref)
                m.update(id=r["id"], seconds=seconds, bit_depth=bit_depth, info=rec.backbone_info)
                if rec.clipped_pairs:  # how far MDS alone gets (of the filled distances)
                    mds_only = reconstruct(png, refine=False)
                    m["mds_cb_rmsd"] = compare_with_reference(mds_only, ref)["cb_rmsd"]
                rows.append(m)
            report(rows, bit_depth, len(files), backbone)
            all_rows += rows
    return all_rows


def report(rows: list[dict], bit_depth: int, n_files: int, backbone: bool) -> None:
    print(f"\n== {bit_depth}-bit PNG: {len(rows)} proteins ({n_files} single-chain files; "
          "the others are duplicate ids or multi-model) ==")  # fmt: skip
    print(f"Cb RMSD (A)        {_quantiles([r['cb_rmsd'] for r in rows])}")
    print(f"TM-score (Cb)      {_quantiles([r['tm_score'] for r in rows])}")
    print(f"lDDT (Cb)          {_quantiles([r['lddt'] for r in rows])}")
    if backbone:
        print(f"backbone RMSD (A)  {_quantiles([r['bb_rmsd'] for r in rows])}")
        print(f"CA RMSD (A)        {_quantiles([r['ca_rmsd'] for r in rows])}")
        print(f"TM-score (CA)      {_quantiles([r['ca_tm_score'] for r in rows])}")
        devs = [r["info"]["max_bond_deviation_refined"] for r in rows]
        print(f"max bond dev. (A)  {_quantiles(devs)}  (refinement, before the bond projection)")
        shifts = [r["info"]["bond_projection_max_shift"] for r in rows]
        print(f"projection shift   {_quantiles(shifts)}  (largest atom move, A)")
        devs = [r["info"]["max_bond_deviation"] for r in rows]
        print(f"max bond dev. (A)  {_quantiles(devs)}  (output)")
    print(f"seconds / protein  {_quantiles([r['seconds'] for r in rows])}")
    print(
        f"mirror images after the fix: {sum(r['mirror_image'] for r in rows)}; "
        f"MDS had the wrong hand (fixed): {sum(r['mirrored_before_fix'] for r in rows)}; "
        f"min handedness score {min(r['handedness_score'] for r in rows):.4f}"
    )
    clipped = sorted((r for r in rows if r["clipped_pairs"]), key=lambda r: r["length"])
    print(f"proteins with clipped pairs: {len(clipped)}")
    for r in clipped:
        extra = f"  bb RMSD {r['bb_rmsd']:.4f}" if backbone else ""
        print(
            f"  {r['id']:<34} L {r['length']:>4}  clipped {r['clipped_pairs']:>6}  "
            f"Cb RMSD {r['cb_rmsd']:.4f}  TM {r['tm_score']:.4f}  "
            f"(MDS unrefined: Cb RMSD {r['mds_cb_rmsd']:.3f}){extra}"
        )
    sys.stdout.flush()


# --------------------------------------------------------------------------- clipped pairs


def promod3_most_extended(db: Path, count: int, dmax: float = 80.0) -> list[str]:
    """The ids of the ``count`` chains (40-1024 residues) of a Foldcomp database with the most
    Cb pairs at or beyond ``dmax``."""
    from protoken.archives import iter_foldcomp, read_member

    scored = []
    for m in iter_foldcomp(str(db)):
        try:
            bb = read_member(m.name, m.kind, m.read())[0]
        except Exception:  # noqa: BLE001 - an unreadable entry is not in the test set
            continue
        if 40 <= len(bb) <= 1024:
            far = int(np.count_nonzero(pairwise_distances(virtual_cb(bb.n, bb.ca, bb.c)) >= dmax))
            if far:
                scored.append((-far, m.id))
    return [sid for _, sid in sorted(scored)[:count]]


def clipped_test_set(count: int) -> list:
    """Backbones of the test set (see the module docstring)."""
    from protoken.archives import iter_foldcomp, read_member

    shared = shared_dir() / "data"
    out = []
    with open(shared / "structures" / "MANIFEST.tsv", newline="") as fh:
        names = sorted(r["file"] for r in csv.DictReader(fh, delimiter="\t"))
    for name in names:
        try:
            bb = read_backbones(shared / "structures" / name, chains="first", models="first")[0]
        except Exception:  # noqa: BLE001 - files that cannot be read are no test case
            continue
        cb = virtual_cb(bb.n, bb.ca, bb.c)
        if 40 <= len(bb) <= 1024 and (pairwise_distances(cb) >= 80.0).any():
            out.append(bb)
    db = shared / "promod3" / "promod3"
    wanted = set(promod3_most_extended(db, count)) if count else set()
    for m in iter_foldcomp(str(db)) if wanted else ():
        if m.id in wanted:
            out.append(read_member(m.name, m.kind, m.read())[0])
    return out


def before_issue_26(image: np.ndarray, dmax: float = 80.0) -> np.ndarray:
    """The Cb of the pipeline before issue 26: classical MDS of the distances as they are (a
    clipped pair read as dmax), the refinement, the hand from omega alone."""
    f = image_to_features(image, dmax)
    clipped = clipped_mask(image)
    known = ~clipped
    np.fill_diagonal(known, False)
    x = refine_distances(mds(f.d), f.d, clipped, dmax)
    return x * np.array([1.0, 1.0, -1.0]) if handedness_score(x, f, known) < 0 else x


def _clipped_case(task: tuple) -> list[dict]:
    bb, settings = task
    truth = virtual_cb(bb.n, bb.ca, bb.c)
    rows = []
    for bit_depth, dmax in settings:
        pixels = features_to_pixels(sixd(bb.n, bb.ca, bb.c, dmax), dmax, bit_depth)
        image = dequantize(pixels, np.float64)  # what a PNG of convert decodes to
        n_clipped = int(np.count_nonzero(clipped_mask(image)) // 2)
        if not n_clipped:
            continue
        t0 = time.process_time()
        rec = reconstruct(image, dmax=dmax)
        seconds = time.process_time() - t0
        t0 = time.process_time()
        old = before_issue_26(image, dmax)
        old_seconds = time.process_time() - t0
        length = len(truth)
        base = {"id": bb.id, "length": length, "setting": f"{bit_depth}-bit, dmax {dmax:g}",
                "clipped_pairs": n_clipped,
                "clipped_fraction": n_clipped / (length * (length - 1) / 2)}  # fmt: skip
        for method, x, secs, extra in (
            ("before", old, old_seconds, {}),
            ("now", rec.cb, seconds, {"handedness": rec.handedness,
                                      "mirrored_parts": rec.mirrored_parts}),
        ):  # fmt: skip
            rows.append({**base, "method": method, "seconds": secs,
                         "tm_score": tm_score(x, truth), "cb_rmsd": rmsd(x, truth),
                         "mirror_image": bool(mirror_rmsd(x, truth) < rmsd(x, truth)),
                         **extra})  # fmt: skip
    return rows


def clipped(count: int, settings: list[tuple[int, float]], workers: int) -> list[dict]:
    """The ``--clipped`` figures (see the module docstring); returns the rows."""
    from concurrent.futures import ProcessPoolExecutor

    cases = clipped_test_set(count)
    print(f"test set: {len(cases)} chains ({count} ProMod3, {len(cases) - count} of "
          "../shared/data/structures)")  # fmt: skip
    rows: list[dict] = []
    tasks = [(bb, settings) for bb in cases]
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            for r in pool.map(_clipped_case, tasks, chunksize=1):
                rows += r
    else:
        for t in tasks:
            rows += _clipped_case(t)
    print("\n| setting | method | images with clipped pairs | TM median | TM min | TM < 0.9 "
          "| TM < 0.99 | mirror images | hand undetermined | CPU s median |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for setting in dict.fromkeys(r["setting"] for r in rows):
        for method in ("before", "now"):
            sel = [r for r in rows if r["setting"] == setting and r["method"] == method]
            tm = np.array([r["tm_score"] for r in sel])
            undetermined = (sum(r["handedness"] != "determined" for r in sel)
                            if method == "now" else "")  # fmt: skip
            print(f"| {setting} | {method} | {len(sel)} | {np.median(tm):.4f} | {tm.min():.4f} "
                  f"| {int((tm < 0.9).sum())} | {int((tm < 0.99).sum())} "
                  f"| {sum(r['mirror_image'] for r in sel)} | {undetermined} "
                  f"| {np.median([r['seconds'] for r in sel]):.2f} |")  # fmt: skip
    for setting in dict.fromkeys(r["setting"] for r in rows):
        print(f"\n{setting}, now: TM against the fraction of clipped pairs")
        for b in by_clipped([r for r in rows if r["setting"] == setting and r["method"] == "now"]):
            print(f"  {b['clipped']:<9} {b['proteins']:>4} proteins  TM median "
                  f"{b['tm_score']['median']:.4f}  min {b['tm_score']['min']:.4f}  "
                  f"mirror images {b['mirror_images']}")  # fmt: skip
        worst = sorted((r for r in rows if r["setting"] == setting and r["method"] == "now"),
                       key=lambda r: r["tm_score"])[:5]  # fmt: skip
        print("  worst: " + ", ".join(f"{r['id']} (L {r['length']}, "
              f"{100 * r['clipped_fraction']:.0f}% clipped, TM {r['tm_score']:.4f})"
              for r in worst))  # fmt: skip
    sys.stdout.flush()
    return rows


def _setting(text: str) -> tuple[int, float]:
    bits, _, dmax = text.partition(":")
    return int(bits), float(dmax)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256, 512, 1024])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--roundtrip", action="store_true", help="acceptance figures instead")
    parser.add_argument("--workers", type=int, default=2, help="conversion workers")
    parser.add_argument("--clipped", action="store_true", help="extended proteins instead")
    parser.add_argument("--promod3", type=int, default=200, help="ProMod3 chains (--clipped)")
    parser.add_argument(
        "--settings",
        type=_setting,
        nargs="+",
        default=[(8, 80.0), (16, 250.0)],
        metavar="BITS:DMAX",
        help="images of --clipped (default 8:80 16:250)",
    )
    parser.add_argument("--json", help="--clipped: write the rows to this file")
    args = parser.parse_args()
    if args.clipped:
        rows = clipped(args.promod3, args.settings, args.workers)
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    elif args.roundtrip:
        roundtrip(args.workers)
    else:
        timings(args.sizes, args.repeat)


if __name__ == "__main__":
    main()
