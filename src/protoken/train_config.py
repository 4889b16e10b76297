"""The training configuration: one pydantic model, validated strictly, and the rules of
``--resume`` (which fields may change).

pydantic v2 rather than OmegaConf structured configs: strict types (``8x`` or the string
``"False"`` are refused, not coerced), ``Literal`` choices and range constraints, each error
one line naming its field; we need neither config merging nor interpolation.
"""

from __future__ import annotations

import json
import sys
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from protoken.codec import NORMALIZE_ALIASES
from protoken.model import preset_config

__all__ = ["RESUMABLE", "TrainConfig", "read_mapping", "resumed_config"]

#: Config fields ``--resume`` lets change; any other difference from RUN/config.json is refused.
RESUMABLE = frozenset(
    "data out max_steps eval_interval eval_batches eval_structures log_interval ckpt_interval "
    "num_workers wandb wandb_project wandb_run_name".split()
)
# ``out`` is where --resume found RUN/last.pt: the run folder written another way (a trailing
# slash, an absolute path) or moved since, never another run.
#: Keys of old configs that no longer mean anything (ignored with a warning).
_OBSOLETE = {"shuffle_buffer": "the sample order is a seeded permutation per epoch"}


# --------------------------------------------------------------------------- configuration


class TrainConfig(BaseModel):
    """Everything a training run depends on (saved as RUN/config.json).

    Validated by pydantic in strict mode: a value of the wrong type (``batch_size: 8x``, the
    string ``"False"`` for a boolean), an unknown key or a value out of range is refused with
    the field's name. ``preset`` names a model preset of any family (``tiny``, ``small``,
    ``reference``, ...) and ``model`` overrides its fields, e.g. ``{"codebook_size": 512}``.
    ``dmax`` and ``bit_depth`` default to what ``protoken convert`` recorded.
    """

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    data: str = ""
    out: str = "runs/protoken"
    preset: str = "tiny"
    model: dict[str, Any] = Field(default_factory=dict)
    # data
    only_bins: list[str] = Field(default_factory=list)
    skip_bins: list[str] = Field(default_factory=list)
    valid_frac: float = Field(0.05, ge=0.0, le=1.0)
    split_key_regex: str | None = None  # e.g. "^bm5__([0-9A-Za-z]{4})": by complex
    exclude_ids_file: str | None = None  # ids (one a line) kept out of every split
    # {"REGEX": N}: training ids that match are drawn N times per epoch (index.oversampled)
    oversample: dict[str, int] = Field(default_factory=dict)
    batch_size: int = Field(8, ge=1)
    crop: int | None = Field(None, ge=8)  # train on random diagonal windows of <= crop residues
    # this fraction of single-chain training images cut into two-chain pseudo-complexes
    # (protoken.data.batches.split_chain): interfaces to learn from single chains
    split_chains: float = Field(0.0, ge=0.0, le=1.0)
    split_pieces: int = Field(2, ge=2)  # a pseudo-complex has 2 .. split_pieces chains
    group_by_bin: bool = True
    # data converted with --format shards: read the shards G at a time (BatchPlan shard_window)
    shard_window: int | None = Field(None, ge=1)
    num_workers: int = Field(2, ge=0)
    normalize: Literal["none", "reference"] = "none"  # older names: codec.NORMALIZE_ALIASES
    dmax: float | None = None
    bit_depth: int | None = None
    # optimisation
    max_steps: int = Field(2000, ge=1)
    grad_accum: int = Field(1, ge=1)
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = Field(100, ge=0)
    weight_decay: float = 0.05
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    loss_weighting: Literal["step", "pixel", "batch"] = "step"
    # evaluation, logging, checkpoints
    eval_interval: int = Field(200, ge=1)
    eval_batches: int = Field(4, ge=1)
    eval_structures: int = Field(3, ge=0)
    log_interval: int = Field(10, ge=1)
    ckpt_interval: int = Field(200, ge=1)
    seed: int = 0
    # fine-tuning: start from a bundled tokenizer's or a checkpoint's weights (see train.init_from)
    init: str | None = None
    wandb: bool = False
    wandb_project: str = "protoken"
    wandb_run_name: str = ""

    @model_validator(mode="before")
    @classmethod
    def _drop_obsolete(cls, values: Any) -> Any:
        if isinstance(values, dict):
            if values.get("normalize") in NORMALIZE_ALIASES:
                values = {**values, "normalize": NORMALIZE_ALIASES[values["normalize"]]}
            for key in set(values) & set(_OBSOLETE):
                print(f"protoken train: ignoring {key} ({_OBSOLETE[key]})", file=sys.stderr)
                values = {k: v for k, v in values.items() if k != key}
        return values

    def model_cfg(self):
        """The model config: the preset with ``model`` overrides (any family)."""
        return preset_config(self.preset, self.model)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Validate a dict; raises ValueError with one line per bad field."""
        try:
            return cls(**d)
        except ValidationError as exc:
            raise ValueError(_explain(exc)) from None

    @classmethod
    def from_file(cls, path: str) -> TrainConfig:
        """Load a JSON or YAML file (``.json``, ``.yaml``, ``.yml``)."""
        return cls.from_dict(read_mapping(path))


def _explain(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        name = ".".join(str(p) for p in err["loc"]) or "config"
        if err["type"] == "extra_forbidden":
            lines.append(f"unknown config key {name}")
        else:
            lines.append(f"config value {name}={err.get('input')!r}: {err['msg']}")
    return "; ".join(lines)


def read_mapping(path: str) -> dict[str, Any]:
    """The config keys of a JSON or YAML file (by its extension).

    Raises
    ------
    ValueError
        One line naming the file: unreadable, not JSON / YAML, or not a mapping.
    """
    try:
        with open(path) as fh:
            if path.endswith((".yaml", ".yml")):
                import yaml

                d = yaml.safe_load(fh) or {}
            else:
                d = json.load(fh)
    except OSError as exc:
        raise ValueError(f"{path}: unreadable ({exc.strerror or type(exc).__name__})") from None
    except ValueError as exc:  # json.JSONDecodeError
        raise ValueError(f"{path}: not valid JSON ({' '.join(str(exc).split())})") from None
    except Exception as exc:  # noqa: BLE001 - yaml's parser errors
        raise ValueError(f"{path}: not valid YAML ({' '.join(str(exc).split())[:160]})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a mapping of config keys")
    return d


def resumed_config(saved: TrainConfig, new: TrainConfig) -> TrainConfig:
    """``new`` if it differs from the run's ``saved`` config only in :data:`RESUMABLE` fields.

    Raises
    ------
    ValueError
        Naming the fields that may not change.
    """
    a, b = saved.to_dict(), new.to_dict()
    fixed = [k for k in a if a[k] != b[k] and k not in RESUMABLE]
    if fixed:
        diff = ", ".join(f"{k}: {a[k]!r} -> {b[k]!r}" for k in fixed)
        raise ValueError(
            f"--resume cannot change {diff}; only {', '.join(sorted(RESUMABLE))} may change "
            "(start a new run to change the others)"
        )
    return new
