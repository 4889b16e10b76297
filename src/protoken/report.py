"""What the evaluation commands write and print: tables, summaries, the report and its pictures.

- ``protoken reconstruct --reference``: ``metrics.tsv`` (:data:`RECONSTRUCT_COLUMNS`) and
  ``summary.json`` (:func:`write_reconstruct_tables`), one line for the terminal
  (:func:`summary_line`).
- ``protoken evaluate``: ``metrics.tsv`` (:data:`EVALUATE_COLUMNS`), ``summary.json``,
  ``report.md`` with ``hist_rmsd.png``, ``hist_tm.png``, ``images_{best,median,worst}.png``
  (input | decoded image, per channel) and ``overlay_{best,median,worst}.png`` (truth vs
  reconstruction in 3D) (:func:`write_report`); its headline (:func:`headline`).
"""

from __future__ import annotations

import json
import os

import numpy as np

from protoken.fileio import atomic_write, format_value, write_tsv
from protoken.metrics import superpose

__all__ = [
    "EVALUATE_COLUMNS",
    "EVALUATE_COMPLEX_COLUMNS",
    "RECONSTRUCT_COLUMNS",
    "clipped_table",
    "headline",
    "summary_line",
    "write_reconstruct_tables",
    "write_report",
]

RECONSTRUCT_COLUMNS = (
    "id", "length", "cb_rmsd", "tm_score", "lddt", "clipped_pairs", "mirrored_before_fix",
    "mirror_image", "handedness_score", "distance_rms", "clipped_fraction",
    "handedness_confidence", "handedness",
)  # fmt: skip
RECONSTRUCT_BACKBONE_COLUMNS = ("bb_rmsd", "ca_rmsd", "ca_tm_score")
EVALUATE_COLUMNS = (
    "id", "length", "image_mse", "distance_mae", "cb_rmsd", "tm_score", "lddt",
    "tokens_per_residue", "bits_per_residue", "mirrored_before_fix", "clipped_fraction",
    "handedness", "reference",
)  # fmt: skip
EVALUATE_BACKBONE_COLUMNS = ("bb_rmsd", "ca_tm_score")
#: ``protoken evaluate --chains complex``: the columns of complexes (after the others).
EVALUATE_COMPLEX_COLUMNS = (
    "chains", "n_chains", "interfaces", "dockq", "fnat", "irmsd", "lrmsd", "complex_tm_score",
    "chain_tm_min", "ceiling_dockq", "ceiling_fnat", "ceiling_irmsd", "ceiling_lrmsd",
    "ceiling_complex_tm_score", "ceiling_chain_tm_min",
)  # fmt: skip


def _write_json(path: str, data: dict) -> None:
    """A summary as indented JSON, written atomically."""
    atomic_write(path, json.dumps(data, indent=2) + "\n")


# --------------------------------------------------------------------------- reconstruct


def write_reconstruct_tables(out: str, rows: list[dict], summary: dict, backbone: bool) -> None:
    """``protoken reconstruct --reference``'s ``metrics.tsv`` (the compared ``rows``) and
    ``summary.json``."""
    columns = RECONSTRUCT_COLUMNS + (RECONSTRUCT_BACKBONE_COLUMNS if backbone else ())
    if any(r.get("n_chains", 1) > 1 for r in rows):  # complexes (FASTA headers with chains=)
        columns += tuple(c for c in EVALUATE_COMPLEX_COLUMNS if not c.startswith("ceiling_"))
    write_tsv(os.path.join(out, "metrics.tsv"), columns, rows)
    _write_json(os.path.join(out, "summary.json"), summary)


def summary_line(summary: dict) -> str:
    """``protoken reconstruct``'s line for the terminal."""
    text = f"reconstructed {summary['images'] - summary['failed']} of {summary['images']} images"
    if not summary.get("with_reference"):
        return text
    cb, tm, ld = summary["cb_rmsd"], summary["tm_score"], summary["lddt"]
    text += (
        f"; vs reference ({summary['with_reference']}): Cb RMSD median {cb['median']:.4f} A"
        f" (max {cb['max']:.4f}), TM-score median {tm['median']:.4f} (min {tm['min']:.4f}),"
        f" lDDT median {ld['median']:.4f}; mirror images {summary['mirror_images']}"
    )
    if "bb_rmsd" in summary:
        text += (
            f"; backbone RMSD median {summary['bb_rmsd']['median']:.4f} A"
            f", CA TM-score median {summary['ca_tm_score']['median']:.4f}"
        )
    clipped = summary["clipped_proteins"]
    if clipped:
        worst = max(r["cb_rmsd"] for r in clipped)
        low = min(r["tm_score"] for r in clipped)
        text += (f"; {len(clipped)} with clipped pairs (max Cb RMSD {worst:.4f} A, "
                 f"min TM-score {low:.4f})")  # fmt: skip
    return text


