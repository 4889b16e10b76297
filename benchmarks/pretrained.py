"""Release and score the bundled tokenizers (``protoken/resources/pretrained``).

    python benchmarks/pretrained.py release NAME RUN/best.pt --config configs/NAME.yaml \\
        --cpu-hours H --notes configs/NAME.card.yaml
                             # export weights (safetensors) + JSON, score, write the model card
    python benchmarks/pretrained.py score NAME   # recompute the card's held-out figures

``--refine STEPS`` (per-residue): decoding by inversion, as ``protoken decode --refine`` (default
the tokenizer's, 100); the card then also shows the decoder's one pass at every rate. ``--jobs
N`` scores N rates at once, one core each.

The test set is ``configs/heldout.tsv`` (``benchmarks/heldout.py``): every protein of
../shared/data/structures of 40-1024 residues that shares no sequence 8-mer (at most 2%) with
the training set, duplicates removed. It never chose a checkpoint: training keeps ``best.pt`` by
the validation loss of its validation split (held out by complex or PDB id), a different set.
Each protein: structure -> image (the tokenizer's dmax, 8-bit) -> tokens -> 3D (a per-residue
decoder's own backbone; a hierarchical one's image through MDS, handedness, refinement, full
backbone) against the true structure; and the image -> 3D path without the tokenizer (the
ceiling). A per-residue tokenizer of K stages is scored at every rate (the first 1 .. K stages).
The card's prose (data, compute with the CPU-hours of every session, lineage, limitations,
how to reproduce) comes from ``--notes``; its "What the tokens know" section from
``docs/token_probes.json`` when ``benchmarks/token_probes.py`` scored these very weights.
``release --reuse-results`` releases the weights already bundled under NAME again (the same
sha256, else refused) with a new model config (e.g. a field that holds no weights, as
``benchmarks/average_weights.py --set`` changes it), config path or card prose, keeping the
held-out figures instead of re-scoring for an hour; only valid when what changed does not move
them (say so in the card). ``score`` prints the figures next to those in the JSON and fails
when they differ by more than 0.005 (TM-score) / 0.05 A (RMSD).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SHARED = os.path.join(ROOT, "..", "shared", "data")


def score(name: str, structures: str, workers: int, out: str, limit: int | None = None,
          stages: int | None = None, ceiling: bool = True,
          refine: int | None = None) -> dict:  # fmt: skip
    from heldout import read_heldout
    from protoken.evaluate import evaluate
    from protoken.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained(name, device="cpu")
    tok.stages = stages
    if refine is not None:
        tok.refine = refine
    files = read_heldout(structures)[:limit]
    s = evaluate(tok, files, out, backbone=True, workers=workers, progress=False,
                 chains="first", models="first", ceiling=ceiling,
                 log=lambda *a: None)  # fmt: skip
    res = {
        "test_set": "configs/heldout.tsv (held out, 40-1024 residues)",
        "proteins": s["proteins"],
        "structure_from": s["structure_from"],
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
        "by_length": [
            {k: (round(v, 4) if isinstance(v, float) else v) for k, v in b.items()}
            for b in s["by_length"]
        ],  # fmt: skip
    }
    if stages is not None:
        res["stages"] = stages
    if "refine_steps" in s:
        res["refine_steps"] = s["refine_steps"]
    if ceiling:
        res["ceiling_tm_score_median"] = round(s["ceiling_tm_score"]["median"], 4)
        res["ceiling_cb_rmsd_median"] = round(s["ceiling_cb_rmsd"]["median"], 3)
    return res


def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)


def _score_task(task: tuple) -> dict:
    row = score(*task[:-3], stages=task[-3], ceiling=task[-2], refine=task[-1])
    print(json.dumps({k: v for k, v in row.items() if k != "by_length"}), flush=True)
    return row


def score_all(name: str, args) -> dict:
    """The card's results: the tokenizer as it is, and for a per-residue tokenizer of K
    stages every rate (``by_stage``: decoding from the first 1 .. K stages, refined by
    inversion with ``--refine`` steps, and ``by_stage_one_pass``: the decoder's one pass, when
    ``--refine`` is not 0); the ceiling once. ``--jobs`` scores that many rates at once (one
    core each)."""
    from concurrent.futures import ProcessPoolExecutor

    from protoken import pretrained
    from protoken.tokenizer import REFINE_STEPS

    out = os.path.join(args.out, name)
    family = pretrained.info(name)["model_config"].get("family")
    if family != "residue":
        return score(name, args.structures, args.workers, out, args.limit)
    n = pretrained.info(name)["model_config"].get("n_stages", 1)
    steps = REFINE_STEPS if args.refine is None else args.refine
    tasks = [(name, args.structures, args.workers, f"{out}-{k}", args.limit, k, k == 1, steps)
             for k in range(1, n + 1)]  # fmt: skip
    if steps:
        tasks += [(name, args.structures, args.workers, f"{out}-{k}-one-pass", args.limit, k,
                   False, 0) for k in range(1, n + 1)]  # fmt: skip
    with ProcessPoolExecutor(args.jobs, initializer=_one_thread) as pool:
        rows = list(pool.map(_score_task, tasks))
    out = {**rows[0], "by_stage": rows[:n]}
    if steps:
        out["by_stage_one_pass"] = rows[n:]
    return out


CARD = """# protoken tokenizer `{name}`

