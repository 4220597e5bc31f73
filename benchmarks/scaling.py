"""Scaling: samples/s of the Ray Train loop with 1 vs 2 DDP workers here, and a model, on paper, of
scaling data2vec 2.0 at base size to 8–64 GPUs from measured per-sample compute and gradient volume.

    .venv/bin/python -m benchmarks.scaling [--data runs/demo/data] [--modality image] [--steps 40]
        [--mfu 0.40] [--gpu-batch image=64,audio=44,text=16]

Measured: the demo preset (2.0 mode) through `run_pretraining`: 1 worker × all cores vs 2 workers ×
half the cores each (gloo all-reduce of every gradient each step), same global batch per step,
steady-state samples/s over the second half of the run.

Model (per modality, base preset, 2.0 mode; FLOPs per sample counted here with FlopCounterMode on
the shapes of benchmarks/efficiency.py; gradient bytes = 4 × trainable parameters, since DDP
all-reduces fp32 gradients even under bf16 autocast):
    t_compute  = FLOPs/sample × per-GPU batch / (MFU × 989 TFLOP/s)         (H100 SXM, dense bf16)
    t_allreduce = 2 (N−1)/N × bytes / bandwidth; bandwidth = 450 GB/s NVLink within a node (N ≤ 8),
                  50 GB/s per GPU across nodes (8 × 400 Gb/s NICs per 8-GPU node)
    exposed    = max(0, t_allreduce − ⅔ t_compute)    (DDP overlaps buckets with the backward pass)
    efficiency = t_compute / (t_compute + exposed);  samples/s = N × batch / (t_compute + exposed)
The EMA teacher update is local to each GPU (no communication). Prints both tables, then one JSON
line: {"two_worker_speedup", "efficiency_64_gpus_<modality>"...}.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.efficiency import synthetic  # noqa: E402
from benchmarks.flops import counter  # noqa: E402
from benchmarks.harness import demo_run_config  # noqa: E402
from pipeline.recipes import preset  # noqa: E402
from pipeline.model.data2vec import Data2Vec  # noqa: E402

H100_BF16 = 989e12
NVLINK_BPS, INTERNODE_BPS = 450e9, 50e9
GPUS = (1, 8, 16, 32, 64)


def measured(data: str, mod: str, workers: int, steps: int) -> float:
    from pipeline.pretrain.launch import run_pretraining

    with tempfile.TemporaryDirectory() as tmp:
        cfg = demo_run_config(data, mod, tmp, overrides={
            "train.max_steps": steps, "train.num_workers": workers, "train.batch_size": 32 // workers,
            "train.log_every": steps // 2, "train.checkpoint_every": steps, "train.max_failures": 0})
        result = run_pretraining(cfg)
    if result.error:
        raise RuntimeError(f"{workers}-worker run failed: {result.error}")
    return result.metrics["samples_per_s"]


def per_sample(mod: str) -> tuple[float, int]:
    """(training FLOPs per sample, trainable parameters) at the base preset, 2.0 mode."""
    cfg = preset(mod, "base", "d2v2")
    model = Data2Vec(cfg)
    inputs, mask = synthetic(cfg, 1, np.random.default_rng(0))
    with counter() as fc:
        model(inputs, mask).loss.backward()
    params = sum(p.numel() for p in model.student_parameters() if p.requires_grad)
    return fc.get_total_flops(), params


def model_rows(flops: float, params: int, batch: int, mfu: float):
    for n in GPUS:
        t_c = flops * batch / (mfu * H100_BF16)
        bw = NVLINK_BPS if n <= 8 else INTERNODE_BPS
        t_ar = 0.0 if n == 1 else 2 * (n - 1) / n * 4 * params / bw
        exposed = max(0.0, t_ar - 2 / 3 * t_c)
        yield n, t_c, t_ar, exposed, t_c / (t_c + exposed), n * batch / (t_c + exposed)


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--data", default="runs/demo/data")
    p.add_argument("--modality", default="image", help="modality for the measured 1 vs 2 workers")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--model-modalities", default="image,audio,text")
    p.add_argument("--mfu", type=float, default=0.40, help="assumed GPU model-FLOP utilization")
    p.add_argument("--gpu-batch", default="image=64,audio=44,text=16",
                   help="per-GPU samples per step (audio: 44 clips of 2 s ≈ fairseq base's 1.4 M samples per GPU)")
    a = p.parse_args(argv)
    from pipeline.raycluster import init_ray

    gpu_batch = {k: int(v) for k, v in (x.split("=") for x in a.gpu_batch.split(","))}
    out = {}
    if a.steps > 0:
        init_ray(num_cpus=max(os.cpu_count() or 1, 4), dashboard=True)
        one = measured(a.data, a.modality, 1, a.steps)
        two = measured(a.data, a.modality, 2, a.steps)
        print(f"\nmeasured here ({a.modality}, demo preset, 2.0 mode, global batch 32, {os.cpu_count()} cores)")
        print(f"{'workers':>7} {'threads each':>12} {'samples/s':>10} {'vs 1 worker':>11}")
        print(f"{1:7d} {os.cpu_count():12d} {one:10.2f} {1.0:11.2f}")
        print(f"{2:7d} {max(1, (os.cpu_count() or 2) // 2):12d} {two:10.2f} {two / one:11.2f}")
        out["two_worker_speedup"] = round(two / one, 3)
    for mod in a.model_modalities.split(","):
        flops, params = per_sample(mod)
        b = gpu_batch[mod]
        print(f"\nmodel: {mod} base 2.0, {flops / 1e9:.1f} GFLOP/sample (train), {params / 1e6:.1f} M params "
              f"→ {4 * params / 1e6:.0f} MB of fp32 gradients, per-GPU batch {b}, MFU {a.mfu:.0%}")
        print(f"{'GPUs':>5} {'compute ms':>10} {'allreduce ms':>12} {'exposed ms':>10} {'efficiency':>10} "
              f"{'samples/s':>10}")
        for n, t_c, t_ar, exp, eff, sps in model_rows(flops, params, b, a.mfu):
            print(f"{n:5d} {t_c * 1e3:10.1f} {t_ar * 1e3:12.1f} {exp * 1e3:10.1f} {eff:10.1%} {sps:10.0f}")
        out[f"efficiency_64_gpus_{mod}"] = round(list(model_rows(flops, params, b, a.mfu))[-1][4], 3)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
