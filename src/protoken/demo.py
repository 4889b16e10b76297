"""``protoken demo``: the README's main job, on the structures bundled with the package.

1. convert the 48 bundled structures to 6D images (``OUT/images``);
2. train the tiny preset on CPU for a few minutes (``OUT/run``), holding out the validation
   split (md5 of each image's path, ``valid_frac=0.2``);
3. evaluate the tokenizer on the held-out proteins, with the full backbone (``OUT/report``);
4. print the headline figures and where the report is.
"""

from __future__ import annotations

import os
import time
from importlib import resources

__all__ = ["bundled_structures", "demo"]

VALID_FRAC = 0.2


def bundled_structures() -> str:
    """Folder of the example structures shipped inside the package."""
    return str(resources.files("protoken").joinpath("resources/structures"))


def demo(out: str, max_steps: int = 600, workers: int | None = None, log=print) -> dict:
    """Run the demo; returns the evaluation summary."""
    from protoken.convert import ConvertOptions, convert, read_manifest
    from protoken.data import in_valid_split
    from protoken.evaluate import evaluate
    from protoken.report import headline
    from protoken.tokenizer import Tokenizer
    from protoken.train import TrainConfig, train

    t0 = time.perf_counter()
    images = os.path.join(out, "images")
    log(f"[1/3] converting the bundled structures into {images}")
    summary = convert(
        [bundled_structures()], ConvertOptions(out=images), workers=workers, progress=False
    )
    log(summary.text())

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
    tok = Tokenizer.from_checkpoint(os.path.join(run_dir, "best.pt"))
    result = evaluate(tok, sorted(held_out), report, backbone=True, workers=workers, progress=False)
    log(f"demo finished in {time.perf_counter() - t0:.0f} s")
    log(headline(result, report))
    return result
