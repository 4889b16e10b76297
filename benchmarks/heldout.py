"""The held-out test set of the bundled tokenizers: proteins of ../shared/data/structures that
share no sequence with the training set (../shared/data/train, BM5).

    python benchmarks/heldout.py [--structures ../shared/data/structures]
                                 [--train ../shared/data/train]

How "share no sequence" is checked: every protein chain of every training file (all chains,
first model) and the evaluated chain of each candidate (the first chain of the first model,
as ``protoken evaluate --chains first --models first`` reads it) are cut into overlapping
8-mers of their one-letter sequence; a candidate is held out when at most 2% of its 8-mers
occur in any training chain (unrelated proteins share essentially none; a 2% allowance keeps
proteins that share only a tag or a short linker) and it is 40-1024 residues long. Candidates
with an identical sequence are kept once (the first file in name order: several entries are
given as .cif and .pdb). Writes ``configs/heldout.tsv`` (every candidate: file, length, shared
8-mer fraction, decision) and ``src/protoken/resources/structures/HELDOUT.txt`` (the bundled
structures that share no sequence with the training set, duplicates among themselves allowed:
what ``protoken demo`` evaluates); prints the counts.
"""

from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
K = 8
MAX_SHARED = 0.02
MIN_LEN, MAX_LEN = 40, 1024


def read_heldout(structures: str, min_len: int = MIN_LEN, max_len: int = MAX_LEN) -> list[str]:
    """Paths of the held-out files of ``configs/heldout.tsv`` of ``min_len``-``max_len``
    residues, in name order (what the benchmarks evaluate)."""
    out = []
    with open(os.path.join(ROOT, "configs", "heldout.tsv")) as fh:
        header = fh.readline().rstrip("\n").split("\t")
        for line in fh:
            row = dict(zip(header, line.rstrip("\n").split("\t"), strict=True))
            if row["decision"] == "held out" and min_len <= int(row["length"]) <= max_len:
                out.append(os.path.join(structures, row["file"]))
    return out


STRUCTURES = os.path.join(ROOT, "..", "shared", "data", "structures")


def heldout_residue_args(ap: argparse.ArgumentParser) -> None:
    """The arguments of the per-residue benchmarks over the held-out set: ``--tokenizer``
    (bundled name or checkpoint path) and ``--structures``."""
    ap.add_argument("--tokenizer", default="residue", help="bundled name or checkpoint path")
    ap.add_argument("--structures", default=STRUCTURES)


def residue_tokenizer(spec: str, structures: str, who: str):
    """The per-residue tokenizer ``spec`` on the CPU; exits with a one-line reason when
    ``structures`` is missing or ``spec`` is of another family."""
    from protoken.tokenizer import Tokenizer

    if not os.path.isdir(structures):
        sys.exit(f"{who}: {structures} not found (../shared/data/structures)")
    tok = Tokenizer.load(spec, device="cpu")
    if tok.family != "residue":
        sys.exit(f"{who}: {spec} is not a per-residue tokenizer")
    return tok


def kmers(seq: str, k: int = K) -> set[str]:
    return {seq[i : i + k] for i in range(len(seq) - k + 1)}


def structure_files(folder: str) -> list[str]:
    from protoken.inputs import is_structure_name

    return sorted(os.path.join(folder, f) for f in os.listdir(folder) if is_structure_name(f))


def main(argv: list[str] | None = None) -> int:
    from protoken.fileio import atomic_write, write_tsv
    from protoken.structure import read_backbones

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    shared = os.path.join(ROOT, "..", "shared", "data")
    p.add_argument("--structures", default=os.path.join(shared, "structures"))
    p.add_argument("--train", default=os.path.join(shared, "train"))
    p.add_argument("--promod3", default=os.path.join(shared, "promod3", "chains.tsv"),
                   help="chains.tsv of the ProMod3 training set (its sequences count as training "
                        "chains too); '' to leave it out")  # fmt: skip
    p.add_argument("--out", default=os.path.join(ROOT, "configs", "heldout.tsv"))
    args = p.parse_args(argv)
    for folder in (args.structures, args.train):
        if not os.path.isdir(folder):
            print(f"heldout: {folder} not found (the shared data folder)", file=sys.stderr)
            return 1

    train_kmers: set[str] = set()
    n_chains = 0
    for path in structure_files(args.train):
        try:
            for bb in read_backbones(path, "split", "first"):
                train_kmers |= kmers(bb.sequence)
                n_chains += 1
        except Exception:  # noqa: BLE001 - an unreadable training file adds no k-mers
            continue
    if args.promod3:
        with open(args.promod3) as fh:
            header = fh.readline().rstrip("\n").split("\t")
            col = header.index("sequence")
            for line in fh:
                train_kmers |= kmers(line.rstrip("\n").split("\t")[col])
                n_chains += 1
    print(f"training set: {n_chains} chains, {len(train_kmers)} distinct {K}-mers")

    rows, seen, held, unshared = [], set(), [], set()
    bundled = set(os.listdir(os.path.join(ROOT, "src", "protoken", "resources", "structures")))
    for path in structure_files(args.structures):
        name = os.path.basename(path)
        row = {"file": name, "length": "", "shared_kmer_fraction": "", "decision": ""}
        try:
            bb = read_backbones(path, "first", "first")[0]
        except Exception as exc:  # noqa: BLE001 - recorded
            row["decision"] = f"unreadable: {' '.join(str(exc).split())[:80]}"
            rows.append(row)
            continue
        mers = kmers(bb.sequence)
        shared_frac = len(mers & train_kmers) / max(len(mers), 1)
        row["length"], row["shared_kmer_fraction"] = len(bb), round(shared_frac, 4)
        if not MIN_LEN <= len(bb) <= MAX_LEN:
            row["decision"] = "length outside 40-1024"
        elif shared_frac > MAX_SHARED:
            row["decision"] = "shares sequence with training"
        elif bb.sequence in seen:
            row["decision"] = "duplicate sequence"
            unshared.add(name)
        else:
            row["decision"] = "held out"
            seen.add(bb.sequence)
            held.append(name)
            unshared.add(name)
        rows.append(row)
    write_tsv(args.out, ("file", "length", "shared_kmer_fraction", "decision"), rows)
    # the bundled copies are the shared files, gzipped when they were not
    in_bundle = sorted(b for b in bundled if b in unshared or b.removesuffix(".gz") in unshared)
    listing = os.path.join(ROOT, "src", "protoken", "resources", "structures", "HELDOUT.txt")
    atomic_write(listing, "# written by benchmarks/heldout.py\n" + "\n".join(in_bundle) + "\n")
    counts: dict[str, int] = {}
    for r in rows:
        key = r["decision"].split(":")[0]
        counts[key] = counts.get(key, 0) + 1
    print(f"{len(rows)} candidates: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
    print(f"held out: {len(held)} ({len(in_bundle)} of them bundled) -> {args.out}, {listing}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