{summary}

- **Family**: {family} (preset `{preset}`, {params:.2f} M weights); {layout}.
- **Load**: `Tokenizer.from_pretrained("{name}")`, `protoken encode FILES -c {name} --out t.npz`
  (offline: the weights ship in the package as `{name}.safetensors`, sha256 `{sha}`).

## Training data

{data_note}

## Compute

{compute}

Config of the last stage (`{config_path}`):

```yaml
{config}
```

## Held-out results

Test set: `configs/heldout.tsv` (written by `benchmarks/heldout.py`): the {proteins} proteins of
../shared/data/structures (PDB entries, SCOPe / CATH / Pfam domains, AlphaFold and other
predicted models) of 40-1024 residues whose sequence shares at most 2% of its 8-mers with any
training chain (BM5 and ProMod3 alike; unrelated proteins share none), duplicates removed;
first chain, first model. Structure -> image -> tokens -> {path} -> 3D,
compared with the true structure. *Ceiling*: the image -> 3D path without the tokenizer (MDS,
handedness, refinement, full backbone, 8-bit images).

{results}

By length (medians):

{by_length}

"Mirror images left": reconstructions that superpose better onto the truth after a reflection.
{complexes}
## Limitations

{limitations}
- Tokens depend on the weights: tokens made with one bundled model decode only with it
  (token files record the model's id).

## Reproduce

```bash
{reproduce}
python benchmarks/pretrained.py score {name}                 # recompute the figures above
```
"""


def _row(r: dict, label: str) -> str:
    use = ", ".join(f"{100 * u:.0f}%" for u in r["codebook_usage"])
    return (f"| {label} | {r['bits_per_residue_median']:g} | {r['tm_score_median']:.3f} "
            f"({r['fraction_tm_above_0.5']:.0%} > 0.5) | {r['cb_rmsd_median']:.2f} | "
            f"{r['lddt_median']:.3f} | {r['bb_rmsd_median']:.2f} | {use} | "
            f"{r['mirror_images']} |")  # fmt: skip


def write_card(name: str, meta: dict, config_path: str, notes: dict) -> str:
    r, prov, mc = meta["results"], meta["provenance"], meta["model_config"]
    head = ("| tokens | bits / residue | TM-score | Cb RMSD (A) | lDDT | backbone RMSD (A) | "
            "codebook use | mirror images |\n|---|---|---|---|---|---|---|---|")  # fmt: skip
    stages = r.get("by_stage")
    if stages:
        lines = [_row(s, f"first {s['stages']} stage{'s' if s['stages'] > 1 else ''}")
                 for s in stages]  # fmt: skip
        lines += [_row(s, f"first {s['stages']} stage{'s' if s['stages'] > 1 else ''}, one "
                          "decoder pass") for s in r.get("by_stage_one_pass", [])]  # fmt: skip
    else:
        lines = [_row(r, "all levels")]
    ceiling = (f"| ceiling (no tokenizer) | - | {r['ceiling_tm_score_median']:.3f} | "
               f"{r['ceiling_cb_rmsd_median']:.3f} | - | - | - | - |")  # fmt: skip
    results = "\n".join([head, *lines, ceiling])
    by = stages or [r]
    bl_head = "| residues | proteins | " + " | ".join(
        f"TM ({s.get('stages', 'all')} stage{'s' if s.get('stages', 2) != 1 else ''})"
        for s in by) + " | ceiling TM |"  # fmt: skip
    bl = [bl_head, "|" + "---|" * (len(by) + 3)]
    for i, b in enumerate(by[0]["by_length"]):
        tms = " | ".join(f"{s['by_length'][i]['tm_score']:.3f}" for s in by)
        bl.append(f"| {b['lengths']} | {b['proteins']} | {tms} | "
                  f"{b.get('ceiling_tm_score', float('nan')):.3f} |")  # fmt: skip
    layout = ("residual FSQ codes per residue, aligned with the sequence"
              if mc["family"] == "residue"
              else "grids of tokens per level (their number grows with L^2)")  # fmt: skip
    path = ("the decoder's own backbone (N, CA, C; O from ideal geometry)"
            if r.get("structure_from") == "decoder"
            else "image -> 3D (MDS, handedness, refinement, full backbone)")  # fmt: skip
    if r.get("refine_steps"):
        path = (f"the decoder's own backbone refined by inversion ({r['refine_steps']} Adam "
                "steps over its frames until the tokenizer's encoder gives the tokens back; "
                "`--refine`, the default; rows *one decoder pass*: `--refine 0`), N, CA, C; O "
                "from ideal geometry")  # fmt: skip
    return CARD.format(
        name=name, summary=meta["summary"], family=mc["family"], preset=prov.get("preset", ""),
        params=prov.get("weights", 0) / 1e6, layout=layout, sha=meta["sha256"][:16],
        data_note=notes["data"].strip(), compute=notes["compute"].strip(),
        config_path=config_path, config=open(os.path.join(ROOT, config_path)).read().strip(),
        proteins=r["proteins"], path=path, results=results, by_length="\n".join(bl),
        complexes=notes.get("complexes", ""), limitations=notes["limitations"].strip(),
        reproduce=notes["reproduce"].strip(),
    )  # fmt: skip


def add_probe_section(name: str, card_path: str) -> bool:
    """Put "What the tokens know" back into a card ``release`` rewrote: the rows of
    ``docs/token_probes.json`` (``benchmarks/token_probes.py``) for these very weights, else
    nothing (a stale table is never quoted). Returns whether the card changed."""
    from protoken import pretrained
    from token_probes import card_section, update_card

    path = os.path.join(ROOT, "docs", "token_probes.json")
    if not os.path.exists(path):
        return False
    with open(path) as fh:
        results = json.load(fh)
    section = card_section(name, pretrained.load(name)["checkpoint_id"], results)
    return bool(section) and update_card(card_path, section)


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
    rel.add_argument("--notes", required=True,
                     help="YAML with the card's prose: data, compute, limitations, reproduce "
                          "(and complexes: a markdown section)")  # fmt: skip
    rel.add_argument("--reuse-results", action="store_true",
                     help="keep the held-out figures of the bundled NAME, whose weights must "
                          "be these (same sha256), instead of re-scoring")  # fmt: skip
    sc = sub.add_parser("score")
    sc.add_argument("name")
    for q in (rel, sc):
        q.add_argument("--structures", default=os.path.join(SHARED, "structures"))
        q.add_argument("--workers", type=int, default=2)
        q.add_argument("--out", default=os.path.join(ROOT, "runs", "pretrained-eval"))
        q.add_argument("--limit", type=int, help="score only the first N proteins (a dry run)")
        q.add_argument("--refine", type=int, default=None,
                       help="per-residue: Adam steps of decoding by inversion (default: the "
                            "tokenizer's, 100; 0: one decoder pass)")  # fmt: skip
        q.add_argument("--jobs", type=int, default=1, help="rates scored at once (release)")
    args = p.parse_args(argv)

    if args.cmd == "release":
        import yaml

        notes = yaml.safe_load(open(args.notes))
        summary = args.summary or notes.get("summary", "")
        before = pretrained.info(args.name) if args.reuse_results else None
        if before is not None:  # the same weights? (exported beside, nothing bundled touched)
            with tempfile.TemporaryDirectory() as tmp:
                trial = json.load(open(pretrained.export(args.checkpoint, args.name, tmp)))
            if trial["sha256"] != before.get("sha256") or "results" not in before:
                print(f"release: {args.checkpoint} holds other weights than the bundled "
                      f"{args.name} (or it has no results); re-score without --reuse-results",
                      file=sys.stderr)  # fmt: skip
                return 2
        path = pretrained.export(args.checkpoint, args.name, summary=summary,
                                 cpu_hours=args.cpu_hours, config=args.config)  # fmt: skip
        meta = json.load(open(path))
        if before is not None:
            meta["results"] = before["results"]
        else:
            meta["results"] = score_all(args.name, args)
        if notes.get("complex_results"):
            meta["complex_results"] = json.load(open(os.path.join(ROOT, notes["complex_results"])))
        with open(path, "w") as fh:
            json.dump(meta, fh, indent=1)
            fh.write("\n")
        card = write_card(args.name, meta, args.config, notes)
        card_path = os.path.join(os.path.dirname(path), f"{args.name}.md")
        with open(card_path, "w") as fh:
            fh.write(card)
        add_probe_section(args.name, card_path)
        print(json.dumps({k: v for k, v in meta["results"].items() if k != "by_stage"}, indent=1))
        return 0

    meta = pretrained.info(args.name)
    # a card scored before decoding by inversion holds one-pass figures
    refine = args.refine if args.refine is not None else meta["results"].get("refine_steps", 0)
    got = score(args.name, args.structures, args.workers, os.path.join(args.out, args.name),
                args.limit, stages=meta["results"].get("stages"), refine=refine)  # fmt: skip
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
