"""`train_loop_per_worker`: what each Ray Train worker runs.

    resume from ray.train.get_checkpoint() → stream the worker's dataset shard → collate + masks →
    student/teacher step (DDP, bf16 autocast on GPU, clipping, accumulation) → EMA update →
    metrics (rank 0 → MLflow) → checkpoint via ray.train.report every N steps → final encoder.
"""
from __future__ import annotations

import math
import os
import tempfile
import time
from contextlib import nullcontext

import torch

from pipeline.model.data2vec import Data2Vec
from pipeline.train.batches import collate, step_rng
from pipeline.train.checkpoint import load_state, save_final, save_state
from pipeline.train.config import RunConfig, TrainConfig
from pipeline.train.tracking import MLflowSink, NullSink, default_tracking_uri, git_commit, mask_picture


def lr_at(step: int, t: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): a pure function, so resume needs no state."""
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    if t.schedule == "cosine":
        p = (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps)
        return t.lr * (t.min_lr_scale + (1 - t.min_lr_scale) * 0.5 * (1 + math.cos(math.pi * min(p, 1.0))))
    # tri_stage (fairseq): warm-up, hold 90% of the run, then exponential decay to lr × min_lr_scale.
    hold_end = t.warmup_steps + int(0.9 * (t.max_steps - t.warmup_steps))
    if step < hold_end:
        return t.lr
    p = (step - hold_end) / max(1, t.max_steps - hold_end)
    return t.lr * max(t.min_lr_scale, 1e-12) ** min(p, 1.0)


def build_optimizer(model: Data2Vec, t: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over the student; no weight decay on biases, norms, positions, CLS and mask tokens."""
    decay, no_decay = [], []
    teacher = {id(p) for p in model.teacher_parameters()}
    for name, p in model.named_parameters():
        if id(p) in teacher or not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(("cls", "mask_emb")) else decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=t.lr, betas=t.betas, eps=t.eps)


def _to(inputs: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in inputs.items()}


