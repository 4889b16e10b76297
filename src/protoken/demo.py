"""``protoken demo``: the README's main job, on the structures bundled with the package.

Default (about a minute on 2 CPU cores, no training, nothing downloaded):

1. convert the 48 bundled structures to 6D images (``OUT/images``);
2. encode the held-out ones (``resources/structures/HELDOUT.txt``: the bundled proteins that
   share no sequence with the tokenizers' training set) with a pretrained tokenizer
   (``default``), decode the tokens to images and 3D, and write the report (``OUT/report``);
3. print the headline figures and what to do next.

``demo_train`` (``protoken demo --train``) trains a tiny tokenizer from scratch instead.
"""

from __future__ import annotations

import os
import time
from importlib import resources

__all__ = ["bundled_structures", "demo", "demo_train", "heldout_structures"]

VALID_FRAC = 0.2

NEXT_STEPS = """next:
  protoken encode YOUR_FILES -c {checkpoint} --out tokens.npz     # your structures -> tokens
  protoken encode YOUR_FILES -c residue --format fasta --out t.fasta  # one token per residue
  protoken decode tokens.npz -c {checkpoint} --out decoded           # tokens -> 3D
  protoken convert DATA --out imgs && protoken train --data imgs --preset residue-small --out run
                                                                   # train your own tokenizer"""


def bundled_structures() -> str:
    """Folder of the example structures shipped inside the package."""
    return str(resources.files("protoken").joinpath("resources/structures"))


def heldout_structures() -> list[str]:
    """Paths of the bundled structures held out from the pretrained tokenizers' training
    (no shared sequence k-mers with it; ``benchmarks/heldout.py`` writes the list)."""
    root = bundled_structures()
    with open(os.path.join(root, "HELDOUT.txt")) as fh:
        names = [line.strip() for line in fh if line.strip() and not line.startswith("#")]
    return [os.path.join(root, name) for name in names]


def _convert_bundled(out: str, stage: str, workers: int | None, log) -> str:
    """Convert the bundled structures into ``OUT/images`` (returned), logging the summary."""
    from protoken.convert import ConvertOptions, convert

    images = os.path.join(out, "images")
    log(f"{stage} converting the bundled structures into {images}")
    summary = convert(
        [bundled_structures()], ConvertOptions(out=images), workers=workers, progress=False
    )
    log(summary.text())
    return images


def demo(out: str, checkpoint: str = "default", workers: int | None = None, log=print) -> dict:
    """The pretrained demo; returns the evaluation summary."""
    from protoken.evaluate import evaluate
    from protoken.report import headline
    from protoken.tokenizer import Tokenizer

    t0 = time.perf_counter()
    _convert_bundled(out, "[1/2]", workers, log)
    tok = Tokenizer.load(checkpoint)
    held_out = heldout_structures()
    n_bundled = sum(1 for _ in os.scandir(bundled_structures()) if _.name.endswith(".gz"))
    report = os.path.join(out, "report")
    log(
        f"[2/2] encoding with the pretrained tokenizer {checkpoint!r} ({tok.family} family) "
        f"the {len(held_out)} bundled proteins held out from its training (the other "
        f"{n_bundled - len(held_out)} share a sequence 8-mer with the bundled tokenizers' "
        "training sets, BM5 or the ProMod3 chains; "
        f"resources/structures/HELDOUT.txt), decoding them to 3D, report in {report}"
    )
    result = evaluate(tok, held_out, report, workers=workers, progress=False, log=log)
    log(f"demo finished in {time.perf_counter() - t0:.0f} s")
    log(headline(result, report))
    log(_test_sets(checkpoint, len(held_out)))
    log(NEXT_STEPS.format(checkpoint=checkpoint))
    return result


def _test_sets(checkpoint: str, n: int) -> str:
    """Which proteins the demo's figures are of, beside those of the tokenizer's model card."""
    from protoken import pretrained

    text = f"(the figures above are of the {n} held-out bundled proteins"
    if pretrained.is_name(checkpoint):
        res = pretrained.info(checkpoint).get("results", {})
        if "tm_score_median" in res:
            text += (f"; the model card's median TM-score {res['tm_score_median']:.3f} is of "
                     f"its test set of {res.get('proteins', '?')} proteins: "
                     f"{res.get('test_set', 'see protoken pretrained')}")  # fmt: skip
    return text + ")"


def demo_train(out: str, max_steps: int = 600, workers: int | None = None, log=print) -> dict:
    """Train a tiny tokenizer on the bundled structures and evaluate it on its held-out
    validation split (md5 of each image's path, ``valid_frac=0.2``); returns the summary."""
    from protoken.convert.manifest import read_manifest
    from protoken.data import in_valid_split
    from protoken.evaluate import evaluate
    from protoken.report import headline
    from protoken.tokenizer import Tokenizer
    from protoken.train import TrainConfig, train

    t0 = time.perf_counter()
    images = _convert_bundled(out, "[1/3]", workers, log)

    run_dir = os.path.join(out, time.strftime("run-%Y%m%d-%H%M%S"))
    log(f"[2/3] training the tiny tokenizer for {max_steps} steps on CPU into {run_dir}")
    cfg = TrainConfig(
        data=images,
        out=run_dir,
        preset="tiny",
        valid_frac=VALID_FRAC,
        max_steps=max_steps,
        batch_size=8,
        lr=2e-3,
        min_lr=2e-4,
        warmup_steps=min(50, max_steps // 10 + 1),
        eval_interval=max(1, max_steps // 3),
        eval_batches=2,
        log_interval=max(1, max_steps // 20),
        ckpt_interval=max(1, max_steps // 3),
        num_workers=1,
        seed=0,
    )
    train(cfg)

    held_out = []
    for row in read_manifest(os.path.join(images, "manifest.tsv")):
        if row["status"] == "ok" and in_valid_split(f"{row['bin']}/{row['id']}.png", VALID_FRAC):
            held_out.append(row["source"])
    report = os.path.join(out, "report")
    log(f"[3/3] evaluating on the {len(held_out)} held-out proteins (full backbone) in {report}")
    tok = Tokenizer.load(os.path.join(run_dir, "best.pt"))
    result = evaluate(tok, sorted(held_out), report, backbone=True, workers=workers, progress=False)
    log(f"demo finished in {time.perf_counter() - t0:.0f} s")
    log(headline(result, report))
    return result
