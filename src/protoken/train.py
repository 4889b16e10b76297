"""Training the hierarchical VQ-VAE: one process, or DDP under torchrun.

    protoken train --data IMAGES --out RUN --preset tiny --max-steps 2000
    torchrun --nproc_per_node=8 -m protoken train --data IMAGES --out RUN --preset small

Like nanoGPT's train.py, the whole loop is this one file, read top to bottom: configuration,
distributed set-up, data, model and optimiser, then the loop (learning-rate schedule, gradient
accumulation with ``no_sync``, mixed precision, clipping), evaluation, logging and checkpoints.

What a run leaves in RUN:

- ``config.json``: the full training configuration (model config included);
- ``metrics.jsonl``: one JSON object per logged step and per evaluation;
- ``last.pt`` (every ``ckpt_interval`` steps, at the end, and on SIGTERM / SIGINT) and ``best.pt``
  (lowest validation loss): self-describing checkpoints (model config, codec settings, version)
  that ``--resume`` continues exactly and ``protoken encode/decode/evaluate`` load;
- ``samples/step_NNNNNN.png``: input | reconstruction | error, per channel, for a few
  validation proteins at each evaluation.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from protoken import __version__
from protoken.codec import CodecSettings
from protoken.fileio import atomic_path
from protoken.model import VQVAE, VQVAEConfig

__all__ = ["TrainConfig", "load_checkpoint", "main", "train"]

CHECKPOINT_FORMAT = 1


# --------------------------------------------------------------------------- configuration


@dataclass
class TrainConfig:
    """Everything a training run depends on (saved as RUN/config.json).

    ``preset`` names a model preset (tiny, small, seed) and ``model`` overrides its fields,
    e.g. ``{"codebook_size": 512}``. ``dmax`` and ``bit_depth`` default to what
    ``protoken convert`` recorded in DATA/convert.json.
    """

    data: str = ""
    out: str = "runs/protoken"
    preset: str = "tiny"
    model: dict = field(default_factory=dict)
    # data
    only_bins: list = field(default_factory=list)
    skip_bins: list = field(default_factory=list)
    valid_frac: float = 0.05
    batch_size: int = 8
    group_by_bin: bool = True
    shuffle_buffer: int = 10_000
    num_workers: int = 2
    normalize: str = "none"
    dmax: float | None = None
    bit_depth: int | None = None
    # optimisation
    max_steps: int = 2000
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100
    weight_decay: float = 0.05
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    dtype: str = "auto"  # auto: bfloat16 on CUDA, float32 on CPU; or float32, bfloat16, float16
    # evaluation, logging, checkpoints
    eval_interval: int = 200
    eval_batches: int = 4
    eval_structures: int = 3
    log_interval: int = 10
    ckpt_interval: int = 200
    seed: int = 0
    wandb: bool = False
    wandb_project: str = "protoken"
    wandb_run_name: str = ""

    def __post_init__(self) -> None:
        _check_types(self)
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(
                f"dtype must be auto, float32, bfloat16 or float16, not {self.dtype!r}"
            )
        if self.normalize not in ("none", "seed"):
            raise ValueError(f"normalize must be 'none' or 'seed', not {self.normalize!r}")
        for name in ("batch_size", "grad_accum", "max_steps", "eval_interval", "log_interval",
                     "ckpt_interval"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, not {getattr(self, name)}")

    def model_config(self) -> VQVAEConfig:
        return VQVAEConfig.preset(self.preset, **_tuples(self.model))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown config keys: {', '.join(unknown)}")
        return cls(**d)

    @classmethod
    def from_file(cls, path: str) -> TrainConfig:
        """Load a JSON or YAML file (``.json``, ``.yaml``, ``.yml``)."""
        with open(path) as fh:
            if path.endswith((".yaml", ".yml")):
                import yaml

                d = yaml.safe_load(fh) or {}
            else:
                d = json.load(fh)
        if not isinstance(d, dict):
            raise ValueError(f"{path}: expected a mapping of config keys")
        return cls.from_dict(d)


def _tuples(d: dict) -> dict:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}


def _check_types(cfg: TrainConfig) -> None:
    """Reject values of the wrong type with one clear message (a YAML '8x' or a bool typo)."""
    hints = {f.name: f.type for f in dataclasses.fields(cfg)}
    for name, hint in hints.items():
        value = getattr(cfg, name)
        hint = str(hint)
        ok = True
        if hint == "bool":
            ok = isinstance(value, bool)
        elif hint == "int":
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif hint == "float":
            ok = isinstance(value, int | float) and not isinstance(value, bool)
            if ok:
                setattr(cfg, name, float(value))
        elif hint == "float | None":
            ok = value is None or (isinstance(value, int | float) and not isinstance(value, bool))
        elif hint == "int | None":
            ok = value is None or (isinstance(value, int) and not isinstance(value, bool))
        elif hint == "str":
            ok = isinstance(value, str)
        elif hint == "list":
            ok = isinstance(value, list | tuple)
        elif hint == "dict":
            ok = isinstance(value, dict)
        if not ok:
            raise ValueError(
                f"config value {name}={value!r} has the wrong type "
                f"({type(value).__name__}, expected {hint})"
            )


def parse_bool(text: str) -> bool:
    """Strict boolean parsing for flags (the seed's ``type=bool`` makes 'False' true)."""
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, not {text!r}")


def _parse_override(text: str) -> tuple[str, Any]:
    """``key=value`` with the value read as JSON when it parses (numbers, true, lists)."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, not {text!r}")
    key, raw = text.split("=", 1)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip(), value


# --------------------------------------------------------------------------- distributed


@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def master(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup_distributed() -> Dist:
    """Read RANK / WORLD_SIZE / LOCAL_RANK (torchrun) and start the process group: NCCL on
    CUDA, gloo on CPU. Without torchrun: one process, CUDA if available."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    if world_size > 1:
        rank = int(os.environ["RANK"])
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if cuda:
            torch.cuda.set_device(local_rank)
            device = torch.device("cuda", local_rank)
        else:
            device = torch.device("cpu")
        dist.init_process_group(backend="nccl" if cuda else "gloo")
        return Dist(rank, local_rank, world_size, device)
    return Dist(device=torch.device("cuda" if cuda else "cpu"))


def _all_mean(value: float, d: Dist) -> float:
    if not d.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=d.device)
    dist.all_reduce(t)
    return float(t) / d.world_size


