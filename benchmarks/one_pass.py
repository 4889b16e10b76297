"""Compare per-residue checkpoints fast: one decoder pass on the held-out set, by stage and length.

    python benchmarks/one_pass.py CHECKPOINT [CHECKPOINT ...] [--stages 1,2,4] [--threads 2]

For each checkpoint (a bundled name or a path), every protein of ``configs/heldout.tsv`` (first
chain, first model) is encoded and decoded in the decoder's one pass (no refinement: about a
minute for the 143 proteins on 2 cores, against an hour for the card's refined figures) from
its first k stages, and the CA TM-score of the decoder's backbone printed as medians over all
proteins and by length (40-99 / 100-199 / 200-399 / 400-1024 residues). It is how training runs
were compared before a release (docs/rate_distortion.md); the model cards' figures come from
``benchmarks/pretrained.py release`` (full backbone, refined and one pass).
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from heldout import STRUCTURES, read_heldout, residue_tokenizer  # noqa: E402

BINS = ((40, 99), (100, 199), (200, 399), (400, 1024))


def score(checkpoint: str, structures: str, stages: list[int]) -> np.ndarray:
    """``(proteins, 1 + len(stages))``: length, then the CA TM-score from the first k stages,
    for every held-out protein of ``structures``."""
    from protoken.metrics import tm_score

    tok = residue_tokenizer(checkpoint, structures, "one_pass")
    tok.refine, tok.stages, model = 0, None, tok.model
    rows = []
    for path in read_heldout(structures):
        item = tok.prepare(path, chains="first", models="first")[0]
        n, true_ca = item.image.shape[-1], item.backbone[:, 1]
        (codes,) = tok.encode_images([item.image])[0]
        row = [n]
        for k in stages:
            _, ca, _ = model.decode_backbone(model.batch_codes([[codes[:, :k]]], [n]), [n])
            row.append(tm_score(ca[0, :n].double().cpu().numpy(), true_ca))
        rows.append(row)
    return np.array(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkpoints", nargs="+", help="bundled names or checkpoint paths")
    ap.add_argument("--structures", default=STRUCTURES)
    ap.add_argument("--stages", default="1,2,4", help="comma-separated numbers of stages")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    stages = [int(k) for k in args.stages.split(",")]
    for checkpoint in args.checkpoints:
        a = score(checkpoint, args.structures, stages)
        cells = " / ".join(f"{np.median(a[:, i + 1]):.3f}" for i in range(len(stages)))
        print(f"{checkpoint}: {len(a)} proteins, one pass, CA TM median at {args.stages} "
              f"stages {cells}")  # fmt: skip
        for lo, hi in BINS:
            sel = a[(a[:, 0] >= lo) & (a[:, 0] <= hi)]
            cells = " / ".join(f"{np.median(sel[:, i + 1]):.3f}" for i in range(len(stages)))
            print(f"  {lo}-{hi} residues ({len(sel)}): {cells}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
