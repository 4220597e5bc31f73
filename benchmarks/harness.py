"""In-process training and probing on preprocessed shards, without Ray: the "bare PyTorch step"
the benchmarks compare against, and a fast loop for recipe experiments.

    rows = load_rows("runs/demo/data/image_train", "image")           # columns as Python lists
    trainer = Trainer(run_config, rows)                               # same collate/optimizer/LR as a worker
    trainer.train(100)                                                # → seconds spent in steps
    acc = probe_accuracy(trainer.model, probe_train, probe_test)      # frozen features → LR probe

    trainer = Trainer.from_configs(model_cfg, train_cfg, device)     # no rows: bring your own batches
    trainer.train_step(inputs, mask)                                  # one step on them

The step is the worker's step (`pipeline.train.step.train_step`, with the same `collate` and
masks, bf16 autocast on CUDA, and the model's modules compiled when train.compile is set); only
the data comes from memory instead of a Ray Data stream.
"""
from __future__ import annotations

import glob
import json
import os
import time

import numpy as np
import pyarrow.parquet as pq
import torch

from pipeline.model.config import ModelConfig
from pipeline.model.data2vec import Data2Vec
from pipeline.probe import eval_inputs, fit_probes
from pipeline.train.batches import collate, step_rng
from pipeline.train.stream import COLUMNS
from pipeline.train.config import RunConfig, TrainConfig, resolve
from pipeline.train.launch import frontend_from_manifest, read_manifest
from pipeline.train.step import autocast_for, build_optimizer, train_step


def demo_run_config(data: str, modality: str, output: str, size: str = "demo",
                    overrides: dict | None = None, **frontend) -> RunConfig:
    """The run config for pretraining on the demo's preprocessed folders under `data` (as
    `python -m jobs.demo` lays them out), with the data-derived front-end settings from its manifest."""
    from pipeline.demo import SPLITS

    pre = os.path.join(data, f"{modality}_{SPLITS[modality][0]}")
    fe = {**frontend_from_manifest(read_manifest(pre, modality)), **frontend}
    # Benchmarks time one micro-batch per worker per step: base recipes' reference_batch would
    # otherwise make each step 8–16 micro-batches on one worker.
    overrides = {"train.reference_batch": None, **(overrides or {})}
    return resolve(modality, pre, output, size, None, overrides, model_frontend=fe)


def load_rows(data_dir: str, modality: str, labeled: bool = False) -> dict[str, list]:
    """All rows of a preprocessed folder → {column: list}; `labeled` keeps rows with a label."""
    cols = COLUMNS[modality] + (["label"] if labeled else [])
    files = sorted(glob.glob(os.path.join(data_dir, "shards", "*.parquet")))
    tables = [pq.read_table(f, columns=cols) for f in files]
    out = {c: [v for t in tables for v in t.column(c).to_pylist()] for c in cols}
    if labeled:
        keep = [i for i, lab in enumerate(out["label"]) if lab is not None]
        out = {c: [v[i] for i in keep] for c, v in out.items()}
    if modality == "image":  # decoded once: the evaluation view, as pixels (what read tasks hand a worker)
        from pipeline.augment import eval_views
        size = json.load(open(os.path.join(data_dir, "manifest.json")))["settings"]["size"]
        out["image"] = list(eval_views(out["image"], size).reshape(len(out["image"]), -1))
    return out


def batches(rows: dict[str, list], batch_size: int, seed: int):
    """Endless shuffled numpy batches (epoch after epoch), dropping the last partial batch."""
    n = len(next(iter(rows.values())))
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(n)
        for i in range(0, n - batch_size + 1, batch_size):
            idx = order[i: i + batch_size]
            yield {c: _column([v[j] for j in idx]) for c, v in rows.items()}


def _column(values: list):
    if isinstance(values[0], np.ndarray) and values[0].dtype == np.uint8:  # image pixels → (B, S·S·3)
        return np.stack(values)
    if isinstance(values[0], (bytes, str)) or values[0] is None:
        return np.asarray(values, dtype=object)
    arr = np.empty(len(values), dtype=object)
    arr[:] = [np.asarray(v) for v in values]
    return arr


class Trainer:
    """One process, one model: the worker's step on in-memory batches.

    Built as a worker builds it (pipeline/pretrain/worker.py): seeded weights on `device`, the
    optimizer, then `model.compile_modules()` when train.compile is set. Without `rows` there is
    no data: the caller passes its own batches to `train_step`."""

    def __init__(self, cfg: RunConfig, rows: dict[str, list] | None = None, device: str | torch.device = "cpu"):
        self.cfg, t = cfg, cfg.train
        self.device = torch.device(device)
        torch.manual_seed(t.seed)
        self.model = Data2Vec(cfg.model).to(self.device)
        self.opt = build_optimizer(self.model, t)
        if t.compile:
            self.model.compile_modules()
        self.autocast = autocast_for(self.device)  # bf16 on CUDA, none on CPU
        self.step = 0
        self.data = batches(rows, t.batch_size, t.seed) if rows is not None else None

    @classmethod
    def from_configs(cls, model: ModelConfig, train: TrainConfig, device: str | torch.device = "cpu") -> Trainer:
        """A Trainer from a model config and a TrainConfig alone (no data folder, no rows)."""
        run = RunConfig(modality=model.modality, data="", output="", model=model, train=train)
        return cls(run, device=device)

    def next_inputs(self):
        t = self.cfg.train
        return collate(next(self.data), self.cfg.model, step_rng(t.seed, 0, self.step), t.audio_max_samples,
                       t.text_max_tokens, t.audio_batching)

    def train_step(self, inputs: dict[str, torch.Tensor], mask: torch.Tensor) -> float:
        """The product's step (pipeline.train.step.train_step) on one in-memory batch: `inputs` as
        `collate` makes them, `mask` (B or B·clone_batch, T) bool; both moved to the model's device."""
        self.model.train()
        inputs, mask = {k: v.to(self.device) for k, v in inputs.items()}, mask.to(self.device)
        m = train_step(self.model, self.model, self.opt, [(inputs, mask)], self.step, self.cfg.train,
                       autocast=self.autocast)
        self.step += 1
        return m["loss"]

    def train(self, steps: int) -> float:
        """Run `steps` steps (collate included, as in a worker); returns their wall seconds."""
        t0 = time.perf_counter()
        for _ in range(steps):
            self.train_step(*self.next_inputs())
        return time.perf_counter() - t0


def features(model: Data2Vec, rows: dict[str, list], layers=(-1,), teacher: bool = False,
             batch_size: int = 128) -> np.ndarray:
    """Mean-pooled frozen features (N, D), in-process (the Ray version is pipeline.probe.extract)."""
    model.eval()
    f = model.cfg.frontend
    col = COLUMNS[model.cfg.modality][0]
    out = []
    for i in range(0, len(rows[col]), batch_size):
        b = {col: _column(rows[col][i: i + batch_size])}
        out.append(model.extract(eval_inputs(b, model.cfg.modality, f.image_size, f.max_positions),
                                 layers=layers, teacher=teacher).numpy())
    return np.concatenate(out)


def probe_accuracy(model: Data2Vec, train_rows, test_rows, layers=(-1,), teacher: bool = False,
                   n_jobs: int | None = None) -> float:
    xtr, xte = (features(model, r, layers, teacher) for r in (train_rows, test_rows))
    return fit_probes(xtr, np.asarray(train_rows["label"]), xte, np.asarray(test_rows["label"]),
                      n_jobs=n_jobs)["probe_accuracy"]