# --------------------------------------------------------------------------- data


def _codec_settings(cfg: TrainConfig) -> CodecSettings:
    from protoken.convert import read_settings

    recorded = read_settings(cfg.data) or {}
    dmax = cfg.dmax if cfg.dmax is not None else recorded.get("dmax", 80.0)
    bit_depth = cfg.bit_depth if cfg.bit_depth is not None else recorded.get("bit_depth", 8)
    for key, value in (("dmax", dmax), ("bit_depth", bit_depth)):
        if key in recorded and recorded[key] != value:
            raise ValueError(
                f"config {key}={value} but {cfg.data} was converted with {key}={recorded[key]}"
            )
    return CodecSettings(dmax=float(dmax), bit_depth=int(bit_depth), normalize=cfg.normalize)


def build_loaders(cfg: TrainConfig, model_cfg: VQVAEConfig, d: Dist):
    """Infinite shuffled training loader and finite validation loader (see protoken.data)."""
    from torch.utils.data import DataLoader

    from protoken.data import IterableImageDatasetUni, collate_with_padding

    if not cfg.data or not os.path.isdir(cfg.data):
        raise FileNotFoundError(f"data folder not found: {cfg.data!r} (run protoken convert)")
    common = dict(
        valid_frac=cfg.valid_frac,
        normalize=None if cfg.normalize == "none" else cfg.normalize,
        rank=d.rank,
        world_size=d.world_size,
        only_bins=cfg.only_bins or None,
        skip_bins=cfg.skip_bins or None,
        seed=cfg.seed,
    )
    factor = model_cfg.downsample_factor
    train_ds = IterableImageDatasetUni(
        cfg.data, split="train", infinite=True, shuffle_buffer=cfg.shuffle_buffer,
        batch_size=cfg.batch_size, group_by_bin=cfg.group_by_bin, multiple=factor, **common,
    )  # fmt: skip
    loader_kw = dict(num_workers=cfg.num_workers, pin_memory=d.device.type == "cuda")
    if cfg.num_workers > 0:
        loader_kw["prefetch_factor"] = 4
    train_dl = DataLoader(train_ds, batch_size=None, **loader_kw)

    def val_loader(sharded: bool):
        kw = dict(common, rank=d.rank if sharded else 0, world_size=d.world_size if sharded else 1)
        try:
            # a fixed-seed shuffle: the same batches at every evaluation, drawn from all bins
            ds = IterableImageDatasetUni(cfg.data, split="val", shuffle_buffer=10_000, **kw)
        except ValueError as exc:
            raise ValueError(f"validation split: {exc} (valid_frac={cfg.valid_frac})") from None
        collate = partial(collate_with_padding, multiple=factor)
        return DataLoader(ds, batch_size=cfg.batch_size, collate_fn=collate, num_workers=0)

    # every rank must run the same number of validation batches: shard the split by rank when
    # every rank gets some of it, else let every rank evaluate the whole (small) split
    val_dl = val_loader(sharded=True)
    has_val = next(iter(val_dl), None) is not None
    if d.enabled:
        flag = torch.tensor([1.0 if has_val else 0.0], device=d.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        if flag.item() == 0:
            val_dl = val_loader(sharded=False)
            has_val = next(iter(val_dl), None) is not None
    if not has_val:
        raise ValueError(
            f"the validation split of {cfg.data} is empty (valid_frac={cfg.valid_frac}): "
            "raise valid_frac or add images"
        )
    return train_ds, train_dl, val_dl


# --------------------------------------------------------------------------- optimisation


def configure_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device):
    """AdamW; weight decay on matrices and convolution kernels only (not on biases, norms)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    extra = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), **extra)


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to ``lr``, then cosine decay to ``min_lr`` at ``max_steps``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype:
    if cfg.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[
        cfg.dtype
    ]


# --------------------------------------------------------------------------- checkpoints


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(),  # noqa: NPY002
             "torch": torch.get_rng_state()}  # fmt: skip
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])  # noqa: NPY002 - global state, for exact resume
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str, **payload) -> None:
    """torch.save to a temporary file in the same folder, then rename (atomic)."""
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path: str, map_location="cpu") -> dict:
    """Load a training checkpoint; raises ValueError with a clear message on a foreign file."""
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except (OSError, RuntimeError, EOFError) as exc:
        raise ValueError(f"cannot read checkpoint {path}: {exc}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a protoken checkpoint (format {CHECKPOINT_FORMAT})")
    return ckpt


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(model, val_dl, cfg: TrainConfig, codec: CodecSettings, d: Dist, amp) -> tuple:
    """Masked validation loss and Cb-distance MAE over ``eval_batches`` batches on every rank
    (identical counts, so collectives line up), plus structure metrics of a few proteins.

    Returns (metrics dict, a few (input, recon, length, id) samples as numpy arrays).
    """
    from protoken.data import take_batches

    raw = model.module if isinstance(model, DDP) else model
    raw.eval()
    tot_loss = tot_recon = tot_mae = 0.0
    n = 0
    samples = []
    for batch in take_batches(val_dl, cfg.eval_batches):
        x, mask = batch["image"].to(d.device), batch["mask"].to(d.device)
        with amp:
            out = raw(x, mask)
        tot_loss += float(out.loss)
        tot_recon += float(out.recon_loss)
        tot_mae += _distance_mae(x, out.recon.float(), mask, codec)
        n += 1
        for i, pid in enumerate(batch["ids"]):
            if len(samples) < cfg.eval_structures and pid not in {smp[3] for smp in samples}:
                length = int(batch["lengths"][i])
                samples.append((
                    _to_unit(x[i, :, :length, :length], codec).cpu().numpy(),
                    _to_unit(out.recon[i, :, :length, :length].float(), codec).cpu().numpy(),
                    length,
                    batch["ids"][i],
                ))  # fmt: skip
    raw.train()
    metrics = {
        "val_loss": _all_mean(tot_loss / max(n, 1), d),
        "val_recon": _all_mean(tot_recon / max(n, 1), d),
        "val_cb_distance_mae": _all_mean(tot_mae / max(n, 1), d),
    }
    if d.master and samples:
        metrics.update(_structure_metrics(samples, codec))
    return metrics, samples


def _to_unit(image: torch.Tensor, codec: CodecSettings) -> torch.Tensor:
    """Model space -> [-1, 1] image space (undo the standardisation, if any)."""
    if codec.normalize == "none":
        return image
    from protoken.codec import unstandardize

    return unstandardize(image)


def _distance_mae(x, recon, mask, codec: CodecSettings) -> float:
    """Mean |d_recon - d_true| in Angstrom over valid pixels of the lower triangle (i > j)."""
    xt, rt = _to_unit(x.float(), codec), _to_unit(recon, codec)
    n = x.shape[-1]
    lower = torch.ones(n, n, dtype=torch.bool, device=x.device).tril(-1)
    valid = mask & lower
    d_true = (xt[:, 0] + 1) / 2 * codec.dmax
    d_rec = (rt[:, 0].clamp(-1, 1) + 1) / 2 * codec.dmax
    return float(((d_rec - d_true).abs() * valid).sum() / valid.sum().clamp(min=1))


def _structure_metrics(samples, codec: CodecSettings) -> dict:
    """MDS Cb RMSD and TM-score of each reconstruction against the input image's own MDS."""
    from protoken.metrics import rmsd, tm_score
    from protoken.reconstruct import reconstruct

    rmsds, tms = [], []
    for inp, rec, _length, _id in samples:
        truth = reconstruct(inp, dmax=codec.dmax).cb
        pred = reconstruct(np.clip(rec, -1, 1), dmax=codec.dmax).cb
        rmsds.append(rmsd(pred, truth))
        tms.append(tm_score(pred, truth))
    return {"val_cb_rmsd": float(np.mean(rmsds)), "val_tm_score": float(np.mean(tms))}


