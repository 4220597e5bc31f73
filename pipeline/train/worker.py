"""`train_loop_per_worker`: what each Ray Train worker runs.

    resume from ray.train.get_checkpoint() → this rank's seeded stream of batches (stream.py) →
    groups of grad_accum micro-batches → collate + masks (in a background thread, the next steps
    ahead: batches.Ahead) → train_step (step.py: DDP, autocast,
    health check agreed by all ranks, clip, EMA) → metrics (rank 0 → MLflow) → checkpoint via
    ray.train.report every N steps → final model (rank 0)

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
from pipeline.model.data2vec import Data2Vec
from pipeline.model.objective import NonFiniteLoss, RepresentationCollapse
from pipeline.train.batches import COLUMNS, Ahead, collate, step_rng
from pipeline.train.checkpoint import load_state, save_final, save_state
from pipeline.train.config import RunConfig
from pipeline.train.curves import OnlineProbe, ValidationLoss
from pipeline.train.step import autocast_for, build_optimizer, train_step
from pipeline.train.stream import Chunk, RankStream
from pipeline.train.tracking import MLflowSink, NullSink, git_commit, mask_picture


def threads_for_worker(node_cpus: int, workers_on_node: int) -> int:
    """torch threads of one worker: its node's CPUs shared by the workers on that node."""
    return max(1, node_cpus // max(1, workers_on_node))


def node_cpus() -> int:
    """CPUs this process may run on (cgroup/affinity aware), on the node it runs on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def worker_context(use_gpu: bool):
    """(rank, world size, device, torch threads) of this Ray Train worker; sets the thread count."""
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    device = ray.train.torch.get_device() if use_gpu else torch.device("cpu")
    threads = threads_for_worker(node_cpus(), ctx.get_local_world_size())
    torch.set_num_threads(threads)
    return ctx.get_world_rank(), ctx.get_world_size(), device, threads


def _cpu_copy(state):
    """A detached CPU copy of a (nested) state dict: the in-memory snapshot rollbacks restore."""
    if torch.is_tensor(state):
        return state.detach().to("cpu", copy=True)
    if isinstance(state, dict):
        return {k: _cpu_copy(v) for k, v in state.items()}
    if isinstance(state, list):
        return [_cpu_copy(v) for v in state]
    return state


def _load(model, opt, state: dict, device) -> None:
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    for s in opt.state.values():  # optimizer state follows the model to the device
        for k, v in s.items():
            if torch.is_tensor(v) and k != "step":
                s[k] = v.to(device)


def train_loop_per_worker(config: dict) -> None:
    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint

    cfg = RunConfig.from_dict(config["run"])
    t, mcfg = cfg.train, cfg.model
    rank, world, device, threads = worker_context(t.use_gpu)

    torch.manual_seed(t.seed)  # identical initial weights on every rank
    model = Data2Vec(mcfg).to(device)
    opt = build_optimizer(model, t)
    # Run position; lr_scale and rollbacks change only on a rollback and are checkpointed too.
    pos = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "lr_scale": 1.0, "rollbacks": 0}
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = load_state(d)
        _load(model, opt, state, device)
        pos.update({k: state[k] for k in pos if k in state})
    elif cfg.init:  # continued pretraining: student ← checkpoint, teacher ← a copy of it
        from pipeline.init_weights import apply_init, read_init
        apply_init(model, read_init(cfg.init))  # copies into the existing (device) tensors
    rollback = t.on_collapse == "rollback"  # keep an in-memory copy of the last checkpoint to return to
    snapshot = {"model": _cpu_copy(model.state_dict()), "optimizer": _cpu_copy(opt.state_dict()), **pos} \
        if rollback else None
    if t.compile:
        model.compile_modules()
    net = ray.train.torch.prepare_model(model, move_to_device=False) if world > 1 else model

    total, stop = t.max_steps, t.stop_at_step or t.max_steps
    sink = NullSink()
    if rank == 0:
        out_fs, out_root = storage.resolve(cfg.output)
        out_fs.create_dir(out_root, recursive=True)
        sink = MLflowSink(cfg.tracking_uri, cfg.experiment,
                          cfg.output, f"{cfg.modality}-{mcfg.mode}-{cfg.preset}", cfg.to_dict(),
                          parent_run_id=cfg.parent_run_id)
        sink.set_tags({"train.effective_batch": cfg.train.effective_batch, "train.peak_lr": cfg.train.peak_lr,
                       "git_commit": git_commit(), "modality": cfg.modality, "mode": mcfg.mode,
                       "preset": cfg.preset, "ray.num_workers": world, "torch.threads_per_worker": threads,
                       "ray.cluster_cpus": config.get("cluster_cpus", "?"), "device": str(device)})
        if ckpt is not None:
            print(f"[rank 0] resumed from step {pos['step']} (epoch {pos['epoch']}, batch {pos['batch_in_epoch']})",
                  flush=True)
    fault = config.get("fault") or {}
    autocast = autocast_for(device)
    stream = RankStream([Chunk(**c) for c in config["chunks"]], COLUMNS[cfg.modality], t.batch_size,
                        t.shuffle_buffer, t.seed, rank, world)
    steps_per_epoch = stream.batches_per_epoch() // t.grad_accum
    if steps_per_epoch == 0:
        raise RuntimeError(f"worker {rank} gets no full step per epoch: lower train.batch_size ({t.batch_size}) "
                           f"× grad_accum ({t.grad_accum}) or use fewer workers ({world})")
    curves = Curves(cfg, config.get("val_chunks") or [], device, autocast) if rank == 0 else None
    run = {"t0": time.perf_counter(), "wait": 0.0, "eval": 0.0, "samples": 0}  # whole run (since this start)
    if curves and pos["step"] == 0:
        run["eval"] += curves.evaluate(model, sink, 0)  # the curves' starting point: the network at init
    window = {"loss": 0.0, "tv": 0.0, "pv": 0.0, "n": 0, "wait": 0.0, "eval": 0.0, "t0": time.perf_counter(),
              "samples": 0}
    start_step = pos["step"]
    pictured = pos["step"] > 0

    def prepare_from(pos: dict) -> Ahead:
        """The run's next steps from `pos`, collated with their masks in the background, across
        epoch boundaries (batches.Ahead)."""
        groups = stream.groups(pos["epoch"], pos["batch_in_epoch"], t.grad_accum)
        return Ahead(lambda step: [collate(nb, mcfg, step_rng(t.seed, rank, step, i), t.audio_max_samples,
                                           t.text_max_tokens, t.audio_batching) for i, nb in enumerate(next(groups))],
                     pos["step"], stop)

    ahead = prepare_from(pos)
    while pos["step"] < stop:
        rolled_back = False
        t_wait = time.perf_counter()
        while pos["batch_in_epoch"] < steps_per_epoch and pos["step"] < stop:
            step, micro = ahead.get()
            assert step == pos["step"], (step, pos["step"])
            window["wait"] += time.perf_counter() - t_wait
            torch.manual_seed(t.seed * 1_000_003 + rank * 10_007 + step * 31)  # dropout, decoder noise
            if not pictured and rank == 0:
                with tempfile.TemporaryDirectory() as tmp:
                    sink.log_artifact(mask_picture(os.path.join(tmp, "masks.png"), micro[0][0], micro[0][1].numpy(),
                                                   cfg.modality, model.frontend.grid), "masks")
                pictured = True
            micro = [({k: v.to(device, non_blocking=True) for k, v in x.items()}, m.to(device)) for x, m in micro]
            poison = (fault.get("nan_at_step") == step + 1 and rank == fault.get("rank", 0)
                      and fault.get("poisoned", 0) < fault.get("times", 1))
            try:
                m = train_step(model, net, opt, micro, step, t, lr_scale=pos["lr_scale"], autocast=autocast,
                               rank=rank, world=world, poison=poison)
            except (NonFiniteLoss, RepresentationCollapse) as e:
                fault["poisoned"] = fault.get("poisoned", 0) + int(poison)
                if t.on_collapse == "raise" or pos["rollbacks"] >= t.max_rollbacks:
                    raise
                opt.zero_grad(set_to_none=True)  # drop this group's partial gradients
                _load(model, opt, _cpu_copy(snapshot), device)  # a copy: the snapshot may serve again
                # Back to the snapshot's position, but the rollback count and the LR cut compound.
                pos.update(step=snapshot["step"], epoch=snapshot["epoch"], batch_in_epoch=snapshot["batch_in_epoch"],
                           rollbacks=pos["rollbacks"] + 1, lr_scale=pos["lr_scale"] * t.rollback_lr_factor)
                sink.log_metrics({"rollback": pos["rollbacks"], "rollback_lr_scale": pos["lr_scale"]}, step)
                sink.set_tags({f"rollback.{pos['rollbacks']}": f"step {step} → {pos['step']}: {type(e).__name__}: {e}"})
                if rank == 0:
                    print(f"[rank 0] {type(e).__name__} at step {step}: rolled back to step {pos['step']}, "
                          f"LR × {pos['lr_scale']:g} (rollback {pos['rollbacks']}/{t.max_rollbacks})", flush=True)
                ahead.close()
                ahead = prepare_from(pos)  # the restored position's batches and masks
                rolled_back = True
                break
            pos["step"] += 1
            pos["batch_in_epoch"] += 1
            step = pos["step"]
            window["loss"] += m["loss"]
            window["tv"] += m["target_var"]
            window["pv"] += m["pred_var"]
            window["n"] += 1
            window["samples"] += t.batch_size * t.grad_accum * world
            if fault.get("step") == step and rank == world - 1 and not os.path.exists(fault["marker"]):
                # Test-only: this worker process dies once. Ray Train's controller polls reports
                # every 2 s; waiting past that makes the restart deterministic (it resumes from
                # the latest registered checkpoint either way).
                time.sleep(5)
                open(fault["marker"], "w").close()
                print(f"[rank {rank}] injected fault at step {step}", flush=True)
                os._exit(1)
            if curves and (step % curves.every == 0 or step == stop):
                window["eval"] += curves.evaluate(model, sink, step)
            if step % t.log_every == 0 or step == stop:
                now = time.perf_counter()
                for k in ("wait", "eval", "samples"):
                    run[k] += window[k]
                dt, run_dt = now - window["t0"] - window["eval"], now - run["t0"] - run["eval"]  # training time
                n = max(window["n"], 1)
                metrics = {"loss": window["loss"] / n, "lr": m["lr"], "ema_decay": m["ema_decay"],
                           "target_var": window["tv"] / n, "pred_var": window["pv"] / n,
                           "samples_per_s": window["samples"] / dt, "data_wait_fraction": window["wait"] / dt,
                           "run_samples_per_s": run["samples"] / run_dt, "run_data_wait_fraction": run["wait"] / run_dt,
                           "run_eval_fraction": run["eval"] / (now - run["t0"]), "epoch": pos["epoch"]}
                sink.log_metrics(metrics, step)
                if rank == 0:
                    eta = (now - run["t0"]) / max(step - start_step, 1) * (stop - step)
                    print(f"step {step}/{total} loss {metrics['loss']:.4f} lr {m['lr']:.2e} "
                          f"{metrics['samples_per_s']:.1f} samples/s data-wait {metrics['data_wait_fraction']:.1%} "
                          f"ETA {eta:.0f}s", flush=True)
                window = {"loss": 0.0, "tv": 0.0, "pv": 0.0, "n": 0, "wait": 0.0, "eval": 0.0,
                          "t0": time.perf_counter(), "samples": 0, "last": metrics}
            if step % t.checkpoint_every == 0 or step == stop:
                saved = dict(pos)
                if saved["batch_in_epoch"] == steps_per_epoch:  # the epoch is done: resume at the next
                    saved.update(epoch=pos["epoch"] + 1, batch_in_epoch=0)
                if rollback:
                    snapshot = {"model": _cpu_copy(model.state_dict()), "optimizer": _cpu_copy(opt.state_dict()),
                                **saved}
                _report(ray.train, Checkpoint, rank, model, opt, saved, cfg, window.get("last", {}))
            t_wait = time.perf_counter()
        if not rolled_back and pos["batch_in_epoch"] >= steps_per_epoch:
            pos.update(epoch=pos["epoch"] + 1, batch_in_epoch=0)
    ahead.close()
    if rank == 0:
        if pos["step"] >= total:
            final = storage.join(cfg.output, "final")
            save_final(final, model, cfg.to_dict())
            with tempfile.TemporaryDirectory() as tmp:
                fs, root = storage.resolve(final)
                for f in ("config.json", "model.safetensors"):
                    local = os.path.join(tmp, f)
                    with fs.open_input_stream(f"{root}/{f}") as src, open(local, "wb") as dst:
                        dst.write(src.read())
                    sink.log_artifact(local, "final")
        sink.close()


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


def _report(train, Checkpoint, rank, model, opt, pos, cfg, metrics):
    """Every rank reports (a barrier); rank 0 attaches the checkpoint."""
    metrics = {**metrics, "step": pos["step"]}
    if rank != 0:
        train.report(metrics, checkpoint=None)
        return
    with tempfile.TemporaryDirectory() as tmp:
        save_state(tmp, model=model, optimizer=opt, config=cfg.to_dict(), **pos)
        train.report(metrics, checkpoint=Checkpoint.from_directory(tmp))
