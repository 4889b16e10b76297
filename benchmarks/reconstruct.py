"""Reconstruction speed against L, and the round-trip acceptance figures on ../shared.

    python benchmarks/reconstruct.py                 # timings, L = 128, 256, 512, 1024
    python benchmarks/reconstruct.py --roundtrip     # all single-chain proteins, 8 and 16 bit

Timings: images of the first L residues of d1y5ia2 (a 1074-residue SCOPe domain, so that every L
is a real chain), at 8 and 16 bit. Per L: ``mds`` alone (eigensolver included), ``reconstruct``
with ``refine=False`` (MDS + handedness) and with refinement (16-bit images of these fragments
have no clipped pairs and skip it; 8-bit images are always refined), and the refinement
(:func:`protoken.reconstruct.refine_distances`) alone. Median of ``--repeat`` runs, one JSON line
per L.

Round trip: every single-chain protein of ../shared/data/structures (40-1024 residues, one
model) is converted at 8 and 16 bit, reconstructed and compared with the Cb of the original
file. Prints the distributions of Cb RMSD, TM-score and lDDT, the mirror-image count, and the
proteins with clipped pairs with their RMSD and TM-score.
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

from protoken.codec import dequantize, features_to_image, image_to_distances, quantize
from protoken.evaluate import compare_with_reference
from protoken.geometry import sixd
from protoken.reconstruct import (
    clipped_mask,
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


def _median_time(repeat: int, fn, *args, **kwargs) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn(*args, **kwargs)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def timings(sizes: list[int], repeat: int) -> None:
    structures = shared_dir() / "data" / "structures"
    bb = read_backbones(next(structures.glob("foldseek_large__d1y5ia2.*")))[0]
    for length in sizes:
        n, ca, c = bb.n[:length], bb.ca[:length], bb.c[:length]
        image = features_to_image(sixd(n, ca, c))
        img16 = dequantize(quantize(image, 16), np.float64)
        img8 = dequantize(quantize(image, 8), np.float64)
        d8 = image_to_distances(img8)
        clipped8 = clipped_mask(img8)
        x8 = mds(d8)
        row = {
            "L": length,
            "clipped_pairs": int(clipped_mask(img16).sum() // 2),
            "mds_s": _median_time(repeat, lambda im: mds(image_to_distances(im)), img16),
            "mds_handedness_16bit_s": _median_time(repeat, reconstruct, img16, refine=False),
            "reconstruct_16bit_s": _median_time(repeat, reconstruct, img16),
            "refined_16bit": reconstruct(img16).refined,
            "mds_handedness_8bit_s": _median_time(repeat, reconstruct, img8, refine=False),
            "reconstruct_8bit_s": _median_time(repeat, reconstruct, img8),
            "refine_only_8bit_s": _median_time(repeat, refine_distances, x8, d8, clipped8),
        }
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
                if rec.clipped_pairs:  # how far classical MDS alone gets
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
            f"(MDS alone: Cb RMSD {r['mds_cb_rmsd']:.3f}){extra}"
        )
    sys.stdout.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256, 512, 1024])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--roundtrip", action="store_true", help="acceptance figures instead")
    parser.add_argument("--workers", type=int, default=2, help="conversion workers")
    args = parser.parse_args()
    if args.roundtrip:
        roundtrip(args.workers)
    else:
        timings(args.sizes, args.repeat)


if __name__ == "__main__":
    main()
