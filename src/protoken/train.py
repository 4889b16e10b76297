"""Training a tokenizer (any model family of :mod:`protoken.model`): one process, or DDP.

    protoken train --data IMAGES --out RUN --preset tiny --max-steps 2000
    torchrun --nproc_per_node=8 -m protoken train --data IMAGES --out RUN --preset small
    srun --ntasks-per-node=8 --signal=USR1@60 python -m protoken train --data ... --out RUN

Like nanoGPT's train.py the loop (:func:`train`) reads top to bottom: config, distributed
set-up, data, model and optimiser, then steps (learning-rate schedule, gradient accumulation,
mixed precision, clipping), logging, validation and checkpoints. The pieces it calls are
above it, by section: distributed, data, optimisation, checkpoints, validation, logging. It is
one file of ~800 lines on purpose: the whole of a training run can be read in one place.

Loss weighting (``loss_weighting``), on the summed masked errors (``loss_sum`` of the model
output contract) of each micro-batch:

- ``step`` (default): divided by the valid pixels of the whole step, over every rank and
  accumulation step (counted on the host from the masks before the forward passes). Within a
  step every residue pair weighs the same whichever rank or micro-batch holds it, and
  ``grad_accum`` micro-batches give exactly the gradient of one large batch; steps weigh alike.
- ``pixel``: divided by one constant, the mean valid pixels of a step (from the index's
  lengths): every residue pair weighs the same across steps too, so a step of long proteins
  moves the weights more than a step of short ones.
- ``batch``: the former per-batch mean, averaged over micro-batches and ranks.

On held-out BM5 complexes (tiny preset, 200 steps, 2 seeds) ``pixel`` gave a lower mean
TM-score than the per-step weighting in every length bin (README, "Measured here"), hence
the default.

What a run leaves in RUN: ``config.json`` (the config, its model config and codec),
``metrics.jsonl`` (one JSON object per logged step and per validation), ``last.pt`` (every
``ckpt_interval`` steps, at the end, on pre-emption) and ``best.pt`` (lowest validation
loss), checkpoints of :mod:`protoken.checkpoint`; ``samples/step_NNNNNN.png``.

Pre-emption: SIGTERM, SIGINT or SIGUSR1, to the main process or its whole process group
(DataLoader workers ignore them), makes every rank stop at the next step boundary; rank 0
writes ``last.pt`` there and ``protoken train`` exits with
:data:`protoken.cli.EXIT_PREEMPTED` (75, ``EX_TEMPFAIL``: "requeue me"). ``--resume``
continues exactly: the sample order is a pure function of (seed, epoch, position, rank,
worker) (:class:`protoken.data.IndexedBatches`), so nothing is replayed.

Exit codes of ``protoken train``: 0 done, 2 bad config / data / checkpoint, 75 pre-empted
(``RUN/last.pt`` written; run the same command with ``--resume``).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from protoken import checkpoint
from protoken.codec import CodecSettings
from protoken.fileio import file_sha256
from protoken.model import config_to_dict
from protoken.train_config import RESUMABLE, TrainConfig, resumed_config

__all__ = ["RESUMABLE", "TrainConfig", "train"]

# --------------------------------------------------------------------------- distributed


@dataclass
class Dist:
    """This process's place in the job. ``control`` is a gloo group on the CPU for the small
    per-step agreements (global loss weight, stop flag), so they never wait for the GPU."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    control: Any = None

    @property
    def master(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup_distributed() -> Dist:
    """Read RANK / WORLD_SIZE / LOCAL_RANK (torchrun) or, in an ``srun`` step with one task per
    process, SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID (MASTER_ADDR and MASTER_PORT must be set)
    and start the process group: NCCL on CUDA, gloo on CPU. Otherwise one process."""
    env = os.environ
    # inside an srun step (not an salloc shell, where SLURM_NTASKS is set too)
    if "WORLD_SIZE" not in env and "SLURM_STEP_ID" in env and int(env["SLURM_NTASKS"]) > 1:
        env["WORLD_SIZE"], env["RANK"] = env["SLURM_NTASKS"], env["SLURM_PROCID"]
        env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
    world_size = int(env.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    if world_size == 1:
        return Dist(device=torch.device("cuda" if cuda else "cpu"))
    rank, local_rank = int(env["RANK"]), int(env.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    control = dist.new_group(backend="gloo") if cuda else None
    return Dist(rank, local_rank, world_size, device, control)


def agree(values: list[float], d: Dist, op=dist.ReduceOp.SUM) -> list[float]:
    """All-reduce a few numbers on the CPU control group (no GPU sync)."""
    if not d.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, op=op, group=d.control)
    return t.tolist()


# --------------------------------------------------------------------------- data


def codec_settings(cfg: TrainConfig) -> CodecSettings:
    """dmax and bit depth recorded by ``protoken convert`` (a config value must agree)."""
    from protoken.convert_settings import agreed, read_settings

    recorded = read_settings(cfg.data) or {}
    dmax = agreed(recorded, "dmax", cfg.dmax, f"the data {cfg.data}")
    bit_depth = agreed(recorded, "bit_depth", cfg.bit_depth, f"the data {cfg.data}")
    known = {"dmax": None if dmax is None else float(dmax),
             "bit_depth": None if bit_depth is None else int(bit_depth)}  # fmt: skip
    known = {k: v for k, v in known.items() if v is not None}
    return CodecSettings(normalize=cfg.normalize, **known)


@dataclass
class Data:
    """The training stream and the validation batches of one rank."""

    train: Any  # protoken.data.IndexedBatches
    train_loader: Any
    val_loader: Any
    n_train: int
    n_val: int

    @property
    def batches_per_epoch(self) -> int:
        return self.train.plan.batches_per_epoch


def build_data(cfg: TrainConfig, multiple: int, d: Dist, epoch: int, position: int) -> Data:
    """Index the dataset once (from its manifest, no directory walk), split it, and make the
    training stream (starting at ``epoch``, ``position``) and the fixed validation batches."""
    from torch.utils.data import DataLoader

    from protoken.data import BatchPlan, ImageIndex, IndexedBatches, ignore_signals, read_id_list

    if not cfg.data or not os.path.isdir(cfg.data):
        raise FileNotFoundError(f"data folder not found: {cfg.data!r} (run protoken convert)")
    cache = os.path.join(cfg.out, ".protoken-index")  # never in the data folder: it may be shared
    index = ImageIndex.build(cfg.data, cfg.only_bins or None, cfg.skip_bins or None, cache)
    exclude = read_id_list(cfg.exclude_ids_file) if cfg.exclude_ids_file else []
    rows = {
        split: index.split_rows(split, cfg.valid_frac, cfg.split_key_regex, exclude)
        for split in ("train", "val")
    }
    rows["train"] = index.oversampled(rows["train"], cfg.oversample)
    for split, r in rows.items():
        if not len(r):
            raise ValueError(
                f"the {split} split of {cfg.data} is empty (valid_frac={cfg.valid_frac}, "
                f"{len(index)} images): change valid_frac or add images"
            )
    common = dict(
        multiple=multiple,
        rank=d.rank,
        world_size=d.world_size,
        normalize=None if cfg.normalize == "none" else cfg.normalize,
        crop=cfg.crop,
    )
    train_plan = BatchPlan(
        index, rows["train"], cfg.batch_size, cfg.group_by_bin, cfg.seed, cfg.shard_window
    )
    train = IndexedBatches(train_plan, epoch=epoch, position=position,
                           split_chains=cfg.split_chains, split_pieces=cfg.split_pieces,
                           **common)  # fmt: skip
    per_window = train_plan.bins_per_window() if d.master else None
    n_bins = 0 if per_window is None else len(np.unique(index.bin_of[rows["train"]]))
    if per_window is not None and per_window < n_bins / 2:
        print(f"protoken train: warning: shard_window={cfg.shard_window} reads {per_window:.1f} "
              f"of the {n_bins} length bins at a time (each shard holds one bin), so stretches "
              "of training see only those lengths and a short run ends on a few of them; "
              "leave shard_window unset on a local disk", file=sys.stderr, flush=True)  # fmt: skip
    val_plan = BatchPlan(index, rows["val"], cfg.batch_size, cfg.group_by_bin, cfg.seed)
    val = IndexedBatches(val_plan, epoch=-1, num_batches=cfg.eval_batches, **common)
    workers = dict(num_workers=cfg.num_workers, worker_init_fn=ignore_signals)
    if cfg.num_workers > 0:
        workers["prefetch_factor"] = 4
    train_loader = DataLoader(
        train,
        batch_size=None,
        pin_memory=d.device.type == "cuda",
        generator=torch.Generator().manual_seed(cfg.seed),
        **workers,
    )
    val_loader = DataLoader(val, batch_size=None, num_workers=0)
    return Data(train, train_loader, val_loader, len(rows["train"]), len(rows["val"]))


# --------------------------------------------------------------------------- optimisation


def configure_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device):
    """AdamW; weight decay on matrices and convolution kernels only (not on biases, norms)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
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


def autocast(cfg: TrainConfig, device: torch.device):
    """(autocast context, dtype): bf16 on CUDA and fp32 on CPU for ``auto``."""
    names = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if cfg.dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        dtype = names[cfg.dtype]
    if dtype == torch.float32:
        return nullcontext(), dtype
    return torch.autocast(device_type=device.type, dtype=dtype), dtype


def micro_loss(out, step_weight: float, cfg: TrainConfig, d: Dist) -> torch.Tensor:
    """What one micro-batch adds to the step's loss, so that the gradient summed over
    micro-batches (and averaged over ranks by DDP) is that of
    ``sum(loss_sum) / step_weight + mean(aux_loss)`` over the whole step (``step_weight``:
    the step's global weight, or the constant of :func:`mean_step_weight`)."""
    if cfg.loss_weighting == "batch":  # the per-batch pixel mean, averaged
        recon = out.loss_sum / out.weight.clamp(min=1) / cfg.grad_accum
    else:
        recon = out.loss_sum * (d.world_size / step_weight)
    return recon + out.aux_loss / cfg.grad_accum


def mean_step_weight(model, data: Data, cfg: TrainConfig, d: Dist) -> float | None:
    """The mean loss weight of a step: what ``loss_sum`` sums over in the average step (all
    ranks and micro-batches), from the lengths in the index, using the model's own
    ``loss_weight`` (additive over proteins) for each distinct length. None when the index
    has no lengths (built by a walk): the loop then uses each step's own global weight."""
    from protoken.model import mask_from_lengths

    plan = data.train.plan
    lengths = plan.index.lengths[plan.rows]
    if not len(lengths) or lengths.min() <= 0:
        return None
    values, counts = np.unique(lengths, return_counts=True)
    total = sum(
        int(c) * model.loss_weight(mask_from_lengths([int(v)], int(v)))
        for v, c in zip(values, counts, strict=True)
    )
    return total / plan.batches_per_epoch * d.world_size * cfg.grad_accum


# --------------------------------------------------------------------------- checkpoints


def replica_checksum(model: torch.nn.Module, optimizer) -> float:
    """A weighted sum over what DDP replicas must agree on: parameters and persistent buffers
    (codebooks and their EMA statistics: the state_dict) and the optimiser state. Caches
    (rotary-embedding tables, which depend on the image sizes a rank has seen) are not in
    the state_dict and do not count."""
    tensors = list(model.state_dict().values())
    for state in optimizer.state.values():
        tensors += [v for v in state.values() if isinstance(v, torch.Tensor)]
    total = torch.zeros((), dtype=torch.float64)
    for k, t in enumerate(tensors):
        flat = t.detach().double().flatten()
        phase = torch.arange(flat.numel(), dtype=torch.float64, device=flat.device) * 0.7 + k
        total += (flat * torch.cos(phase)).sum().cpu()
    return float(total)


def save_checkpoint(path: str, state: dict, model, optimizer, d: Dist) -> None:
    """Check the replicas agree, gather every rank's RNG state, let rank 0 write ``path``."""
    rng = [checkpoint.rng_state()]
    if d.enabled:
        sums = [None] * d.world_size
        dist.all_gather_object(sums, replica_checksum(model, optimizer))
        if len(set(sums)) != 1:
            raise RuntimeError(f"DDP replicas diverged at step {state['step']}: checksums {sums}")
        if d.master:
            print(
                f"step {state['step']}: {d.world_size} replicas identical "
                f"(checksum {sums[0]:.12g})",
                flush=True,
            )
        rng = [None] * d.world_size
        dist.all_gather_object(rng, checkpoint.rng_state())
    if d.master:
        checkpoint.save(
            path,
            {**state, "model": model.state_dict(), "optimizer": optimizer.state_dict(), "rng": rng},
        )
    if d.enabled:
        dist.barrier()


def training_state(cfg: TrainConfig, model_cfg: dict, codec: CodecSettings, data: Data, d: Dist,
                   lineage: dict | None, step: int, best_val: float, consumed: int,
                   scaler) -> dict:  # fmt: skip
    """Everything of a checkpoint but the model, optimiser and RNG states: where the run
    stands (``consumed``: batches of finished steps, per rank), what it was made with, and
    (fine-tuned runs) where its starting weights came from."""
    epoch, position = data.train.position_after(consumed)
    return {
        "step": step,
        "best_val": best_val,
        "config": cfg.to_dict(),
        "model_config": model_cfg,
        "codec": codec.to_dict(),
        "scaler": scaler.state_dict(),
        "data": {
            "epoch": epoch,
            "position": position,
            "world_size": d.world_size,
            "batches_per_epoch": data.batches_per_epoch,
        },
        **({"lineage": lineage} if lineage else {}),
    }


# --------------------------------------------------------------------------- validation


@torch.no_grad()
def validate(model, loader, cfg: TrainConfig, codec: CodecSettings, d: Dist, amp) -> tuple:
    """Validation loss (weighted as in training), Cb-distance MAE per protein, and the MDS Cb
    RMSD / TM-score of a few proteins, over the same ``eval_batches`` batches on every rank.

    Returns (metrics, samples for :func:`protoken.plots.save_samples`).
    """
    from protoken.metrics import distance_mae

    model.eval()
    loss_sum = weight = aux = mae_sum = 0.0
    n_batches = n_proteins = 0
    samples = []
    for batch in loader:
        x, mask = batch["image"].to(d.device), batch["mask"].to(d.device)
        with amp:
            out = model(x, mask, *_chains(batch, d))
        loss_sum += float(out.loss_sum)
        weight += float(out.weight)
        aux += float(out.aux_loss)
        n_batches += 1
        truth, recon = _to_unit(x.float(), codec).cpu(), _to_unit(out.recon.float(), codec).cpu()
        for i, length in enumerate(batch["lengths"].tolist()):
            inp = truth[i, :, :length, :length].numpy()
            rec = recon[i, :, :length, :length].numpy()
            mae_sum += distance_mae(inp, rec, codec.dmax)
            n_proteins += 1
            if len(samples) < cfg.eval_structures and batch["ids"][i] not in {
                s[3] for s in samples
            }:
                samples.append((inp, np.clip(rec, -1, 1), length, batch["ids"][i]))
    model.train()
    loss_sum, weight, aux, mae_sum, n_batches, n_proteins = agree(
        [loss_sum, weight, aux, mae_sum, n_batches, n_proteins], d
    )
    metrics = {
        "val_loss": loss_sum / weight + aux / n_batches,
        "val_recon": loss_sum / weight,
        "val_cb_distance_mae": mae_sum / n_proteins,
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


def _structure_metrics(samples, codec: CodecSettings) -> dict:
    """MDS Cb RMSD and TM-score of each reconstruction against the input image's own MDS."""
    from protoken.metrics import rmsd, tm_score
    from protoken.reconstruct import reconstruct

    rmsds, tms = [], []
    for inp, rec, _length, _id in samples:
        truth = reconstruct(inp, dmax=codec.dmax).cb
        pred = reconstruct(rec, dmax=codec.dmax).cb
        rmsds.append(rmsd(pred, truth))
        tms.append(tm_score(pred, truth))
    return {"val_cb_rmsd": float(np.mean(rmsds)), "val_tm_score": float(np.mean(tms))}


# --------------------------------------------------------------------------- logging


class StepStats:
    """Loss terms and model metrics of the current step, kept as tensors (no host sync) and
    read on logging steps only."""

    def __init__(self) -> None:
        self.loss_sum = self.weight = self.aux = 0.0
        self.metrics: dict[str, torch.Tensor] = {}

    def add(self, out) -> None:
        self.loss_sum = self.loss_sum + out.loss_sum.detach()
        self.weight = self.weight + out.weight.detach()
        self.aux = self.aux + out.aux_loss.detach()
        self.metrics = out.metrics

    def reduce(self, n_micro: int, d: Dist) -> dict[str, Any]:
        """The step's loss over all ranks and micro-batches, and the metrics averaged over
        ranks (of each rank's last micro-batch). One all-reduce."""
        names = sorted(self.metrics)
        flat = [self.metrics[k].detach().float().reshape(-1) for k in names]
        head = torch.stack(
            [
                torch.as_tensor(v, dtype=torch.float64).cpu()
                for v in (self.loss_sum, self.weight, self.aux)
            ]
        )
        values = torch.cat([head] + [f.double().cpu() for f in flat])
        if d.enabled:
            dist.all_reduce(values, group=d.control)
        loss_sum, weight, aux = values[:3].tolist()
        out = {
            "loss": loss_sum / weight + aux / (n_micro * d.world_size),
            "recon": loss_sum / weight,
            "aux": aux / (n_micro * d.world_size),
        }
        offset = 3
        for name, f in zip(names, flat, strict=True):
            v = (values[offset : offset + f.numel()] / d.world_size).tolist()
            out[name] = [round(x, 4) for x in v] if f.numel() > 1 else round(v[0], 4)
            offset += f.numel()
        return out


class RunLog:
    """What the loop writes besides checkpoints (rank 0): RUN/config.json, the console,
    RUN/metrics.jsonl, sample pictures, Weights & Biases."""

    def __init__(self, cfg: TrainConfig, d: Dist, model_cfg, codec: CodecSettings, data: Data):
        self.cfg, self.d, self.codec, self.data = cfg, d, codec, data
        self.model_cfg = config_to_dict(model_cfg)
        self.path = os.path.join(cfg.out, "metrics.jsonl")
        self.wandb = _init_wandb(cfg, self.model_cfg) if cfg.wandb and d.master else None
        if d.master:
            os.makedirs(os.path.join(cfg.out, "samples"), exist_ok=True)
            info = {**cfg.to_dict(), "model_config": self.model_cfg, "codec": codec.to_dict()}
            with open(os.path.join(cfg.out, "config.json"), "w") as fh:
                json.dump(info, fh, indent=1)

    def say(self, text: str) -> None:
        if self.d.master:
            print(text, flush=True)

    def announce(self, model, dtype, step: int, epoch: int, position: int,
                 lineage: dict | None = None) -> None:  # fmt: skip
        n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        new = (lineage or {}).get("new_weights") or []
        self.say(
            f"protoken train: {n_params:,} parameters, preset {self.cfg.preset}, "
            f"{self.d.world_size} process(es) on {self.d.device}, dtype {dtype}, "
            f"{self.data.n_train} training / {self.data.n_val} validation images, "
            f"{self.data.batches_per_epoch} batches per epoch, from step {step} "
            f"(epoch {epoch}, batch {position})"
            + (f"; weights from {lineage['init']}" if lineage else "")
            + (f" (new: {', '.join(new[:4])})" if new else "")
        )

    def log_step(self, rec: dict) -> None:
        self.log(
            rec,
            f"step {rec['step']:6d} | loss {rec['loss']:.4f} | recon "
            f"{rec['recon']:.4f} | lr {rec['lr']:.2e} | grad "
            f"{rec['grad_norm']:.2f} | {rec['images_per_s']:.1f} img/s",
        )

    def log_eval(self, step: int, val: dict, samples: list) -> None:
        image = None
        if self.d.master and samples:
            from protoken.plots import save_samples

            image = os.path.join(self.cfg.out, "samples", f"step_{step:06d}.png")
            save_samples(image, samples)
        text = "eval " + " | ".join(f"{k} {v:.4f}" for k, v in val.items())
        self.log({"step": step, **val}, text, image)

    def log(self, record: dict, text: str, image: str | None = None) -> None:
        """A line of RUN/metrics.jsonl, the console and W&B (rank 0)."""
        if not self.d.master:
            return
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        print(text, flush=True)
        if self.wandb is not None:
            payload = {}
            for key, value in record.items():
                if isinstance(value, list):
                    payload.update({f"{key}/level{i}": v for i, v in enumerate(value)})
                elif key != "step":
                    payload[key] = value
            if image is not None:
                import wandb

                payload["samples"] = wandb.Image(image)
            self.wandb.log(payload, step=record["step"])

    def finish(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()


def _init_wandb(cfg: TrainConfig, model_cfg: dict):
    """A W&B run (optional extra; honours WANDB_MODE, e.g. offline)."""
    try:
        import wandb
    except ImportError:
        raise RuntimeError(
            "--wandb needs the wandb package: pip install 'protoken[wandb]'"
        ) from None
    config = {**cfg.to_dict(), "model_config": model_cfg}
    return wandb.init(
        project=cfg.wandb_project, name=cfg.wandb_run_name or None, dir=cfg.out, config=config
    )


# --------------------------------------------------------------------------- the loop


class StopSignal:
    """SIGTERM, SIGINT or SIGUSR1 set :attr:`received`; the loop stops at the next step."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)

    def __init__(self) -> None:
        self.received: int | None = None
        self._old: dict = {}

    def __enter__(self) -> StopSignal:
        for sig in self.SIGNALS:
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def __exit__(self, *exc) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def train(cfg: TrainConfig, resume: bool = False) -> dict:
    """Run (or resume) training; returns the last logged metrics, with ``"preempted": True``
    when a signal stopped it (RUN/last.pt then holds the step reached).

    Raises
    ------
    FileNotFoundError
        The data folder is missing; or ``resume`` without RUN/last.pt.
    ValueError
        An empty split, a bad config value, a config or checkpoint ``--resume`` cannot
        continue (:class:`protoken.checkpoint.CheckpointError`).
    """
    d = setup_distributed()
    try:
        with StopSignal() as stop:
            return _train(cfg, resume, d, stop)
    finally:
        if d.enabled and dist.is_initialized():
            dist.destroy_process_group()


def _train(cfg: TrainConfig, resume: bool, d: Dist, stop: StopSignal) -> dict:
    # -- config and checkpoint
    last_path, best_path = os.path.join(cfg.out, "last.pt"), os.path.join(cfg.out, "best.pt")
    ckpt = _resume_checkpoint(cfg, last_path) if resume else None
    if ckpt is None and os.path.exists(last_path):
        raise ValueError(
            f"{cfg.out} already holds a run ({last_path}): pass --resume to "
            "continue it, or choose another --out"
        )
    model_cfg, codec = cfg.model_cfg(), codec_settings(cfg)
    if model_cfg.loss.dmax != codec.dmax:  # the loss reads Angstrom
        model_cfg = dataclasses.replace(
            model_cfg, loss=dataclasses.replace(model_cfg.loss, dmax=codec.dmax)
        )
    if ckpt is not None and ckpt["codec"] != codec.to_dict():
        raise ValueError(f"{last_path} used codec settings {ckpt['codec']}, now {codec}")

    # -- model, optimiser, precision: identical initial weights on every rank
    torch.manual_seed(cfg.seed)
    model = _build(model_cfg).to(d.device)
    optimizer = configure_optimizer(model, cfg, d.device)
    amp, dtype = autocast(cfg, d.device)
    scaler = torch.amp.GradScaler(d.device.type, enabled=dtype == torch.float16)
    step, best_val, epoch, position = 0, math.inf, 0, 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        step, best_val = ckpt["step"], ckpt["best_val"]
        epoch, position = ckpt["data"]["epoch"], ckpt["data"]["position"]
        checkpoint.set_rng_state(ckpt["rng"][d.rank % len(ckpt["rng"])])
    lineage = None
    if ckpt is not None:
        lineage = ckpt.get("lineage")
    elif cfg.init:  # fine-tuning: every rank loads the same weights
        lineage = init_from(model, cfg.init, codec)
    # the quantisers all-reduce their EMA statistics: no buffer broadcast at each forward
    ddp = DDP(model, **_no_buffer_sync()) if d.enabled else model

    # -- data: the stream continues where the checkpoint left it, without replay
    data = build_data(cfg, model_cfg.downsample_factor, d, epoch, position)
    if ckpt is not None and ckpt["data"]["batches_per_epoch"] != data.batches_per_epoch:
        raise ValueError(
            f"the training split of {cfg.data} changed since {last_path}: the "
            "data order cannot be continued; start a new run"
        )
    batches, consumed = iter(data.train_loader), 0  # consumed: batches of finished steps
    loss_norm = mean_step_weight(model, data, cfg, d) if cfg.loss_weighting == "pixel" else None
    log = RunLog(cfg, d, model_cfg, codec, data)
    log.announce(model, dtype, step, epoch, position, lineage)
    state = functools.partial(training_state, cfg, config_to_dict(model_cfg), codec, data, d,
                              lineage)  # fmt: skip

    # -- the loop
    last: dict = {}
    window_images, window_start = 0, time.perf_counter()
    ddp.train()
    while step < cfg.max_steps:
        micro = [next(batches) for _ in range(cfg.grad_accum)]
        weight = 0 if loss_norm else sum(model.loss_weight(b["mask"]) for b in micro)
        weight, stopping = agree([weight, stop.received is not None], d)
        if stopping:  # a rank got a signal: every rank stops here, at the same step
            break
        lr = learning_rate(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        stats = StepStats()
        for i, batch in enumerate(micro):
            x = batch["image"].to(d.device, non_blocking=True)
            mask = batch["mask"].to(d.device, non_blocking=True)
            sync = ddp.no_sync() if d.enabled and i < len(micro) - 1 else nullcontext()
            with sync:
                with amp:
                    out = ddp(x, mask, *_chains(batch, d))
                    loss = micro_loss(out, loss_norm or weight, cfg, d)
                scaler.scale(loss).backward()
            stats.add(out)
            window_images += x.shape[0]
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        consumed += len(micro)

        if step % cfg.log_interval == 0 or step == cfg.max_steps:
            seconds = time.perf_counter() - window_start
            last = {
                "step": step,
                **stats.reduce(len(micro), d),
                "lr": lr,
                "grad_norm": round(float(grad_norm), 4),
                "images_per_s": round(window_images * d.world_size / seconds, 2),
            }
            log.log_step(last)
            window_images, window_start = 0, time.perf_counter()

        if step % cfg.eval_interval == 0 or step == cfg.max_steps:
            val, samples = validate(model, data.val_loader, cfg, codec, d, amp)
            log.log_eval(step, val, samples)
            last.update(val)
            if val["val_loss"] < best_val:
                best_val = val["val_loss"]
                save_checkpoint(
                    best_path, state(step, best_val, consumed, scaler), model, optimizer, d
                )

        if step % cfg.ckpt_interval == 0 or step == cfg.max_steps:
            save_checkpoint(last_path, state(step, best_val, consumed, scaler), model, optimizer, d)

    if step < cfg.max_steps:  # stopped by a signal
        save_checkpoint(last_path, state(step, best_val, consumed, scaler), model, optimizer, d)
        log.say(
            f"protoken train: stopped by signal at step {step}; {last_path} saved; "
            "continue with --resume"
        )
        last["preempted"] = True
    log.finish()
    return last


def _no_buffer_sync() -> dict:
    """DDP keyword that stops the per-forward buffer broadcast (renamed in torch 2.13)."""
    import inspect

    if "forward_sync_buffers" in inspect.signature(DDP).parameters:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}


def init_from(model, source: str, codec: CodecSettings) -> dict:
    """Load a bundled tokenizer's (by name) or a checkpoint's weights into ``model`` for
    fine-tuning (``--init``); returns the lineage recorded in the run's checkpoints.

    The source must be of the model's family and image codec, and every weight it holds must
    exist in the model with the same shape; weights the model has beyond them (e.g. the
    chain projections of a model extended to complexes) keep their initialisation and are
    listed in the lineage.

    Raises
    ------
    ValueError
        One line naming the source: unreadable, another family or codec, or weights whose
        names or shapes differ.
    """
    from protoken import pretrained
    from protoken.model import config_from_dict, family_of

    try:
        if pretrained.is_name(source) and not os.path.exists(source):
            src, ident = pretrained.load(source), f"bundled:{source}"
            ident += f"@{src.get('checkpoint_id', '')}" if src.get("checkpoint_id") else ""
        else:
            src = checkpoint.load(source)
            checkpoint.validate(src, source)
            ident = f"{os.path.abspath(source)}@{file_sha256(source)[:12]}"
        src_family = family_of(config_from_dict(src["model_config"]))
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"--init {source}: {exc}") from None
    family = family_of(model.config)
    if src_family != family:
        raise ValueError(f"--init {source} is a {src_family} tokenizer; this run trains a "
                         f"{family} model")  # fmt: skip
    src_codec = CodecSettings.from_dict(src["codec"])
    if (src_codec.dmax, src_codec.bit_depth) != (codec.dmax, codec.bit_depth):
        raise ValueError(f"--init {source} was trained on images of dmax {src_codec.dmax}, "
                         f"{src_codec.bit_depth}-bit; the data are dmax {codec.dmax}, "
                         f"{codec.bit_depth}-bit")  # fmt: skip
    own = model.state_dict()
    state = src["model"]
    foreign = sorted(set(state) - set(own))
    shapes = sorted(k for k in set(state) & set(own) if tuple(state[k].shape) != own[k].shape)
    if foreign or shapes:
        what = (f"weights this model lacks: {', '.join(foreign[:3])}" if foreign else
                f"weights of other shapes: {', '.join(shapes[:3])}")  # fmt: skip
        raise ValueError(f"--init {source} does not match the model ({what}); use the same "
                         "preset and model settings")  # fmt: skip
    model.load_state_dict(state, strict=False)
    parent = src["provenance"] if "provenance" in src else checkpoint.provenance(src)
    return {"init": ident, "init_provenance": parent,
            "new_weights": sorted(set(own) - set(state))}  # fmt: skip


def _chains(batch: dict, d: Dist) -> tuple:
    """The model's ``chains`` argument of a batch holding complexes (else nothing, so every
    batch of single chains calls the model exactly as before)."""
    chains = batch.get("chains")
    return () if chains is None else (chains.to(d.device, non_blocking=True),)


def _build(model_cfg):
    from protoken.model import build_model

    return build_model(model_cfg)


def _resume_checkpoint(cfg: TrainConfig, last_path: str) -> dict:
    """RUN/last.pt, checked against the run's config.json and the config asked for."""
    if not os.path.exists(last_path):
        raise FileNotFoundError(f"--resume: no checkpoint at {last_path}")
    ckpt = checkpoint.load(last_path)  # on the CPU: RNG states must stay there
    checkpoint.validate(ckpt, last_path, training=True)
    saved = TrainConfig.from_dict(ckpt["config"])
    resumed_config(saved, cfg)
    return ckpt
