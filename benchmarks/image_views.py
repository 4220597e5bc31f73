"""Images per second per CPU core of each recipe's view (decode + augment) from the bytes a shard
stores, stored bytes per image against raw pixels, and the CPU cores one GPU needs to be fed.

    .venv/bin/python -m benchmarks.image_views [--photos 40] [--rounds 5] [--size 224] [--mfu 0.40]
        [--gflop-per-sample d2v2=408.9,d2v1=138.9,finetune=100.9]

Images: benchmarks/photos.py's natural photos (3 sources, shorter side 300–1200, half JPEG q95, half
PNG), stored as preprocessing stores them (`pipeline.decoders.encode_stored_image`,
ImageSettings(size)): shorter side size / 0.875 (256 for 224), JPEG q90 (or PNG when smaller).
Views, each over all stored images as a Ray Data read task runs them (`pipeline.augment`; one torch
thread; row ids 0..n-1, epoch = the round, so every round draws new crops):
    d2v2      train_views with D2V2_VIEWS (random resized crop 0.2–1, flip)
    d2v1      train_views with D2V1_VIEWS (color jitter 0.4, crop 0.08–1, flip)
    finetune  train_views with FINETUNE_VIEWS (crop 0.08–1, flip)
    eval      eval_views (resize to 256 if needed, center 224 crop; also train.augment=none)
    none      decode only (stored bytes → RGB array at stored size): the floor under every view
Rate = images / process CPU seconds (one thread, so CPU seconds = core seconds; robust to other
processes on the machine), median over `--rounds` rounds, views alternating within each round;
wall-clock rates are printed beside it.

GPU side: samples/s one GPU trains at, from benchmarks/scaling.py's model (no GPU has measured it
yet; benchmarks/gpu_check.py has not run): FLOPs per sample counted on the base preset at 224 px
(d2v2 by scaling.per_sample; d2v1 the same on the d2v1 preset; finetune = the base encoder's
forward + backward on one unmasked image, the head ignored), over an H100's dense bf16 989 TFLOP/s
at `--mfu` (scaling's default 40%), one GPU (no all-reduce): samples/s = MFU × 989e12 / FLOPs.
cores per GPU = that rate / the view's images/s per core; `cores_per_gpu` uses the data2vec 2.0
base rate for every view, `cores_per_gpu_own_recipe` each training view's own recipe. Not counted:
Ray Data's own work per row (Arrow conversion, object store), the read of the shard from disk.
Prints a table, then one JSON line: {"stored_bytes_per_image" (mean), "stored_bytes_range",
"raw_bytes", "raw_over_stored", "views" (images/s per core), "gpu_samples_per_s" (d2v2 base),
"gpu_samples_per_s_own_recipe", "cores_per_gpu", "cores_per_gpu_own_recipe"}.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.photos import write_photos  # noqa: E402
from pipeline import augment  # noqa: E402
from pipeline.config import ImageSettings  # noqa: E402
from pipeline.decoders import encode_stored_image  # noqa: E402
from pipeline.recipes import D2V1_VIEWS, D2V2_VIEWS, FINETUNE_VIEWS  # noqa: E402

VIEWS = ("d2v2", "d2v1", "finetune", "eval", "none")
RECIPE_VIEWS = {"d2v2": D2V2_VIEWS, "d2v1": D2V1_VIEWS, "finetune": FINETUNE_VIEWS}
OWN = {"d2v2": "d2v2", "d2v1": "d2v1", "finetune": "finetune"}  # view → the recipe that trains on it


def stored_images(n: int, seed: int, size: int) -> tuple[list[bytes], list[str]]:
    """n photos → (stored bytes, formats) as preprocessing writes them into shards."""
    cfg = ImageSettings(size=size)
    with tempfile.TemporaryDirectory() as tmp:
        out = []
        for p in write_photos(tmp, n, seed):
            with open(p, "rb") as f:
                out.append(encode_stored_image(f.read(), cfg))
    return [b for b, _ in out], [f for _, f in out]


def view_fn(name: str, size: int, seed: int):
    """(column, row_ids, epoch) → what the view yields."""
    if name in RECIPE_VIEWS:
        spec = {"size": size, **RECIPE_VIEWS[name]}
        return lambda col, rows, epoch: augment.train_views(col, rows, spec, seed, epoch)
    if name == "eval":
        return lambda col, rows, epoch: augment.eval_views(col, size)
    if name == "none":
        return lambda col, rows, epoch: [np.asarray(augment.decode(b)) for b in col]
    raise ValueError(f"unknown view {name!r}; expected one of {VIEWS}")


def measure(names, stored: list[bytes], size: int, seed: int, rounds: int) -> dict[str, dict]:
    """{view: {"cpu": images per CPU-second (median), "wall": images per wall-second (median)}}."""
    fns = {v: view_fn(v, size, seed) for v in names}
    rows = np.arange(len(stored))
    for fn in fns.values():  # warm-up: imports, first transforms
        fn(stored[:4], rows[:4], 10_000)
    cpu, wall = collections.defaultdict(list), collections.defaultdict(list)
    for r in range(rounds):
        for v, fn in fns.items():
            c, t = time.process_time(), time.perf_counter()
            fn(stored, rows, r)
            c, t = time.process_time() - c, time.perf_counter() - t
            cpu[v].append(len(stored) / c)
            wall[v].append(len(stored) / t)
    return {v: {"cpu": statistics.median(cpu[v]), "wall": statistics.median(wall[v])} for v in names}


def flops_per_sample(recipe: str) -> float:
    """Training FLOPs per 224-px image of the base preset: d2v2 / d2v1 pretraining steps, or the
    encoder's forward + backward on one unmasked image (fine-tuning)."""
    from benchmarks.efficiency import synthetic
    from benchmarks.flops import counter
    from benchmarks.scaling import per_sample
    from pipeline.model.data2vec import Data2Vec
    from pipeline.recipes import preset

    if recipe == "d2v2":
        return per_sample("image")[0]
    cfg = preset("image", "base", "d2v1" if recipe == "d2v1" else "d2v2")
    model = Data2Vec(cfg)
    inputs, mask = synthetic(cfg, 1, np.random.default_rng(0))
    with counter() as fc:
        if recipe == "d2v1":
            model(inputs, mask).loss.backward()
        else:
            Data2Vec.extract.__wrapped__(model, inputs).sum().backward()  # extract, without its no_grad
    return fc.get_total_flops()


