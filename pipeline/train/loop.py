"""The step loop every Ray Train worker runs, pretraining (pipeline/pretrain/worker.py) and
fine-tuning (pipeline/finetune/worker.py) alike. What differs between them is a `Task`'s hooks.

    checkpoint → `restore` the run position → the step's layout at this world size
    (config.step_layout: the effective batch in shares, micro-batches) → this rank's seeded
    stream (stream.py) → its share of each step in micro-batches, collated ahead in a background
    thread (batches.Ahead) → task.step → metric window → log line + MLflow (rank 0) →
    task.after_step (learning curves, validation, early stop) → checkpoint via ray.train.report
    (every checkpoint_every steps or checkpoint_every_s seconds) → epoch roll-over → … → stop

The run position `pos` is what a checkpoint resumes from: step (optimizer steps so far), epoch,
rest (the rows of the epoch's global order not yet read, stream.py; None = all of them),
step_in_epoch (optimizer steps into that epoch), world (the world size that wrote it), plus the
task's own fields (pretraining: lr_scale, rollbacks; fine-tuning: the best validation score so
far …). Nothing in it depends on the world size, and neither does a step's global batch, so an
elastic run restarts on fewer or more workers with the same steps cut into other shares, and
reads each row once.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
import time

import numpy as np
import torch

from pipeline.train.batches import Ahead, sample_rngs
from pipeline.train.checkpoint import load_state, save_state
from pipeline.train.config import step_layout
from pipeline.train.stream import ROW_ID, RankStream, interval_rows

POSITION = {"step": 0, "epoch": 0, "rest": None, "step_in_epoch": 0, "world": 0}
SAMPLE_LOG = "D2V_SAMPLE_LOG"  # test hook: a file each rank appends the row ids of its steps to


class Restart(Exception):
    """Raised by `Task.step` after it moved the run position back (a rollback): the loop drops the
    steps prepared ahead and prepares them again from the new position."""


class Task:
    """The hooks of one kind of training; the loop calls them in this order."""

    columns: list[str]
    """Columns each worker streams."""
    view: dict | None = None
    """Images: the training view the read tasks draw (augment.view_spec); None: stored bytes."""
    averaged: tuple[str, ...] = ("loss",)
    """Step metrics averaged over a logging window; every other value `step` returns is logged as
    it was at the window's last step."""

    def collate(self, batch: dict, rng) -> tuple:
        """One numpy micro-batch → tensors (+ masks), on the CPU, in the background thread."""
        raise NotImplementedError

    def begin(self, pos: dict) -> None:
        """Before the first step of this (re)start; timed as evaluation."""

    def step(self, step: int, micro: list[tuple], pos: dict) -> dict:
        """One optimizer step over `micro` (this rank's share of the step, collated micro-batches)
        → metrics (at least loss and lr). May move `pos` back and raise Restart."""
        raise NotImplementedError

    def after_step(self, step: int, pos: dict) -> None:
        """After step `step` (already counted in pos); timed as evaluation."""

    def stopped(self, pos: dict) -> bool:
        """True to end the run before its last step (early stopping)."""
        return False

    def checkpoint_extra(self, saved: dict) -> dict:
        """Tensors saved with the model and optimizer at a checkpoint at position `saved`."""
        return {}