def clipped_table(by_clipped: list[dict]) -> list[str]:
    """Markdown lines of the TM-score against the fraction of clipped pairs
    (:func:`protoken.evaluate.by_clipped`)."""
    if not by_clipped:
        return []
    ceiling = any("ceiling_tm_score" in b for b in by_clipped)
    head = "| clipped pairs | proteins | TM-score median | TM-score min | mirror images |"
    rule = "|---|---|---|---|---|"
    if ceiling:
        head += " ceiling TM median | ceiling TM min |"
        rule += "---|---|"
    lines = [head, rule]
    for b in by_clipped:
        tm = b["tm_score"]
        line = (f"| {b['clipped']} | {b['proteins']} | {tm['median']:.4f} | {tm['min']:.4f} "
                f"| {b['mirror_images']} |")  # fmt: skip
        if ceiling:
            c = b.get("ceiling_tm_score")
            line += f" {c['median']:.4f} | {c['min']:.4f} |" if c else " | |"
        lines.append(line)
    return lines


# --------------------------------------------------------------------------- evaluate


def write_report(out: str, rows, summary, shown: dict, backbone: bool) -> None:
    """``protoken evaluate``'s outputs: metrics.tsv, summary.json, pictures and report.md.

    ``rows``: every protein's metrics; ``shown``: the only proteins whose images the report
    needs, ``{"best", "median", "worst"}`` -> :class:`protoken.evaluate.Picture` (``index`` into
    ``rows``, input and decoded ``image``/``decoded``, reconstructed ``cb`` and true ``truth``
    Cb (L, 3): the virtual Cb of the structure, or the Cb reconstructed from an input PNG).
    """
    cols = EVALUATE_COLUMNS + (EVALUATE_BACKBONE_COLUMNS if backbone else ())
    if "complexes" in summary:
        cols += EVALUATE_COMPLEX_COLUMNS
    write_tsv(os.path.join(out, "metrics.tsv"), cols, rows)
    _write_json(os.path.join(out, "summary.json"), summary)

    order = np.argsort([r["tm_score"] for r in rows], kind="stable")
    picks = {name: shown[name].index for name in ("best", "median", "worst")}
    pictures = _pictures(out, rows, shown)

    s = summary
    prov = s.get("provenance") or {}
    trained = ", ".join(f"{k} {v}" for k, v in prov.items()) or "unknown"
    md = [
        "# protoken evaluation",
        "",
        f"Tokenizer `{s.get('checkpoint', '')}` ({s.get('family', 'hierarchical')} family; "
        f"trained: {trained}), {s['proteins']} proteins ({s['skipped_inputs']} inputs skipped). "
        + _structures_from(s, backbone)
        + " and compared with the true "
        "structures after superposition by a proper rotation. The *ceiling* column is the "
        "input image itself reconstructed the same way, without the tokenizer: what the "
        "image -> 3D path alone reaches, the best any tokenizer of these images can do.",
        "",
        "| metric | median | mean | min | max | ceiling median |",
        "|---|---|---|---|---|---|",
    ]
    labels = {
        "tm_score": "TM-score (Cb)", "cb_rmsd": "Cb RMSD (A)", "lddt": "lDDT (Cb)",
        "distance_mae": "Cb distance MAE (A)", "image_mse": "image MSE", "bb_rmsd":
        "backbone RMSD (A)", "ca_tm_score": "TM-score (CA)", "tokens_per_residue":
        "tokens / residue", "bits_per_residue": "bits / residue",
    }  # fmt: skip
    md += _stat_rows(s, labels)
    md += ["", "By length (medians):", "", "| residues | proteins | TM-score | Cb RMSD (A) | "
           "lDDT | ceiling TM-score |", "|---|---|---|---|---|---|"]  # fmt: skip
    for b in s.get("by_length", []):
        ceil = f"{b['ceiling_tm_score']:.4f}" if "ceiling_tm_score" in b else ""
        md.append(f"| {b['lengths']} | {b['proteins']} | {b['tm_score']:.4f} | "
                  f"{b['cb_rmsd']:.3f} | {b['lddt']:.4f} | {ceil} |")  # fmt: skip
    if s.get("by_clipped"):
        md += ["", "By fraction of clipped pairs (Cb-Cb >= dmax, stored as \"far\" without "
               "angles; a larger `--dmax` at 16 bit keeps them):", "",
               *clipped_table(s["by_clipped"])]  # fmt: skip
    md += [
        "",
        f"Fraction with TM-score > 0.5: {s['fraction_tm_above_0.5']:.3f}; "
        f"> 0.9: {s['fraction_tm_above_0.9']:.3f}.",
        f"Codebook usage per level (coarsest first; one level for per-residue tokens): "
        f"{', '.join(f'{u:.3f}' for u in s['codebook_usage_per_level_coarsest_first'])}.",
        "",
        f"Mirrored before fix: {s.get('mirrored_before_fix', 0)} of {s['proteins']}. Distances "
        "alone (classical MDS) give a structure or its mirror image with equal right; the "
        "reconstruction picks the hand that agrees with the decoded image's chiral channels "
        "(omega, theta), and this counts the proteins whose first MDS solution had the wrong "
        f"hand and was reflected. Mirror images left after that step: "
        f"{s.get('mirror_images', 0)} (superposing better onto the truth after a reflection); "
        f"hand undetermined (the decoded angles too weak to decide): "
        f"{s.get('handedness_undetermined', 0)}.",
        "",
    ]
    if "complexes" in s:
        md += _complex_section(s)
    md += [
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
        md.append("| " + " | ".join(format_value(rows[i].get(c, "")) for c in cols) + " |")
    atomic_write(os.path.join(out, "report.md"), "\n".join(md) + "\n")


def _complex_section(s: dict) -> list[str]:
    """report.md's lines on complexes (``--chains complex``): interface scores with their
    ceiling, DockQ classes, and medians by complex size."""
    md = [
        "## Complexes",
        "",
        f"Complexes of two chains or more: {s['complexes']}, each one image of all its chains. "
        "Scores on the known residue correspondence: the complex TM-score superposes all "
        "residues together (a chain placed wrongly relative to the others costs its share), "
        "the chain TM-score each chain alone (the worst chain's); DockQ, fnat, interface and "
        "ligand RMSD come from the DockQ package (v2), per pair of chains in contact in the "
        "truth, averaged over the pairs of each complex, on the atoms an image describes "
        "(N, CA, C rebuilt from the image, and Cb): fnat counts backbone and Cb contacts "
        "within 5 A, not the side-chain contacts of published DockQ values. The ceiling is "
        "the input image reconstructed without the tokenizer.",
        "",
        "| metric | median | mean | min | max | ceiling median |",
        "|---|---|---|---|---|---|",
    ]
    labels = {
        "dockq": "DockQ", "fnat": "fnat", "irmsd": "interface RMSD (A)",
        "lrmsd": "ligand RMSD (A)", "complex_tm_score": "complex TM-score (Cb)",
        "chain_tm_min": "worst chain TM-score (Cb)",
    }  # fmt: skip
    md += _stat_rows(s, labels)
    for prefix, name in (("", "From tokens"), ("ceiling_", "Ceiling")):
        classes = s.get(f"{prefix}dockq_classes")
        if classes:
            md.append("")
            md.append(f"{name}: DockQ at least acceptable (>= 0.23) for "
                      f"{100 * classes['acceptable']:.0f}%, medium (>= 0.49) for "
                      f"{100 * classes['medium']:.0f}%, high (>= 0.80) for "
                      f"{100 * classes['high']:.0f}% of the complexes.")  # fmt: skip
    size = s.get("by_complex_size", {})

    def fmt(entry, key):
        return f"{entry[key]:.4f}" if key in entry else ""

    for label_key, title in (("chains", "chains"), ("residues", "residues")):
        md += ["", f"By complex size ({title}; medians):", "",
               f"| {title} | complexes | DockQ | complex TM-score | ceiling DockQ | "
               "ceiling complex TM-score |", "|---|---|---|---|---|---|"]  # fmt: skip
        for e in size.get(label_key, []):
            md.append(f"| {e[label_key]} | {e['complexes']} | {fmt(e, 'dockq')} | "
                      f"{fmt(e, 'complex_tm_score')} | {fmt(e, 'ceiling_dockq')} | "
                      f"{fmt(e, 'ceiling_complex_tm_score')} |")  # fmt: skip
    return md + [""]


def _pictures(out, rows, shown) -> dict[str, tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

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
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))  # counts: integer ticks
        ax.set_title(f"{label}: median {np.median(vals):.3f}", fontsize=10)
        save(fig, name)

    names = ("ch0: d (lower) / omega (upper)", "ch1: theta", "ch2: phi")
    pictures = {}
    for which, pic in shown.items():
        i = pic.index
        fig, axes = plt.subplots(2, 3, figsize=(9, 6.2))
        for c in range(3):
            for r, (img, title) in enumerate(((pic.image, "input"), (pic.decoded, "decoded"))):
                ax = axes[r, c]
                drawn = ax.imshow(np.asarray(img[c], np.float32), vmin=-1, vmax=1,
                                  cmap="viridis", interpolation="nearest")  # fmt: skip
                fig.colorbar(drawn, ax=ax, fraction=0.046, pad=0.04)
                ax.set_title(f"{title} {names[c]}", fontsize=8)
                ax.set_xticks([])
                ax.set_yticks([])
        fig.suptitle(f"{rows[i]['id']} ({which}, TM {rows[i]['tm_score']:.3f})", fontsize=10)
        images_png = f"images_{which}.png"
        save(fig, images_png)

        ref = np.asarray(pic.truth)
        aligned = superpose(pic.cb, ref)
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