def save_samples(path: str, samples, codec: CodecSettings) -> None:
    """A PNG grid: one row per protein and channel, columns input | reconstruction | |error|."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = len(samples) * 3
    fig, axes = plt.subplots(rows, 3, figsize=(7.5, 2.4 * rows), squeeze=False)
    names = ("ch0: d (lower) / omega (upper)", "ch1: theta", "ch2: phi")
    for k, (inp, rec, length, pid) in enumerate(samples):
        for c in range(3):
            r = 3 * k + c
            for col, (img, title, cmap, vmax) in enumerate((
                (inp[c], "input", "viridis", 1), (rec[c], "reconstruction", "viridis", 1),
                (np.abs(rec[c] - inp[c]), "|error|", "magma", 0.5),
            )):  # fmt: skip
                ax = axes[r, col]
                ax.imshow(img, cmap=cmap, vmin=0 if col == 2 else -1, vmax=vmax,
                          interpolation="nearest")  # fmt: skip
                ax.set_xticks([])
                ax.set_yticks([])
                if col == 0:
                    ax.set_ylabel(f"{pid} (L={length})\n{names[c]}", fontsize=7)
                if r == 0:
                    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=80)
    plt.close(fig)


# --------------------------------------------------------------------------- the loop


class _Stop:
    """Set by SIGTERM / SIGINT: the loop saves last.pt at the next step boundary and exits."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._old: dict = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.signal = signum

    def __exit__(self, *exc) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def train(cfg: TrainConfig, resume: bool = False) -> dict:
    """Run (or resume) training; returns the last logged metrics.

    Raises
    ------
    FileNotFoundError
        The data folder is missing; or ``resume`` without RUN/last.pt.
    ValueError
        An empty dataset, a bad config value, or a checkpoint made with another config.
    """
    d = setup_distributed()
    try:
        return _train(cfg, resume, d)
    finally:
        if d.enabled and dist.is_initialized():
            dist.destroy_process_group()


