"""The pre-flight memory estimate (pipeline/train/memory.py) against the measured peak RSS of
real training steps on CPU, one fresh process per configuration.

    python benchmarks/memory_estimate.py [--config image,demo,d2v2,32 ...] [--config ft:audio,demo,classify,8 ...]

A pretraining row is modality,size,mode,batch: two steps of benchmarks/harness.py's Trainer (the
worker's collate and `pipeline.train.step.train_step`) on full-size samples. A fine-tuning row is
ft:modality,size,task,batch: two `finetune_step`s (from a pretrained init: the audio CNN frozen, as
the base recipe and CTC run it — the demo's classification trains it, as scratch does, an estimate
tests/test_finetune.py's micro-batch test exercises; 20-s audio clips, full-length text).

Prints a table (estimate, measured peak, ratio) and one JSON line last.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
DEFAULT = ["image,demo,d2v2,32", "audio,demo,d2v2,32", "text,demo,d2v1,32", "image,base,d2v2,2",
           "image,base,d2v1,4", "audio,base,d2v1,1", "text,base,d2v2,2",
           "ft:image,demo,classify,32", "ft:audio,demo,classify,16", "ft:audio,demo,ctc,8", "ft:text,demo,classify,32",
           "ft:audio,base,classify,2"]


def _rows(modality: str, batch: int, t, rng, vocab: int = 8000):
    """A numpy batch of full-size samples: 224-px images, audio of train.audio_max_samples, text of
    train.text_max_tokens."""
    import numpy as np

    if modality == "image":  # the views the read tasks hand a worker: (B, 224·224·3) uint8
        return {"image": rng.integers(0, 255, (batch, 224 * 224 * 3), dtype=np.uint8)}
    col = np.empty(batch, dtype=object)
    if modality == "audio":
        col[:] = [rng.standard_normal(t.audio_max_samples).astype(np.float32) for _ in range(batch)]
        return {"audio": col}
    n = t.text_max_tokens
    col[:] = [np.concatenate([[0], rng.integers(5, vocab, n - 2), [2]]).astype(np.int32) for _ in range(batch)]
    return {"input_ids": col}


def peak_rss() -> int:
    """This process's peak resident set in bytes (Linux VmHWM). Not getrusage's ru_maxrss: Linux
    carries that across exec, so a process started by a big one (a test runner) reads its parent's
    size as its own peak."""
    with open("/proc/self/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    return kib * 1024


def measure_finetune(modality: str, size: str, task: str, batch: int) -> dict:
    """Two real fine-tuning steps of this config from a (random) pretrained-layout init."""
    import numpy as np
    import torch

    from pipeline.model.finetune import FineTuneModel
    from pipeline.recipes import recipe
    from pipeline.train.config import resolve_finetune
    from pipeline.train.memory import GB, estimate
    from pipeline.finetune.step import build_finetune_optimizer, finetune_step
    from pipeline.finetune.tasks import Targets, build_vocab, collate

    process = peak_rss()  # torch, Ray Train and the pipeline imported, nothing built
    fe = {"image": {"image_size": 224}, "text": {"vocab_size": 8000}}.get(modality, {})
    labels = build_vocab(["one two three"]) if task == "ctc" else [str(i) for i in range(10)]
    cfg = resolve_finetune(modality=modality, task=task, init="/pretrained/final", model=recipe(modality, "d2v2", size, **fe).model,
                           train_data="d", val_data="v", test_data="t", output="o", labels=labels, preset_name=size,
                           overrides={"train.batch_size": batch,
                                      **({"finetune.freeze_feature_encoder": True} if modality == "audio" else {})})
    t, f = cfg.train, cfg.finetune
    rng = np.random.default_rng(0)
    nb = _rows(modality, batch, t, rng)
    col = np.empty(batch, dtype=object)
    col[:] = ["three one four one five nine two six" if task == "ctc" else str(i % 10) for i in range(batch)]
    nb["transcript" if task == "ctc" else "label"] = col
    torch.set_num_threads(os.cpu_count() or 1)
    model = FineTuneModel.for_task(cfg.model, f, len(labels))
    opt = build_finetune_optimizer(model, t, f.layer_decay)
    targets = Targets(task, labels)
    for s in range(2):
        micro = [collate(nb, modality, cfg.model, targets, np.random.default_rng(s), t, f.mask_time_prob,
                         f.mask_time_length)]
        finetune_step(model, model, opt, micro, s + f.freeze_encoder_steps, t, f)
    peak = peak_rss()
    return {"config": f"ft:{modality},{size},{task},{batch}", "estimate_gb": round(estimate(cfg)["total"] / GB, 2),
            "peak_gb": round(peak / GB, 2), "process_gb": round(process / GB, 2)}


def measure(modality: str, size: str, mode: str, batch: int) -> dict:
    """Two real steps of this config (224-px images, full-length audio/text) in this process, by the
    harness Trainer: collate + the product's train_step, as in a worker."""
    import numpy as np
    import torch

    from benchmarks.harness import Trainer
    from pipeline.train.config import resolve
    from pipeline.train.memory import GB, estimate

    process = peak_rss()
    fe = {"image": {"image_size": 224}, "text": {"vocab_size": 8000}}.get(modality, {})
    cfg = resolve(modality, "d", "o", size, None, {"model.mode": mode, "train.batch_size": batch}, model_frontend=fe)
    nb = _rows(modality, batch, cfg.train, np.random.default_rng(0))  # exactly one batch of rows
    torch.set_num_threads(os.cpu_count() or 1)
    Trainer(cfg, {c: list(v) for c, v in nb.items()}).train(2)
    peak = peak_rss()
    return {"config": f"{modality},{size},{mode},{batch}", "estimate_gb": round(estimate(cfg)["total"] / GB, 2),
            "peak_gb": round(peak / GB, 2), "process_gb": round(process / GB, 2)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", action="append", help="modality,size,mode,batch (repeatable)")
    p.add_argument("--one", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.one:
        import importlib
        importlib.import_module("ray.train")  # a training worker's process has Ray loaded: the estimate counts it
        ft = a.one.startswith("ft:")
        mod, size, mode, batch = a.one.removeprefix("ft:").split(",")
        print(json.dumps((measure_finetune if ft else measure)(mod, size, mode, int(batch))))
        return 0
    rows = []
    for c in a.config or DEFAULT:
        r = subprocess.run([sys.executable, __file__, "--one", c], capture_output=True, text=True, timeout=900)
        if r.returncode:
            raise SystemExit(f"{c}: {r.stderr[-2000:]}")
        rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
    print(f"{'config':<28} {'estimate GiB':>12} {'peak RSS GiB':>12} {'ratio':>6} {'of it, the process':>18}")
    for r in rows:
        r["ratio"] = round(r["estimate_gb"] / r["peak_gb"], 2)
        print(f"{r['config']:<28} {r['estimate_gb']:>12.2f} {r['peak_gb']:>12.2f} {r['ratio']:>6.2f} "
              f"{r['process_gb']:>18.2f}")
    ratios = [r["ratio"] for r in rows]
    print(json.dumps({"min_ratio": min(ratios), "max_ratio": max(ratios), "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
