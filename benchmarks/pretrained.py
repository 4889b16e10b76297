"""Release and score the bundled tokenizers (``protoken/resources/pretrained``).

    python benchmarks/pretrained.py release NAME RUN/best.pt --config configs/NAME.yaml \\
        --cpu-hours H        # export weights (safetensors) + JSON, score, write the model card
    python benchmarks/pretrained.py score NAME   # recompute the card's held-out figures

The test set is ``configs/heldout.tsv`` (``benchmarks/heldout.py``): every protein of
../shared/data/structures of 40-1024 residues that shares no sequence 8-mer (at most 2%) with
the training set, duplicates removed. It never chose a checkpoint: training keeps ``best.pt`` by
the validation loss of the BM5 validation split (10% of the complexes), a different set.
Each protein: structure -> image (the tokenizer's dmax, 8-bit) -> tokens -> image -> 3D (MDS,
handedness, refinement, full backbone) against the true structure; and the same without the
tokenizer (the ceiling). ``score`` prints the figures next to those in the JSON and fails when
they differ by more than 0.005 (TM-score) / 0.05 A (RMSD).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SHARED = os.path.join(ROOT, "..", "shared", "data")


def score(name: str, structures: str, workers: int, out: str, limit: int | None = None) -> dict:
    from heldout import read_heldout
    from protoken.evaluate import evaluate
    from protoken.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained(name, device="cpu")
    files = read_heldout(structures)[:limit]
    s = evaluate(tok, files, out, backbone=True, workers=workers, progress=False,
                 chains="first", models="first", log=lambda *a: None)  # fmt: skip
    return {
        "test_set": "configs/heldout.tsv (held out, 40-1024 residues)",
        "proteins": s["proteins"],
        "tm_score_median": round(s["tm_score"]["median"], 4),
        "tm_score_mean": round(s["tm_score"]["mean"], 4),
        "cb_rmsd_median": round(s["cb_rmsd"]["median"], 3),
        "lddt_median": round(s["lddt"]["median"], 4),
        "bb_rmsd_median": round(s["bb_rmsd"]["median"], 3),
        "fraction_tm_above_0.5": round(s["fraction_tm_above_0.5"], 4),
        "bits_per_residue_median": round(s["bits_per_residue"]["median"], 2),
        "tokens_per_residue_median": round(s["tokens_per_residue"]["median"], 3),
        "codebook_usage": s["codebook_usage_per_level_coarsest_first"],
        "mirror_images": s["mirror_images"],
        "mirrored_before_fix": s["mirrored_before_fix"],
        "ceiling_tm_score_median": round(s["ceiling_tm_score"]["median"], 4),
        "ceiling_cb_rmsd_median": round(s["ceiling_cb_rmsd"]["median"], 3),
        "by_length": [
            {k: (round(v, 4) if isinstance(v, float) else v) for k, v in b.items()}
            for b in s["by_length"]
        ],  # fmt: skip
    }


CARD = """# protoken tokenizer `{name}`

{summary}

- **Family**: {family} (preset `{preset}`, {params:.2f} M weights); {layout}.
- **Load**: `Tokenizer.from_pretrained("{name}")`, `protoken encode FILES -c {name} --out t.npz`
  (offline: the weights ship in the package as `{name}.safetensors`, sha256 `{sha}`).

## Training data

