"""Driver side shared by pretraining (pipeline/pretrain) and fine-tuning (pipeline/finetune): read a
preprocessed folder's manifest, check a resume, run a worker loop on Ray Train (`fit`, fixed or
elastic), turn a failure into the worker's own error line. Paths may be local folders or URIs."""
from __future__ import annotations

import json
import os

import ray

from pipeline import storage
from pipeline.config import ConfigError
from pipeline.train.loop import SAMPLE_LOG


def read_manifest(data: str, modality: str) -> dict:
    """DATA/manifest.json (DATA a path or URI), checked against the modality."""
    fs, root = storage.resolve(data)
    if not storage.exists(fs, f"{root}/manifest.json"):
        raise ConfigError(f"data: {data!r} has no manifest.json; run `python -m jobs.preprocess` first")
    m = json.loads(storage.read_text(fs, f"{root}/manifest.json"))
    if m.get("modality") != modality:
        raise ConfigError(f"modality: --modality {modality} but {data!r} holds {m.get('modality')} data")
    if not m.get("counts", {}).get("written"):
        raise ConfigError(f"data: {data!r} holds no rows")
    refuse_raw_pixels(m, data)
    return m


def refuse_raw_pixels(m: dict, data: str) -> None:
    """Image folders written before images were stored encoded (raw pixels, one fixed crop) cannot
    give random crops: ConfigError with the command that rewrites them."""
    s = m.get("settings", {})
    if m.get("modality") == "image" and s.get("stored") != "encoded":
        raise ConfigError(
            f"data: {data!r} stores raw {s.get('size')}-px pixels (written before images were stored as "
            f"JPEG/PNG with room for random crops); rewrite it: python -m jobs.preprocess --modality image "
            f"--input {m.get('input', 'RAW_FOLDER')} --output {data} --image-size {s.get('size', 224)} --overwrite")


def frontend_from_manifest(m: dict) -> dict:
    """Model settings that must match the data (image size, vocabulary size, <mask> id)."""
    s = m["settings"]
    if m["modality"] == "image":
        return {"image_size": s["size"]}
    if m["modality"] == "text":
        # Manifests written before special_ids carried RoBERTa-style ids all had <mask> = 4.
        return {"vocab_size": s["vocab_size"], "mask_id": s.get("special_ids", {}).get("mask", 4)}
    return {}


# Fields that may change between a run and its resume, per kind of run (the Ray Train run name);
# any other difference changes what is being trained (schedule, batch, model, data) and is refused
# unless --allow-config-change. How a run is run and where it logs never changes its weights:
RUN_FIELDS = {"train.stop_at_step", "train.log_every", "train.checkpoint_every", "train.checkpoint_every_s",
              "train.micro_batch", "train.max_failures",
              "train.min_workers", "train.resize_interval_s", "train.worker_resources",
              "train.cpus_per_worker", "train.use_gpu", "train.compile", "train.worker_memory_gb",
              "tracking_uri", "experiment", "parent_run_id"}
RESUMABLE = {
    # pretraining's learning curves only watch; rollbacks act on a failure only
    "pretrain": RUN_FIELDS | {"train.on_collapse", "train.max_rollbacks", "train.eval_every", "train.val_batches",
                              "train.probe_samples", "val_data", "probe_train", "probe_test"},
    # fine-tuning's validation picks the weights it keeps: eval_every and val_data are not free
    "finetune": RUN_FIELDS,
}


# Fields added after runs were already written with this layout, with the value those runs used.
ADDED_FIELDS = {"model.frontend.mask_id": 4, "train.reference_batch": None,
               "train.tri_stage_hold": 0.9, "finetune.feature_bn": False, "train.min_workers": None,
               "train.resize_interval_s": 60.0, "train.worker_resources": {},
               # before images were stored encoded and augmented per epoch (their shards are refused)
               "train.augment": "none", "train.crop_scale": [0.08, 1.0], "train.crop_ratio": [3 / 4, 4 / 3],
               "train.hflip": 0.5, "train.color_jitter": 0.0}


def resumable(key: str, fields: set) -> bool:
    """Whether flattened config key `key` may change on a resume: a listed field, or any key under a
    listed mapping field (flatten turns train.worker_resources={trainer: 1} into
    train.worker_resources.trainer)."""
    return any(key == f or key.startswith(f + ".") for f in fields)


