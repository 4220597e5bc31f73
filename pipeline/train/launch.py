"""Driver side of pretraining: read the data's manifest, build the streaming dataset and the
TorchTrainer, run it. The only module here that creates Ray objects."""
from __future__ import annotations

import json
import os

import ray

from pipeline.config import ConfigError
from pipeline.train.batches import COLUMNS
from pipeline.train.config import RunConfig
from pipeline.train.worker import train_loop_per_worker


def read_manifest(data: str, modality: str) -> dict:
    path = os.path.join(data, "manifest.json")
    if not os.path.isfile(path):
        raise ConfigError(f"data: {data!r} has no manifest.json; run `python -m jobs.preprocess` first")
    with open(path) as f:
        m = json.load(f)
    if m.get("modality") != modality:
        raise ConfigError(f"modality: --modality {modality} but {data!r} holds {m.get('modality')} data")
    if not m.get("counts", {}).get("written"):
        raise ConfigError(f"data: {data!r} holds no rows")
    return m


def frontend_from_manifest(m: dict) -> dict:
    """Model settings that must match the data (image size, vocabulary size)."""
    s = m["settings"]
    if m["modality"] == "image":
        return {"image_size": s["size"]}
    if m["modality"] == "text":
        return {"vocab_size": s["vocab_size"]}
    return {}


def run_pretraining(cfg: RunConfig, fault: dict | None = None):
    """Run (or resume) the pretraining described by `cfg` on the connected Ray cluster."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, ScalingConfig
    from ray.train import RunConfig as RayRunConfig
    from ray.train.torch import TorchTrainer

    t = cfg.train
    out = os.path.abspath(cfg.output) if "://" not in cfg.output else cfg.output
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg.to_dict(), f, indent=2, sort_keys=True)
    # Streamed, never materialized: each worker pulls blocks of its split as it trains.
    ds = ray.data.read_parquet(os.path.join(cfg.data, "shards"), columns=COLUMNS[cfg.modality])
    cluster_cpus = int(ray.cluster_resources().get("CPU", 1))
    resources = {"CPU": t.cpus_per_worker, **({"GPU": 1} if t.use_gpu else {})}
    exec_opts = ray.data.ExecutionOptions(preserve_order=True)  # same batches on a re-run: exact resume
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"run": cfg.to_dict(), "fault": fault, "cluster_cpus": cluster_cpus,
                           "threads_per_worker": max(1, (os.cpu_count() or 1) // t.num_workers)},
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu, resources_per_worker=resources),
        run_config=RayRunConfig(name="pretrain", storage_path=os.path.join(out, "ray"),
                                failure_config=FailureConfig(max_failures=t.max_failures),
                                checkpoint_config=CheckpointConfig(num_to_keep=2)),
        datasets={"train": ds},
        dataset_config=DataConfig(execution_options=exec_opts),
    )
    return trainer.fit()


def local_cluster_cpus(cfg: RunConfig) -> int:
    """Logical CPUs for a local Ray cluster: the training workers' CPUs plus two for the Ray Data
    tasks that feed them (a worker set that holds every CPU starves its own input and hangs)."""
    return max(os.cpu_count() or 1, cfg.train.num_workers * cfg.train.cpus_per_worker + 2)
