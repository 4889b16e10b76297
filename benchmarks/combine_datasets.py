"""Several folders written by ``protoken convert`` as one training folder, without copying an
image: PNGs and tar shards are hard-linked (symlinked across file systems), manifests and shard
indexes merged. How the bundled tokenizers train on single chains and complexes together.

    python benchmarks/combine_datasets.py data/promod3 data/bm5-complexes-shards --out data/mix

The folders must agree on the image codec (``dmax``, bit depth: their ``convert.json``) and on
the format (all loose PNGs, or all shards: the index reads shards when a folder has any). Each
source's shards get a tag of their own (``s0``, ``s1`` ...: ``shards/BIN/sK-NNNNNN.tar`` and
``shards/index.sK.tsv``); the manifests are concatenated under the union of their columns (a
complex keeps its ``chains``). An id found in two sources is an error (rename before combining).
The combined ``convert.json`` is the first source's, with ``"combined"`` listing the sources.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys


def _link(src: str, dst: str) -> None:
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        os.symlink(os.path.abspath(src), dst)


def _rows(path: str) -> tuple[list[str], list[dict]]:
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
        return list(reader.fieldnames or []), list(reader)


def combine(sources: list[str], out: str) -> dict:
    """Combine ``sources`` into ``out`` (which must not exist); returns counts."""
    if os.path.exists(out):
        raise FileExistsError(f"{out} exists")
    settings = [json.load(open(os.path.join(s, "convert.json"))) for s in sources]
    codec = {(s["dmax"], s["bit_depth"]) for s in settings}
    if len(codec) > 1:
        raise ValueError(f"the sources' images differ in dmax / bit depth: {sorted(codec)}")
    sharded = [os.path.isdir(os.path.join(s, "shards")) for s in sources]
    if len(set(sharded)) > 1:
        raise ValueError("mix of sharded and loose folders: convert them to one format")
    os.makedirs(out)
    header: list[str] = []
    rows: list[dict] = []
    seen: set[str] = set()
    for k, src in enumerate(sources):
        cols, mine = _rows(os.path.join(src, "manifest.tsv"))
        header += [c for c in cols if c not in header]
        for r in mine:
            if r["status"] == "ok":
                if r["id"] in seen:
                    raise ValueError(f"id {r['id']} is in two sources")
                seen.add(r["id"])
        rows += mine
        if sharded[k]:
            tag = f"s{k}"
            folder = os.path.join(src, "shards")
            for name in sorted(os.listdir(folder)):
                if not (name.startswith("index.") and name.endswith(".tsv")):
                    continue
                old_tag = name[len("index.") : -len(".tsv")]
                cols_i, index_rows = _rows(os.path.join(folder, name))
                for r in index_rows:
                    bin_, shard = r["shard"].split("/")
                    new = f"{bin_}/{tag}{shard[len(old_tag) :]}"
                    dst = os.path.join(out, "shards", new)
                    if not os.path.exists(dst):
                        _link(os.path.join(folder, r["shard"]), dst)
                    r["shard"] = new
                with open(os.path.join(out, "shards", f"index.{tag}.tsv"), "a", newline="") as fh:
                    w = csv.DictWriter(fh, cols_i, delimiter="\t", quoting=csv.QUOTE_NONE,
                                       lineterminator="\n")  # fmt: skip
                    if fh.tell() == 0:
                        w.writeheader()
                    w.writerows(index_rows)
        else:
            for name in os.listdir(src):
                if name.startswith("bin_") and os.path.isdir(os.path.join(src, name)):
                    for png in os.listdir(os.path.join(src, name)):
                        _link(os.path.join(src, name, png), os.path.join(out, name, png))
    with open(os.path.join(out, "manifest.tsv"), "w", newline="") as fh:
        w = csv.DictWriter(fh, header, delimiter="\t", quoting=csv.QUOTE_NONE,
                           lineterminator="\n", restval="")  # fmt: skip
        w.writeheader()
        w.writerows(rows)
    merged = {**settings[0], "combined": [os.path.abspath(s) for s in sources]}
    with open(os.path.join(out, "convert.json"), "w") as fh:
        json.dump(merged, fh, indent=1)
    return {"sources": len(sources), "images": len(seen), "manifest_rows": len(rows)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("sources", nargs="+")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    try:
        print(json.dumps(combine(args.sources, args.out)))
    except (OSError, ValueError) as exc:
        print(f"combine_datasets: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
