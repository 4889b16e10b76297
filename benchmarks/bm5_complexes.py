"""BM5's bound complexes as one structure file each: the receptor and ligand files of a complex
(``XXXX_r_b-matched``, ``XXXX_l_b-matched``: the partners as bound, in the complex's frame)
written together, receptor chains first, so that ``protoken convert --chains complex`` makes
one image per complex.

    python benchmarks/bm5_complexes.py [--train ../shared/data/train] [--out data/bm5-complexes-pdb]
    protoken convert data/bm5-complexes-pdb --out data/bm5-complexes --chains complex \\
        --models first

Output: ``OUT/bm5__XXXX_complex.pdb`` (ATOM records of the receptor, TER, those of the ligand,
TER, END). A ligand chain whose id the receptor already uses is renamed to the first unused
letter (said on stderr). The ids keep the ``bm5__XXXX`` prefix, so training splits them by
complex id with the same ``split_key_regex`` as the chains (``^bm5__([0-9A-Za-z]{4})``).
"""

from __future__ import annotations

import argparse
import gzip
import os
import re
import string
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
_BOUND = re.compile(r"^bm5__([0-9A-Za-z]{4})_([rl])_b-matched\.pdb(\.gz)?$")


def _atoms(path: str) -> list[str]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", errors="replace") as fh:
        lines = []
        for line in fh:
            if line.startswith("ENDMDL"):
                break  # first model
            if line.startswith(("ATOM  ", "HETATM")):
                lines.append(line.rstrip("\n"))
    return lines


def _chains(lines: list[str]) -> list[str]:
    return list(dict.fromkeys(line[21] for line in lines))


def merge(receptor: str, ligand: str) -> tuple[str, dict[str, str]]:
    """PDB text of the receptor's then the ligand's atom records, and the ligand chain
    renames (old -> new) that kept the chain ids distinct."""
    rec, lig = _atoms(receptor), _atoms(ligand)
    used = set(_chains(rec))
    renames = {}
    for cid in _chains(lig):
        if cid in used:
            new = next(c for c in string.ascii_uppercase + string.digits if c not in used)
            renames[cid] = new
            used.add(new)
        else:
            used.add(cid)
    lig = [line[:21] + renames.get(line[21], line[21]) + line[22:] for line in lig]
    return "\n".join([*rec, "TER", *lig, "TER", "END"]) + "\n", renames


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train", default=os.path.join(ROOT, "..", "shared", "data", "train"))
    p.add_argument("--out", default=os.path.join(ROOT, "data", "bm5-complexes-pdb"))
    args = p.parse_args(argv)
    files: dict[str, dict[str, str]] = {}
    for name in sorted(os.listdir(args.train)):
        m = _BOUND.match(name)
        if m:
            files.setdefault(m.group(1), {})[m.group(2)] = os.path.join(args.train, name)
    os.makedirs(args.out, exist_ok=True)
    written = 0
    for cid, pair in sorted(files.items()):
        if set(pair) != {"r", "l"}:
            print(f"bm5_complexes: {cid}: no bound {'ligand' if 'r' in pair else 'receptor'} "
                  "file; left out", file=sys.stderr)  # fmt: skip
            continue
        text, renames = merge(pair["r"], pair["l"])
        if renames:
            print(f"bm5_complexes: {cid}: ligand chains renamed {renames}", file=sys.stderr)
        path = os.path.join(args.out, f"bm5__{cid}_complex.pdb")
        with open(path + ".tmp", "w") as fh:
            fh.write(text)
        os.replace(path + ".tmp", path)
        written += 1
    print(f"bm5_complexes: {written} complexes -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