def _train(cfg: TrainConfig, resume: bool, d: Dist) -> dict:
    model_cfg = cfg.model_config()
    codec = _codec_settings(cfg)
    os.makedirs(os.path.join(cfg.out, "samples"), exist_ok=True)
    last_path = os.path.join(cfg.out, "last.pt")
    best_path = os.path.join(cfg.out, "best.pt")

    ckpt = None
    if not resume and os.path.exists(last_path):
        raise ValueError(
            f"{cfg.out} already holds a run ({last_path}): pass --resume to continue it, "
            "or choose another --out"
        )
    if resume:
        if not os.path.exists(last_path):
            raise FileNotFoundError(f"--resume: no checkpoint at {last_path}")
        ckpt = load_checkpoint(last_path, map_location=d.device)
        if ckpt["model_config"] != model_cfg.to_dict():
            raise ValueError(
                f"{last_path} was trained with another model config; "
                f"differences: {_dict_diff(ckpt['model_config'], model_cfg.to_dict())}"
            )
        if ckpt["codec"] != codec.to_dict():
            raise ValueError(f"{last_path} used codec settings {ckpt['codec']}, now {codec}")

    # identical initial weights on every rank; data order differs by rank through sharding
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)  # noqa: NPY002
    model = VQVAE(model_cfg).to(d.device)
    optimizer = configure_optimizer(model, cfg, d.device)
    dtype = autocast_dtype(cfg, d.device)
    amp = (torch.autocast(device_type=d.device.type, dtype=dtype)
           if dtype != torch.float32 else nullcontext())  # fmt: skip
    scaler = torch.amp.GradScaler(d.device.type, enabled=dtype == torch.float16)

    step, best_val, consumed = 0, float("inf"), 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        step, best_val, consumed = ckpt["step"], ckpt["best_val"], ckpt["batches_consumed"]

    train_ds, train_dl, val_dl = build_loaders(cfg, model_cfg, d)
    # EMA statistics are all-reduced inside the quantisers, so every rank holds the same
    # codebooks: no buffer broadcast (the seed's broadcast overwrote every rank's update)
    ddp = DDP(model, **_no_buffer_broadcast()) if d.enabled else model
    raw = model

    if d.master:
        with open(os.path.join(cfg.out, "config.json"), "w") as fh:
            json.dump({**cfg.to_dict(), "model_config": model_cfg.to_dict(),
                       "codec": codec.to_dict()}, fh, indent=1)  # fmt: skip
        print(f"protoken train: {raw.num_parameters():,} parameters, preset {cfg.preset}, "
              f"{d.world_size} process(es) on {d.device}, dtype {dtype}, "
              f"padding multiple {model_cfg.downsample_factor}", flush=True)  # fmt: skip
    wandb_run = _init_wandb(cfg, model_cfg, d) if cfg.wandb and d.master else None

    from protoken.data import cycle

    batches = cycle(train_dl)
    if ckpt is not None:
        # replay the data stream to where the checkpoint was taken, then restore the random
        # state saved there (after the loader iterator drew its seed, as in the first run)
        for _ in range(consumed):
            next(batches)
        if consumed == 0:
            batches = _prepend(next(batches), batches)
        _set_rng_state(ckpt["rng"][min(d.rank, len(ckpt["rng"]) - 1)])

    metrics_path = os.path.join(cfg.out, "metrics.jsonl")
    last: dict = {}
    window_images, window_start = 0, time.perf_counter()
    ddp.train()
    with _Stop() as stop:
        while step < cfg.max_steps:
            lr = learning_rate(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum = recon_sum = commit_sum = 0.0
            usage = perplexity = None
            for micro in range(cfg.grad_accum):
                batch = next(batches)
                consumed += 1
                x = batch["image"].to(d.device, non_blocking=True)
                mask = batch["mask"].to(d.device, non_blocking=True)
                last_micro = micro == cfg.grad_accum - 1
                sync = nullcontext() if (last_micro or not d.enabled) else ddp.no_sync()
                with sync:
                    with amp:
                        out = ddp(x, mask)
                        loss = out.loss / cfg.grad_accum
                    scaler.scale(loss).backward()
                loss_sum += out.loss.item() / cfg.grad_accum
                recon_sum += out.recon_loss.item() / cfg.grad_accum
                commit_sum += out.commit_loss.item() / cfg.grad_accum
                usage, perplexity = out.usage.detach(), out.perplexity.detach()
                window_images += x.shape[0]
            scaler.unscale_(optimizer)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(raw.parameters(), cfg.grad_clip))
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step += 1

            if step % cfg.log_interval == 0 or step == cfg.max_steps:
                elapsed = time.perf_counter() - window_start
                last = {
                    "step": step,
                    "loss": _all_mean(loss_sum, d),
                    "recon": _all_mean(recon_sum, d),
                    "commit": _all_mean(commit_sum, d),
                    "lr": lr,
                    "grad_norm": grad_norm,
                    "images_per_s": window_images * d.world_size / max(elapsed, 1e-9),
                    "codebook_usage": [round(float(u), 4) for u in usage],
                    "perplexity": [round(float(p), 2) for p in perplexity],
                }
                window_images, window_start = 0, time.perf_counter()
                if d.master:
                    _log(metrics_path, last, wandb_run)
                    print(f"step {step:6d} | loss {last['loss']:.4f} | recon {last['recon']:.4f} "
                          f"| commit {last['commit']:.4f} | lr {lr:.2e} | grad {grad_norm:.2f} "
                          f"| {last['images_per_s']:.1f} img/s | usage "
                          f"{'/'.join(f'{u:.2f}' for u in last['codebook_usage'])}",
                          flush=True)  # fmt: skip

            if step % cfg.eval_interval == 0 or step == cfg.max_steps:
                val, samples = evaluate(ddp, val_dl, cfg, codec, d, amp)
                val["step"] = step
                improved = val["val_loss"] < best_val
                best_val = min(best_val, val["val_loss"])
                if d.master:
                    sample_path = os.path.join(cfg.out, "samples", f"step_{step:06d}.png")
                    save_samples(sample_path, samples, codec)
                    _log(metrics_path, val, wandb_run, image=sample_path)
                    print("eval " + " | ".join(f"{k} {v:.4f}" for k, v in val.items()
                                               if k != "step"), flush=True)  # fmt: skip
                last.update(val)
                if improved:
                    _checkpoint(best_path, raw, optimizer, scaler, step, best_val, consumed,
                                cfg, model_cfg, codec, d)  # fmt: skip

            stop_now = _agree(stop.signal is not None, d)
            if step % cfg.ckpt_interval == 0 or step == cfg.max_steps or stop_now:
                _checkpoint(last_path, raw, optimizer, scaler, step, best_val, consumed, cfg,
                            model_cfg, codec, d)  # fmt: skip
            if stop_now:
                if d.master:
                    print(f"protoken train: stopped by signal at step {step}; "
                          f"{last_path} saved, continue with --resume", flush=True)  # fmt: skip
                break
    if wandb_run is not None:
        wandb_run.finish()
    return last


