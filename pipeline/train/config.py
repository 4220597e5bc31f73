"""The pretraining run's resolved config: preset → YAML file → `--set key=value` overrides.

    cfg = resolve(modality="image", preset="demo", data=..., output=..., overrides={...})

Everything is validated before Ray starts; a bad value raises ConfigError naming the field
("train.lr: must be > 0"). `to_dict()` is what workers receive and what MLflow logs.
"""
from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field

import yaml

from pipeline import storage
from pipeline.augment import AUGMENTS
from pipeline.config import ConfigError, check, check_fields
from pipeline.model.config import ModelConfig
from pipeline.recipes import recipe
from pipeline.train.tracking import absolute_tracking_uri, default_tracking_uri


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads `1e-3` as a string; users mean a float."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[0-9][0-9_]*[eE][-+]?[0-9]+"
               r"|\.[0-9_]+(?:[eE][-+]?[0-9]+)?|\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."))


def load_yaml(text: str):
    return yaml.load(text, Loader=_Loader)


def _check(cond: bool, name: str, msg: str) -> None:
    check(cond, f"train.{name}", msg)


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    max_steps: int = 400_000
    """Total optimizer steps of the run; the LR and EMA schedules depend on it."""
    stop_at_step: int | None = None
    """Checkpoint at this step and exit cleanly (a later run with the same output resumes)."""
    batch_size: int = 16
    """Samples per worker per micro-batch."""
    grad_accum: int = 1
    """Micro-batches of batch_size per worker per optimizer step, when reference_batch is null:
    the effective batch is then batch_size × grad_accum × num_workers (at any worker count)."""
    reference_batch: int | None = None
    """The recipe's effective batch: samples per optimizer step over all workers (the reference's
    per-GPU batch × its GPU count). When set, it is the run's effective batch exactly, at any
    worker count (`step_layout`): 4 GPUs reproduce a 16-GPU recipe. null = batch_size × grad_accum
    × num_workers."""
    micro_batch: int | None = None
    """The most samples a worker puts through one forward/backward; None = batch_size. The memory
    fit lowers it when a step does not fit a worker. It changes how a step is cut, never what the
    step computes: the effective batch, the loss normalization, the validation rows and the CLS
    loss weight stay the config's."""
    lr: float = 1e-3
    min_lr_scale: float = 0.01
    """Both schedules end at lr × min_lr_scale."""
    warmup_steps: int = 1000
    schedule: str = "cosine"
    """"cosine" (warm-up + cosine) or "tri_stage" (warm-up, hold, exponential decay)."""
    tri_stage_hold: float = 0.9
    """tri_stage: the fraction of max_steps held at the peak after the warm-up; the rest decays
    (fairseq phase_ratio: pretraining [0.03, 0.9, 0.07], fine-tuning [0.1, 0.4, 0.5])."""
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    weight_decay: float = 0.01
    clip_norm: float = 4.0
    """Gradient clipping max norm (0 = off)."""
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 500
    checkpoint_every_s: float = 600.0
    """Also checkpoint when this many seconds passed since the last checkpoint (0 = off): a lost
    node or a resize re-runs at most about this much work, whatever checkpoint_every is."""
    num_workers: int = 1
    """Ray Train workers (DDP ranks); with min_workers, the most an elastic run uses."""
    min_workers: int | None = None
    """Elastic training (`--num-workers MIN-MAX`): start with whatever between min_workers and
    num_workers the cluster has, go on with fewer when a node is lost and grow back when one joins
    (each a restart from the last checkpoint). The effective batch stays the run's: grad_accum is
    re-derived per world size (reference_batch, else batch_size × grad_accum × num_workers)."""
    resize_interval_s: float = 60.0
    """Elastic: seconds between checks whether more workers could run (each growth restarts)."""
    worker_resources: dict = field(default_factory=dict)
    """Custom Ray resources each worker needs besides its CPUs/GPU, e.g. {trainer: 1} to keep
    training workers on the nodes started with that resource."""
    cpus_per_worker: int = 1
    """CPUs each worker holds. Its Ray Data readers run beside it on its node with no CPU of their
    own (pipeline/train/elastic.py), as many at once as its share of the node's cores: they can
    never be starved by workers holding every CPU."""
    use_gpu: bool = False
    max_failures: int = 2
    """Worker crashes tolerated; each restarts from the last checkpoint."""
    shuffle_buffer: int = 1024
    """Rows of each worker's seeded shuffle window (on top of the per-epoch chunk order; 0 = no
    shuffle inside windows). Its memory is window × row size: lower it for long audio crops."""
    augment: str = "none"
    """Images: the view each sample is trained on, drawn anew every epoch in the Ray Data read tasks
    from (seed, epoch, row id) (pipeline/augment.py). "crop": ColorJitter(color_jitter) →
    RandomResizedCrop(size, crop_scale, crop_ratio, bicubic) → RandomHorizontalFlip(hflip);
    "none": the evaluation view (shorter side to size / 0.875, center crop) every epoch."""
    crop_scale: tuple[float, float] = (0.08, 1.0)
    """RandomResizedCrop's range of the crop's area, as a fraction of the image's."""
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    """RandomResizedCrop's range of the crop's aspect ratio (width / height)."""
    hflip: float = 0.5
    """Probability of a horizontal flip (augment "crop")."""
    color_jitter: float = 0.0
    """ColorJitter brightness = contrast = saturation strength (0 = off; data2vec 1.0 uses 0.4)."""
    audio_max_samples: int = 250_000
    """Audio crops longer than this (16 kHz samples) are randomly cropped."""
    audio_batching: str = "pad"
    """"pad" (zero-pad to the batch's longest clip, padding masked) or "crop" (crop every clip to
    the batch's shortest, as fairseq pretraining does)."""
    text_max_tokens: int = 512
    compile: bool = False
    """torch.compile the model's modules (static mask counts keep shapes fixed: no recompiling)."""
    on_collapse: str = "raise"
    """What a NonFiniteLoss / RepresentationCollapse does: "raise" (stop every rank with that
    error) or "rollback" (restore the last checkpoint, scale the LR by rollback_lr_factor, go on)."""
    max_rollbacks: int = 3
    rollback_lr_factor: float = 0.5
    val_fraction: float = 0.0
    """Hold out this fraction of the data's row-group chunks (seeded) for the validation loss."""
    eval_every: int = 0
    """Steps between validation-loss / online-probe points (0 = about 5 points per run, and one
    at step 0)."""
    val_batches: int = 4
    """Batches (of batch_size, fixed masks) the validation loss averages."""
    probe_samples: int = 512
    """Samples per split the online probe uses (a seeded subset; the final probe uses all)."""
    worker_memory_gb: float | None = None
    """Memory one worker may use, for the pre-flight estimate; None = this machine's RAM shared by
    the local workers (CPU) or the local GPU's memory."""

    def __post_init__(self):
        _check(self.reference_batch is None or self.reference_batch >= 1, "reference_batch",
               f"must be >= 1 or null, got {self.reference_batch}")
        _check(self.micro_batch is None or self.micro_batch >= 1, "micro_batch",
               f"must be >= 1 or null, got {self.micro_batch}")
        _check(self.max_steps >= 1, "max_steps", f"must be >= 1, got {self.max_steps}")
        _check(self.stop_at_step is None or 1 <= self.stop_at_step <= self.max_steps, "stop_at_step",
               f"must be in [1, max_steps={self.max_steps}], got {self.stop_at_step}")
        _check(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        _check(self.grad_accum >= 1, "grad_accum", f"must be >= 1, got {self.grad_accum}")
        _check(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        _check(0 <= self.min_lr_scale <= 1, "min_lr_scale", "must be in [0, 1]")
        _check(0 <= self.tri_stage_hold <= 1, "tri_stage_hold", "must be in [0, 1]")
        _check(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        _check(self.schedule in ("cosine", "tri_stage"), "schedule",
               f"must be 'cosine' or 'tri_stage', got {self.schedule!r}")
        _check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas", "must be two values in [0, 1)")
        _check(self.weight_decay >= 0 and self.clip_norm >= 0, "clip_norm", "must be >= 0")
        _check(self.log_every >= 1, "log_every", "must be >= 1")
        _check(self.checkpoint_every >= 1, "checkpoint_every", "must be >= 1")
        _check(self.checkpoint_every_s >= 0, "checkpoint_every_s", "must be >= 0 (0 = step-based only)")
        _check(self.num_workers >= 1, "num_workers", f"must be >= 1, got {self.num_workers}")
        _check(self.min_workers is None or 1 <= self.min_workers <= self.num_workers, "min_workers",
               f"must be in [1, num_workers={self.num_workers}] or null, got {self.min_workers}")
        _check(self.resize_interval_s >= 0, "resize_interval_s", "must be >= 0")
        _check(isinstance(self.worker_resources, dict) and all(isinstance(v, (int, float)) and v > 0
                                                               for v in self.worker_resources.values()),
               "worker_resources", f"must map resource names to amounts > 0, got {self.worker_resources!r}")
        _check(self.cpus_per_worker >= 1, "cpus_per_worker", "must be >= 1")
        _check(self.max_failures >= -1, "max_failures", "must be >= -1 (-1 = unlimited)")
        _check(self.shuffle_buffer >= 0, "shuffle_buffer", "must be >= 0")
        _check(self.augment in AUGMENTS, "augment", f"must be one of {', '.join(AUGMENTS)}, got {self.augment!r}")
        _check(len(self.crop_scale) == 2 and 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1, "crop_scale",
               f"must be [lo, hi] with 0 < lo <= hi <= 1, got {list(self.crop_scale)}")
        _check(len(self.crop_ratio) == 2 and 0 < self.crop_ratio[0] <= self.crop_ratio[1], "crop_ratio",
               f"must be [lo, hi] with 0 < lo <= hi, got {list(self.crop_ratio)}")
        _check(0 <= self.hflip <= 1, "hflip", f"must be in [0, 1], got {self.hflip}")
        _check(0 <= self.color_jitter <= 1, "color_jitter", f"must be in [0, 1], got {self.color_jitter}")
        _check(self.audio_max_samples >= 4000, "audio_max_samples", "must be >= 4000 (0.25 s)")
        _check(self.text_max_tokens >= 8, "text_max_tokens", "must be >= 8")
        _check(self.on_collapse in ("raise", "rollback"), "on_collapse",
               f"must be 'raise' or 'rollback', got {self.on_collapse!r}")
        _check(self.max_rollbacks >= 0, "max_rollbacks", "must be >= 0")
        _check(0 < self.rollback_lr_factor <= 1, "rollback_lr_factor", "must be in (0, 1]")
        _check(0 <= self.val_fraction < 0.5, "val_fraction", f"must be in [0, 0.5), got {self.val_fraction}")
        _check(self.eval_every >= 0, "eval_every", "must be >= 0 (0 = about 5 points per run)")
        _check(self.val_batches >= 1, "val_batches", "must be >= 1")
        _check(self.probe_samples >= 20, "probe_samples", "must be >= 20")
        _check(self.worker_memory_gb is None or self.worker_memory_gb > 0, "worker_memory_gb", "must be > 0 or null")
        _check(self.audio_batching in ("pad", "crop"), "audio_batching",
               f"must be 'pad' or 'crop', got {self.audio_batching!r}")

    @property
    def effective_batch(self) -> int:
        """Samples per optimizer step, all workers together: the run's, at any worker count."""
        if self.reference_batch is not None:
            return self.reference_batch
        return self.batch_size * self.grad_accum * self.num_workers

    @property
    def micro(self) -> int:
        """The largest micro-batch a worker runs."""
        return self.micro_batch or self.batch_size

    def batch_line(self, world: int | None = None) -> str:
        """How the effective batch is made on `world` workers (default num_workers)."""
        return step_layout(self, world or self.num_workers).line()


def split_evenly(n: int, parts: int) -> list[int]:
    """n as `parts` whole numbers that differ by at most one, the larger first: 7, 3 → [3, 2, 2]."""
    return [n // parts + (i < n % parts) for i in range(parts)]


@dataclass(frozen=True)
class StepLayout:
    """How one optimizer step's global batch is cut: `shares[r]` samples on rank r, in
    micro-batches of `micro[r]` samples."""
    effective: int
    shares: list[int]
    micro: list[list[int]]

    @property
    def world(self) -> int:
        return len(self.shares)

    @property
    def grad_accum(self) -> int:
        """Micro-batches per step on the rank with the most."""
        return max(len(m) for m in self.micro)

    def offset(self, rank: int) -> int:
        """Where rank's share starts in the step's (sorted) global batch."""
        return sum(self.shares[:rank])

    def line(self) -> str:
        hi, lo = max(self.shares), min(self.shares)
        share = f"{hi}" if hi == lo else f"{hi} or {lo}"
        sizes = sorted({b for m in self.micro for b in m}, reverse=True)
        counts = sorted({len(m) for m in self.micro}, reverse=True)
        return (f"effective batch {self.effective} = {self.world} worker(s) × {share} samples, in "
                f"{' or '.join(map(str, counts))} micro-batch(es) of {' or '.join(map(str, sizes))}")


def step_layout(t: TrainConfig, world: int) -> StepLayout:
    """The one place the step's cut is derived: the effective batch (the run's, whatever `world`)
    in `world` shares that differ by at most one sample, each in the fewest micro-batches of at
    most `t.micro` samples, again differing by at most one. Nothing is rounded: every layout of
    the same run trains on the same global batch (loss normalization: train/step.py)."""
    E = t.effective_batch
    check(E >= world, "train.num_workers", f"{world} workers cannot share an effective batch of {E} samples")
    shares = split_evenly(E, world)
    return StepLayout(E, shares, [split_evenly(s, -(-s // t.micro)) for s in shares])


# TrainConfig fields that older configs carry and this version dropped, and why.
REMOVED_FIELDS = {
    "scale_lr": "the effective batch is now exact at every worker count (step_layout): no LR to rescale",
}


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    modality: str
    data: str
    output: str
    preset: str = "demo"
    tracking_uri: str | None = None
    experiment: str = "data2vec"
    parent_run_id: str | None = None
    """MLflow run to nest this run under (set by sweeps and the demo)."""
    val_data: str | None = None
    """Preprocessed folder whose validation loss (fixed masks) is logged every train.eval_every
    steps; or hold out train.val_fraction of `data`."""
    probe_train: str | None = None
    """Labeled preprocessed folders for the online probe (kNN + linear on frozen features, every
    train.eval_every steps), logged as probe.* metrics."""
    probe_test: str | None = None
    init: str | None = None
    """Start the student (and its teacher copy) from this checkpoint: our RUN_DIR/final or a Hugging
    Face Data2Vec*Model folder (continued pretraining); its architecture replaces the preset's."""
    model: ModelConfig = None  # type: ignore[assignment]
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for k in ("betas", "crop_scale", "crop_ratio"):
            d["train"][k] = list(d["train"][k])
        return d

    @classmethod
    def from_dict(cls, d: dict):
        """The inverse of to_dict (sections become their config classes)."""
        d = dict(d)
        t = dict(d.pop("train"))
        for k in REMOVED_FIELDS:  # configs written before a field was dropped
            t.pop(k, None)
        check_fields(TrainConfig, t, "train.")
        check_fields(cls, {k: v for k, v in d.items() if k not in ("model", "finetune")}, "")
        if "finetune" in d:
            check_fields(TaskConfig, d["finetune"], "finetune.")
        for k in ("betas", "crop_scale", "crop_ratio"):
            if k in t:
                t[k] = tuple(t[k])
        if "finetune" in d:
            d["finetune"] = TaskConfig(**d["finetune"])
        return cls(model=ModelConfig.from_dict(d.pop("model")), train=TrainConfig(**t), **d)


def read_config_file(path: str) -> dict:
    """A --config YAML file as a mapping (ConfigError if missing or not a mapping)."""
    if not storage.is_file(path):
        raise ConfigError(f"config: {path!r} does not exist")
    cfg = load_yaml(storage.read_text(*storage.resolve(path))) or {}
    if not isinstance(cfg, dict):
        raise ConfigError(f"config: {path!r} must hold a mapping")
    return cfg


def _set_path(d: dict, dotted: str, value) -> None:
    keys = dotted.split(".")
    cur = d
    for i, k in enumerate(keys[:-1]):
        if not isinstance(cur.get(k), dict):
            raise ConfigError(f"{'.'.join(keys[: i + 1])}: not a config section (in --set {dotted})")
        cur = cur[k]
    if keys[-1] not in cur:
        raise ConfigError(f"{dotted}: unknown field")
    if _is_section(cur[keys[-1]]):
        _merge(cur, {keys[-1]: value}, ".".join(keys[:-1]) + "." if len(keys) > 1 else "")
    else:
        cur[keys[-1]] = value


def _is_section(value) -> bool:
    """A config section (model, train, model.encoder, …): a non-empty mapping of fields. An empty
    mapping is a field's value (train.worker_resources)."""
    return isinstance(value, dict) and bool(value)


def _merge(base: dict, upd: dict, prefix: str = "") -> None:
    for k, v in upd.items():
        name = f"{prefix}{k}"
        if k not in base:
            raise ConfigError(f"{name}: unknown field")
        if _is_section(base[k]):
            if not isinstance(v, dict):
                raise ConfigError(f"{name}: a config section, must be a mapping of its fields "
                                  f"(e.g. --set {name}.FIELD=VALUE), got {v!r}")
            _merge(base[k], v, name + ".")
        else:
            base[k] = v


def parse_workers(value: str) -> dict[str, int]:
    """--num-workers "4" → {"train.num_workers": 4}; "1-8" (elastic) → also train.min_workers 1."""
    lo, sep, hi = str(value).partition("-")
    try:
        lo_n, hi_n = int(lo), int(hi) if sep else None
    except ValueError:
        raise ConfigError(f"train.num_workers: --num-workers takes N or MIN-MAX (e.g. 1-8), got {value!r}") from None
    if hi_n is None:
        return {"train.num_workers": lo_n}
    return {"train.num_workers": hi_n, "train.min_workers": lo_n}


def parse_sets(items: list[str]) -> dict[str, object]:
    """["train.lr=1e-3", "model.mask.prob=0.7"] → {"train.lr": 0.001, ...} (values parsed as YAML)."""
    out = {}
    for it in items:
        if "=" not in it:
            raise ConfigError(f"--set {it!r}: expected key=value")
        k, v = it.split("=", 1)
        out[k.strip()] = load_yaml(v)
    return out


def resolve(modality: str, data: str, output: str, preset_name: str = "demo", config_file: str | None = None,
            overrides: dict | None = None, model_frontend: dict | None = None, **top) -> RunConfig:
    """Build and validate the run config. `model_frontend` carries data-derived settings
    (vocab size, image size) read from the preprocessed data's manifest."""
    if modality not in ("image", "audio", "text"):
        raise ConfigError(f"modality: must be image, audio or text, got {modality!r}")
    # Workers run with another cwd (and on other nodes): local paths must be absolute.
    data, output = (storage.canonical(p) for p in (data, output))
    mode = "d2v2"
    if overrides and "model.mode" in overrides:
        mode = overrides["model.mode"]
    file_cfg = read_config_file(config_file) if config_file else {}
    if config_file:
        file_model = file_cfg.get("model") if isinstance(file_cfg.get("model"), dict) else {}  # else refused by _merge
        mode = file_model.get("mode", mode) if "model.mode" not in (overrides or {}) else mode
    if mode not in ("d2v1", "d2v2"):
        raise ConfigError(f"model.mode: must be 'd2v1' or 'd2v2', got {mode!r}")
    r = recipe(modality, mode, preset_name, **(model_frontend or {}))
    model = r.model
    train = {**dataclasses.asdict(TrainConfig()), **r.train}
    d = {"modality": modality, "data": data, "output": output, "preset": preset_name,
         "tracking_uri": None, "experiment": "data2vec", "parent_run_id": None, "val_data": None,
         "probe_train": None, "probe_test": None, "init": None, "model": model.to_dict(), "train": train}
    d.update({k: v for k, v in top.items() if v is not None})
    for k in ("val_data", "probe_train", "probe_test", "init"):
        if d[k]:
            d[k] = storage.canonical(d[k])
    # The tracking store is fixed here, on the driver (a relative sqlite path would resolve in a
    # Ray worker's folder); an object-store --output with no --tracking-uri leaves it None.
    d["tracking_uri"] = absolute_tracking_uri(d["tracking_uri"]) if d["tracking_uri"] else \
        (default_tracking_uri(output) if output else None)
    _merge(d, file_cfg)
    for k, v in (overrides or {}).items():
        _set_path(d, k, v)
    for k in ("modality", "data", "output", "preset"):
        if d[k] != {"modality": modality, "data": data, "output": output, "preset": preset_name}[k]:
            raise ConfigError(f"{k}: set it with --{k}, not in the config file")
    _check_accumulation(d["train"], overrides)
    try:
        return RunConfig.from_dict(d)
    except TypeError as e:  # wrong type/unknown keyword inside a section
        raise ConfigError(f"config: {e}") from None


def _check_accumulation(train: dict, overrides: dict | None) -> None:
    """grad_accum is derived from train.reference_batch; setting both on the command line is a
    contradiction, not a silent override."""
    if "train.grad_accum" in (overrides or {}) and train.get("reference_batch") is not None:
        raise ConfigError(f"train.grad_accum: derived from train.reference_batch={train['reference_batch']} "
                          f"(the recipe's effective batch) and the worker count; set train.reference_batch=null "
                          f"to choose grad_accum yourself")


def to_yaml(cfg: RunConfig) -> str:
    """The resolved config as a `--config` file: `model:` and `train:` sections, every field."""
    d = cfg.to_dict()
    head = f"# jobs.pretrain --modality {cfg.modality} --preset {cfg.preset}: every resolved field\n"
    return head + yaml.safe_dump({"model": d["model"], "train": d["train"]}, sort_keys=False)


def dump(cfg: RunConfig) -> str:
    return json.dumps(cfg.to_dict(), indent=2, sort_keys=True)


# ----------------------------------------------------------------------------- fine-tuning
@dataclass(frozen=True, kw_only=True)
class TaskConfig:
    """What fine-tuning adds to a TrainConfig (see pipeline/recipes.py::finetune_recipe)."""
    task: str = "classify"
    """"classify" (a label per sample) or "ctc" (audio: a character transcript per clip)."""
    layer_decay: float = 1.0
    """Layer-wise LR decay: block i of L gets lr × layer_decay^(L + 1 - (i + 1)), the front end
    layer_decay^(L + 1), the head lr (1 = off)."""
    drop_path: float = 0.0
    """Stochastic depth of the last block (linearly less in earlier blocks)."""
    head_dropout: float = 0.0
    feature_bn: bool = False
    """classify: standardize the pooled features over the batch (BatchNorm without affine, MAE's
    linear-probe head) before the head, so a new head reads them from the first steps."""
    label_smoothing: float = 0.0
    freeze_feature_encoder: bool = False
    """Audio: the CNN stays as pretrained and runs without gradients."""
    freeze_encoder_steps: int = 0
    """Head warm-up: for this many first steps only the head (and mask embedding) is updated."""
    mask_time_prob: float = 0.0
    """Audio: wav2vec2-style time masks on the CNN frames while training (0 = off)."""
    mask_time_length: int = 10
    patience: int = 0
    """Stop after this many evaluations without a better validation score (0 = never)."""
    label_fraction: float = 1.0
    """Train on a seeded, class-stratified fraction of the training labels."""

    def __post_init__(self):
        c = lambda cond, name, msg: check(cond, f"finetune.{name}", msg)  # noqa: E731
        c(self.task in ("classify", "ctc"), "task", f"must be 'classify' or 'ctc', got {self.task!r}")
        c(0 < self.layer_decay <= 1, "layer_decay", f"must be in (0, 1], got {self.layer_decay}")
        c(0 <= self.drop_path < 1, "drop_path", "must be in [0, 1)")
        c(0 <= self.head_dropout < 1, "head_dropout", "must be in [0, 1)")
        c(0 <= self.label_smoothing < 1, "label_smoothing", "must be in [0, 1)")
        c(self.freeze_encoder_steps >= 0, "freeze_encoder_steps", "must be >= 0")
        c(not (self.feature_bn and self.task == "ctc"), "feature_bn", "applies to classify only, not ctc")
        c(0 <= self.mask_time_prob < 1, "mask_time_prob", "must be in [0, 1)")
        c(self.mask_time_length >= 1, "mask_time_length", "must be >= 1")
        c(self.patience >= 0, "patience", "must be >= 0")
        c(0 < self.label_fraction <= 1, "label_fraction", f"must be in (0, 1], got {self.label_fraction}")


@dataclass(frozen=True, kw_only=True)
class FineTuneConfig:
    modality: str
    init: str
    """"scratch", our RUN_DIR/final, or a Hugging Face Data2Vec* directory."""
    train_data: str
    val_data: str
    test_data: str
    output: str
    labels: list
    """classify: the class names (index = class id); ctc: the character vocabulary."""
    preset: str = "demo"
    tracking_uri: str | None = None
    experiment: str = "data2vec-finetune"
    parent_run_id: str | None = None
    model: ModelConfig = None  # type: ignore[assignment]
    train: TrainConfig = field(default_factory=TrainConfig)
    finetune: TaskConfig = field(default_factory=TaskConfig)

    to_dict = RunConfig.to_dict  # the same serialization as RunConfig (+ the finetune: section)
    from_dict = classmethod(RunConfig.from_dict.__func__)


def resolve_finetune(*, modality: str, task: str, init: str, model: ModelConfig, train_data: str, val_data: str,
                     test_data: str, output: str, labels: list, preset_name: str = "demo",
                     config_file: str | None = None, overrides: dict | None = None, **top) -> FineTuneConfig:
    """The fine-tuning run's config: the (modality, task, preset) fine-tuning recipe → YAML file
    (`model:`, `train:`, `finetune:` sections) → `--set` overrides. `model` is the architecture (from
    the --init checkpoint, or the preset's for scratch) with the recipe's fine-tuning dropout."""
    from pipeline.recipes import finetune_recipe

    r = finetune_recipe(modality, task, preset_name, pre_norm=model.encoder.pre_norm)
    enc = dataclasses.replace(model.encoder, dropout=r.dropout,
                              attn_dropout=r.dropout if r.attn_dropout is None else r.attn_dropout)
    model = dataclasses.replace(model, encoder=enc)
    paths = {k: storage.canonical(v) if v else v for k, v in
             dict(train_data=train_data, val_data=val_data, test_data=test_data, output=output).items()}
    task_cfg = {**dataclasses.asdict(TaskConfig()), **r.task}
    if init == "scratch":  # the baseline trains every layer at the full LR, from step 0 (finetune_recipe)
        task_cfg.update(freeze_feature_encoder=False, layer_decay=1.0, freeze_encoder_steps=0)
    d = {"modality": modality, "init": init if init == "scratch" else storage.canonical(init), **paths, "labels": list(labels),
         "preset": preset_name, "tracking_uri": None, "experiment": "data2vec-finetune", "parent_run_id": None,
         "model": model.to_dict(), "train": {**dataclasses.asdict(TrainConfig()), **r.train}, "finetune": task_cfg}
    fixed = {k: d[k] for k in ("modality", "init", "train_data", "val_data", "test_data", "output", "labels", "preset")}
    d.update({k: v for k, v in top.items() if v is not None})
    d["tracking_uri"] = absolute_tracking_uri(d["tracking_uri"]) if d["tracking_uri"] else default_tracking_uri(paths["output"])
    if config_file:
        _merge(d, read_config_file(config_file))
    for k, v in (overrides or {}).items():
        _set_path(d, k, v)
    if d["finetune"]["task"] != task:
        raise ConfigError(f"finetune.task: set it with --task, not in the config ({d['finetune']['task']!r})")
    for k, v in fixed.items():
        if d[k] != v:
            raise ConfigError(f"{k}: set by the command line and the data, not in the config")
    _check_accumulation(d["train"], overrides)
    try:
        cfg = FineTuneConfig.from_dict(d)
    except TypeError as e:
        raise ConfigError(f"config: {e}") from None
    f, t = cfg.finetune, cfg.train
    check(not f.feature_bn or t.batch_size >= 2, "finetune.feature_bn",
          f"standardizes over the batch, so it needs train.batch_size >= 2 (got {t.batch_size})")
    if modality != "audio":
        for name in ("mask_time_prob", "freeze_feature_encoder"):
            check(not getattr(f, name), f"finetune.{name}", f"applies to audio only, not {modality}")
    check(f.freeze_encoder_steps < t.max_steps, "finetune.freeze_encoder_steps",
          f"must be < train.max_steps={t.max_steps} (else the encoder never trains); for a short run "
          f"lower it, e.g. --set finetune.freeze_encoder_steps={t.max_steps // 2}")
    return cfg
