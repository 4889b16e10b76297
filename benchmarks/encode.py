"""Encoding throughput: proteins per second per core, from a structure file to tokens and from
a converted PNG to tokens, at L ~ 128, 256 and 512.

    python benchmarks/encode.py [--checkpoint default residue] [--repeats 8]

For each length a real protein of ../shared/data/structures near that length (single chain);
``torch.set_num_threads(1)`` (one core); each input is encoded ``--repeats`` times in batches of
``--repeats`` after a warm-up, and the best of 3 timings is reported. From a file the time
includes parsing, the 6D features and the image; from a PNG, decoding the PNG.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TARGETS = (128, 256, 512)


def pick(structures: str, target: int) -> str:
    import csv

    with open(os.path.join(structures, "MANIFEST.tsv"), newline="") as fh:
        rows = [r for r in csv.DictReader(fh, delimiter="\t")
                if r["n_models"] == "1" and r["n_chains"] == "1"]  # fmt: skip
    best = min(rows, key=lambda r: abs(int(r["n_protein_residues_first_chain"]) - target))
    return os.path.join(structures, best["file"])


def rate(tok, sources: list, repeats: int) -> float:
    tok.batch_size = repeats
    list(tok.encode_many(sources[:1]))  # warm-up
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        tokens = list(tok.encode_many(sources))
        best = min(best, time.perf_counter() - t0)
    assert len(tokens) == len(sources)
    return len(sources) / best


def main(argv: list[str] | None = None) -> int:
    import torch

    from protoken.convert import ConvertOptions, convert
    from protoken.tokenizer import Tokenizer

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", nargs="+", default=["default", "residue"])
    p.add_argument("--repeats", type=int, default=8)
    p.add_argument("--structures", default=os.path.join(ROOT, "..", "shared", "data", "structures"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    files = {t: pick(args.structures, t) for t in TARGETS}
    with tempfile.TemporaryDirectory() as tmp:
        convert(list(files.values()), ConvertOptions(out=tmp), workers=1, progress=False)
        pngs = {}
        for root, _, names in os.walk(tmp):
            for n in names:
                if n.endswith(".png"):
                    pngs[n[: -len(".png")]] = os.path.join(root, n)
        for name in args.checkpoint:
            tok = Tokenizer.load(name, device="cpu")
            for t, path in files.items():
                sid = os.path.basename(path).split(".")[0]
                item = tok.prepare(path, chains="first", models="first")[0]
                row = {
                    "checkpoint": name,
                    "family": tok.family,
                    "target_length": t,
                    "length": int(item.image.shape[-1]),
                    "protein": sid,
                    "from_file_per_s_per_core": round(rate(tok, [path] * args.repeats,
                                                           args.repeats), 2),
                    "from_png_per_s_per_core": round(rate(tok, [pngs[sid]] * args.repeats,
                                                          args.repeats), 2),
                }  # fmt: skip
                print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