def train_loop_per_worker(config: dict) -> None:
    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint

    cfg = RunConfig.from_dict(config["run"])
    t, mcfg = cfg.train, cfg.model
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if t.use_gpu else torch.device("cpu")
    torch.set_num_threads(config.get("threads_per_worker", 1))

    torch.manual_seed(t.seed)  # identical initial weights on every rank
    model = Data2Vec(mcfg)
    opt = build_optimizer(model, t)
    step, epoch, batch_in_epoch = 0, 0, 0
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = load_state(d)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step, epoch, batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
    model.to(device)
    for s in opt.state.values():  # optimizer state follows the model to the device
        for k, v in s.items():
            if torch.is_tensor(v) and k != "step":
                s[k] = v.to(device)
    ddp = ray.train.torch.prepare_model(model, move_to_device=False) if world > 1 else model
    core: Data2Vec = model

    total, stop = t.max_steps, t.stop_at_step or t.max_steps
    sink = NullSink()
    if rank == 0:
        os.makedirs(cfg.output, exist_ok=True)
        sink = MLflowSink(cfg.tracking_uri or default_tracking_uri(cfg.output), cfg.experiment,
                          cfg.output, f"{cfg.modality}-{mcfg.mode}-{cfg.preset}", cfg.to_dict(),
                          parent_run_id=cfg.parent_run_id)
        sink.set_tags({"git_commit": git_commit(), "modality": cfg.modality, "mode": mcfg.mode,
                       "preset": cfg.preset, "ray.num_workers": world,
                       "ray.cluster_cpus": config.get("cluster_cpus", "?"), "device": str(device)})
        if ckpt is not None:
            print(f"[rank 0] resumed from step {step} (epoch {epoch}, batch {batch_in_epoch})", flush=True)
    fault = config.get("fault") or {}
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    shard = ray.train.get_dataset_shard("train")
    window = {"loss": 0.0, "tv": 0.0, "pv": 0.0, "n": 0, "wait": 0.0, "t0": time.perf_counter(), "samples": 0}
    run_t0 = time.perf_counter()
    start_step = step
    pictured = step > 0

    while step < stop:
        it = shard.iter_batches(batch_size=t.batch_size, batch_format="numpy", drop_last=True,
                                local_shuffle_buffer_size=t.shuffle_buffer or None,
                                local_shuffle_seed=t.seed * 100_003 + epoch * 101 + rank if t.shuffle_buffer else None,
                                prefetch_batches=2)
        skip = batch_in_epoch * t.grad_accum  # micro-batches already consumed before a resume
        micro, stepped_this_epoch = 0, False
        t_wait = time.perf_counter()
        for i, nb in enumerate(it):
            if i < skip:
                t_wait = time.perf_counter()
                continue
            window["wait"] += time.perf_counter() - t_wait
            torch.manual_seed(t.seed * 1_000_003 + rank * 10_007 + step * 31 + micro)  # dropout, decoder noise
            inputs, mask = collate(nb, mcfg, step_rng(t.seed, rank, step, micro), t.audio_max_samples,
                                   t.text_max_tokens, t.audio_batching)
            if not pictured and rank == 0:
                with tempfile.TemporaryDirectory() as tmp:
                    sink.log_artifact(mask_picture(os.path.join(tmp, "masks.png"), inputs, mask.numpy(),
                                                   cfg.modality, core.frontend.grid), "masks")
                pictured = True
            inputs, mask = _to(inputs, device), mask.to(device)
            last = micro == t.grad_accum - 1
            sync = ddp.no_sync() if (world > 1 and not last) else nullcontext()
            with sync, autocast:
                out = ddp(inputs, mask)
            core.check(out, step)  # NonFiniteLoss / RepresentationCollapse, never a silent NaN
            with sync:
                (out.loss / t.grad_accum).backward()
            window["loss"] += out.loss.item()
            window["tv"] += float(out.target_var)
            window["pv"] += float(out.pred_var)
            window["n"] += 1
            window["samples"] += nb[next(iter(nb))].shape[0] * world
            micro += 1
            if not last:
                t_wait = time.perf_counter()
                continue
            # ---- optimizer step
            micro = 0
            lr = lr_at(step, t)
            for g in opt.param_groups:
                g["lr"] = lr
            if t.clip_norm > 0:
                torch.nn.utils.clip_grad_norm_(core.student_parameters(), t.clip_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
            decay = core.ema_step(step)
            step += 1
            batch_in_epoch += 1
            stepped_this_epoch = True
            if fault.get("step") == step and rank == world - 1 and not os.path.exists(fault["marker"]):
                # Test-only: this worker process dies once. Ray Train's controller polls reports
                # every 2 s; waiting past that makes the restart deterministic (it resumes from
                # the latest registered checkpoint either way).
                time.sleep(5)
                open(fault["marker"], "w").close()
                print(f"[rank {rank}] injected fault at step {step}", flush=True)
                os._exit(1)
            if step % t.log_every == 0 or step == stop:
                dt = time.perf_counter() - window["t0"]
                n = max(window["n"], 1)
                metrics = {"loss": window["loss"] / n, "lr": lr, "ema_decay": decay,
                           "target_var": window["tv"] / n, "pred_var": window["pv"] / n,
                           "samples_per_s": window["samples"] / dt, "data_wait_fraction": window["wait"] / dt,
                           "epoch": epoch}
                sink.log_metrics(metrics, step)
                if rank == 0:
                    done = step - start_step
                    eta = (time.perf_counter() - run_t0) / max(done, 1) * (stop - step)
                    print(f"step {step}/{total} loss {metrics['loss']:.4f} lr {lr:.2e} "
                          f"{metrics['samples_per_s']:.1f} samples/s data-wait {metrics['data_wait_fraction']:.1%} "
                          f"ETA {eta:.0f}s", flush=True)
                window = {"loss": 0.0, "tv": 0.0, "pv": 0.0, "n": 0, "wait": 0.0, "t0": time.perf_counter(),
                          "samples": 0, "last": metrics}
            if step % t.checkpoint_every == 0 or step == stop:
                _report(ray.train, Checkpoint, rank, core, opt, step, epoch, batch_in_epoch, cfg,
                        window.get("last", {}))
            if step >= stop:
                break
            t_wait = time.perf_counter()
        else:
            if not stepped_this_epoch:
                raise RuntimeError(
                    f"the dataset shard of worker {rank} yields no full batch: lower train.batch_size "
                    f"({t.batch_size}) × grad_accum ({t.grad_accum}) or use fewer workers ({world})")
            epoch += 1
            batch_in_epoch = 0
    if rank == 0:
        if step >= total:
            save_final(os.path.join(cfg.output, "final"), core, cfg.to_dict())
            for f in ("config.json", "model.safetensors"):
                sink.log_artifact(os.path.join(cfg.output, "final", f), "final")
        sink.close()


def _report(train, Checkpoint, rank, model, opt, step, epoch, batch_in_epoch, cfg, metrics):
    """Every rank reports (a barrier); rank 0 attaches the checkpoint."""
    metrics = {**metrics, "step": step}
    if rank != 0:
        train.report(metrics, checkpoint=None)
        return
    with tempfile.TemporaryDirectory() as tmp:
        save_state(tmp, model=model, optimizer=opt, step=step, epoch=epoch, batch_in_epoch=batch_in_epoch,
                   config=cfg.to_dict())
        train.report(metrics, checkpoint=Checkpoint.from_directory(tmp))

