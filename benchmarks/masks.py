"""Mask drawing, vectorized vs the per-row loops it replaced: masks/s per recipe at its real
per-worker batch, both timed side by side (A, B, A, B, …) in one process.

    .venv/bin/python -m benchmarks.masks [--repeats 5] [--sizes base] [--tiny]

One row per (modality, mode) of the chosen preset sizes: the batch is the recipe's per-worker
batch (× clone_batch for data2vec 2.0), T its tokens per sample (224-px images, 20 s audio crops,
512-token text). The loops are benchmarks/masking_loops.py (pipeline/masking.py before
vectorization); both draw from the same distributions (tests/test_masking.py), not the same masks.
Prints a table, then one JSON line: {"mask_speedup": {row: median}, "min_mask_speedup": …,
"masks_per_s": {row: vectorized masks/s}}.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import masking_loops  # noqa: E402
from pipeline import masking  # noqa: E402
from pipeline.model import data2vec  # noqa: E402
from pipeline.model.frontends import conv_frames  # noqa: E402
from pipeline.recipes import recipe  # noqa: E402

FRONTEND = {"image": {"image_size": 224}, "audio": {}, "text": {"vocab_size": 50_000}}


def case(modality: str, mode: str, size: str, tiny: bool):
    """(model config, batch, T, lengths, input_ids) for one recipe's real per-worker batch."""
    r = recipe(modality, mode, size, **FRONTEND[modality])
    cfg, B = r.model, (2 if tiny else r.train["batch_size"])
    rng = np.random.default_rng(0)
    if modality == "image":
        return cfg, B, (cfg.frontend.image_size // cfg.frontend.patch_size) ** 2, None, None
    if modality == "audio":
        T = int(conv_frames(r.train.get("audio_max_samples", 320_000)))
        return cfg, B, T, rng.integers(T // 2, T + 1, size=B), None
    T = min(r.train.get("text_max_tokens", 512), cfg.frontend.max_positions)
    lengths = rng.integers(T // 2, T + 1, size=B)
    ids = rng.integers(5, cfg.frontend.vocab_size, size=(B, T))
    return cfg, B, T, lengths, ids


def timed(module, cfg, B, T, lengths, ids, n: int) -> float:
    """Seconds per draw_masks call with the given generator module."""
    data2vec.masking = module
    try:
        t0 = time.perf_counter()
        for i in range(n):
            data2vec.draw_masks(cfg, B, T, np.random.default_rng(i), lengths=lengths, input_ids=ids)
        return (time.perf_counter() - t0) / n
    finally:
        data2vec.masking = masking


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5, help="paired (loops, vectorized) measurements per row")
    p.add_argument("--sizes", default="base")
    p.add_argument("--tiny", action="store_true", help="batch 2, 1 call per timing: proves the script runs")
    a = p.parse_args(argv)
    rows, speedup, rate = [], {}, {}
    for size in a.sizes.split(","):
        for modality in ("image", "audio", "text"):
            for mode in ("d2v1", "d2v2"):
                cfg, B, T, lengths, ids = case(modality, mode, size, a.tiny)
                n = 1 if a.tiny else 5
                rows_per_call = B * (cfg.decoder.clone_batch if mode == "d2v2" else 1)
                ratios, fast = [], []
                for _ in range(max(1, a.repeats)):
                    slow_s = timed(masking_loops, cfg, B, T, lengths, ids, n)
                    fast_s = timed(masking, cfg, B, T, lengths, ids, n)
                    ratios.append(slow_s / fast_s)
                    fast.append(fast_s)
                name = f"{modality}-{mode}-{size}"
                speedup[name] = round(statistics.median(ratios), 2)
                rate[name] = round(rows_per_call / statistics.median(fast), 0)
                rows.append((name, rows_per_call, T, statistics.median(fast) * 1e3, min(ratios), speedup[name],
                             max(ratios)))
    print("| recipe | masks per batch | T | vectorized ms/batch | speedup vs loops (min / median / max) |")
    print("|---|---|---|---|---|")
    for name, n, T, ms, lo, med, hi in rows:
        print(f"| {name} | {n} | {T} | {ms:.1f} | {lo:.1f} / {med:.1f} / {hi:.1f} |")
    print(json.dumps({"mask_speedup": speedup, "min_mask_speedup": min(speedup.values()), "masks_per_s": rate}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