def _no_buffer_broadcast() -> dict:
    """DDP keyword that stops the per-forward buffer broadcast (buffers still synced at init)."""
    import inspect

    if "forward_sync_buffers" in inspect.signature(DDP).parameters:  # torch >= 2.13
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}


def _prepend(first, rest):
    yield first
    yield from rest


def _agree(flag: bool, d: Dist) -> bool:
    """True on every rank when any rank got a stop signal (so all stop at the same step)."""
    if not d.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=d.device)
    dist.all_reduce(t)
    return bool(t.item() > 0)


def replica_checksum(model: torch.nn.Module) -> float:
    """A weighted sum over every parameter and buffer: equal on all ranks iff (barring a
    one-in-2^52 coincidence) the replicas hold the same weights and codebooks."""
    total = torch.zeros((), dtype=torch.float64)
    for k, t in enumerate(list(model.parameters()) + list(model.buffers())):
        flat = t.detach().double().flatten()
        weights = torch.cos(torch.arange(flat.numel(), dtype=torch.float64, device=flat.device)
                            * 0.7 + k)  # fmt: skip
        total += (flat * weights).sum().cpu()
    return float(total)


def _checkpoint(path, model, optimizer, scaler, step, best_val, consumed, cfg, model_cfg, codec,
                d: Dist) -> None:  # fmt: skip
    """Check the DDP replicas agree, gather every rank's RNG state, and let rank 0 write the
    checkpoint atomically."""
    rng = [_rng_state()]
    if d.enabled:
        sums = [None] * d.world_size
        dist.all_gather_object(sums, replica_checksum(model))
        if len(set(sums)) != 1:
            raise RuntimeError(f"DDP replicas diverged at step {step}: checksums {sums}")
        if d.master:
            print(f"step {step}: {d.world_size} replicas identical (checksum {sums[0]:.12g})",
                  flush=True)  # fmt: skip
        gathered = [None] * d.world_size
        dist.all_gather_object(gathered, rng[0])
        rng = gathered
    if d.master:
        save_checkpoint(
            path,
            format=CHECKPOINT_FORMAT,
            version=__version__,
            model=model.state_dict(),
            optimizer=optimizer.state_dict(),
            scaler=scaler.state_dict(),
            step=step,
            best_val=best_val,
            batches_consumed=consumed,
            config=cfg.to_dict(),
            model_config=model_cfg.to_dict(),
            codec=codec.to_dict(),
            rng=rng,
        )
    if d.enabled:
        dist.barrier()


