"""Where a training step's time goes: the forward's parts (front end's local encoder, teacher, conv
positions, student encoder, decoder), then backward + optimizer, per step — for 2.0 at several
masked-copy counts and for 1.0, and for audio with the CNN run channels-last (the product's
`WaveCNN`) beside the plain Conv1d layout, all in one run.

    .venv/bin/python -m benchmarks.step_profile [--data runs/demo/data] [--modality audio]
        [--clones 2,8] [--steps 10]

Each row trains in this process with the workers' step (benchmarks/harness.py: same collate, masks,
optimizer), demo preset, 2 threads, 5 warm-up steps then `--steps` timed ones; with audio each
variant runs right before its plain-Conv1d twin, so the pair sees the same machine. A part's time is
its forward only; the teacher's includes its own positions and encoder, and "positions" counts
every call of the student front end's `context` (the teacher's too where it has no EMA copy of
them). Everything after the forward (autograd's backward through every part, AdamW, the EMA
update) is the column "rest".
Prints a table, then one JSON line.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
import time

import torch
import torch.nn as nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.harness import Trainer, demo_run_config, load_rows  # noqa: E402

WARMUP = 5

# (owner, method, column): "local" is the front end's local encoder (audio: the CNN; image: patches;
# text: embeddings), "encoder" the student's Transformer.
PARTS = [("frontend", "local", "local"), ("", "targets", "teacher"), ("frontend", "context", "positions"),
         ("encoder", "forward", "encoder"), ("decoder", "forward", "decoder")]


def _timed(obj, name: str, into: dict, label: str) -> None:
    fn = getattr(obj, name)

    def wrapper(*a, **k):
        t0 = time.perf_counter()
        out = fn(*a, **k)
        into[label] += time.perf_counter() - t0
        return out
    setattr(obj, name, wrapper)


def profile(data: str, modality: str, mode: str, clones: int | None, steps: int, plain_cnn: bool = False) -> dict:
    ov = {"model.mode": mode, **({"model.decoder.clone_batch": clones} if clones else {})}
    cfg = demo_run_config(data, modality, tempfile.mkdtemp(), overrides=ov)
    tr = Trainer(cfg, load_rows(cfg.data, modality))
    m = tr.model
    if plain_cnn:  # the same modules run as a plain Sequential of Conv1d (channels-first) layers
        m.frontend.cnn.forward = nn.Sequential.forward.__get__(m.frontend.cnn)
    parts = collections.defaultdict(float)
    for owner, name, label in PARTS + [("", "forward", "forward")]:
        obj = getattr(m, owner, None) if owner else m
        if obj is not None and hasattr(obj, name):
            _timed(obj, name, parts, label)
    for _ in range(WARMUP):
        tr.train_step(*tr.next_inputs())
    parts.clear()
    total = 0.0
    for _ in range(steps):
        inputs = tr.next_inputs()
        t0 = time.perf_counter()
        tr.train_step(*inputs)
        total += time.perf_counter() - t0
    forward = parts.pop("forward")
    row = {k: v / steps for k, v in parts.items()}
    row["rest"] = (total - forward) / steps  # backward through every part, AdamW, EMA
    row["step"] = total / steps
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--data", default="runs/demo/data")
    p.add_argument("--modality", default="audio", choices=["image", "audio", "text"])
    p.add_argument("--clones", default="2,8", help="2.0 masked copies per sample, one row each")
    p.add_argument("--steps", type=int, default=20)
    a = p.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    variants = []
    for name, mode, c in [(f"2.0, {c} copies", "d2v2", int(c)) for c in a.clones.split(",")] + [("1.0", "d2v1", None)]:
        variants.append((name, mode, c, False))
        if a.modality == "audio":
            variants.append((f"{name}, CNN as plain Conv1d", mode, c, True))
    rows = {name: profile(a.data, a.modality, mode, c, a.steps, plain) for name, mode, c, plain in variants}
    cols = [label for _, _, label in PARTS] + ["rest", "step"]
    print(f"\n{a.modality}: seconds per step (forward parts; rest = backward, AdamW, EMA)")
    print(f"{'variant':34}" + "".join(f"{c:>10}" for c in cols))
    for name, r in rows.items():
        print(f"{name:34}" + "".join(f"{r.get(c, 0.0):10.3f}" for c in cols))
    out = {"modality": a.modality, "s_per_step": {k: round(r["step"], 3) for k, r in rows.items()}}
    if a.modality == "audio":
        out["cnn_channels_last_speedup"] = {k: round(rows[f"{k}, CNN as plain Conv1d"]["step"] / r["step"], 2)
                                            for k, r in rows.items() if "plain" not in k}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
