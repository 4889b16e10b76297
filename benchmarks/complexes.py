"""Complexes back in 3D (issue 22): held-out complexes, image -> 3D (the ceiling) and, given
tokenizers, structures -> tokens -> 3D, scored by interface (DockQ) and as a whole.

    python benchmarks/complexes.py [--bit-depth 8] [--workers 2]
                                   [--checkpoint NAME_OR_PATH ...] [--stages K] [--refine N]
                                   [--structures ../shared/data/structures]
                                   [--train ../shared/data/train]
                                   [--promod3 ../shared/data/promod3/chains.tsv]
                                   [--config configs/default.yaml] [--tsv PATH]

The held-out complexes:

- the files of ../shared/data/structures that ``protoken convert --chains complex --models
  first`` reads as a complex of two protein chains or more, 40-1024 residues in all, none of
  whose chains shares sequence with training: a chain shares when more than 2% of its 8-mers
  occur in a chain of ../shared/data/train (BM5, every chain of every file) or of the ProMod3
  chains (../shared/data/promod3/chains.tsv), the test of ``benchmarks/heldout.py`` applied
  to each chain; complexes of the same chain sequences are kept once (the first file by name);
- the BM5 complexes held out by complex id: those whose id (the 4 characters of
  ``bm5__XXXX``) falls in the validation split of ``--config`` (its ``split_key_regex`` and
  ``valid_frac``, :func:`protoken.data.in_valid_split`: what training never sees), as bound
  in the complex: ``XXXX_r_b-matched`` and ``XXXX_l_b-matched`` in one file, receptor first
  (:func:`bm5_complexes.merge`), 40-1024 residues in all.

Ceiling: each complex's image (``sixd`` of all its residues, stored at ``--bit-depth``, the
bundled tokenizers' 8 bits by default) reconstructed without a tokenizer (MDS, handedness,
refinement, backbone) and scored by :func:`protoken.metrics.complex_scores` against the file:
DockQ (the DockQ package, on N, CA, C and Cb), fnat, interface RMSD, complex TM-score (all
residues, the known correspondence) and the worst chain's TM-score. Tokenizer rows: ``protoken
evaluate --chains complex`` (:func:`protoken.evaluate.evaluate`) of each ``--checkpoint`` on
the same complexes (per-residue tokenizers from their first ``--stages`` stages, decoded with
``--refine`` inversion steps: 0 is the decoder's one pass, about 2 minutes instead of 40); they
mean something for a chain-aware tokenizer (issue 22). Prints the
issue's table (medians, with the targets), the medians by complex size, and with ``--tsv``
writes one row per complex (the ceiling's; each tokenizer's beside it, ``TSV_STEM.NAME.tsv``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from bm5_complexes import _BOUND, merge  # noqa: E402
from heldout import MAX_SHARED, K, kmers, structure_files  # noqa: E402

MIN_LEN, MAX_LEN = 40, 1024

#: (figure, targets as text, DockQ target, complex TM target) of the issue's table.
TARGETS = {
    "ceiling": (">= 0.95 / >= 0.99", 0.95, 0.99),
    "default": (">= 0.49 / >= 0.85", 0.49, 0.85),
    "residue": (">= 0.23 / >= 0.6", 0.23, 0.6),
}


# --------------------------------------------------------------------------- the held-out set


def _kmers_found(candidates: set[str], sequences) -> set[str]:
    """The k-mers of ``candidates`` that occur in any of ``sequences`` (one pass over them,
    holding only the candidates' k-mers)."""
    found = set()
    for seq in sequences:
        for i in range(len(seq) - K + 1):
            mer = seq[i : i + K]
            if mer in candidates:
                found.add(mer)
    return found


def _training_sequences(train: str, promod3: str):
    """Every chain sequence of the training data: BM5's (all chains, first model) and the
    ProMod3 chains (chains.tsv's ``sequence`` column)."""
    from protoken.structure import read_backbones

    for path in structure_files(train):
        try:
            for bb in read_backbones(path, "split", "first"):
                yield bb.sequence
        except Exception:  # noqa: BLE001 - an unreadable training file adds nothing
            continue
    if promod3 and os.path.isfile(promod3):
        with open(promod3) as fh:
            col = fh.readline().rstrip("\n").split("\t").index("sequence")
            for line in fh:
                yield line.rstrip("\n").split("\t")[col]


def held_out_structures(structures: str, train: str, promod3: str, log=print) -> list:
    """``[(name, Backbone)]``: the multi-chain files of ``structures`` (``n_chains`` > 1 in its
    MANIFEST.tsv) held out (see the module docstring), in name order; ``log`` hears the count
    of each decision."""
    import csv
    import re

    from protoken.structure import read_backbones

    with open(os.path.join(structures, "MANIFEST.tsv"), newline="") as fh:
        multi = sorted(r["file"] for r in csv.DictReader(fh, delimiter="\t")
                       if int(r["n_chains"]) > 1)  # fmt: skip
    complexes, decisions = [], {}

    def decide(key: str) -> None:
        decisions[key] = decisions.get(key, 0) + 1

    for name in multi:
        try:
            (bb,) = read_backbones(os.path.join(structures, name), "complex", "first")
        except Exception as exc:  # noqa: BLE001 - recorded
            decide(f"refused ({re.split(r'[:(]', str(exc))[0].strip()})")
            continue
        if len(bb.chains) < 2:
            decide("fewer than 2 protein chains of 5 residues")
        elif not MIN_LEN <= len(bb) <= MAX_LEN:
            decide(f"length outside {MIN_LEN}-{MAX_LEN}")
        else:
            complexes.append((name, bb))
    chains = [_chain_sequences(bb) for _, bb in complexes]
    wanted = set().union(*(kmers(s) for seqs in chains for s in seqs)) if chains else set()
    found = _kmers_found(wanted, _training_sequences(train, promod3))
    out, seen = [], set()
    for (name, bb), seqs in zip(complexes, chains, strict=True):
        shared = max(len(kmers(s) & found) / max(len(kmers(s)), 1) for s in seqs)
        if shared > MAX_SHARED:
            decide("a chain shares sequence with training")
        elif tuple(seqs) in seen:
            decide("duplicate complex")
        else:
            decide("held out")
            seen.add(tuple(seqs))
            out.append((name, bb))
    log(f"structures ({len(multi)} multi-chain files): "
        + ", ".join(f"{v} {k}" for k, v in sorted(decisions.items())))  # fmt: skip
    return out


def _chain_sequences(bb) -> list[str]:
    out, start = [], 0
    for _, n in bb.chains:
        out.append(bb.sequence[start : start + n])
        start += n
    return out


def held_out_bm5(train: str, config: str, log=print) -> list:
    """``[(name, Backbone, text)]``: BM5's bound complexes in the validation split of
    ``config`` (see the module docstring), ``text`` the merged PDB file."""
    import re

    import yaml

    from protoken.data import in_valid_split
    from protoken.structure import read_backbones

    with open(config) as fh:
        cfg = yaml.safe_load(fh)
    pattern = re.compile(cfg.get("split_key_regex") or r"^bm5__([0-9A-Za-z]{4})")
    valid_frac = float(cfg.get("valid_frac", 0.1))
    files: dict[str, dict[str, str]] = {}
    for name in sorted(os.listdir(train)):
        m = _BOUND.match(name)
        if m:
            files.setdefault(m.group(1), {})[m.group(2)] = os.path.join(train, name)
    out, counts = [], {"held out": 0, "in training": 0, "incomplete": 0, "too long": 0}
    for cid, pair in sorted(files.items()):
        name = f"bm5__{cid}_complex"
        m = pattern.search(name)
        if not (m and in_valid_split(m.group(1), valid_frac)):
            counts["in training"] += 1
            continue
        if set(pair) != {"r", "l"}:
            counts["incomplete"] += 1
            continue
        text, _ = merge(pair["r"], pair["l"])
        (bb,) = read_backbones(name + ".pdb", "complex", "first", data=text.encode())
        if not MIN_LEN <= len(bb) <= MAX_LEN:
            counts["too long"] += 1
            continue
        counts["held out"] += 1
        out.append((name, bb, text))
    log(f"BM5 complexes (validation split of {os.path.relpath(config, ROOT)}, valid_frac "
        f"{valid_frac}): " + ", ".join(f"{v} {k}" for k, v in counts.items()))  # fmt: skip
    return out


# --------------------------------------------------------------------------- the ceiling


def _ceiling(task) -> dict:
    """One complex's image (at ``bit_depth``) -> 3D with the backbone -> its scores."""
    name, bb, dmax, bit_depth = task
    from protoken.codec import dequantize, features_to_image, quantize
    from protoken.evaluate import complex_row
    from protoken.geometry import sixd, virtual_cb
    from protoken.reconstruct import reconstruct

    t0 = time.perf_counter()
    image = features_to_image(sixd(bb.n, bb.ca, bb.c, dmax=dmax), dmax)
    image = dequantize(quantize(image, bit_depth))
    rec = reconstruct(image, dmax=dmax, backbone=True)
    truth = {"N": bb.n, "CA": bb.ca, "C": bb.c, "CB": virtual_cb(bb.n, bb.ca, bb.c)}
    row = {"id": name, "length": len(bb), "n_chains": len(bb.chains)}
    row.update({f"ceiling_{k}": v for k, v in complex_row(rec, truth, bb.chains,
                                                          bb.sequence).items()})  # fmt: skip
    row["ceiling_clipped_pairs"] = rec.clipped_pairs
    row["seconds"] = time.perf_counter() - t0
    return row


def _single_thread() -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:  # pragma: no cover
        pass


# --------------------------------------------------------------------------- printing


def _median(rows, key) -> float:
    vals = [r[key] for r in rows if key in r]
    return float(np.median(vals)) if vals else float("nan")


def _size_table(rows, prefix: str) -> list[str]:
    from protoken.evaluate import by_complex_size

    size = by_complex_size(rows)
    lines = []
    for key, title in (("chains", "chains"), ("residues", "residues")):
        lines += [
            f"| {title} | complexes | DockQ median | complex TM median |",
            "|---|---|---|---|",
        ]
        for e in size[key]:
            dq, tm = e.get(f"{prefix}dockq"), e.get(f"{prefix}complex_tm_score")
            lines.append(f"| {e[key]} | {e['complexes']} | "
                         f"{'' if dq is None else f'{dq:.3f}'} | "
                         f"{'' if tm is None else f'{tm:.3f}'} |")  # fmt: skip
        lines.append("")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    shared = os.path.join(ROOT, "..", "shared", "data")
    p.add_argument("--structures", default=os.path.join(shared, "structures"))
    p.add_argument("--train", default=os.path.join(shared, "train"))
    p.add_argument("--promod3", default=os.path.join(shared, "promod3", "chains.tsv"))
    p.add_argument("--config", default=os.path.join(ROOT, "configs", "default.yaml"),
                   help="training config whose split holds BM5 complexes out")  # fmt: skip
    p.add_argument("--bit-depth", type=int, default=8, choices=(8, 16))
    p.add_argument("--dmax", type=float, default=80.0)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--checkpoint", action="append", default=[], metavar="NAME_OR_PATH",
                   help="a tokenizer to evaluate on the complexes (repeatable)")  # fmt: skip
    p.add_argument("--stages", type=int, default=None,
                   help="per-residue tokenizers: the first K stages")  # fmt: skip
    p.add_argument("--refine", type=int, default=None,
                   help="per-residue tokenizers: decoding-by-inversion steps (0: the decoder's "
                        "one pass; default: the tokenizer's, 100)")  # fmt: skip
    p.add_argument("--no-ceiling", action="store_true", help="the tokenizer rows only")
    p.add_argument("--tsv", default=None, help="write one row per complex here")
    p.add_argument("--limit", type=int, default=None, help="the first N complexes only")
    args = p.parse_args(argv)
    for folder in (args.structures, args.train):
        if not os.path.isdir(folder):
            print(f"complexes: {folder} not found (the shared data folder)", file=sys.stderr)
            return 1
    log = print
    structures = held_out_structures(args.structures, args.train, args.promod3, log)
    bm5 = held_out_bm5(args.train, args.config, log)
    complexes = [(n, bb) for n, bb in structures] + [(n, bb) for n, bb, _ in bm5]
    if args.limit:
        complexes = complexes[: args.limit]
    log(
        f"held-out complexes: {len(complexes)} ({len(structures)} from the structures, "
        f"{len(bm5)} from BM5); chains per complex: "
        + ", ".join(f"{k}: {v}" for k, v in sorted(_count(bb for _, bb in complexes).items()))
    )

    t0 = time.perf_counter()
    tasks = [(n, bb, args.dmax, args.bit_depth) for n, bb in complexes]
    if args.no_ceiling:
        tasks = []
    with ProcessPoolExecutor(args.workers, initializer=_single_thread) as pool:
        rows = list(pool.map(_ceiling, tasks))
    log(
        f"ceiling: {len(rows)} complexes reconstructed in {time.perf_counter() - t0:.0f} s "
        f"({args.workers} workers)"
    )
    for r in sorted(rows, key=lambda r: r.get("ceiling_dockq", 2.0))[:5]:
        log(
            f"  lowest ceiling DockQ: {r['id']} ({r['n_chains']} chains, {r['length']} residues):"
            f" DockQ {r.get('ceiling_dockq', float('nan')):.3f}, complex TM "
            f"{r['ceiling_complex_tm_score']:.4f}, clipped pairs {r['ceiling_clipped_pairs']}"
        )

    table = []
    if rows:
        table.append(("ceiling", f"ceiling: image ({args.bit_depth}-bit) -> 3D, no tokenizer",
                      _median(rows, "ceiling_dockq"),
                      _median(rows, "ceiling_complex_tm_score")))  # fmt: skip
    by_name = {r["id"]: r for r in rows}
    if args.checkpoint:
        table += _tokenizer_rows(args, complexes, bm5, by_name, log)

    print()
    print("| figure | target DockQ / complex TM | DockQ median | complex TM median |")
    print("|---|---|---|---|")
    for key, what, dq, tm in table:
        target = TARGETS.get(key, ("", None, None))[0]
        print(f"| {what} | {target} | {dq:.3f} | {tm:.4f} |")
    print()
    if rows:
        print(f"Ceiling by complex size ({len(rows)} complexes; fnat median "
              f"{_median(rows, 'ceiling_fnat'):.3f}, interface RMSD median "
              f"{_median(rows, 'ceiling_irmsd'):.3f} A, worst-chain TM median "
              f"{_median(rows, 'ceiling_chain_tm_min'):.4f}):")  # fmt: skip
        print()
        print("\n".join(_size_table(rows, "ceiling_")))
    if args.tsv:
        from protoken.fileio import write_tsv

        cols = ["id", "length", "n_chains", *sorted({k for r in rows for k in r} - {"id", "length",
                "n_chains"})]  # fmt: skip
        write_tsv(args.tsv, cols, list(by_name.values()))
        print(f"per complex: {args.tsv}")
    return 0


