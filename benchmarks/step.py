"""Training-step throughput: our data2vec 1.0 and 2.0 modes vs a Hugging Face baseline.

    .venv/bin/python -m benchmarks.step [--steps 6] [--sizes vit-s,demo]

The baseline is what a user would build without us: a `transformers` Data2VecVisionModel student,
a `copy.deepcopy` EMA teacher updated with a per-parameter Python loop, `output_hidden_states`
top-K targets, a linear head and smooth L1 on masked patches. All three run the same image
sizes and widths. FLOPs per step are counted with torch's FlopCounterMode (forward + backward;
benchmarks/flops.py fixes its grouped-conv backward count);
the CPU's fp32 matmul rate is measured in the same run. Prints a table, then one JSON line:
{"d1_over_baseline", "d2_over_d1", "cpu_matmul_fraction"} (the fraction is our 1.0 step at ViT-S).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.flops import counter, matmul_peak  # noqa: E402
from pipeline.recipes import preset  # noqa: E402
from pipeline.model.data2vec import Data2Vec, draw_masks  # noqa: E402

SIZES = {  # name: (image px, patch, width, depth, heads, batch)
    "vit-s": (224, 16, 384, 12, 6, 8),
    "demo": (28, 4, 128, 4, 4, 32),
}


class OurStep:
    """Our model in the baseline's bare loop (plain for-each AdamW, no clipping, no health check, no
    LR schedule), so the two rows differ only in the model and the EMA; the product's whole step
    (benchmarks/harness.py's Trainer) is what benchmarks.efficiency times."""

    def __init__(self, mode, px, patch, dim, depth, heads, batch):
        cfg = preset("image", "base", mode, image_size=px, patch_size=patch)
        cfg = dataclasses.replace(cfg, encoder=dataclasses.replace(
            cfg.encoder, dim=dim, depth=depth, heads=heads, dropout=0.0, attn_dropout=0.0),
            target=dataclasses.replace(cfg.target, top_k=min(cfg.target.top_k, depth)))
        if mode == "d2v2":
            cfg = dataclasses.replace(cfg, decoder=dataclasses.replace(cfg.decoder, dim=min(dim, 384)))
        self.model = Data2Vec(cfg)
        self.opt = torch.optim.AdamW(self.model.student_parameters(), lr=1e-4, fused=False)
        self.batch = {"image": torch.randn(batch, 3, px, px)}
        T = self.model.num_tokens(self.batch)
        self.mask = torch.from_numpy(draw_masks(cfg, batch, T, np.random.default_rng(0))["mask"])
        self.i = 0

    def __call__(self):
        out = self.model(self.batch, self.mask)
        self.opt.zero_grad(set_to_none=True)
        out.loss.backward()
        self.opt.step()
        self.model.ema_step(self.i)
        self.i += 1


class HFBaselineStep:
    """data2vec 1.0 for images the way a user would write it on top of `transformers`."""

    def __init__(self, px, patch, dim, depth, heads, batch, top_k=6, decay=0.9998, lr=1e-4):
        from transformers import Data2VecVisionConfig, Data2VecVisionModel

        cfg = Data2VecVisionConfig(image_size=px, patch_size=patch, hidden_size=dim, num_hidden_layers=depth,
                                   num_attention_heads=heads, intermediate_size=4 * dim,
                                   hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                   use_mask_token=True, use_relative_position_bias=False,
                                   use_absolute_position_embeddings=True, layer_scale_init_value=0.1,
                                   attn_implementation="sdpa")
        self.student = Data2VecVisionModel(cfg, add_pooling_layer=False)
        self.teacher = copy.deepcopy(self.student).eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.head = torch.nn.Linear(dim, dim)
        self.opt = torch.optim.AdamW(list(self.student.parameters()) + list(self.head.parameters()), lr=lr)
        self.x = torch.randn(batch, 3, px, px)
        n = (px // patch) ** 2
        m = draw_masks(preset("image", "base", "d2v1"), batch, n, np.random.default_rng(0))["mask"]
        self.mask = torch.from_numpy(m)
        self.top_k, self.decay = min(top_k, depth), decay

    def __call__(self, x: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> float:
        """One step on (x (B, 3, H, W), mask (B, T) bool); the fixed random batch when omitted."""
        x = self.x if x is None else x
        mask = self.mask if mask is None else mask
        with torch.no_grad():
            hs = self.teacher(x, output_hidden_states=True).hidden_states[-self.top_k:]
            y = sum(F.layer_norm(h[:, 1:], h.shape[-1:]) for h in hs) / self.top_k
            y = F.layer_norm(y, y.shape[-1:])
        h = self.student(x, bool_masked_pos=mask).last_hidden_state[:, 1:]
        pred = self.head(h[mask])
        loss = F.smooth_l1_loss(pred, y[mask], beta=2.0)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        with torch.no_grad():
            for t, s in zip(self.teacher.parameters(), self.student.parameters()):
                t.mul_(self.decay).add_(s, alpha=1 - self.decay)
        return float(loss.detach())

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Mean-pooled final student outputs over patches (B, D), as our probes pool."""
        self.student.eval()
        f = self.student(x).last_hidden_state[:, 1:].mean(1)
        self.student.train()
        return f


def measure(step, batch: int, steps: int) -> tuple[float, float]:
    """(samples/s, FLOPs per step)."""
    step()  # warm-up
    with counter() as fc:
        step()
    flops = fc.get_total_flops()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    dt = (time.perf_counter() - t) / steps
    return batch / dt, flops


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--sizes", default="vit-s,demo")
    a = p.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    peak = matmul_peak()
    print(f"# CPU fp32 matmul: {peak / 1e9:.1f} GFLOP/s ({torch.get_num_threads()} threads)")
    print(f"{'size':6} {'variant':22} {'samples/s':>10} {'GFLOP/step':>11} {'GFLOP/s':>8} {'of matmul':>9}")
    res = {}
    for size in a.sizes.split(","):
        px, patch, dim, depth, heads, batch = SIZES[size]
        variants = {
            "hf-baseline (1.0)": lambda: HFBaselineStep(px, patch, dim, depth, heads, batch),
            "ours d2v1": lambda: OurStep("d2v1", px, patch, dim, depth, heads, batch),
            "ours d2v2": lambda: OurStep("d2v2", px, patch, dim, depth, heads, batch),
        }
        for name, make in variants.items():
            sps, flops = measure(make(), batch, a.steps)
            achieved = flops * sps / batch
            res[(size, name)] = (sps, achieved / peak)
            print(f"{size:6} {name:22} {sps:10.2f} {flops / 1e9:11.2f} {achieved / 1e9:8.1f} {achieved / peak:9.2f}")
    first = a.sizes.split(",")[0]
    out = {
        "d1_over_baseline": round(res[(first, "ours d2v1")][0] / res[(first, "hf-baseline (1.0)")][0], 3),
        "d2_over_d1": round(res[(first, "ours d2v2")][0] / res[(first, "ours d2v1")][0], 3),
        "cpu_matmul_fraction": round(res[(first, "ours d2v1")][1], 3),
    }
    print(f"# ratios at {first}; d2v2 samples/s counts images (each with {preset('image', 'base').decoder.clone_batch} masks)")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