# ----------------------------------------------------------------------------- worker set-up
def threads_for_worker(node_cpus: int, workers_on_node: int) -> int:
    """torch threads of one worker: its node's CPUs shared by the workers on that node."""
    return max(1, node_cpus // max(1, workers_on_node))


def node_cpus() -> int:
    """CPUs this process may run on (cgroup/affinity aware), on the node it runs on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def worker_context(use_gpu: bool, log_level: str = "INFO"):
    """(rank, world size, device, torch threads) of this Ray Train worker; sets the thread count
    and the level of Ray Train's own log lines here (launch.fit: WARNING when the job's console is
    not a terminal — its "Reporting training result …" lines reach the console through Ray's
    logger, which Ray Train's LoggingConfig leaves alone)."""
    import logging

    import ray.train
    import ray.train.torch

    from pipeline import storage

    storage.guard_console()  # this worker's lines (its log file, the job's console): no URI credentials
    logging.getLogger("ray.train").setLevel(log_level)
    from ray.train.v2._internal.execution import context as train_context

    logging.getLogger(train_context.__file__).setLevel(log_level)  # Ray 2.60 names this one logger by its file
    ctx = ray.train.get_context()
    device = ray.train.torch.get_device() if use_gpu else torch.device("cpu")
    threads = threads_for_worker(node_cpus(), ctx.get_local_world_size())
    torch.set_num_threads(threads)
    return ctx.get_world_rank(), ctx.get_world_size(), device, threads


def cpu_copy(state):
    """A detached CPU copy of a (nested) state dict: the best weights, a rollback's snapshot."""
    if torch.is_tensor(state):
        return state.detach().to("cpu", copy=True)
    if isinstance(state, dict):
        return {k: cpu_copy(v) for k, v in state.items()}
    if isinstance(state, list):
        return [cpu_copy(v) for v in state]
    return state


def load_model_and_optimizer(model, opt, state: dict, device) -> None:
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    for s in opt.state.values():  # optimizer state follows the model to the device
        for k, v in s.items():
            if torch.is_tensor(v) and k != "step":
                s[k] = v.to(device)


def restore(model, opt, pos: dict, device) -> dict | None:
    """Ray Train's checkpoint (a restart or a re-run) → model, optimizer and `pos` updated in place;
    returns the whole saved state (for the task's own tensors), None on a fresh start."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return None
    with ckpt.as_directory() as d:
        state = load_state(d)
    load_model_and_optimizer(model, opt, state, device)
    if "batch_in_epoch" in state and "step_in_epoch" not in state:  # checkpoints written before the rename
        state["step_in_epoch"] = state["batch_in_epoch"]
    pos.update({k: state[k] for k in pos if k in state})
    return state


# ----------------------------------------------------------------------------- the loop
class Meter:
    """Seconds and samples of a logging window and of the whole run since this (re)start:
    training time is wall time less evaluation."""

    def __init__(self, averaged: tuple[str, ...]):
        self.averaged = averaged
        self.run = {"t0": time.perf_counter(), "wait": 0.0, "eval": 0.0, "samples": 0}
        self.window = self._fresh()

    def _fresh(self) -> dict:
        return {"t0": time.perf_counter(), "n": 0, "wait": 0.0, "eval": 0.0, "samples": 0,
                **{k: 0.0 for k in self.averaged}}

    def add(self, key: str, seconds_or_samples: float) -> None:
        self.window[key] += seconds_or_samples

    def step(self, m: dict) -> None:
        self.window["n"] += 1
        for k in self.averaged:
            self.window[k] += m[k]

    def metrics(self, last: dict, epoch: int) -> dict:
        """The window's averages, the step's other values, and rates of the window and of the run;
        starts the next window."""
        now, w, run = time.perf_counter(), self.window, self.run
        for k in ("wait", "eval", "samples"):
            run[k] += w[k]
        dt, run_dt = now - w["t0"] - w["eval"], now - run["t0"] - run["eval"]  # training time
        n = max(w["n"], 1)
        out = {**{k: v for k, v in last.items() if k not in self.averaged},
               **{k: w[k] / n for k in self.averaged},
               "samples_per_s": w["samples"] / dt, "data_wait_fraction": w["wait"] / dt,
               "run_samples_per_s": run["samples"] / run_dt, "run_data_wait_fraction": run["wait"] / run_dt,
               "run_eval_fraction": run["eval"] / (now - run["t0"]), "epoch": epoch}
        self.window = self._fresh()
        return out


def run_steps(task: Task, *, model, opt, pos: dict, t, rank: int, world: int, chunks: dict, sink,
              config: dict, resumed: bool) -> dict:
    """Train from `pos` to train.stop_at_step (or max_steps, or the task's early stop); returns the
    last logged metrics. `config` is saved with every checkpoint."""
    layout = step_layout(t, world)
    if rank == 0 and t.min_workers and world != t.num_workers:
        print(f"elastic: {world} worker(s) of {t.min_workers}-{t.num_workers}: {layout.line()}", flush=True)
    stream = RankStream(chunks, task.columns, layout.shares, t.shuffle_buffer, t.seed, rank, view=task.view)
    whole_epoch = stream.plan(None)
    if whole_epoch.steps == 0:
        raise RuntimeError(f"the data has {stream.total} rows, fewer than one step's effective batch "
                           f"({t.effective_batch}): lower train.reference_batch or train.batch_size")
    if pos["rest"] is None and pos["step_in_epoch"]:
        raise RuntimeError(
            f"the checkpoint at step {pos['step']} was written {pos['step_in_epoch']} steps into epoch "
            f"{pos['epoch']} by an earlier version whose data order depended on the worker count; "
            f"this version cannot tell which of that epoch's rows it read. Resume it with the version that "
            f"wrote it, or start the run again in a new --output")
    if resumed:
        _resumed(pos, world, layout, stream, sink, rank, t)
    pos["world"] = world
    stop = t.stop_at_step or t.max_steps
    t0 = time.perf_counter()
    start_step, last = pos["step"], {}
    sample_log = os.environ.get(SAMPLE_LOG)
    plan, planned = None, 0  # this epoch's plan and the steps made since it was drawn
    clock = Clock(t.checkpoint_every_s, world, next(model.parameters()).device)

    def prepare(pos: dict) -> Ahead:
        """The run's next steps from `pos`, collated in the background across epoch boundaries."""
        nonlocal plan, planned
        while (plan := stream.plan(pos["rest"])).steps == 0:  # less than a step left: next epoch
            pos.update(epoch=pos["epoch"] + 1, step_in_epoch=0, rest=None)
        planned = 0
        groups = stream.groups(pos["epoch"], pos["rest"], layout.micro[rank])
        return Ahead(lambda step: [(task.collate(nb, sample_rngs(t.seed, step, nb[ROW_ID])), _sample_ids(nb, sample_log))
                                   for nb in next(groups)], pos["step"], stop)

    ahead = prepare(pos)  # reading the first steps starts now, while begin() evaluates
    task.begin(pos)
    meter = Meter(task.averaged)
    meter.run.update(t0=t0, eval=time.perf_counter() - t0)  # the run's clock includes begin(), as evaluation
    try:
        while pos["step"] < stop and not task.stopped(pos):
            t_wait = time.perf_counter()
            step, prepared = ahead.get()
            assert step == pos["step"], (step, pos["step"])
            micro, rows = [m for m, _ in prepared], [r for _, r in prepared]
            meter.add("wait", time.perf_counter() - t_wait)
            torch.manual_seed(t.seed * 1_000_003 + rank * 10_007 + step * 31)  # dropout, drop-path, decoder noise
            try:
                m = task.step(step, micro, pos)
            except Restart:
                ahead.close()
                ahead = prepare(pos)  # the restored position's batches and masks
                continue
            if sample_log:
                _log_rows(sample_log, step, pos["epoch"], rank, world, rows)
            epoch = pos["epoch"]
            pos["step"] += 1
            pos["step_in_epoch"] += 1
            planned += 1
            pos["rest"] = plan.left_after(planned)
            while plan.steps == planned:  # the epoch is done: its next step is the next epoch's first
                pos.update(epoch=pos["epoch"] + 1, step_in_epoch=0, rest=None)
                plan, planned = whole_epoch, 0
            step = pos["step"]
            meter.step(m)
            meter.add("samples", t.effective_batch)
            t_eval = time.perf_counter()
            task.after_step(step, pos)
            meter.add("eval", time.perf_counter() - t_eval)
            end = step == stop or task.stopped(pos)
            if step % t.log_every == 0 or end:
                last = {**meter.metrics(m, epoch), "world_size": world, "effective_batch": t.effective_batch}
                sink.log_metrics(last, step)
                if rank == 0:
                    eta = (time.perf_counter() - meter.run["t0"]) / max(step - start_step, 1) * (stop - step)
                    line = (f"step {step}/{t.max_steps} loss {last['loss']:.4f} lr {last['lr']:.2e} "
                            f"{last['samples_per_s']:.1f} samples/s data-wait {last['data_wait_fraction']:.1%} "
                            f"ETA {eta:.0f}s")
                    print(line, flush=True)
                    sink.set_tags({"progress.step": step, "progress": f"{line} ({time.strftime('%H:%M:%S')})"})
            if step % t.checkpoint_every == 0 or end or clock.due():
                report(rank, model, opt, dict(pos), config, last, task.checkpoint_extra(dict(pos)))
                sink.commit(step)  # the metric history holds what a restart will not re-run
                clock.reset()
    finally:
        ahead.close()
    return last


class Clock:
    """Time-based checkpoints (train.checkpoint_every_s): every rank must checkpoint at the same
    step (a report is a barrier), so the ranks agree on the longest time since the last one."""

    def __init__(self, every_s: float, world: int, device):
        self.every_s, self.world, self.device = every_s, world, device  # NCCL reduces device tensors only
        self.reset()

    def reset(self) -> None:
        self.t0 = time.monotonic()

    def due(self) -> bool:
        if self.every_s <= 0:
            return False
        waited = torch.tensor([time.monotonic() - self.t0], dtype=torch.float64, device=self.device)
        if self.world > 1:
            import torch.distributed as dist

            dist.all_reduce(waited, op=dist.ReduceOp.MAX)
        return float(waited) >= self.every_s


def _resumed(pos: dict, world: int, layout, stream: RankStream, sink, rank: int, t) -> None:
    """A restart's lines and events: where it resumes, what it re-runs, a resize (its own tag)."""
    if rank != 0:
        return
    resized = pos["world"] and pos["world"] != world
    reached = sink.tag("progress.step")
    rerun = max(0, int(reached) - pos["step"]) if reached else 0
    left = stream.total if pos["rest"] is None else interval_rows(pos["rest"])
    print(f"[rank 0] resumed from step {pos['step']} (epoch {pos['epoch']}, {left} of its {stream.total} rows "
          f"left) on {world} worker(s)" + (f", {pos['world']} before" if resized else "")
          + f"; re-runs {rerun} step(s) the last attempt had logged", flush=True)
    sink.log_event({"rerun_steps": rerun}, pos["step"])
    if resized:
        when = time.strftime("%Y-%m-%dT%H:%M:%S")
        sink.set_tags({f"resize.{when}": f"{pos['world']} → {world} workers at step {pos['step']} "
                                         f"(re-runs {rerun} steps): {layout.line()}"})


def _sample_ids(batch: dict, sample_log: str | None) -> tuple:
    """A micro-batch's stable row ids and, under the sample-log test hook, a digest of each image
    view it trained on (the crop the read task drew), else None."""
    if not sample_log or "image" not in batch or not isinstance(batch["image"], np.ndarray):
        return batch[ROW_ID], None
    return batch[ROW_ID], [hashlib.sha1(v.tobytes()).hexdigest()[:16] for v in batch["image"]]


def _log_rows(path: str, step: int, epoch: int, rank: int, world: int, rows: list) -> None:
    """Test hook: one JSON line per rank and step with the stable ids of the rows it trained on
    (and, for images, a digest of each view)."""
    views = [v for _, vs in rows if vs is not None for v in vs]
    line = json.dumps({"step": step, "epoch": epoch, "rank": rank, "world": world,
                       "rows": [int(r) for b, _ in rows for r in b], **({"views": views} if views else {})}) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())  # one write per line: the ranks' lines do not interleave
    finally:
        os.close(fd)


def report(rank: int, model, opt, pos: dict, config: dict, metrics: dict, extra: dict) -> None:
    """Every rank reports (a barrier); rank 0 attaches the checkpoint: model, optimizer, config,
    the run position and the task's extra tensors."""
    import ray.train
    from ray.train import Checkpoint

    metrics = {**metrics, "step": pos["step"]}
    if rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    with tempfile.TemporaryDirectory() as tmp:
        save_state(tmp, model=model, optimizer=opt, config=config, **pos, **extra)
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp))


def copy_to_local(fs, root: str, names: tuple[str, ...], tmp: str) -> list[str]:
    """Files ROOT/NAME of a (possibly remote) folder → local copies in `tmp` (for MLflow artifacts)."""
    out = []
    for name in names:
        local = os.path.join(tmp, name)
        with fs.open_input_stream(f"{root}/{name}") as src, open(local, "wb") as dst:
            dst.write(src.read())
        out.append(local)
    return out
