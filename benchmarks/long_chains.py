"""Long chains: does a per-residue tokenizer decode them in one piece as well as in pieces?

    python benchmarks/long_chains.py [--tokenizer residue] [--window 300] [--min-len 400]
                                     [--stages 1] [--json OUT]

For each held-out protein of ``configs/heldout.tsv`` of at least ``--min-len`` residues (first
chain, first model), in one decoder pass (no refinement, so the figures isolate the model):

- ``one piece``: the whole chain encoded and decoded; TM-score of the decoder's CA;
- per window of ``--window`` residues (starts every half window): the window's image encoded
  and decoded alone (``alone``) against the one-piece decoding on the same residues (``in
  one piece``, superposed on those residues only), and the fraction of the window's stage-1
  codes that equal the one-piece codes of the same residues (``codes agree``).

If the windows alone decode far better than the same residues in one piece, the model does not
carry what it learned on its training crops over to longer chains (the cure is training on
longer crops). If the codes of a residue change with the window, the tokens are not local:
tokens of different windows cannot be mixed, so encoding and decoding a long chain in
overlapping windows and stitching them does not work either (measured 2026-12-07 on the
stage-4 `residue`: 0.35 against 0.41 in one piece; see docs/rate_distortion.md).
Prints a line per protein and the medians; ``--json`` writes them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from heldout import heldout_residue_args, read_heldout, residue_tokenizer  # noqa: E402


def _decode_ca(tok, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Encode ``image`` alone and decode it in one pass: (codes (L, K), CA (L, 3))."""
    (codes,) = tok.encode_images([image])[0]
    n = image.shape[-1]
    _, ca, _ = tok.model.decode_backbone(tok.model.batch_codes([[codes]], [n]), [n])
    return codes, ca[0, :n].double().cpu().numpy()


def measure(tok, path: str, window: int) -> dict:
    """One protein's figures (see the module docstring)."""
    from protoken.metrics import tm_score

    item = tok.prepare(path, chains="first", models="first")[0]
    true_ca = item.backbone[:, 1]
    length = true_ca.shape[0]
    codes, ca = _decode_ca(tok, item.image)
    row = {"file": os.path.basename(path), "length": length,
           "one_piece_tm": tm_score(ca, true_ca), "windows": []}  # fmt: skip
    for s in range(0, max(length - window, 0) + 1, max(window // 2, 1)):
        e = min(s + window, length)
        win_codes, win_ca = _decode_ca(tok, item.image[:, s:e, s:e])
        row["windows"].append({
            "start": s, "end": e,
            "alone_tm": tm_score(win_ca, true_ca[s:e]),
            "in_one_piece_tm": tm_score(ca[s:e], true_ca[s:e]),
            "codes_agree": float((win_codes[:, 0] == codes[s:e, 0]).mean()),
        })  # fmt: skip
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    heldout_residue_args(ap)
    ap.add_argument("--window", type=int, default=300)
    ap.add_argument("--min-len", type=int, default=400)
    ap.add_argument("--max-len", type=int, default=1024)
    ap.add_argument("--stages", type=int, default=1)
    ap.add_argument("--limit", type=int, default=None, help="first N proteins only")
    ap.add_argument("--json", default=None, help="write the rows and medians here")
    args = ap.parse_args(argv)

    tok = residue_tokenizer(args.tokenizer, args.structures, "long_chains")
    tok.stages = args.stages
    files = read_heldout(args.structures, args.min_len, args.max_len)[: args.limit]
    rows = []
    for path in files:
        row = measure(tok, path, args.window)
        rows.append(row)
        w = row["windows"]
        print(f"{row['file']:40s} L={row['length']:4d}  one piece {row['one_piece_tm']:.3f}  "
              f"windows alone {np.median([x['alone_tm'] for x in w]):.3f}  in one piece "
              f"{np.median([x['in_one_piece_tm'] for x in w]):.3f}  codes agree "
              f"{np.mean([x['codes_agree'] for x in w]):.0%}", flush=True)  # fmt: skip
    wins = [x for r in rows for x in r["windows"]]
    medians = {
        "proteins": len(rows),
        "windows": len(wins),
        "one_piece_tm": float(np.median([r["one_piece_tm"] for r in rows])),
        "window_alone_tm": float(np.median([x["alone_tm"] for x in wins])),
        "window_in_one_piece_tm": float(np.median([x["in_one_piece_tm"] for x in wins])),
        "codes_agree": float(np.mean([x["codes_agree"] for x in wins])),
    }
    print(f"{args.tokenizer}, {args.stages} stage(s), windows of {args.window}: "
          f"{medians['proteins']} proteins of {args.min_len}-{args.max_len} residues, one piece "
          f"TM {medians['one_piece_tm']:.3f}; {medians['windows']} windows alone "
          f"{medians['window_alone_tm']:.3f}, the same residues in one piece "
          f"{medians['window_in_one_piece_tm']:.3f}; stage-1 codes agree "
          f"{medians['codes_agree']:.1%}")  # fmt: skip
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"settings": vars(args), "medians": medians, "rows": rows}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
