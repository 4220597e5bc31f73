"""Time to accuracy: wall-clock for data2vec 2.0 to reach the probe accuracy that 1.0 reaches with a
fixed budget — and for a Hugging Face-based 1.0 baseline (images) to reach it too.

    .venv/bin/python -m benchmarks.time_to_accuracy [--data runs/demo/data] [--modalities image,audio,text]
        [--budget1 image=1000,audio=400,text=1000] [--budget2 image=300,audio=150,text=400] [--probes 6]
        [--seeds 0,1,2] [--set1 train.lr=5e-4]

`--data` holds the demo's preprocessed folders (`python -m jobs.demo` writes them to runs/demo/data):
<modality>_train (pretraining input; text uses text_pretrain), <modality>_train/_test (probe splits).
Every variant trains in this process with the workers' step (benchmarks/harness.py), demo preset,
2 threads. The clock counts training steps only; probes (frozen student, mean-pooled final layer,
logistic regression on held-out data) run between chunks and are not timed.

1. data2vec 1.0 trains for its fixed budget (`--budget1` steps); its final probe accuracy is the target,
   and t1 = the training time at which its probe first reached it. If 1.0 ends less than 5 points
   above its own random init (it did not learn in its budget), the target is random init + 5 points
   instead, and t1 > the whole budget: the speed-up is then a lower bound (">").
2. data2vec 2.0 trains (up to `--budget2` steps), probed after each chunk; t2 = first time ≥ target.
3. Images only: the HF baseline of benchmarks/step.py (transformers Data2VecVision student, deepcopy
   teacher, constant EMA 0.999, same sizes, masks, LR schedule and budget as 1.0); t_hf likewise.
Speed-up = t1 / t2 (and t_hf / t2). A variant that never reaches the target gives a lower bound (">").
With several `--seeds` (the runs' `train.seed`: weights, data order, masks) each seed runs 1.0 and
2.0 (and the baseline) afresh, with its own target; the JSON's speed-up is the median over seeds,
`..._range` the lowest and highest.
Prints a table, then one JSON line with the speed-ups.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.harness import Trainer, demo_run_config, load_rows, probe_accuracy  # noqa: E402
from pipeline.config import ConfigError  # noqa: E402
from pipeline.probe import fit_probes  # noqa: E402
from pipeline.train.batches import image_tensor  # noqa: E402
from pipeline.train.config import parse_sets  # noqa: E402
from pipeline.train.step import lr_at  # noqa: E402

BUDGET1 = "image=1000,audio=400,text=1000"  # 1.0 steps (batch 32): roughly the 2.0 demo's wall time
BUDGET2 = "image=300,audio=150,text=400"
LEARNED = 0.05  # probe points above random init that count as "learned" (the quality bar)


def parse_budget(text: str) -> dict[str, int]:
    out = {}
    for item in text.split(","):
        k, v = item.split("=")
        out[k.strip()] = int(v)
    return out


def curve(step, probe, max_steps: int, probes: int, target: float | None = None) -> list[tuple[float, int, float]]:
    """Train with `step()` up to max_steps, probing `probes` times (and at step 0); returns
    [(training seconds, steps, probe accuracy)]. Stops early once a probe reaches `target`."""
    points = [(0.0, 0, probe())]
    marks = {int(round(max_steps * (i + 1) / probes)) for i in range(probes)}
    seconds = 0.0
    for s in range(1, max_steps + 1):
        t0 = time.perf_counter()
        step()
        seconds += time.perf_counter() - t0
        if s in marks:
            points.append((seconds, s, probe()))
            print(f"    step {s:5d}  {seconds:7.1f} s  probe {points[-1][2]:.3f}", flush=True)
            if target is not None and points[-1][2] >= target:
                break
    return points


def first_reach(points, target: float) -> float | None:
    return next((t for t, _, a in points if a >= target), None)


def ours(mod: str, mode: str, data: str, steps: int, probe_rows, probes: int, target=None, seed: int = 0,
         sets: dict | None = None):
    cfg = demo_run_config(data, mod, tempfile.mkdtemp(),
                          overrides={**(sets or {}), "model.mode": mode, "train.max_steps": steps, "train.seed": seed})
    tr = Trainer(cfg, load_rows(cfg.data, mod))
    print(f"  {mod} {mode} seed {seed}: {steps} steps max", flush=True)
    return curve(lambda: tr.train_step(*tr.next_inputs()), lambda: probe_accuracy(tr.model, *probe_rows),
                 steps, probes, target)


def hf_baseline(data: str, steps: int, probe_rows, probes: int, target: float, seed: int = 0):
    """The 1.0 baseline a user would write on `transformers` (benchmarks/step.py), on real digits."""
    from benchmarks.step import HFBaselineStep

    cfg = demo_run_config(data, "image", tempfile.mkdtemp(),
                          overrides={"model.mode": "d2v1", "train.max_steps": steps, "train.seed": seed})
    m, t = cfg.model, cfg.train
    torch.manual_seed(t.seed)
    base = HFBaselineStep(m.frontend.image_size, m.frontend.patch_size, m.encoder.dim, m.encoder.depth,
                          m.encoder.heads, t.batch_size, top_k=m.target.top_k, decay=m.ema.decay, lr=t.lr)
    tr = Trainer(cfg, load_rows(cfg.data, "image"))  # only for its batches and masks (same as ours 1.0)
    state = {"step": 0}

    def step():
        inputs, mask = tr.next_inputs()
        tr.step += 1  # next masks
        for g in base.opt.param_groups:
            g["lr"] = lr_at(state["step"], t)
        base(inputs["image"], mask)
        state["step"] += 1

    def probe():
        feats = []
        for rows in probe_rows:
            x = image_tensor(np.stack(rows["image"]), m.frontend.image_size)
            feats.append(torch.cat([base.features(x[i: i + 256]) for i in range(0, len(x), 256)]).numpy())
        ytr, yte = (np.asarray(r["label"]) for r in probe_rows)
        return fit_probes(feats[0], ytr, feats[1], yte)["probe_accuracy"]

    print(f"  image hf-baseline seed {seed}: {steps} steps max", flush=True)
    return curve(step, probe, steps, probes, target)


def one_seed(mod: str, seed: int, a, b1: dict, b2: dict, probe_rows) -> tuple[list, dict]:
    """1.0, 2.0 (and, for images, the HF baseline) at one seed → (table rows, speed-ups)."""
    c1 = ours(mod, "d2v1", a.data, b1[mod], probe_rows, a.probes, seed=seed, sets=parse_sets(a.set1))
    learned = c1[-1][2] >= c1[0][2] + LEARNED
    target = c1[-1][2] if learned else c1[0][2] + LEARNED
    t1 = first_reach(c1, target) if learned else c1[-1][0]  # not learned: t1 > the whole budget
    c2 = ours(mod, "d2v2", a.data, b2[mod], probe_rows, a.probes2, target, seed=seed)
    t2 = first_reach(c2, target)
    speed = t1 / t2 if t2 else None
    rows = [(mod, seed, "ours d2v1", c1, target, t1, None, not learned),
            (mod, seed, "ours d2v2", c2, target, t2, speed, not learned)]
    out = {"speedup": speed, "lower_bound": not learned}
    if mod == "image" and not a.no_hf:
        ch = hf_baseline(a.data, b1[mod], probe_rows, a.probes, target, seed)
        th = first_reach(ch, target)
        lower = th is None
        th = th if th is not None else ch[-1][0]
        sp = th / t2 if t2 else None
        rows.append((mod, seed, "hf-baseline d2v1", ch, target, th, sp, lower))
        out.update(hf_speedup=sp, hf_reached=not lower)
    if not learned:
        print(f"  note: {mod} 1.0 ended at {c1[-1][2]:.3f}, < 5 points above its random init "
              f"{c1[0][2]:.3f}; target = {target:.3f}, 1.0's time is a lower bound", flush=True)
    return rows, out


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--data", default="runs/demo/data")
    p.add_argument("--modalities", default="image,audio,text")
    p.add_argument("--budget1", default=BUDGET1, help="data2vec 1.0 (and HF baseline) steps per modality")
    p.add_argument("--budget2", default=BUDGET2, help="data2vec 2.0 maximum steps per modality")
    p.add_argument("--probes", type=int, default=6, help="probes along the 1.0 and HF curves (plus step 0)")
    p.add_argument("--probes2", type=int, default=12, help="probes along the 2.0 curve: it stops at the "
                   "first that reaches the target, so denser probing measures t2 more precisely")
    p.add_argument("--seeds", default="0", help="comma-separated train.seed values; the speed-up is their median")
    p.add_argument("--no-hf", action="store_true", help="skip the Hugging Face baseline")
    p.add_argument("--set1", action="append", default=[], metavar="KEY=VALUE",
                   help="a setting of the data2vec 1.0 runs only, e.g. train.lr=5e-4 (repeatable)")
    a = p.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    b1, b2 = parse_budget(a.budget1), parse_budget(a.budget2)
    seeds = [int(x) for x in a.seeds.split(",")]
    rows, out = [], {}
    for mod in a.modalities.split(","):
        per_seed = []
        for seed in seeds:
            try:
                probe_rows = tuple(load_rows(os.path.join(a.data, f"{mod}_{s}"), mod, labeled=True)
                                   for s in ("train", "test"))
                r, o = one_seed(mod, seed, a, b1, b2, probe_rows)
            except (ConfigError, FileNotFoundError, KeyError) as e:
                print(f"error: {mod}: {e} (run `python -m jobs.demo` first, or pass --data)", file=sys.stderr)
                return 2
            rows += r
            per_seed.append(o)
        speeds = [o["speedup"] for o in per_seed if o["speedup"]]
        # A seed whose 2.0 never reached the target counts as the lowest.
        ranked = sorted(o["speedup"] or 0.0 for o in per_seed)
        median = statistics.median(ranked)
        out[f"time_to_accuracy_speedup_{mod}"] = round(median, 2) if median else None
        out[f"time_to_accuracy_lower_bound_{mod}"] = any(o["lower_bound"] for o in per_seed)
        if len(seeds) > 1:
            out[f"time_to_accuracy_speedup_{mod}_range"] = [round(ranked[0], 2), round(ranked[-1], 2)]
            out[f"time_to_accuracy_reached_{mod}"] = f"{len(speeds)}/{len(seeds)}"
        if "hf_speedup" in per_seed[0]:
            hf = statistics.median(o["hf_speedup"] or 0.0 for o in per_seed)
            out["hf_baseline_speedup_image"] = round(hf, 2) if hf else None
            out["hf_baseline_reached_target"] = all(o["hf_reached"] for o in per_seed)

    print(f"\n{'modality':8} {'seed':>4} {'variant':17} {'steps':>6} {'train_s':>8} {'random':>7} {'final':>6} "
          f"{'target':>7} {'t_reach_s':>9} {'speedup':>8}")
    for mod, seed, name, c, target, t_reach, sp, lower in rows:  # lower: 1.0 never reached the target in its budget
        reach = "n/a" if t_reach is None else (">" if lower and name != "ours d2v2" else "") + f"{t_reach:.1f}"
        speed = "n/a" if not sp else (">" if lower else "") + f"{sp:.2f}"
        print(f"{mod:8} {seed:4d} {name:17} {c[-1][1]:6d} {c[-1][0]:8.1f} {c[0][2]:7.3f} {c[-1][2]:6.3f} "
              f"{target:7.3f} {reach:>9} {speed:>8}")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
