"""Rate-distortion of the tokenizer families: held-out quality against bits per residue, every
model trained for the same CPU time on the same data.

    python benchmarks/rate_distortion.py --data data/bm5 --minutes 5 10 15 20 30
                                         [--only residue-4096 hier-512-geo] [--proteins 40]

For each configuration (:data:`CONFIGS`: the per-residue family at 4096 and 1000 FSQ codes, the
hierarchical tiny model with the reference MSE and with the geometric loss, at 512 and 64
codes) ``protoken train`` runs in a child process on one thread (``OMP_NUM_THREADS=1``,
``num_workers=0``: all its CPU time is the child's own) on the training split of ``--data``
(BM5, split by complex id). At each CPU-time mark the child is pre-empted (SIGUSR1: it saves
``last.pt`` at a step boundary and exits 75), the checkpoint is evaluated, and training resumes
exactly (``--resume``) up to the next mark, so every model gets the same CPU minutes.

Evaluation: ``--proteins`` held-out proteins of 40-400 residues (``configs/heldout.tsv``: no
8-mer shared with the training set), structure -> image -> tokens -> image -> 3D with the full
backbone: median TM-score, Cb RMSD, lDDT, backbone RMSD, bits per residue (median), codebook
use on these proteins, mirror images. The ceiling row is the exact image -> 3D round trip (no
tokenizer). Results go to ``benchmarks/results/rate_distortion/`` (``results.jsonl``, appended
per mark, so runs of different configurations combine; ``table.md``; ``rate_distortion.png``:
TM-score against bits per residue at the last mark, and against CPU minutes).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import subprocess
import sys
import time

from protoken.model.residue import V1_FIELDS

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
OUT = os.path.join(HERE, "results", "rate_distortion")

COMMON = {
    "crop": 192,
    "batch_size": 8,
    "split_key_regex": "^bm5__([0-9A-Za-z]{4})",
    "valid_frac": 0.1,
    "num_workers": 0,
    "max_steps": 100000,  # the same (barely decaying) schedule for all: time is the budget
    "lr": 1e-3,
    "warmup_steps": 100,
    "eval_interval": 100000,
    "ckpt_interval": 100000,
    "log_interval": 50,
    "seed": 0,
}
#: name -> (preset, model overrides[, training overrides])
CONFIGS = {
    # the first per-residue design (on BM5, --data data/bm5)
    "residue-4096": ("residue-small", {**V1_FIELDS}),
    "residue-1000": ("residue-small", {**V1_FIELDS, "fsq_levels": [8, 5, 5, 5]}),
    "hier-512-mse": ("tiny", {}),
    "hier-512-geo": ("tiny", {"loss": "geometric"}),
    "hier-64-geo": ("tiny", {"loss": "geometric", "codebook_size": 64}),
    # a schedule fitted to a 30-minute budget: 128-residue crops (~0.45 s a step on one
    # thread), cosine decay over the ~4,000 steps that fit in 30 CPU minutes
    "residue-4096-30min": ("residue-small", {**V1_FIELDS}, {"crop": 128, "max_steps": 4000}),
    # issue 21's designs, on the ProMod3 chains (--data data/promod3): the first per-residue
    # design, then the neighbourhood encoder with residual FSQ (4 stages, random stage
    # dropout), alone or with the first design's whole-row pooling, without and with the
    # decoder's pair representation and binned-6D heads
    "v1-promod3": ("residue-small", {**V1_FIELDS}),
    "knn-rfsq": ("residue-small", {}),
    "knn-row-rfsq": ("residue-small", {"encoder": "both"}),
    "knn-rfsq-pair": (
        "residue-small",
        {"pair_dim_decoder": 32, "n_pair_blocks": 2, "pair_loss_weight": 0.25},
    ),
}


def heldout_proteins(n: int, structures: str) -> list[str]:
    """``n`` held-out files of 40-400 residues, chosen by the md5 of their names (stable)."""
    from heldout import read_heldout

    files = read_heldout(structures, 40, 400)
    files.sort(key=lambda f: hashlib.md5(os.path.basename(f).encode()).hexdigest())
    return files[:n]


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def train_until(run: str, cfg_path: str, cpu_budget: float, resume: bool) -> tuple[float, int]:
    """Train (or resume) until the child used ``cpu_budget`` CPU seconds; returns the CPU
    seconds used and the exit code."""
    cmd = [sys.executable, "-m", "protoken", "train", "--config", cfg_path]
    if resume:
        cmd.append("--resume")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with open(os.path.join(run, "train.log"), "a") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        used = 0.0
        while proc.poll() is None:
            try:
                used = _cpu_seconds(proc.pid)
            except (OSError, IndexError):
                pass
            if used >= cpu_budget:
                proc.send_signal(signal.SIGUSR1)
                break
            time.sleep(0.5)
        code = proc.wait()
    return used, code


def evaluate_checkpoint(ckpt: str, proteins: list[str], out: str, ceiling: bool) -> dict:
    from protoken.evaluate import evaluate
    from protoken.tokenizer import Tokenizer

    tok = Tokenizer.load(ckpt, device="cpu")
    s = evaluate(tok, proteins, out, backbone=True, workers=1, progress=False, ceiling=ceiling,
                 chains="first", models="first", log=lambda *a: None)  # fmt: skip
    result = {
        "proteins": s["proteins"],
        "tm_score": s["tm_score"]["median"],
        "cb_rmsd": s["cb_rmsd"]["median"],
        "lddt": s["lddt"]["median"],
        "bb_rmsd": s["bb_rmsd"]["median"],
        "bits_per_residue": s["bits_per_residue"]["median"],
        "codebook_usage": s["codebook_usage_per_level_coarsest_first"],
        "mirror_images": s["mirror_images"],
    }
    if ceiling:
        result["ceiling"] = {
            k: s[f"ceiling_{k}"]["median"] for k in ("tm_score", "cb_rmsd", "lddt")
        }
    return result


def run_config(name: str, args, proteins: list[str]) -> None:
    preset, overrides, *train = CONFIGS[name]
    run = os.path.join(args.work, name)
    os.makedirs(run, exist_ok=True)
    cfg = {**COMMON, **(train[0] if train else {}), "data": os.path.abspath(args.data),
           "out": run, "preset": preset, "split_key_regex": args.split_key_regex,
           "valid_frac": args.valid_frac}  # fmt: skip
    if overrides:
        cfg["model"] = overrides
    cfg_path = os.path.join(run, "config.yaml")
    with open(cfg_path, "w") as fh:
        json.dump(cfg, fh)  # JSON is YAML
    used_total, resume = 0.0, os.path.exists(os.path.join(run, "last.pt"))
    for minutes in args.minutes:
        budget = minutes * 60 - used_total
        if budget > 0:
            used, code = train_until(run, cfg_path, budget, resume)
            used_total += used
            resume = True
            if code not in (0, 75):
                raise SystemExit(f"{name}: training exited {code}; see {run}/train.log")
        from protoken import checkpoint

        step = checkpoint.load(os.path.join(run, "last.pt"))["step"]
        res = evaluate_checkpoint(os.path.join(run, "last.pt"), proteins,
                                  os.path.join(run, f"eval-{minutes:g}min"),
                                  ceiling=args.ceiling)  # fmt: skip
        args.ceiling = False  # once is enough: it does not depend on the model
        row = {"config": name, "preset": preset, "overrides": overrides, "cpu_minutes": minutes,
               "step": step, **res}  # fmt: skip
        print(json.dumps(row), flush=True)
        with open(os.path.join(OUT, "results.jsonl"), "a") as fh:
            fh.write(json.dumps(row) + "\n")


def write_table_and_plot() -> None:
    rows = [json.loads(line) for line in open(os.path.join(OUT, "results.jsonl"))]
    ceiling = next((r["ceiling"] for r in rows if "ceiling" in r), None)
    md = ["| config | CPU min | steps | bits / residue | TM-score | Cb RMSD (A) | lDDT | "
          "backbone RMSD (A) | codebook use | mirror images |", "|" + "---|" * 10]  # fmt: skip
    if ceiling:
        md.append(f"| ceiling: image -> 3D, no tokenizer | - | - | - | {ceiling['tm_score']:.3f} "
                  f"| {ceiling['cb_rmsd']:.3f} | {ceiling['lddt']:.3f} | - | - | - |")  # fmt: skip
    for r in sorted(rows, key=lambda r: (r["config"], r["cpu_minutes"])):
        use = "/".join(f"{100 * u:.0f}%" for u in r["codebook_usage"])
        md.append(
            f"| {r['config']} | {r['cpu_minutes']:g} | {r['step']} | "
            f"{r['bits_per_residue']:.1f} | {r['tm_score']:.3f} | {r['cb_rmsd']:.2f} | "
            f"{r['lddt']:.3f} | {r['bb_rmsd']:.2f} | {use} | {r['mirror_images']} |"
        )
    with open(os.path.join(OUT, "table.md"), "w") as fh:
        fh.write("\n".join(md) + "\n")
    print("\n".join(md))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for k, name in enumerate(sorted({r["config"] for r in rows})):
        mine = sorted((r for r in rows if r["config"] == name), key=lambda r: r["cpu_minutes"])
        last = mine[-1]
        ax1.scatter(last["bits_per_residue"], last["tm_score"], s=40)
        ax1.annotate(f"{name} ({last['cpu_minutes']:g} min)",
                     (last["bits_per_residue"], last["tm_score"]), xytext=(6, 12 * (k % 2) - 4),
                     textcoords="offset points", fontsize=8)  # fmt: skip
        ax2.plot([r["cpu_minutes"] for r in mine], [r["tm_score"] for r in mine], "o-", label=name)
    if ceiling:
        for ax in (ax1, ax2):
            ax.axhline(
                ceiling["tm_score"], color="k", ls="--", lw=1, label="ceiling (no tokenizer)"
            )
    ax1.set_xscale("log")
    ax1.set_xlabel("bits per residue (median over the held-out proteins)")
    ax1.set_ylabel("held-out median TM-score")
    ax1.set_title("rate-distortion at the last CPU-time mark", fontsize=10)
    ax2.set_xlabel("training CPU minutes (1 thread)")
    ax2.set_ylabel("held-out median TM-score")
    ax2.set_title("TM-score against training time", fontsize=10)
    ax2.legend(fontsize=8)
    for ax in (ax1, ax2):
        ax.set_ylim(0, 1.02)
    fig.tight_layout()
    fig.savefig(os.path.join(OUT, "rate_distortion.png"), dpi=100)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=os.path.join(ROOT, "data", "bm5"))
    p.add_argument("--structures", default=os.path.join(ROOT, "..", "shared", "data", "structures"))
    p.add_argument("--split-key-regex", default=None,
                   help="train/validation split key (default: by complex for BM5, by PDB id "
                        "for ProMod3, chosen from the data folder's name)")  # fmt: skip
    p.add_argument("--minutes", type=float, nargs="+", default=[5, 10, 15, 20, 30])
    p.add_argument("--only", nargs="+", choices=sorted(CONFIGS), default=sorted(CONFIGS))
    p.add_argument("--proteins", type=int, default=40)
    p.add_argument("--work", default=os.path.join(ROOT, "runs", "rate_distortion"))
    p.add_argument("--table-only", action="store_true", help="redraw from results.jsonl")
    args = p.parse_args(argv)
    os.makedirs(OUT, exist_ok=True)
    if not args.table_only:
        if not os.path.isdir(args.data):
            print(f"rate_distortion: {args.data} not found: protoken convert "
                  "../shared/data/train --out data/bm5 --chains split --models first",
                  file=sys.stderr)  # fmt: skip
            return 1
        args.valid_frac = COMMON["valid_frac"]
        if args.split_key_regex is None:
            promod3 = "promod3" in os.path.basename(os.path.normpath(args.data))
            args.split_key_regex = "^([0-9A-Za-z]{4})_" if promod3 else COMMON["split_key_regex"]
            args.valid_frac = 0.02 if promod3 else COMMON["valid_frac"]
        args.minutes = sorted(args.minutes)
        args.ceiling = True
        proteins = heldout_proteins(args.proteins, args.structures)
        for name in args.only:
            run_config(name, args, proteins)
    write_table_and_plot()
    return 0


if __name__ == "__main__":
    sys.exit(main())