def check_resume(cfg, allow_change: bool = False, name: str = "pretrain") -> None:
    """Refuse to resume a run whose schedule-relevant config differs from the one it started
    with, naming the differing fields (before Ray starts)."""
    from pipeline.train.config import REMOVED_FIELDS
    from pipeline.train.tracking import default_tracking_uri, flatten

    fs, root = storage.resolve(cfg.output)
    if not storage.exists(fs, f"{root}/config.json") or not storage.exists(fs, f"{root}/ray/{name}"):
        return  # nothing to resume
    before = flatten(json.loads(storage.read_text(fs, f"{root}/config.json")))
    now = flatten(storage.redact(cfg.to_dict()))  # as written: URI credentials are ***
    for k in REMOVED_FIELDS:  # an older config.json has them; they no longer change what is trained
        before.pop(f"train.{k}", None)
    for k, v in ADDED_FIELDS.items():  # an older config.json lacks them, and meant these values
        if k in now:  # (a pretraining run has no finetune.* fields at all)
            before.setdefault(k, v)
    if before.get("tracking_uri") is None:  # written before the driver fixed the default store
        before["tracking_uri"] = default_tracking_uri(cfg.output)
    for k in ("data", "output", "train_data", "val_data", "test_data"):  # the same place written two ways
        if before.get(k) and now.get(k) and storage.place(before[k]) == storage.place(now[k]):
            before[k] = now[k]
    diff = sorted(k for k in set(before) | set(now)
                  if before.get(k) != now.get(k) and not resumable(k, RESUMABLE[name]))
    if diff and not allow_change:
        shown = ", ".join(f"{k}: {before.get(k)!r} → {now.get(k)!r}" for k in diff[:6])
        raise ConfigError(f"{diff[0]}: {storage.shown(cfg.output)!r} holds a run started with another config ({shown}"
                          f"{', …' if len(diff) > 6 else ''}); resuming would change its schedule. Use a new "
                          f"--output, or pass --allow-config-change to resume anyway")


def fit(loop, name: str, t, output: str, loop_config: dict):
    """Run `loop` on `t.num_workers` Ray Train workers (elastic between t.min_workers and
    t.num_workers when set); checkpoints under OUTPUT/ray/NAME (a re-run resumes from the latest),
    FailureConfig restarts: t.max_failures counts failures of the training code; a worker's node
    lost restarts without counting (elastic.NodeLossPolicy). Each worker's Ray Data readers run on
    its own t.cpus_per_worker CPUs (elastic.reader_options)."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, ScalingConfig
    from ray.train import RunConfig as RayRunConfig

    from pipeline.raycluster import train_log_level
    from pipeline.train.elastic import NodeLossPolicy
    from ray.train.torch import TorchTrainer

    class _Trainer(TorchTrainer):
        # Ray 2.60 builds its default failure policy in fit() with no public way to pass one;
        # this hands the controller NodeLossPolicy instead (left alone if Ray stops passing one).
        def _initialize_and_run_controller(self, **kwargs):
            if "failure_policy" in kwargs:
                kwargs["failure_policy"] = NodeLossPolicy(self.run_config.failure_config)
            return super()._initialize_and_run_controller(**kwargs)

    fs, out = storage.resolve(output)
    cluster_cpus = int(ray.cluster_resources().get("CPU", 1))
    resources = {"CPU": t.cpus_per_worker, **({"GPU": 1} if t.use_gpu else {}), **t.worker_resources}
    workers = (t.min_workers, t.num_workers) if t.min_workers else t.num_workers
    env = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0", **{k: os.environ[k] for k in (SAMPLE_LOG,) if k in os.environ}}
    trainer = _Trainer(
        loop,
        train_loop_config={**loop_config, "cluster_cpus": cluster_cpus, "log_level": train_log_level()},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=t.use_gpu, resources_per_worker=resources,
                                     elastic_resize_monitor_interval_s=t.resize_interval_s),
        run_config=RayRunConfig(name=name, storage_path=f"{out}/ray", storage_filesystem=fs,
                                failure_config=FailureConfig(max_failures=t.max_failures),
                                checkpoint_config=CheckpointConfig(num_to_keep=2),
                                logging_config=LoggingConfig(log_level=train_log_level()),
                                # Ray Train tees a worker's print() into its logger, and both reach
                                # the terminal: one progress line per logging step needs it off.
                                # SAMPLE_LOG: a test's hook (loop.py) reaches the workers.
                                worker_runtime_env={"env_vars": env}),
    )
    return trainer.fit()


def fit_error(run) -> tuple[object, str | None]:
    """(result, None) from `run()` (a call that ends in `fit`), or (None, message) when training
    failed: the message is the worker's own exception, the last line of Ray's report, e.g.
    "…NonFiniteLoss: loss is nan at step 2 (on rank 1)"."""
    from ray.train import TrainingFailedError

    try:
        result = run()
        error = result.error
    except TrainingFailedError as e:
        result, error = None, e
    if not error:
        return result, None
    return None, error_line(error)


def error_line(error: BaseException) -> str:
    """The worker's own exception out of Ray's report around it: its last non-empty line."""
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    return lines[-1] if lines else type(error).__name__


def local_cluster_cpus(cfg) -> int:
    """Logical CPUs for a local Ray cluster: the training workers' CPUs plus two for the driver's
    own Ray Data reads (the workers' readers need none: elastic.reader_options)."""
    return max(os.cpu_count() or 1, cfg.train.num_workers * cfg.train.cpus_per_worker + 2)