def _log(path: str, record: dict, wandb_run, image: str | None = None) -> None:
    with open(path, "a") as fh:
        fh.write(json.dumps(record) + "\n")
    if wandb_run is not None:
        payload = {k: v for k, v in record.items() if k != "step"}
        for key in ("codebook_usage", "perplexity"):
            if key in payload:
                for level, value in enumerate(payload.pop(key)):
                    payload[f"{key}/level{level}"] = value
        if image is not None:
            import wandb

            payload["samples"] = wandb.Image(image)
        wandb_run.log(payload, step=record["step"])


def _init_wandb(cfg: TrainConfig, model_cfg: VQVAEConfig, d: Dist):
    """Start a W&B run (optional extra; honours WANDB_MODE, e.g. offline)."""
    try:
        import wandb
    except ImportError:
        raise RuntimeError(
            "--wandb needs the wandb package: pip install 'protoken[wandb]'"
        ) from None
    return wandb.init(
        project=cfg.wandb_project, name=cfg.wandb_run_name or None, dir=cfg.out,
        config={**cfg.to_dict(), "model_config": model_cfg.to_dict()},
    )  # fmt: skip


def _dict_diff(a: dict, b: dict) -> str:
    keys = sorted(set(a) | set(b))
    return ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in keys if a.get(k) != b.get(k))


