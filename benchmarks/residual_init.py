"""Does nanoGPT's scaled residual initialisation help the held-out loss? (issue 13)

Usage: python benchmarks/residual_init.py [--steps 300] [--seeds 0 1] [--images DIR]

nanoGPT initialises the output projection of every attention and MLP block (``c_proj``) with
N(0, 0.02 / sqrt(2 n_layer)), so that the residual stream's variance does not grow with depth.
protoken does the same (Transformer.init_residual_projections); this script measures it against
PyTorch's default, U(+-1/sqrt(fan_in)) for weights and biases: the tiny preset, trained from the
same initial weights except those projections (n_layer is the number of blocks of each level's
transformer), on the BM5 structures of ../shared/data/train converted with ``--chains split``
(40-128 residues by default), split into train and held-out proteins by complex id (bound and
unbound files of one complex never on both sides).
AdamW, warm-up then cosine, batch 8 grouped by length bin. Prints, per seed and variant, the
held-out masked MSE (the training loss without the commitment term), the held-out Cb-distance
MAE (A) and the training loss of the last 20 steps; a JSON summary last.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from protoken.codec import read_image
from protoken.convert import ConvertOptions, convert
from protoken.inputs import walk_files
from protoken.metrics import distance_mae
from protoken.model import HierarchicalConfig, HierarchicalVQVAE, mask_from_lengths
from protoken.model.transformer import Transformer

REPO = Path(__file__).resolve().parents[1]


def set_projections(model: torch.nn.Module, scaled: bool) -> None:
    """(Re-)initialise every attention and MLP output projection: PyTorch's default, or as
    nanoGPT (protoken's own initialisation, Transformer.init_residual_projections)."""
    for stack in model.modules():
        if isinstance(stack, Transformer):
            if scaled:
                stack.init_residual_projections()
            else:
                for block in stack.blocks:
                    block.attn.proj.reset_parameters()
                    block.mlp.proj.reset_parameters()


def complex_id(path: str) -> str:
    """BM5 ids: ``bm5__1A2K_l_b-matched_A.png`` -> ``1A2K``."""
    return os.path.basename(path).split("__", 1)[-1].split("_")[0]


def load_split(images: str, max_len: int, held_out: float = 0.15):
    """(train, val): images (3, L, L) by length bin, L <= max_len; val by md5 of the complex."""
    train, val = {}, {}
    for path in walk_files(images, (".png",)):
        if int(os.path.basename(os.path.dirname(path)).split("_")[1]) > max_len:
            continue  # the bin's lower bound is above max_len
        digest = hashlib.md5(complex_id(path).encode()).digest()
        side = val if int.from_bytes(digest[:4], "big") / 2**32 < held_out else train
        image = read_image(path)
        side.setdefault(os.path.basename(os.path.dirname(path)), []).append(image)
    return train, val


def batch_of(images: list[np.ndarray], factor: int):
    lengths = [im.shape[-1] for im in images]
    side = -(-max(lengths) // factor) * factor
    x = torch.zeros(len(images), 3, side, side)
    for i, im in enumerate(images):
        x[i, :, : lengths[i], : lengths[i]] = torch.from_numpy(im)
    return x, mask_from_lengths(lengths, side)


def train_batches(train: dict, batch: int, rng: random.Random):
    bins = sorted(train)
    weights = [len(train[b]) for b in bins]
    while True:
        b = rng.choices(bins, weights)[0]
        yield rng.sample(train[b], min(batch, len(train[b])))


@torch.no_grad()
def held_out(model: HierarchicalVQVAE, val: dict, factor: int) -> tuple[float, float]:
    model.eval()
    sse = pixels = 0.0
    maes, counts = [], []
    for images in val.values():
        for start in range(0, len(images), 8):
            chunk = images[start : start + 8]
            x, mask = batch_of(chunk, factor)
            out = model(x, mask)
            n = float(mask.sum()) * 3
            sse += float(out.loss_sum / out.weight) * n
            pixels += n
            for i, im in enumerate(chunk):
                length = im.shape[-1]
                maes.append(distance_mae(im, out.recon[i, :, :length, :length].numpy(), 80.0))
                counts.append(length * (length - 1) / 2)
    model.train()
    return sse / pixels, float(np.average(maes, weights=counts))


def run(train, val, seed: int, scaled: bool, steps: int, lr: float) -> dict:
    torch.manual_seed(seed)
    model = HierarchicalVQVAE(HierarchicalConfig.preset("tiny"))
    torch.manual_seed(10_000 + seed)  # the same weights but for the projections
    set_projections(model, scaled)
    factor = model.config.downsample_factor
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95))  # fmt: skip
    warmup, min_lr = max(1, steps // 10), lr / 10
    batches = train_batches(train, 8, random.Random(seed))
    losses = []
    t0 = time.perf_counter()
    for step in range(steps):
        rate = lr * (step + 1) / warmup if step < warmup else min_lr + 0.5 * (lr - min_lr) * (
            1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))  # fmt: skip
        for group in opt.param_groups:
            group["lr"] = rate
        x, mask = batch_of(next(batches), factor)
        out = model(x, mask)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(out.loss.item())
    mse, mae = held_out(model, val, factor)
    return {"seed": seed, "init": "scaled" if scaled else "default", "steps": steps,
            "val_mse": round(mse, 5), "val_distance_mae_A": round(mae, 3),
            "train_loss_last20": round(float(np.mean(losses[-20:])), 5),
            "seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", default=str(REPO.parent / "shared"))
    parser.add_argument("--images", help="converted images (default: convert into a temp dir)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-len", type=int, default=128, help="longest protein used")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    images = args.images or tempfile.mkdtemp(prefix="protoken-bm5-")
    if not os.path.isfile(os.path.join(images, "manifest.tsv")):
        opts = ConvertOptions(out=images, chains="split", models="first", max_len=256)
        convert([os.path.join(args.shared, "data", "train")], opts, workers=args.threads,
                progress=False)  # fmt: skip
    train, val = load_split(images, args.max_len)
    print(f"images: {images}; train {sum(map(len, train.values()))}, "
          f"held out {sum(map(len, val.values()))} (by complex)", flush=True)  # fmt: skip
    results = []
    for seed in args.seeds:
        for scaled in (False, True):
            res = run(train, val, seed, scaled, args.steps, args.lr)
            print(json.dumps(res), flush=True)
            results.append(res)
    summary = {}
    for init in ("default", "scaled"):
        rows = [r for r in results if r["init"] == init]
        keys = ("val_mse", "val_distance_mae_A", "train_loss_last20")
        summary[init] = {k: round(float(np.mean([r[k] for r in rows])), 5) for k in keys}
    print(json.dumps({"mean_over_seeds": summary, "seeds": args.seeds, "steps": args.steps}))


if __name__ == "__main__":
    main()