def _count(backbones) -> dict:
    out: dict = {}
    for bb in backbones:
        key = str(len(bb.chains)) if len(bb.chains) < 5 else "5+"
        out[key] = out.get(key, 0) + 1
    return out


def _tokenizer_rows(args, complexes, bm5, by_name, log) -> list:
    """``protoken evaluate --chains complex`` of each checkpoint on the held-out complexes:
    the structure files as they are, BM5's merged complexes written to a temporary folder."""
    from protoken.evaluate import evaluate
    from protoken.tokenizer import Tokenizer

    names = {n for n, _ in complexes}
    rows = []
    with tempfile.TemporaryDirectory(prefix="protoken-complexes-") as tmp:
        files = [os.path.join(args.structures, n) for n, _ in complexes
                 if not n.startswith("bm5__")]  # fmt: skip
        for name, _, text in bm5:
            if name in names:
                path = os.path.join(tmp, name + ".pdb")
                with open(path, "w") as fh:
                    fh.write(text)
                files.append(path)
        for spec in args.checkpoint:
            tok = Tokenizer.load(spec)
            residue = tok.family == "residue"
            if args.stages is not None and residue:
                tok.stages = args.stages
            if args.refine is not None and residue:
                tok.refine = args.refine
            out = os.path.join(tmp, "eval-" + str(len(rows)))
            t0 = time.perf_counter()
            summary = evaluate(tok, files, out, workers=args.workers, progress=False,
                               chains="complex", models="first", min_len=MIN_LEN,
                               max_len=MAX_LEN, ceiling=False, log=lambda m: None)  # fmt: skip
            name = os.path.basename(spec).removesuffix(".pt")
            key = name if name in TARGETS else spec
            stages = f", {args.stages} stage(s)" if args.stages and residue else ""
            if residue and args.refine is not None:
                stages += f", refine {args.refine}"
            dq = summary.get("dockq", {}).get("median", float("nan"))
            tm = summary.get("complex_tm_score", {}).get("median", float("nan"))
            log(f"{spec}{stages}: {summary['proteins']} complexes in "
                f"{time.perf_counter() - t0:.0f} s, DockQ median {dq:.3f}, complex TM median "
                f"{tm:.4f}; by chains: " + ", ".join(
                    f"{e['chains']}: {e.get('dockq', float('nan')):.3f}"
                    for e in summary["by_complex_size"]["chains"]))  # fmt: skip
            rows.append((key, f"`{name}`{stages}", dq, tm))
            if args.tsv:  # the tokenizer's rows per complex beside the ceiling's
                per = f"{os.path.splitext(args.tsv)[0]}.{name}.tsv"
                shutil.copyfile(os.path.join(out, "metrics.tsv"), per)
                log(f"{spec}: per complex {per}")
    return rows


if __name__ == "__main__":
    sys.exit(main())
