"""Metrics sinks: MLflow on rank 0, a no-op everywhere else. No Ray imports."""
from __future__ import annotations

import os
import subprocess

import numpy as np


class NullSink:
    run_id = None

    def log_metrics(self, metrics: dict, step: int) -> None: ...
    def log_artifact(self, path: str, artifact_path: str | None = None) -> None: ...
    def set_tags(self, tags: dict) -> None: ...
    def close(self, status: str = "FINISHED") -> None: ...


class MLflowSink(NullSink):
    """One MLflow run per RUN_DIR: its id is stored in RUN_DIR/mlflow_run_id so a resumed run keeps
    logging into the same MLflow run."""

    def __init__(self, tracking_uri: str, experiment: str, run_dir: str, run_name: str, params: dict,
                 parent_run_id: str | None = None):
        import mlflow

        self.mlflow = mlflow
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_experiment(experiment)
        from pipeline import storage

        fs, root = storage.resolve(run_dir)
        id_file = f"{root}/mlflow_run_id"
        run_id = storage.read_text(fs, id_file).strip() if storage.exists(fs, id_file) else None
        tags = {"mlflow.parentRunId": parent_run_id} if parent_run_id and not run_id else None
        self.run = mlflow.start_run(run_id=run_id, run_name=None if run_id else run_name, tags=tags)
        self.run_id = self.run.info.run_id
        if run_id is None:
            storage.write_text(fs, id_file, self.run_id)
            flat = flatten(params)
            items = list(flat.items())
            for i in range(0, len(items), 100):  # MLflow caps params per call
                mlflow.log_params(dict(items[i: i + 100]))

    def log_metrics(self, metrics, step):
        self.mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def log_artifact(self, path, artifact_path=None):
        self.mlflow.log_artifact(path, artifact_path)

    def set_tags(self, tags):
        self.mlflow.set_tags(tags)

    def close(self, status="FINISHED"):
        self.mlflow.end_run(status=status)


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def default_tracking_uri(run_dir: str) -> str | None:
    """sqlite:///RUN_DIR/mlflow.db for a local (or file://) run folder; None for object stores,
    where the user passes --tracking-uri (an MLflow server)."""
    from pipeline.storage import local_path

    local = local_path(run_dir)
    return None if local is None else "sqlite:///" + os.path.join(local, "mlflow.db")


def git_commit() -> str:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                              timeout=5).stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def mask_picture(path: str, inputs: dict, mask: np.ndarray, modality: str, grid=None) -> str:
    """A PNG showing the first samples' masks: images with masked patches greyed out; audio/text
    as a strip per sample (white = visible to the student, dark = masked)."""
    from PIL import Image

    mask = np.asarray(mask)
    if modality == "image" and grid is not None:
        imgs = inputs["image"][: min(4, len(mask))].numpy()  # (n, 3, H, W) normalized
        tiles = []
        for i, img in enumerate(imgs):
            x = img.transpose(1, 2, 0)
            x = (x - x.min()) / (x.max() - x.min() + 1e-6)
            h, w = grid
            ph, pw = x.shape[0] // h, x.shape[1] // w
            m = mask[i].reshape(h, w).repeat(ph, 0).repeat(pw, 1)[..., None]
            tiles.append(np.concatenate([x, np.where(m, 0.5 * x + 0.25, x)], axis=1))
        arr = np.concatenate(tiles, axis=0)
        Image.fromarray((arr * 255).astype(np.uint8)).resize(
            (arr.shape[1] * 4, arr.shape[0] * 4), Image.Resampling.NEAREST).save(path)
    else:
        strip = (~mask[:8]).astype(np.uint8) * 200 + 40
        Image.fromarray(strip).resize((strip.shape[1] * 8, strip.shape[0] * 16), Image.Resampling.NEAREST).save(path)
    return path