def gpu_rates(mfu: float, given: dict[str, float]) -> dict[str, tuple[float, float]]:
    """{recipe: (GFLOP per sample, samples/s on one GPU)} from scaling.py's model."""
    from benchmarks.scaling import H100_BF16, model_rows

    out = {}
    for recipe in OWN.values():
        flops = given[recipe] * 1e9 if recipe in given else flops_per_sample(recipe)
        n, *_, sps = next(model_rows(flops, 0, 64, mfu))  # 1 GPU: compute only, no all-reduce
        assert n == 1 and abs(sps - mfu * H100_BF16 / flops) < 1e-6 * sps
        out[recipe] = (flops / 1e9, sps)
    return out


def main(argv=None) -> int:
    import torch

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--photos", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--rounds", type=int, default=5, help="timed passes over all images per view (median)")
    p.add_argument("--views", default=",".join(VIEWS))
    p.add_argument("--mfu", type=float, default=0.40, help="assumed GPU model-FLOP utilization (scaling.py's)")
    p.add_argument("--gflop-per-sample", default="",
                   help="recipe=GFLOP,... (d2v2, d2v1, finetune) instead of counting on the base preset")
    a = p.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # images/s per core (PIL decodes and resizes on the calling thread)
    try:
        return _run(a)
    finally:
        torch.set_num_threads(threads)  # as it was (the tests call main in their own process)


def _run(a) -> int:
    given = {k: float(v) for k, v in (x.split("=") for x in a.gflop_per_sample.split(",") if x)}
    names = a.views.split(",")
    for v in names:
        view_fn(v, a.size, a.seed)

    stored, formats = stored_images(a.photos, a.seed, a.size)
    sizes = np.array([len(b) for b in stored])
    sides = collections.Counter(min(augment.decode(b).size) for b in stored)
    raw = a.size * a.size * 3
    rates = measure(names, stored, a.size, a.seed, a.rounds)
    gpu = gpu_rates(a.mfu, given)
    base_sps = gpu["d2v2"][1]

    print(f"# {len(stored)} photos stored at {a.size} px: formats {dict(collections.Counter(formats))}, "
          f"shorter sides {dict(sides)}")
    print(f"# stored bytes per image: mean {sizes.mean():.0f}, min {sizes.min()}, max {sizes.max()}; "
          f"raw {a.size}x{a.size}x3 = {raw} B: raw/stored {raw / sizes.mean():.2f}x (mean), "
          f"{raw / sizes.max():.2f}x (largest)")
    print("# GPU model (benchmarks/scaling.py: H100 dense bf16 989 TFLOP/s × MFU "
          f"{a.mfu:.0%}, one GPU), base preset at {a.size} px:")
    for r, (gf, sps) in gpu.items():
        print(f"#   {r:8} {gf:7.1f} GFLOP/sample → {sps:7.0f} samples/s per GPU")
    none = rates.get("none", {}).get("cpu")
    print(f"{'view':9} {'img/s/core':>10} {'wall img/s':>10} {'ms/img':>7} {'decode share':>12} "
          f"{'cores/GPU @d2v2':>15} {'own recipe img/s/GPU':>20} {'cores/GPU @own':>14}")
    cores, cores_own = {}, {}
    for v in names:
        r = rates[v]["cpu"]
        cores[v] = base_sps / r
        share = f"{r / none:12.0%}" if none else f"{'':>12}"
        if v in OWN:
            own = gpu[OWN[v]][1]
            cores_own[v] = own / r
            tail = f"{own:20.0f} {cores_own[v]:14.1f}"
        else:
            tail = f"{'-':>20} {'-':>14}"
        print(f"{v:9} {r:10.1f} {rates[v]['wall']:10.1f} {1e3 / r:7.2f} {share} {cores[v]:15.1f} {tail}")
    print(json.dumps({
        "stored_bytes_per_image": round(float(sizes.mean())), "stored_bytes_range": [int(sizes.min()), int(sizes.max())],
        "raw_bytes": raw, "raw_over_stored": round(raw / float(sizes.mean()), 2),
        "views": {v: round(rates[v]["cpu"], 1) for v in names},
        "gpu_samples_per_s": round(base_sps), "gpu_samples_per_s_own_recipe": {k: round(s) for k, (_, s) in gpu.items()},
        "mfu_assumed": a.mfu,
        "cores_per_gpu": {v: round(c, 2) for v, c in cores.items()},
        "cores_per_gpu_own_recipe": {v: round(c, 2) for v, c in cores_own.items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
