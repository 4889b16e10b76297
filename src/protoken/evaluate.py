"""``protoken evaluate``: round-trip structures through a tokenizer and report honestly.

For each protein: structure -> image (the checkpoint's dmax and bit depth) -> tokens ->
decoded image -> 3D (MDS, handedness from the image, refinement; optionally the full
backbone) -> compared with the true structure (never with a mirror image: proper rotations
only). Written to OUT:

- ``metrics.tsv``: one row per protein (columns in :data:`COLUMNS`);
- ``summary.json``: medians, means, fractions with TM > 0.5 and > 0.9, codebook usage;
- ``report.md``: the summary, the per-protein table and the pictures below;
- ``hist_rmsd.png``, ``hist_tm.png``; ``images_{best,median,worst}.png`` (input | decoded
  image, per channel); ``overlay_{best,median,worst}.png`` (truth vs reconstruction in 3D).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from protoken.fileio import atomic_write, format_value, single_threaded

__all__ = ["COLUMNS", "evaluate", "write_report"]

COLUMNS = (
    "id", "length", "image_mse", "distance_mae", "cb_rmsd", "tm_score", "lddt",
    "tokens_per_residue", "bits_per_residue", "mirrored_before_fix",
)  # fmt: skip
BACKBONE_COLUMNS = ("bb_rmsd", "ca_tm_score")


def image_errors(truth: np.ndarray, decoded: np.ndarray, dmax: float) -> tuple[float, float]:
    """(MSE over all pixels and channels in [-1, 1] units, mean |d_decoded - d_true| in Angstrom
    over the pairs i > j)."""
    mse = float(np.mean((decoded.astype(np.float64) - truth) ** 2))
    lower = np.tril_indices(truth.shape[-1], k=-1)
    d_true = (truth[0][lower] + 1) / 2 * dmax
    d_dec = (np.clip(decoded[0][lower], -1, 1) + 1) / 2 * dmax
    return mse, float(np.mean(np.abs(d_dec - d_true))) if len(d_true) else 0.0


def _reconstruct_and_compare(task: tuple) -> dict:
    """Worker: reconstruct a decoded image and compare it with the reference."""
    decoded, reference, dmax, backbone = task
    from protoken.reconstruct import compare_with_reference, reconstruct

    rec = reconstruct(decoded, dmax=dmax, backbone=backbone)
    row = compare_with_reference(rec, reference)
    row["cb"] = rec.cb
    row["ca"] = rec.atoms["CA"] if rec.atoms is not None else None
    return row


def evaluate(tokenizer, inputs: Sequence[str], out: str, backbone: bool = False,
             workers: int | None = None, progress: bool = True, chains: str = "skip-multi",
             models: str = "skip-multi", min_len: int = 40, max_len: int = 1024,
             log=print) -> dict:  # fmt: skip
    """Evaluate a tokenizer on structure files (or PNGs: then the reference is the 3D
    reconstruction of the input image itself). Returns the summary (also in OUT/summary.json).
    """
    from tqdm import tqdm

    from protoken.reconstruct import reconstruct
    from protoken.structure import SkipStructure, StructureError

    os.makedirs(out, exist_ok=True)
    items, skipped = [], []
    for path in inputs:
        try:
            items.extend(tokenizer.prepare(path, chains=chains, models=models, min_len=min_len,
                                           max_len=max_len))  # fmt: skip
        except (SkipStructure, StructureError, ValueError, OSError) as exc:
            skipped.append((path, str(exc)))
            log(f"protoken evaluate: skipped {path}: {exc}")
    if not items:
        raise ValueError("no protein to evaluate")
    dmax = tokenizer.codec.dmax
    levels, decoded = [], []
    batch = getattr(tokenizer, "batch_size", 8)
    for start in tqdm(range(0, len(items), batch), desc="tokens", disable=not progress,
                      file=sys.stderr):  # fmt: skip
        lv, dec = tokenizer.roundtrip([it.image for it in items[start : start + batch]])
        levels.extend(lv)
        decoded.extend(dec)

    tasks = []
    for it, dec in zip(items, decoded, strict=True):
        reference = it.backbone if it.backbone is not None else reconstruct(it.image, dmax=dmax).cb
        tasks.append((dec, reference, dmax, backbone))
    workers = workers or os.cpu_count() or 1
    if workers > 1 and len(tasks) > 1:
        with ProcessPoolExecutor(workers, initializer=single_threaded) as pool:
            results = list(tqdm(pool.map(_reconstruct_and_compare, tasks), total=len(tasks),
                                desc="3D", disable=not progress, file=sys.stderr))  # fmt: skip
    else:
        results = [_reconstruct_and_compare(t) for t in tqdm(tasks, desc="3D",
                                                             disable=not progress)]  # fmt: skip

    bits = math.log2(tokenizer.config.codebook_size)
    rows = []
    for it, lv, dec, res in zip(items, levels, decoded, results, strict=True):
        mse, mae = image_errors(it.image, dec, dmax)
        n_tok = int(sum(np.asarray(g).size for g in lv))
        row = {
            "id": it.id, "length": int(it.image.shape[-1]), "image_mse": mse, "distance_mae": mae,
            "cb_rmsd": res["cb_rmsd"], "tm_score": res["tm_score"], "lddt": res["lddt"],
            "tokens_per_residue": n_tok / it.image.shape[-1],
            "bits_per_residue": n_tok * bits / it.image.shape[-1],
            "mirrored_before_fix": res["mirrored_before_fix"],
            "mirror_image": res["mirror_image"],
        }  # fmt: skip
        if backbone:
            row["bb_rmsd"] = res.get("bb_rmsd", float("nan"))
            row["ca_tm_score"] = res.get("ca_tm_score", float("nan"))
        rows.append(row)

    usage = []
    for lv in range(len(levels[0])):
        used = np.unique(np.concatenate([np.asarray(p[lv]).ravel() for p in levels]))
        usage.append(len(used[used >= 0]) / tokenizer.config.codebook_size)
    summary = summarize(rows, usage, skipped)
    summary["checkpoint"] = getattr(tokenizer, "checkpoint", "")
    write_report(out, rows, summary, items, decoded, results, backbone,
                 [task[1] for task in tasks])  # fmt: skip
    return summary


def summarize(rows: list[dict], usage: list[float], skipped: list) -> dict:
    tm = np.array([r["tm_score"] for r in rows])
    out = {"proteins": len(rows), "skipped_inputs": len(skipped)}
    for key in ("cb_rmsd", "tm_score", "lddt", "distance_mae", "image_mse", "tokens_per_residue",
                "bits_per_residue", *BACKBONE_COLUMNS):  # fmt: skip
        vals = np.array([r[key] for r in rows if key in r], dtype=np.float64)
        if len(vals):
            out[key] = {"median": float(np.median(vals)), "mean": float(np.mean(vals)),
                        "min": float(vals.min()), "max": float(vals.max())}  # fmt: skip
    out["fraction_tm_above_0.5"] = float(np.mean(tm > 0.5))
    out["fraction_tm_above_0.9"] = float(np.mean(tm > 0.9))
    out["codebook_usage_per_level_coarsest_first"] = [round(u, 4) for u in usage]
    # reconstructions that superpose better onto the truth after a reflection: wrong hand
    out["mirror_images"] = int(sum(bool(r["mirror_image"]) for r in rows))
    return out


def write_report(out: str, rows, summary, items, decoded, results, backbone: bool,
                 references) -> None:  # fmt: skip
    """metrics.tsv, summary.json, pictures and report.md (``references``: per protein the
    true N/CA/C (L, 3, 3), or the Cb (L, 3) reconstructed from an input PNG)."""
    cols = COLUMNS + (BACKBONE_COLUMNS if backbone else ())
    lines = ["\t".join(cols)] + ["\t".join(format_value(r[c]) for c in cols) for r in rows]
    atomic_write(os.path.join(out, "metrics.tsv"), "\n".join(lines) + "\n")
    atomic_write(os.path.join(out, "summary.json"), json.dumps(summary, indent=2) + "\n")

    order = np.argsort([r["tm_score"] for r in rows])
    picks = {"worst": int(order[0]), "median": int(order[len(order) // 2]),
             "best": int(order[-1])}  # fmt: skip
    pictures = _pictures(out, rows, items, decoded, results, picks, references)

    s = summary
    md = [
        "# protoken evaluation",
        "",
        f"Checkpoint `{s.get('checkpoint', '')}`, {s['proteins']} proteins "
        f"({s['skipped_inputs']} inputs skipped). Structures are reconstructed from the decoded "
        "images (classical MDS, handedness from the image's own chiral channels, distance "
        "refinement" + (", full backbone" if backbone else "") + ") and compared with the true "
        "structures after superposition by a proper rotation.",
        "",
        "| metric | median | mean | min | max |",
        "|---|---|---|---|---|",
    ]
    labels = {
        "tm_score": "TM-score (Cb)", "cb_rmsd": "Cb RMSD (A)", "lddt": "lDDT (Cb)",
        "distance_mae": "Cb distance MAE (A)", "image_mse": "image MSE", "bb_rmsd":
        "backbone RMSD (A)", "ca_tm_score": "TM-score (CA)", "tokens_per_residue":
        "tokens / residue", "bits_per_residue": "bits / residue",
    }  # fmt: skip
    for key, label in labels.items():
        if key in s:
            v = s[key]
            md.append(f"| {label} | {v['median']:.4f} | {v['mean']:.4f} | {v['min']:.4f} "
                      f"| {v['max']:.4f} |")  # fmt: skip
    md += [
        "",
        f"Fraction with TM-score > 0.5: {s['fraction_tm_above_0.5']:.3f}; "
        f"> 0.9: {s['fraction_tm_above_0.9']:.3f}.",
        f"Codebook usage per level (coarsest first): "
        f"{', '.join(f'{u:.3f}' for u in s['codebook_usage_per_level_coarsest_first'])}.",
        "",
        "![Cb RMSD](hist_rmsd.png) ![TM-score](hist_tm.png)",
        "",
    ]
    for name in ("best", "median", "worst"):
        r = rows[picks[name]]
        md += [
            f"## {name}: {r['id']} (L={r['length']}, TM {r['tm_score']:.3f}, "
            f"Cb RMSD {r['cb_rmsd']:.2f} A)",
            "",
            f"![{name} images]({pictures[name][0]}) ![{name} 3D]({pictures[name][1]})",
            "",
        ]
    md += ["## Per protein", "", "| " + " | ".join(cols) + " |",
           "|" + "---|" * len(cols)]  # fmt: skip
    for i in order[::-1]:
        md.append("| " + " | ".join(format_value(rows[i][c]) for c in cols) + " |")
    atomic_write(os.path.join(out, "report.md"), "\n".join(md) + "\n")


def _pictures(out, rows, items, decoded, results, picks,
              references) -> dict[str, tuple[str, str]]:  # fmt: skip
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from protoken.metrics import superpose

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(os.path.join(out, name), dpi=90)
        plt.close(fig)

    for key, label, name in (("cb_rmsd", "Cb RMSD (A)", "hist_rmsd.png"),
                             ("tm_score", "TM-score", "hist_tm.png")):  # fmt: skip
        fig, ax = plt.subplots(figsize=(4.5, 3))
        vals = [r[key] for r in rows]
        ax.hist(vals, bins=min(30, max(5, len(vals))), color="#4477aa")
        ax.set_xlabel(label)
        ax.set_ylabel("proteins")
        ax.set_title(f"{label}: median {np.median(vals):.3f}", fontsize=10)
        save(fig, name)

    names = ("ch0: d (lower) / omega (upper)", "ch1: theta", "ch2: phi")
    pictures = {}
    for which, i in picks.items():
        fig, axes = plt.subplots(2, 3, figsize=(9, 6.2))
        for c in range(3):
            for r, (img, title) in enumerate(((items[i].image, "input"), (decoded[i], "decoded"))):
                ax = axes[r, c]
                ax.imshow(img[c], vmin=-1, vmax=1, cmap="viridis", interpolation="nearest")
                ax.set_title(f"{title} {names[c]}", fontsize=8)
                ax.set_xticks([])
                ax.set_yticks([])
        fig.suptitle(f"{rows[i]['id']} ({which}, TM {rows[i]['tm_score']:.3f})", fontsize=10)
        images_png = f"images_{which}.png"
        save(fig, images_png)

        ref = np.asarray(references[i])
        if ref.ndim == 3:  # N, CA, C of the true structure
            from protoken.geometry import virtual_cb

            ref = virtual_cb(ref[:, 0], ref[:, 1], ref[:, 2])
        aligned = superpose(results[i]["cb"], ref)
        fig = plt.figure(figsize=(5, 5))
        ax = fig.add_subplot(projection="3d")
        ax.plot(*ref.T, color="#333333", lw=1.5, label="true (Cb trace)")
        ax.plot(*aligned.T, color="#ee6677", lw=1.2, label="from tokens")
        ax.set_title(f"{rows[i]['id']}: Cb RMSD {rows[i]['cb_rmsd']:.2f} A", fontsize=10)
        ax.legend(fontsize=8, loc="upper left")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_zticks([])
        overlay_png = f"overlay_{which}.png"
        save(fig, overlay_png)
        pictures[which] = (images_png, overlay_png)
    return pictures


# --------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="structure files or folders (PNG images also accepted)",
    )
    parser.add_argument("--checkpoint", "-c", required=True)
    parser.add_argument("--out", "-o", required=True, help="report folder")
    parser.add_argument(
        "--backbone",
        action="store_true",
        help="rebuild the full backbone; report backbone RMSD and CA TM-score",
    )
    parser.add_argument(
        "--workers",
        "-j",
        type=int,
        default=None,
        help="processes for the 3D reconstruction (default: all cores)",
    )
    parser.add_argument("--chains", choices=["skip-multi", "split", "first"], default="skip-multi")
    parser.add_argument("--models", choices=["skip-multi", "first"], default="skip-multi")
    parser.add_argument("--min-len", type=int, default=40, help="skip shorter chains (40)")
    parser.add_argument("--max-len", type=int, default=1024, help="skip longer chains (1024)")
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    from protoken.tokenizer import Tokenizer, _inputs

    tok = Tokenizer.from_checkpoint(args.checkpoint)
    try:
        summary = evaluate(tok, list(_inputs(args.inputs)), args.out, backbone=args.backbone,
                           workers=args.workers, progress=not args.no_progress,
                           chains=args.chains, models=args.models, min_len=args.min_len,
                           max_len=args.max_len,
                           log=lambda m: print(m, file=sys.stderr))  # fmt: skip
    except ValueError as exc:
        print(f"protoken evaluate: {exc}", file=sys.stderr)
        return 2
    print(headline(summary, args.out))
    return 0


def headline(summary: dict, out: str) -> str:
    s = summary
    text = (f"{s['proteins']} proteins: TM-score median {s['tm_score']['median']:.3f}, "
            f"Cb RMSD median {s['cb_rmsd']['median']:.2f} A, lDDT median "
            f"{s['lddt']['median']:.3f}, TM > 0.5 for {100 * s['fraction_tm_above_0.5']:.0f}%, "
            f"{s['bits_per_residue']['median']:.0f} bits/residue")  # fmt: skip
    if "bb_rmsd" in s:
        text += f", backbone RMSD median {s['bb_rmsd']['median']:.2f} A"
    return text + f"\nreport: {os.path.join(out, 'report.md')}"