../shared/data/train: 904 PDB files of the protein-protein Docking Benchmark 5 (BM5-clean,
Apache-2.0; `MANIFEST.tsv` there gives each file's source and sha256), converted with
`protoken convert ../shared/data/train --out data/bm5 --chains split --models first`:
{n_images} chain images of 40-1024 residues ({n_skipped} chains skipped: too short or too
long). Split by
complex id (`split_key_regex: {split}`, the 4 characters before the first `_`), because the bound
and unbound files of one protein are near-duplicates: {n_train} training / {n_val} validation
images (10% of the complexes). The validation split chose the checkpoint (lowest validation
loss); it is not the test set.

## Compute

{steps} optimiser steps of batch {batch} (random diagonal crops of <= {crop} residues), AdamW,
lr {lr} with warm-up and cosine decay, fp32 on CPU (bf16 autocast brought no speed-up on this
CPU), one thread, about {cpu_hours} CPU-hours on a shared 2-core machine.{schedule_note}

Config (`{config_path}`):

```yaml
{config}
```

## Held-out results

Test set: `configs/heldout.tsv` (written by `benchmarks/heldout.py`): the {proteins} proteins of
../shared/data/structures (PDB entries, SCOPe / CATH / Pfam domains, AlphaFold and other
predicted models) of 40-1024 residues whose sequence shares at most 2% of its 8-mers with any
training chain (unrelated proteins share none), duplicates removed; first chain, first model.
Structure -> image -> tokens -> image -> 3D (MDS, handedness, refinement, full backbone),
compared with the true structure. *Ceiling*: the same without the tokenizer (the exact
image -> 3D path, 8-bit images).

| metric | median |
|---|---|
| TM-score (Cb) | {tm:.3f} (mean {tm_mean:.3f}; > 0.5 for {frac:.0%}) |
| Cb RMSD | {cb:.2f} A |
| lDDT (Cb) | {lddt:.3f} |
| backbone RMSD | {bb:.2f} A |
| tokens / bits per residue | {tpr:g} / {bpr:g} |
| codebook use on the test set | {usage} |
| mirror images left / mirrored before fix | {mirror} / {mirrored} |
| ceiling: TM-score / Cb RMSD | {ctm:.3f} / {ccb:.3f} A |

By length (medians):

| residues | proteins | TM-score | Cb RMSD (A) | lDDT | ceiling TM-score |
|---|---|---|---|---|---|
{by_length}

"Mirrored before fix": distances alone give a structure or its mirror image; reconstruction
picks the hand that agrees with the decoded image's omega and theta channels, and this counts
the proteins whose first solution had the wrong hand. "Mirror images left": reconstructions that
still superpose better onto the truth after a reflection.

## Limitations

- Single chains only (complexes are split into chains), 40-1024 residues; the image describes
  the backbone through virtual C-beta atoms (no side chains).
- Trained on CPU-scale data (~800 chains of one benchmark of protein complexes, {steps} steps):
  far below the peers' PDB- or AlphaFold-DB-scale training; expect lower quality on folds
  unlike BM5's (antibodies, enzymes, inhibitors) and on long chains (few in training).
- Tokens depend on the weights: tokens made with one bundled model decode only with it
  (token files record the model's id).

## Reproduce

```bash
protoken convert ../shared/data/train --out data/bm5 --chains split --models first
protoken train --config {config_path}                       # resume: add --resume
python benchmarks/pretrained.py release {name} runs/{name}/best.pt --config {config_path} \\
    --cpu-hours {cpu_hours}
python benchmarks/pretrained.py score {name}                 # recompute the figures above
```
"""


def write_card(name: str, meta: dict, config_path: str, extra_note: str) -> str:
    import yaml

    r, prov, mc = meta["results"], meta["provenance"], meta["model_config"]
    cfg = yaml.safe_load(open(os.path.join(ROOT, config_path)))
    rows = "\n".join(
        f"| {b['lengths']} | {b['proteins']} | {b['tm_score']:.3f} | {b['cb_rmsd']:.2f} | "
        f"{b['lddt']:.3f} | {b.get('ceiling_tm_score', float('nan')):.3f} |"
        for b in r["by_length"]
    )
    layout = ("one token per residue, aligned with the sequence" if mc["family"] == "residue"
              else "grids of tokens per level (their number grows with L^2)")  # fmt: skip
    text = CARD.format(
        name=name, summary=meta["summary"], family=mc["family"], preset=prov.get("preset", ""),
        params=prov.get("weights", 0) / 1e6, layout=layout, sha=meta["sha256"][:16],
        n_images=meta["data"]["images"], n_skipped=meta["data"]["skipped"],
        split=cfg.get("split_key_regex"),
        n_train=meta["data"]["train"], n_val=meta["data"]["val"], steps=prov.get("step"),
        batch=cfg.get("batch_size"), crop=cfg.get("crop"), lr=cfg.get("lr"),
        cpu_hours=meta["cpu_hours"], schedule_note=extra_note, config_path=config_path,
        config=open(os.path.join(ROOT, config_path)).read().strip(), proteins=r["proteins"],
        tm=r["tm_score_median"], tm_mean=r["tm_score_mean"], frac=r["fraction_tm_above_0.5"],
        cb=r["cb_rmsd_median"], lddt=r["lddt_median"], bb=r["bb_rmsd_median"],
        tpr=r["tokens_per_residue_median"], bpr=r["bits_per_residue_median"],
        usage=", ".join(f"{100 * u:.0f}%" for u in r["codebook_usage"]),
        mirror=r["mirror_images"], mirrored=r["mirrored_before_fix"],
        ctm=r["ceiling_tm_score_median"], ccb=r["ceiling_cb_rmsd_median"], by_length=rows,
    )  # fmt: skip
    return text


def main(argv: list[str] | None = None) -> int:
    from protoken import pretrained

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    rel = sub.add_parser("release")
    rel.add_argument("name")
    rel.add_argument("checkpoint")
    rel.add_argument("--config", required=True)
    rel.add_argument("--cpu-hours", type=float, required=True)
    rel.add_argument("--summary", default="")
    rel.add_argument("--note", default="", help="an extra sentence for the Compute section")
    sc = sub.add_parser("score")
    sc.add_argument("name")
    for q in (rel, sc):
        q.add_argument("--structures", default=os.path.join(SHARED, "structures"))
        q.add_argument("--workers", type=int, default=2)
        q.add_argument("--out", default=os.path.join(ROOT, "runs", "pretrained-eval"))
        q.add_argument("--limit", type=int, help="score only the first N proteins (a dry run)")
    args = p.parse_args(argv)

    if args.cmd == "release":
        from protoken import checkpoint
        from protoken.data import ImageIndex

        ckpt = checkpoint.load(args.checkpoint)
        cfg = ckpt["config"]
        index = ImageIndex.build(os.path.join(ROOT, cfg["data"]))
        split = [len(index.split_rows(k, cfg["valid_frac"], cfg["split_key_regex"]))
                 for k in ("train", "val")]  # fmt: skip
        with open(os.path.join(ROOT, cfg["data"], "manifest.tsv")) as fh:
            skipped = sum("\tskipped\t" in line for line in fh)
        data = {"images": len(index), "skipped": skipped, "train": split[0], "val": split[1]}
        mc = ckpt["model_config"]
        bits = "12" if mc.get("family") == "residue" else "grid"
        summary = args.summary or (
            "One token per residue (FSQ, 4096 codes, 12 bits per residue)." if bits == "12"
            else "Hierarchical VQ-VAE: grids of tokens at three levels.")  # fmt: skip
        path = pretrained.export(args.checkpoint, args.name, summary=summary, data=data,
                                 cpu_hours=args.cpu_hours, config=args.config)  # fmt: skip
        meta = json.load(open(path))
        meta["results"] = score(args.name, args.structures, args.workers,
                                os.path.join(args.out, args.name), args.limit)  # fmt: skip
        with open(path, "w") as fh:
            json.dump(meta, fh, indent=1)
            fh.write("\n")
        card = write_card(args.name, meta, args.config, args.note)
        with open(os.path.join(os.path.dirname(path), f"{args.name}.md"), "w") as fh:
            fh.write(card)
        print(json.dumps(meta["results"], indent=1))
        return 0

    meta = pretrained.info(args.name)
    got = score(args.name, args.structures, args.workers, os.path.join(args.out, args.name),
                args.limit)  # fmt: skip
    want = meta.get("results", {})
    bad = []
    for key, tol in (("tm_score_median", 0.005), ("cb_rmsd_median", 0.05),
                     ("bb_rmsd_median", 0.05), ("lddt_median", 0.005)):  # fmt: skip
        print(f"{key}: card {want.get(key)}  now {got[key]}")
        if want.get(key) is None or abs(want[key] - got[key]) > tol:
            bad.append(key)
    if bad:
        print(f"score: the card's {', '.join(bad)} do not match", file=sys.stderr)
        return 1
    print("score: the card's figures are reproduced")
    return 0


if __name__ == "__main__":
    sys.exit(main())
