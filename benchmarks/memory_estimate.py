"""The pre-flight memory estimate (pipeline/train/memory.py) against the measured peak RSS of
real training steps on CPU, one fresh process per configuration.

    python benchmarks/memory_estimate.py [--config image,demo,d2v2,32 ...]

Prints a table (estimate, measured peak, ratio) and one JSON line last.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
DEFAULT = ["image,demo,d2v2,32", "audio,demo,d2v2,32", "text,demo,d2v1,32", "image,base,d2v2,2",
           "image,base,d2v1,4", "audio,base,d2v1,1", "text,base,d2v2,2"]


def measure(modality: str, size: str, mode: str, batch: int) -> dict:
    """Two real steps of this config (224-px images, full-length audio/text) in this process."""
    import numpy as np
    import torch

    from pipeline.model.data2vec import Data2Vec
    from pipeline.train.batches import collate, step_rng
    from pipeline.train.config import resolve
    from pipeline.train.memory import GB, estimate
    from pipeline.train.step import build_optimizer, train_step

    fe = {"image": {"image_size": 224}, "text": {"vocab_size": 8000}}.get(modality, {})
    cfg = resolve(modality, "d", "o", size, None, {"model.mode": mode, "train.batch_size": batch}, model_frontend=fe)
    t = cfg.train
    rng = np.random.default_rng(0)
    col = np.empty(batch, dtype=object)
    if modality == "image":
        col[:] = [rng.integers(0, 255, (224, 224, 3), dtype=np.uint8).tobytes() for _ in range(batch)]
        nb = {"image": col}
    elif modality == "audio":
        col[:] = [rng.standard_normal(t.audio_max_samples).astype(np.float32) for _ in range(batch)]
        nb = {"audio": col}
    else:
        n = t.text_max_tokens
        col[:] = [np.concatenate([[0], rng.integers(5, 8000, n - 2), [2]]).astype(np.int32) for _ in range(batch)]
        nb = {"input_ids": col}
    torch.set_num_threads(os.cpu_count() or 1)
    model = Data2Vec(cfg.model)
    opt = build_optimizer(model, t)
    for s in range(2):
        x, m = collate(nb, cfg.model, step_rng(0, 0, s), t.audio_max_samples, t.text_max_tokens, t.audio_batching)
        train_step(model, model, opt, [(x, m)], s, t)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    return {"config": f"{modality},{size},{mode},{batch}", "estimate_gb": round(estimate(cfg)["total"] / GB, 2),
            "peak_gb": round(peak / GB, 2)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", action="append", help="modality,size,mode,batch (repeatable)")
    p.add_argument("--one", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.one:
        mod, size, mode, batch = a.one.split(",")
        print(json.dumps(measure(mod, size, mode, int(batch))))
        return 0
    rows = []
    for c in a.config or DEFAULT:
        r = subprocess.run([sys.executable, __file__, "--one", c], capture_output=True, text=True, timeout=900)
        if r.returncode:
            raise SystemExit(f"{c}: {r.stderr[-2000:]}")
        rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
    print(f"{'config':<24} {'estimate GiB':>12} {'peak RSS GiB':>12} {'ratio':>6}")
    for r in rows:
        r["ratio"] = round(r["estimate_gb"] / r["peak_gb"], 2)
        print(f"{r['config']:<24} {r['estimate_gb']:>12.2f} {r['peak_gb']:>12.2f} {r['ratio']:>6.2f}")
    ratios = [r["ratio"] for r in rows]
    print(json.dumps({"min_ratio": min(ratios), "max_ratio": max(ratios), "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
