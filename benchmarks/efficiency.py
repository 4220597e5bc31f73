"""Closeness to the machine: achieved FLOP/s of a full training step at base width (768 × 12) over
the matmul FLOP/s this machine reaches, measured in the same run.

    .venv/bin/python -m benchmarks.efficiency [--modalities image,audio,text] [--modes d2v1,d2v2]
        [--steps 2] [--size base] [--compile]

A step is the product's step, `pipeline.train.step.train_step`, run by benchmarks/harness.py's
Trainer as a worker runs it: forward (teacher targets + student) + health check + backward +
gradient clipping + AdamW + EMA update, collate-free, for the `base` preset of each modality
(dropout as in the preset), on fixed synthetic inputs of realistic shape: 224-px images (16×16
patches), 2-s clips at 16 kHz, 512-token text (at most the preset's positions). FLOPs are counted
with torch's FlopCounterMode over one whole step (matmuls, convolutions, attention; forward +
backward; grouped-conv backward fixed in benchmarks/flops.py). The peak is the best of 3 timed
large GEMMs (fp32 on CPU; bf16 on CUDA, where steps run under the worker's bf16 autocast and
`--compile` compiles the model's modules as train.compile does). Prints a table, then one JSON
line: {"cpu_matmul_fraction": the lowest fraction over the rows} (or "gpu_mfu" on CUDA, against
both the measured GEMM and the H100's 989 TFLOP/s).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.flops import sync, counter, matmul_peak  # noqa: E402
from benchmarks.harness import Trainer  # noqa: E402
from pipeline.recipes import preset  # noqa: E402
from pipeline.model.data2vec import draw_masks  # noqa: E402
from pipeline.model.frontends import conv_frames  # noqa: E402
from pipeline.train.config import TrainConfig  # noqa: E402

H100_BF16_DENSE = 989e12  # NVIDIA H100 SXM spec sheet, dense bf16
# (batch on CPU, batch on GPU) per modality and mode: d2v2 multiplies the student batch by clone_batch.
BATCH = {("image", "d2v1"): (8, 128), ("image", "d2v2"): (2, 64), ("audio", "d2v1"): (4, 64),
         ("audio", "d2v2"): (2, 32), ("text", "d2v1"): (4, 64), ("text", "d2v2"): (2, 32)}


def synthetic(cfg, batch: int, rng: np.random.Generator) -> tuple[dict, torch.Tensor]:
    """Realistically shaped random inputs and masks for one step."""
    if cfg.modality == "image":
        px = cfg.frontend.image_size
        inputs, T, lengths = {"image": torch.randn(batch, 3, px, px)}, (px // cfg.frontend.patch_size) ** 2, None
    elif cfg.modality == "audio":
        L = 32_000
        inputs = {"audio": torch.randn(batch, L), "lengths": torch.full((batch,), L)}
        T = int(conv_frames(L))
        lengths = np.full(batch, T)
    else:
        T = min(512, cfg.frontend.max_positions)
        ids = rng.integers(5, cfg.frontend.vocab_size, (batch, T))
        inputs, lengths = {"input_ids": torch.from_numpy(ids)}, np.full(batch, T)
    m = draw_masks(cfg, batch, T, rng, lengths=lengths, input_ids=inputs.get("input_ids", torch.zeros(0)).numpy())
    if "input_ids_masked" in m:
        inputs["input_ids_masked"] = torch.from_numpy(m["input_ids_masked"])
    return inputs, torch.from_numpy(m["mask"])


class Step:
    """One training step of a modality's preset on fixed synthetic inputs: the harness Trainer's
    (the product's) step, per call."""

    def __init__(self, modality: str, mode: str, size: str, device: torch.device, compile_: bool):
        self.cfg = preset(modality, size, mode)
        self.batch = BATCH[(modality, mode)][device.type == "cuda"]
        train = TrainConfig(lr=1e-4, batch_size=self.batch, compile=compile_)
        self.trainer = Trainer.from_configs(self.cfg, train, device)
        inputs, mask = synthetic(self.cfg, self.batch, np.random.default_rng(0))
        self.inputs = {k: v.to(device) for k, v in inputs.items()}  # moved once, outside the timing
        self.mask, self.device = mask.to(device), device  # (B·clone_batch, T) bool

    def __call__(self):
        self.trainer.train_step(self.inputs, self.mask)


def measure(step: Step, steps: int) -> tuple[float, float]:
    """(seconds per step, FLOPs per step)."""
    step()
    step()  # warm-up (and compilation)
    with counter() as fc:
        step()
    sync(step.device)
    t = time.perf_counter()
    for _ in range(steps):
        step()
    sync(step.device)
    return (time.perf_counter() - t) / steps, fc.get_total_flops()


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--modalities", default="image,audio,text")
    p.add_argument("--modes", default="d2v1,d2v2")
    p.add_argument("--size", default="base", help="model preset size: demo, base or large")
    p.add_argument("--steps", type=int, default=2, help="timed steps per row (after 2 warm-up steps)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (CUDA)")
    a = p.parse_args(argv)
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    peak = matmul_peak(device)
    what = "bf16" if device.type == "cuda" else f"fp32, {torch.get_num_threads()} threads"
    print(f"# {device.type} matmul peak: {peak / 1e12:.3f} TFLOP/s ({what}); size {a.size}")
    print(f"{'modality':8} {'mode':5} {'batch':>5} {'s/step':>7} {'GFLOP/step':>11} {'GFLOP/s':>8} {'of matmul':>9}")
    fractions = {}
    for mod in a.modalities.split(","):
        for mode in a.modes.split(","):
            step = Step(mod, mode, a.size, device, a.compile)
            dt, flops = measure(step, a.steps)
            frac = flops / dt / peak
            fractions[f"{mod}_{mode}"] = round(frac, 3)
            print(f"{mod:8} {mode:5} {step.batch:5d} {dt:7.2f} {flops / 1e9:11.1f} {flops / dt / 1e9:8.1f} "
                  f"{frac:9.2f}", flush=True)
            del step
    key = "gpu_mfu_of_measured_matmul" if device.type == "cuda" else "cpu_matmul_fraction"
    out = {key: min(fractions.values()), **{f"{key}_{k}": v for k, v in fractions.items()}}
    if device.type == "cuda":
        out["gpu_mfu_of_h100_spec"] = round(min(fractions.values()) * peak / H100_BF16_DENSE, 3)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
