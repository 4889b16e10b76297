"""Full-backbone reconstruction: time and accuracy against L, and the acceptance figures.

    python benchmarks/backbone.py                 # L = 64 ... 1024, 8 and 16 bit
    python benchmarks/backbone.py --roundtrip     # all single-chain proteins of ../shared

Against L: images of the first L residues of d1y5ia2 (a 1074-residue SCOPe domain) at 8 and 16
bit; for each, the seconds of ``reconstruct(backbone=True)`` (whole pipeline: MDS, refinement,
handedness, placement, backbone refinement, bond projection, O) and of the backbone stage alone
(median of ``--repeat`` runs), backbone (N, CA, C) RMSD, CA TM-score, the largest bond-length
deviation from ideal after the refinement and in the output, and the largest atom move of the
final bond projection. One JSON line per (L, bit depth).

Round trip: as ``benchmarks/reconstruct.py --roundtrip`` with ``backbone=True``: distributions of
backbone RMSD, CA TM-score, bond deviations and time over every single-chain protein.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

from protoken.codec import dequantize, features_to_image, quantize
from protoken.evaluate import compare_with_reference
from protoken.geometry import sixd
from protoken.reconstruct import reconstruct
from protoken.structure import read_backbones

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from reconstruct import roundtrip, shared_dir  # noqa: E402  (benchmarks/reconstruct.py)


def against_length(sizes: list[int], repeat: int) -> None:
    structures = shared_dir() / "data" / "structures"
    bb = read_backbones(next(structures.glob("foldseek_large__d1y5ia2.*")))[0]
    warm = bb.coords[:40]  # import torch and warm up outside the timings
    reconstruct(features_to_image(sixd(warm[:, 0], warm[:, 1], warm[:, 2])), backbone=True)
    for length in sizes:
        coords = bb.coords[:length]
        image = features_to_image(sixd(coords[:, 0], coords[:, 1], coords[:, 2]))
        for bit_depth in (16, 8):
            img = dequantize(quantize(image, bit_depth), np.float64)
            times, stage = [], []
            for _ in range(repeat):
                t0 = time.perf_counter()
                rec = reconstruct(img, backbone=True)
                times.append(time.perf_counter() - t0)
                stage.append(rec.backbone_info["seconds"])
            m = compare_with_reference(rec, coords)
            info = rec.backbone_info
            row = {
                "L": length,
                "bit_depth": bit_depth,
                "seconds": statistics.median(times),
                "backbone_stage_seconds": statistics.median(stage),
                "bb_rmsd": m["bb_rmsd"],
                "ca_tm_score": m["ca_tm_score"],
                "cb_rmsd": m["cb_rmsd"],
                "max_bond_deviation_refined": info["max_bond_deviation_refined"],
                "bond_projection_max_shift": info["bond_projection_max_shift"],
                "max_bond_deviation": info["max_bond_deviation"],
                "refinement_evaluations": info["iterations"],
                "pairs": info["pairs"],
                "clipped_pairs": rec.clipped_pairs,
            }
            print(
                json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})
            )
            sys.stdout.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256, 512, 1024])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--roundtrip", action="store_true", help="acceptance figures instead")
    parser.add_argument("--workers", type=int, default=2, help="conversion workers")
    args = parser.parse_args()
    if args.roundtrip:
        roundtrip(args.workers, backbone=True)
    else:
        against_length(args.sizes, args.repeat)


if __name__ == "__main__":
    main()