# --------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", help="folder written by protoken convert (bin_*/ID.png)")
    parser.add_argument("--out", help="run folder (checkpoints, metrics, samples)")
    parser.add_argument("--config", help="YAML or JSON file of TrainConfig values")
    parser.add_argument("--preset", choices=["tiny", "small", "seed"], help="model preset")
    parser.add_argument("--max-steps", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--num-workers", type=int, help="DataLoader workers per process")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--resume", action="store_true", help="continue from RUN/last.pt")
    parser.add_argument("--wandb", action="store_true", help="log to Weights & Biases")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        type=_parse_override, metavar="KEY=VALUE",
                        help="any TrainConfig value, e.g. --set eval_interval=100 "
                             "--set 'model={\"codebook_size\": 512}' (repeatable)")  # fmt: skip


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    base = TrainConfig.from_file(args.config).to_dict() if args.config else {}
    for key in ("data", "out", "preset", "max_steps", "batch_size", "lr", "num_workers", "dtype"):
        value = getattr(args, key)
        if value is not None:
            base[key] = value
    if args.wandb:
        base["wandb"] = True
    bools = {f.name for f in dataclasses.fields(TrainConfig) if str(f.type) == "bool"}
    for key, value in args.overrides:
        if key in bools and isinstance(value, str):  # --set group_by_bin=False means False
            try:
                value = parse_bool(value)
            except ValueError as exc:
                raise ValueError(f"--set {key}: {exc}") from None
        base[key] = value
    if not base.get("data"):
        raise ValueError("--data is required (a folder written by protoken convert)")
    if not base.get("out"):
        raise ValueError("--out is required (the run folder)")
    return TrainConfig.from_dict(base)


def run(args: argparse.Namespace) -> int:
    try:
        cfg = config_from_args(args)
        train(cfg, resume=args.resume)
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        print(f"protoken train: error: {exc}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    from protoken.cli import main as cli_main

    return cli_main(["train", *(argv if argv is not None else sys.argv[1:])])
