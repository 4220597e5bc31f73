"""`train_loop_per_worker`: what each Ray Train worker runs to pretrain. The step loop itself
(stream, batches ahead, metric windows, logging, checkpoints, epochs) is loop.py's, shared with
fine-tuning; this file holds what pretraining adds:

    Data2Vec student + EMA teacher (from --init or seeded) → train_step (step.py: DDP, autocast,
    health check agreed by all ranks, clip, EMA) → learning curves on rank 0 (validation loss,
    online probe) → RUN_DIR/final (rank 0)

On a NonFiniteLoss / RepresentationCollapse every rank raises the same error in the same step
(`train.on_collapse: raise`), or every rank restores the last checkpoint's state, scales the LR by
`train.rollback_lr_factor` and goes on (`rollback`, at most `train.max_rollbacks` times).
"""
from __future__ import annotations

import os
import tempfile
import time

import torch

from pipeline import storage
from pipeline.augment import view_of
from pipeline.model.data2vec import Data2Vec
from pipeline.model.objective import NonFiniteLoss, RepresentationCollapse
from pipeline.train.batches import collate
from pipeline.train.checkpoint import save_final
from pipeline.train.config import RunConfig
from pipeline.pretrain.curves import OnlineProbe, ValidationLoss
from pipeline.train.loop import (POSITION, Restart, Task, copy_to_local, cpu_copy,
                                 load_model_and_optimizer, restore, run_steps, worker_context)
from pipeline.train.step import autocast_for, build_optimizer, train_step
from pipeline.train.stream import COLUMNS, Chunk, warm_up
from pipeline.train.tracking import MLflowSink, NullSink, git_commit, mask_picture


def train_loop_per_worker(config: dict) -> None:
    """set up (config at this world size, model, optimizer, restored position) → open tracking
    (rank 0) → the step loop → write final/ (rank 0)."""
    cfg = RunConfig.from_dict(config["run"])  # config["run"] stays what is logged and saved
    rank, world, device, threads = worker_context(cfg.train.use_gpu, config.get("log_level", "INFO"))
    warm_up(config["chunks"], COLUMNS[cfg.modality], view_of(cfg))  # Ray Data's start overlaps the build
    model, net, opt, pos, resumed = build(cfg, world, device)
    sink = open_tracking(cfg, config, world, device, threads) if rank == 0 else NullSink()
    try:
        task = Pretraining(cfg, model, net, opt, pos, rank, world, device, sink, config)
        run_steps(task, model=model, opt=opt, pos=pos, t=cfg.train, rank=rank, world=world, chunks=config["chunks"],
                  sink=sink, config=config["run"], resumed=resumed)
        if rank == 0 and pos["step"] >= cfg.train.max_steps:
            write_final(cfg, model, config["run"], sink)
    except BaseException:
        sink.close("FAILED")  # the MLflow run of a failed worker says so (a restart reopens it)
        raise
    sink.close()


def build(cfg: RunConfig, world: int, device):
    """(model, its DDP wrapper, optimizer, run position, resumed?): seeded identical weights on
    every rank, then the checkpoint's (a restart) or --init's (continued pretraining)."""
    import ray.train.torch

    t = cfg.train
    torch.manual_seed(t.seed)  # identical initial weights on every rank
    model = Data2Vec(cfg.model).to(device)
    opt = build_optimizer(model, t)
    # Run position; lr_scale and rollbacks change only on a rollback and are checkpointed too.
    pos = {**POSITION, "lr_scale": 1.0, "rollbacks": 0}
    resumed = restore(model, opt, pos, device) is not None
    if not resumed and cfg.init:  # continued pretraining: student ← checkpoint, teacher ← a copy of it
        from pipeline.init_weights import apply_init, read_init
        apply_init(model, read_init(cfg.init))  # copies into the existing (device) tensors
    if t.compile:
        model.compile_modules()
    net = ray.train.torch.prepare_model(model, move_to_device=False) if world > 1 else model
    return model, net, opt, pos, resumed


