"""Input pipeline and Ray overhead: the full Ray Train loop (streaming Ray Data shards, DDP wrapper,
metrics, checkpoint reports) vs the bare PyTorch step on the same data, side by side.

    .venv/bin/python -m benchmarks.input_pipeline [--data runs/demo/data] [--modalities image,audio,text]
        [--sizes demo,base] [--steps 60] [--base-steps 4] [--warmup-s 60] [--measure-s 30] [--repeats 3]

For each modality and model size, both sides run the same RunConfig (1 worker, all cores as torch
threads, batch of the preset): warm-up steps, then measured steps; samples/s is taken over the
measured steps. Step counts come from a few timed bare steps before the row and are the same on
both sides and in every pair of the row:
- measured: at least `--steps` (`--base-steps` at base size) lasting at least `--measure-s`
  seconds (a 5-s window of fast demo image steps swung by ±20% from pair to pair);
- warm-up: at least `--warmup-s` seconds, rounded up to a multiple of the measured steps. Ray's own
  processes use 0.25 cores in the first 15 s of a run and 0.17-0.19 cores in the second half of a
  60-step run, but 0.11-0.17 in training runs past a minute; a training run lasts hours. Start-up
  and shut-down are a fixed cost per run (and per restart or trial), reported apart as `fixed s`:
  the Ray run's wall time less its training time (Ray Train's controller and worker group, the
  model's build, the first blocks; at the end the checkpoint, the final model, the shut-down).
`--warmup-s 0 --measure-s 0` gives `steps` warm-up and `steps` measured steps (until 2026-11-29:
60 steps per run, the second half measured). The bare side is the worker's step on in-memory
batches (benchmarks/harness.py).
data-wait = share of the Ray worker's training time spent waiting for its next batch over the
measured steps (what the training loop logs as `data_wait_fraction`, the steady state); whole run =
the same over the whole run, its first read included (`run_data_wait_fraction`, the demo's column).
While the Ray side runs, benchmarks/proc_cpu.py reads every process's CPU time from /proc and
reports the cores used over the worker's measured steps: `worker` (the training worker, collation
thread included; `bare`: the bare loop's process over its measured steps), `data` (Ray Data's read
tasks), `ray` (Ray's own processes: raylet, GCS, dashboard, log monitor, Ray Train's controller
actors) and `other` (the rest of the machine). On a CPU-only node, cores that `ray` and `data` use
are time the step cannot have.
`base` = the base model preset (768 × 12) on the demo's data (images keep their 28 px, patch 4).
Each row repeats the pair (bare, Ray) `--repeats` times, alternating, and reports the median
overhead with its range. Prints a table, then one JSON line: {"ray_overhead": worst row's median
1 − ray/bare, "ray_overhead_range": [lowest, highest single pair], "data_wait_fraction": worst
row's median, "ray_background_cores": worst row's median (null off Linux), "ray_fixed_s": worst
row's median fixed seconds per run, "warmup_s", "measure_s", "repeats"}.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.harness import Trainer, demo_run_config, load_rows  # noqa: E402
from benchmarks.proc_cpu import CpuSampler  # noqa: E402
from pipeline.train.config import RunConfig  # noqa: E402


def run_config(mod: str, data: str, size: str, warmup: int, steps: int, output: str) -> RunConfig:
    """`warmup` (a multiple of `steps`) + `steps` steps, logged every `steps`: the last logging
    window is the measured steps."""
    patch = {"patch_size": 4} if mod == "image" and size != "demo" else {}  # the demo's 28-px digits: 49 patches
    total = warmup + steps
    return demo_run_config(data, mod, output, size, {
        "train.max_steps": total, "train.warmup_steps": min(total, 10), "train.log_every": steps,
        "train.checkpoint_every": total, "train.max_failures": 0}, **patch)


def step_counts(cfg: RunConfig, steps: int, warmup_s: float, measure_s: float) -> tuple[int, int]:
    """(warm-up steps, measured steps) at the bare loop's pace (a few timed steps): at least
    `steps` measured steps lasting at least `measure_s` seconds, after at least `warmup_s` seconds
    of warm-up, rounded up to a multiple of the measured steps (at least one)."""
    if warmup_s <= 0 and measure_s <= 0:
        return steps, steps
    tr = Trainer(cfg, load_rows(cfg.data, cfg.modality))
    tr.train(2)  # first steps: allocator, lazy init
    per_step = tr.train(3) / 3
    measured = max(steps, math.ceil(measure_s / per_step))
    return measured * max(1, math.ceil(warmup_s / per_step / measured)), measured


def bare_samples_per_s(cfg: RunConfig, steps: int) -> tuple[float, float]:
    """(samples/s over the last `steps` steps of the run, cores this process used meanwhile)."""
    tr = Trainer(cfg, load_rows(cfg.data, cfg.modality))
    tr.train(cfg.train.max_steps - steps)  # warm-up
    cpu = time.process_time()
    dt = tr.train(steps)
    return cfg.train.batch_size * steps / dt, (time.process_time() - cpu) / dt


def ray_metrics(cfg: RunConfig) -> tuple[dict, dict, float]:
    """(the run's last logging window = its measured steps, cores per process group meanwhile,
    fixed seconds = the run's wall time less its training time)."""
    from pipeline.pretrain.launch import run_pretraining

    t0 = time.perf_counter()
    # The measured steps' share of the worker's life (its start-up makes the share a little smaller).
    with CpuSampler(tail=0.9 * cfg.train.log_every / cfg.train.max_steps) as cpu:
        result = run_pretraining(cfg)
    wall = time.perf_counter() - t0
    if result.error:
        raise RuntimeError(f"{cfg.modality} Ray run failed: {result.error}")
    print(f"    Ray's own processes, cores: {cpu.processes('ray')}", flush=True)
    m = result.metrics
    trained = cfg.train.max_steps * cfg.train.batch_size / m["run_samples_per_s"]
    return m, cpu.cores(), wall - trained


CORE_COLUMNS = ("worker", "data", "ray", "other")  # benchmarks/proc_cpu.py's groups, in the table


def _median(cores: list[dict], group: str) -> float:
    return statistics.median(c.get(group, float("nan")) for c in cores)


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--data", default="runs/demo/data")
    p.add_argument("--modalities", default="image,audio,text")
    p.add_argument("--sizes", default="demo,base")
    p.add_argument("--steps", type=int, default=60, help="measured steps per run at the demo size")
    p.add_argument("--base-steps", type=int, default=4, help="measured steps per run at base size")
    p.add_argument("--warmup-s", type=float, default=60.0,
                   help="seconds of training before the measured steps (0: as many steps as measured)")
    p.add_argument("--measure-s", type=float, default=30.0,
                   help="the measured steps last at least this long (more steps than --steps if need be)")
    p.add_argument("--repeats", type=int, default=3, help="paired (bare, Ray) measurements per row")
    a = p.parse_args(argv)
    from pipeline.raycluster import init_ray

    torch.set_num_threads(os.cpu_count() or 1)  # the bare side; a Ray worker sets its own
    init_ray(num_cpus=max(os.cpu_count() or 1, 3), dashboard=True)
    rows = []
    for size in a.sizes.split(","):
        for mod in a.modalities.split(","):
            steps = a.steps if size == "demo" else a.base_steps
            with tempfile.TemporaryDirectory() as tmp:
                warm, steps = step_counts(run_config(mod, a.data, size, steps, steps, tmp), steps, a.warmup_s,
                                          a.measure_s)
            over, waits, run_waits, bares, rays, cores_seen, bare_cores, fixeds = [], [], [], [], [], [], [], []
            for _ in range(max(1, a.repeats)):  # A, B, A, B, …: drift on a shared machine hits both sides
                with tempfile.TemporaryDirectory() as tmp:
                    cfg = run_config(mod, a.data, size, warm, steps, tmp)
                    bare, bare_cpu = bare_samples_per_s(cfg, steps)
                    m, cores, fixed = ray_metrics(cfg)
                bares.append(bare)
                cores_seen.append(cores)
                bare_cores.append(bare_cpu)
                fixeds.append(fixed)
                rays.append(m["samples_per_s"])
                over.append(1 - m["samples_per_s"] / bare)
                waits.append(m["data_wait_fraction"])
                run_waits.append(m["run_data_wait_fraction"])
                print(f"  {size} {mod}: bare {bare:.2f} samples/s on {bare_cpu:.2f} cores, ray {m['samples_per_s']:.2f}, "
                      f"data-wait {m['data_wait_fraction']:.2%} (whole run {m['run_data_wait_fraction']:.2%}), fixed {fixed:.1f} s, cores meanwhile {cores}",
                      flush=True)
            rows.append((size, mod, cfg.train.batch_size, f"{warm}+{steps}", statistics.median(bares),
                         statistics.median(rays), over, statistics.median(waits), statistics.median(run_waits),
                         statistics.median(fixeds),
                         statistics.median(bare_cores), *(_median(cores_seen, g) for g in CORE_COLUMNS)))
    print(f"\n{'size':5} {'modality':8} {'batch':>5} {'warm+measured':>13} {'bare sps':>9} {'ray sps':>8} "
          f"{'overhead median (min..max)':>27} {'data-wait':>9} {'whole run':>9} {'fixed s':>7} {'bare':>6} "
          + " ".join(f"{c:>6}" for c in CORE_COLUMNS) + f"  (cores of {os.cpu_count()})")
    for size, mod, b, steps, bare, ray_sps, over, wait, run_wait, fixed, *cores in rows:
        spread = f"{statistics.median(over):.1%} ({min(over):.1%}..{max(over):.1%})"
        print(f"{size:5} {mod:8} {b:5d} {steps:>13} {bare:9.2f} {ray_sps:8.2f} {spread:>27} {wait:9.2%} {run_wait:9.2%} {fixed:7.1f} "
              + " ".join(f"{c:6.2f}" for c in cores))
    ray_bg = [r[11 + CORE_COLUMNS.index("ray")] for r in rows]
    bg = max((c for c in ray_bg if c == c), default=None)  # NaN: no /proc here
    print(json.dumps({"ray_overhead": round(max(statistics.median(r[6]) for r in rows), 3),
                      "ray_overhead_range": [round(min(min(r[6]) for r in rows), 3),
                                             round(max(max(r[6]) for r in rows), 3)],
                      "data_wait_fraction": round(max(r[7] for r in rows), 4),
                      "run_data_wait_fraction": round(max(r[8] for r in rows), 4),
                      "ray_background_cores": None if bg is None else round(bg, 3),
                      "ray_fixed_s": round(max(r[9] for r in rows), 1), "warmup_s": a.warmup_s, "measure_s": a.measure_s,
                      "repeats": a.repeats}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
