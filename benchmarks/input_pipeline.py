"""Input pipeline and Ray overhead: the full Ray Train loop (streaming Ray Data shards, DDP wrapper,
metrics, checkpoint reports) vs the bare PyTorch step on the same data, side by side.

    .venv/bin/python -m benchmarks.input_pipeline [--data runs/demo/data] [--modalities image,audio,text]
        [--sizes demo,base] [--steps 60] [--base-steps 8]

For each modality and model size, both sides run the same RunConfig (1 worker, all cores as torch
threads, batch of the preset) for `steps` steps; samples/s is taken over the second half (the
first half warms up: Ray start-up, first blocks, allocator). The bare side is the worker's step on
in-memory batches (benchmarks/harness.py). data-wait = share of the Ray worker's wall time spent
waiting for its next batch (what the training loop logs as `data_wait_fraction`).
While the Ray side runs, benchmarks/proc_cpu.py reads every process's CPU time from /proc and
reports the cores used over the worker's second half: `worker` (the training worker, collation
thread included; `bare`: the bare loop's process over its timed half), `data` (Ray Data's read tasks), `ray` (Ray's own processes: raylet, GCS,
dashboard, log monitor, Ray Train's controller actors) and `other` (the rest of the machine). On a
CPU-only node, cores that `ray` and `data` use are time the step cannot have.
`base` = the base model preset (768 × 12) on the demo's data (images keep their 28 px, patch 4).
Each row repeats the pair (bare, Ray) `--repeats` times, alternating, and reports the median
overhead with its range. Prints a table, then one JSON line: {"ray_overhead": worst row's median
1 − ray/bare, "ray_overhead_range": [lowest, highest single pair], "data_wait_fraction": worst
row's median, "ray_background_cores": worst row's median (null off Linux)}.
"""
from __future__ import annotations

import argparse
import json
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


def run_config(mod: str, data: str, size: str, steps: int, output: str) -> RunConfig:
    patch = {"patch_size": 4} if mod == "image" and size != "demo" else {}  # the demo's 28-px digits: 49 patches
    half = max(1, steps // 2)
    return demo_run_config(data, mod, output, size, {
        "train.max_steps": steps, "train.warmup_steps": min(steps, 10), "train.log_every": half,
        "train.checkpoint_every": steps, "train.max_failures": 0}, **patch)


def bare_samples_per_s(cfg: RunConfig) -> tuple[float, float]:
    """(samples/s over the second half, cores this process used meanwhile)."""
    torch.set_num_threads(os.cpu_count() or 1)
    tr = Trainer(cfg, load_rows(cfg.data, cfg.modality))
    steps = cfg.train.max_steps
    tr.train(steps - steps // 2)  # warm-up half
    cpu = time.process_time()
    dt = tr.train(steps // 2)
    return cfg.train.batch_size * (steps // 2) / dt, (time.process_time() - cpu) / dt


def ray_metrics(cfg: RunConfig) -> tuple[dict, dict]:
    """(the run's last logging window = its second half, cores per process group meanwhile)."""
    from pipeline.train.launch import run_pretraining

    with CpuSampler() as cpu:
        result = run_pretraining(cfg)
    if result.error:
        raise RuntimeError(f"{cfg.modality} Ray run failed: {result.error}")
    print(f"    Ray's own processes, cores: {cpu.processes('ray')}", flush=True)
    return result.metrics, cpu.cores()


CORE_COLUMNS = ("worker", "data", "ray", "other")  # benchmarks/proc_cpu.py's groups, in the table


def _median(cores: list[dict], group: str) -> float:
    return statistics.median(c.get(group, float("nan")) for c in cores)


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--data", default="runs/demo/data")
    p.add_argument("--modalities", default="image,audio,text")
    p.add_argument("--sizes", default="demo,base")
    p.add_argument("--steps", type=int, default=60, help="steps per run at the demo size")
    p.add_argument("--base-steps", type=int, default=8, help="steps per run at base size")
    p.add_argument("--repeats", type=int, default=3, help="paired (bare, Ray) measurements per row")
    a = p.parse_args(argv)
    from pipeline.raycluster import init_ray

    init_ray(num_cpus=max(os.cpu_count() or 1, 3), dashboard=True)
    rows = []
    for size in a.sizes.split(","):
        for mod in a.modalities.split(","):
            steps = a.steps if size == "demo" else a.base_steps
            over, waits, bares, rays, cores_seen, bare_cores = [], [], [], [], [], []
            for _ in range(max(1, a.repeats)):  # A, B, A, B, …: drift on a shared machine hits both sides
                with tempfile.TemporaryDirectory() as tmp:
                    cfg = run_config(mod, a.data, size, steps, tmp)
                    bare, bare_cpu = bare_samples_per_s(cfg)
                    m, cores = ray_metrics(cfg)
                bares.append(bare)
                cores_seen.append(cores)
                bare_cores.append(bare_cpu)
                rays.append(m["samples_per_s"])
                over.append(1 - m["samples_per_s"] / bare)
                waits.append(m["data_wait_fraction"])
                print(f"  {size} {mod}: bare {bare:.2f} samples/s on {bare_cpu:.2f} cores, ray {m['samples_per_s']:.2f}, "
                      f"data-wait {m['data_wait_fraction']:.2%}, cores meanwhile {cores}", flush=True)
            rows.append((size, mod, cfg.train.batch_size, steps, statistics.median(bares), statistics.median(rays),
                         over, statistics.median(waits), statistics.median(bare_cores),
                         *(_median(cores_seen, g) for g in CORE_COLUMNS)))
    print(f"\n{'size':5} {'modality':8} {'batch':>5} {'steps':>5} {'bare sps':>9} {'ray sps':>8} "
          f"{'overhead median (min..max)':>27} {'data-wait':>9} {'bare':>6} " + " ".join(f"{c:>6}" for c in CORE_COLUMNS)
          + f"  (cores of {os.cpu_count()})")
    for size, mod, b, steps, bare, ray_sps, over, wait, *cores in rows:
        spread = f"{statistics.median(over):.1%} ({min(over):.1%}..{max(over):.1%})"
        print(f"{size:5} {mod:8} {b:5d} {steps:5d} {bare:9.2f} {ray_sps:8.2f} {spread:>27} {wait:9.2%} "
              + " ".join(f"{c:6.2f}" for c in cores))
    ray_bg = [r[9 + CORE_COLUMNS.index("ray")] for r in rows]
    bg = max((c for c in ray_bg if c == c), default=None)  # NaN: no /proc here
    print(json.dumps({"ray_overhead": round(max(statistics.median(r[6]) for r in rows), 3),
                      "ray_overhead_range": [round(min(min(r[6]) for r in rows), 3),
                                             round(max(max(r[6]) for r in rows), 3)],
                      "data_wait_fraction": round(max(r[7] for r in rows), 4),
                      "ray_background_cores": None if bg is None else round(bg, 3), "repeats": a.repeats}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