def open_tracking(cfg: RunConfig, config: dict, world: int, device, threads: int) -> MLflowSink:
    """Rank 0's MLflow run (reopened on a restart), with the run's tags."""
    out_fs, out_root = storage.resolve(cfg.output)
    out_fs.create_dir(out_root, recursive=True)
    sink = MLflowSink(cfg.tracking_uri, cfg.experiment, cfg.output, f"{cfg.modality}-{cfg.model.mode}-{cfg.preset}",
                      config["run"], parent_run_id=cfg.parent_run_id)
    sink.set_tags({"train.effective_batch": cfg.train.effective_batch, "train.lr": cfg.train.lr,
                   "git_commit": git_commit(), "modality": cfg.modality, "mode": cfg.model.mode,
                   "preset": cfg.preset, "ray.num_workers": world, "torch.threads_per_worker": threads,
                   "ray.cluster_cpus": config.get("cluster_cpus", "?"), "device": str(device)})
    sink.set_tags(config.get("tags") or {})
    return sink


def write_final(cfg: RunConfig, model, saved_config: dict, sink) -> None:
    """RUN_DIR/final (model.safetensors + config.json), also as MLflow artifacts."""
    final = storage.join(cfg.output, "final")
    save_final(final, model, saved_config)
    with tempfile.TemporaryDirectory() as tmp:
        for local in copy_to_local(*storage.resolve(final), ("config.json", "model.safetensors"), tmp):
            sink.log_artifact(local, "final")