def _structures_from(s: dict, backbone: bool) -> str:
    """Where the report's structures came from, in words."""
    if s.get("structure_from") == "decoder":
        stages = f" from {s['stages']} stage(s) of codes" if "stages" in s else ""
        steps = s.get("refine_steps", 0)
        how = (f", refined by inversion ({steps} Adam steps until the encoder gives the tokens "
               "back)" if steps else ", one decoder pass")  # fmt: skip
        return f"Structures are the decoder's own backbones{stages}{how},"
    return ("Structures are reconstructed from the decoded images (classical MDS, handedness "
            "from the image's own chiral channels, distance refinement"
            + (", full backbone" if backbone else "") + "),")  # fmt: skip


def headline(summary: dict, out: str) -> str:
    """``protoken evaluate``'s lines for the terminal: the headline figures and the report."""
    s = summary
    text = (f"{s['proteins']} proteins: TM-score median {s['tm_score']['median']:.3f}, "
            f"Cb RMSD median {s['cb_rmsd']['median']:.2f} A, lDDT median "
            f"{s['lddt']['median']:.3f}, TM > 0.5 for {100 * s['fraction_tm_above_0.5']:.0f}%, "
            f"{s['bits_per_residue']['median']:.0f} bits/residue")  # fmt: skip
    if "bb_rmsd" in s:
        text += f", backbone RMSD median {s['bb_rmsd']['median']:.2f} A"
    if "dockq" in s:
        ceil = s.get("ceiling_dockq", {}).get("median")
        text += (f"\n{s['complexes']} complexes: DockQ median {s['dockq']['median']:.3f}"
                 + (f" (ceiling {ceil:.3f})" if ceil is not None else "")
                 + f", complex TM-score median {s['complex_tm_score']['median']:.3f}")  # fmt: skip
    return text + f"\nreport: {os.path.join(out, 'report.md')}"


def _stat_rows(s: dict, labels: dict[str, str]) -> list[str]:
    """Table rows ``| label | median | mean | min | max | ceiling median |`` of the summary's
    statistics named in ``labels`` (those present)."""
    rows = []
    for key, label in labels.items():
        if key in s:
            v = s[key]
            ceil = s.get(f"ceiling_{key}", {}).get("median")
            ceil = "" if ceil is None else f"{ceil:.4f}"
            rows.append(f"| {label} | {v['median']:.4f} | {v['mean']:.4f} | {v['min']:.4f} "
                        f"| {v['max']:.4f} | {ceil} |")  # fmt: skip
    return rows