class Pretraining(Task):
    """The data2vec student/teacher step, its rollbacks, the mask picture, the learning curves and
    the test-only fault injection (`config["fault"]`)."""

    averaged = ("loss", "target_var", "pred_var")

    def __init__(self, cfg: RunConfig, model, net, opt, pos: dict, rank: int, world: int, device, sink,
                 config: dict):
        t = cfg.train
        self.cfg, self.t, self.model, self.net, self.opt = cfg, t, model, net, opt
        self.rank, self.world, self.device, self.sink = rank, world, device, sink
        self.columns = COLUMNS[cfg.modality]
        self.view = view_of(cfg)
        self.fault = config.get("fault") or {}
        self.autocast = autocast_for(device)
        self.pictured = pos["step"] > 0
        # An in-memory copy of the last checkpoint to roll back to (train.on_collapse: rollback).
        self.snapshot = self._snapshot(pos) if t.on_collapse == "rollback" else None
        self.curves = Curves(cfg, config.get("val_chunks") or [], device, self.autocast) if rank == 0 else None

    def _snapshot(self, pos: dict) -> dict:
        return {"model": cpu_copy(self.model.state_dict()), "optimizer": cpu_copy(self.opt.state_dict()), **pos}

    def collate(self, batch, rng):
        t = self.t
        return collate(batch, self.cfg.model, rng, t.audio_max_samples, t.text_max_tokens, t.audio_batching)

    def begin(self, pos):
        if self.curves and pos["step"] == 0:
            self.curves.evaluate(self.model, self.sink, 0)  # the curves' starting point: the network at init

    def step(self, step, micro, pos):
        t, rank = self.t, self.rank
        if not self.pictured and rank == 0:
            with tempfile.TemporaryDirectory() as tmp:
                self.sink.log_artifact(mask_picture(os.path.join(tmp, "masks.png"), micro[0][0], micro[0][1].numpy(),
                                                    self.cfg.modality, self.model.frontend.grid), "masks")
            self.pictured = True
        micro = [({k: v.to(self.device, non_blocking=True) for k, v in x.items()}, m.to(self.device)) for x, m in micro]
        fault = self.fault
        poison = (fault.get("nan_at_step") == step + 1 and rank == fault.get("rank", 0)
                  and fault.get("poisoned", 0) < fault.get("times", 1))
        try:
            return train_step(self.model, self.net, self.opt, micro, step, t, lr_scale=pos["lr_scale"],
                              autocast=self.autocast, rank=rank, world=self.world, poison=poison)
        except (NonFiniteLoss, RepresentationCollapse) as e:
            fault["poisoned"] = fault.get("poisoned", 0) + int(poison)
            if t.on_collapse == "raise" or pos["rollbacks"] >= t.max_rollbacks:
                raise
            self._roll_back(step, pos, e)
            raise Restart from e

    def _roll_back(self, step: int, pos: dict, e: Exception) -> None:
        """Back to the snapshot's weights and position; the rollback count and the LR cut compound."""
        t, snap = self.t, self.snapshot
        self.opt.zero_grad(set_to_none=True)  # drop this group's partial gradients
        load_model_and_optimizer(self.model, self.opt, cpu_copy(snap), self.device)  # a copy: it may serve again
        pos.update(step=snap["step"], epoch=snap["epoch"], rest=snap["rest"], step_in_epoch=snap["step_in_epoch"],
                   rollbacks=pos["rollbacks"] + 1, lr_scale=pos["lr_scale"] * t.rollback_lr_factor)
        self.sink.discard_after(pos["step"])  # the abandoned steps' metrics never reach the history
        self.sink.log_event({"rollback": pos["rollbacks"], "rollback_lr_scale": pos["lr_scale"]}, step)
        self.sink.set_tags({f"rollback.{pos['rollbacks']}": f"step {step} → {pos['step']}: {type(e).__name__}: {e}"})
        if self.rank == 0:
            print(f"[rank 0] {type(e).__name__} at step {step}: rolled back to step {pos['step']}, "
                  f"LR × {pos['lr_scale']:g} (rollback {pos['rollbacks']}/{t.max_rollbacks})", flush=True)

    def after_step(self, step, pos):
        fault = self.fault
        if fault.get("step") == step and self.rank == self.world - 1 and not os.path.exists(fault["marker"]):
            # Test-only: this worker process dies once. Ray Train's controller polls reports
            # every 2 s; waiting past that makes the restart deterministic (it resumes from
            # the latest registered checkpoint either way).
            time.sleep(5)
            open(fault["marker"], "w").close()
            print(f"[rank {self.rank}] injected fault at step {step}", flush=True)
            os._exit(1)
        if self.curves and (step % self.curves.every == 0 or step == (self.t.stop_at_step or self.t.max_steps)):
            self.curves.evaluate(self.model, self.sink, step)

    def checkpoint_extra(self, saved):
        if self.snapshot is not None:
            self.snapshot = self._snapshot(saved)
        return {}


class Curves:
    """Rank 0's learning curves: validation loss and the online probe, every `every` steps."""

    def __init__(self, cfg: RunConfig, val_chunks: list[dict], device, autocast):
        t = cfg.train
        self.every = t.eval_every or max(1, t.max_steps // 5)
        self.device, self.autocast = device, autocast
        self.val = ValidationLoss([Chunk(**c) for c in val_chunks], cfg, t.seed) if val_chunks else None
        self.probe = OnlineProbe(cfg.probe_train, cfg.probe_test, cfg, t.seed) if cfg.probe_train else None

    def __bool__(self) -> bool:
        return self.val is not None or self.probe is not None

    def evaluate(self, model, sink, step: int) -> float:
        """Log this step's curve points; returns the seconds it took."""
        t0 = time.perf_counter()
        metrics = {}
        if self.val:
            metrics["val_loss"] = self.val(model, self.device, self.autocast)
        if self.probe:
            metrics.update(self.probe(model, self.device))
        took = time.perf_counter() - t0
        sink.log_metrics({**metrics, "eval_s": took}, step)
        print(f"eval step {step}: " + " ".join(f"{k} {v:.4f}" for k, v in metrics.items()) + f" ({took:.1f}s)",
              flush=True)
        return took
