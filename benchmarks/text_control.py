"""The text control experiment: plain masked language modelling (MLM) vs data2vec 1.0 and 2.0 with
the same front end and encoder, data, batch, optimizer and schedule — does the objective hold text
back at a CPU budget, or the budget itself?

    .venv/bin/python -m benchmarks.text_control [--data runs/demo/data] [--steps 2000] [--every 640]
        [--arms mlm_bert15,mlm_span35,d2v1,d2v2] [--set train.lr=5e-4 ...] [--probe-rows N] [--threads N]

Arms, all on the demo text preset (width 128, depth 4), the demo recipe's TrainConfig (batch 32,
AdamW lr 1e-3, warm-up + cosine over --steps, clip 4) and the same shuffled batches
(benchmarks/harness.py, one process):
- mlm_bert15: RoBERTa-style LM head (dense → GELU → LayerNorm → the input embeddings, tied) over
  BERT masking, 15% of tokens, 80/10/10 <mask>/random/kept, loss at every selected token;
- mlm_span35: the same head over the span masking of fairseq's released data2vec 1.0 text config
  (35%, spans of 4, all <mask>);
- d2v1, d2v2: the demo recipes, trained with the workers' step (the demo d2v1 masks like mlm_bert15;
  `--set model.mask.prob=0.35 --set model.mask.length=4 --set model.mask.bert_corrupt=false` gives
  it the released spans).
Every --every steps (default ≈ one epoch of the demo corpus) each arm is probed on the labeled
splits: topic (final layer, mean-pooled), topic_emb (mean of the input token embeddings) and
word_order (bigram shift; benchmarks/text_diagnostics.py), all with the project's probe
(pipeline.probe.fit_probes). MLM arms also report held-out cross-entropy at BERT-masked tokens
(text_test rows, fixed masks) beside the unigram model's on the same tokens.
Prints a table, then one JSON line: {"curves": {arm: [...]}, "unigram_ce": …, "best_topic": {arm: …},
"d2v_minus_mlm_topic": {step: best data2vec − best MLM}}.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.harness import Trainer, batches, demo_run_config  # noqa: E402
from benchmarks.text_diagnostics import probes, shifted, text_splits  # noqa: E402
from pipeline.model.config import MaskConfig  # noqa: E402
from pipeline.model.data2vec import Data2Vec  # noqa: E402
from pipeline.train.batches import collate, step_rng  # noqa: E402
from pipeline.train.config import RunConfig, parse_sets  # noqa: E402
from pipeline.train.step import lr_at  # noqa: E402

MLM_MASKS = {"mlm_bert15": MaskConfig(prob=0.15, length=1, bert_corrupt=True),
             "mlm_span35": MaskConfig(prob=0.35, length=4, bert_corrupt=False)}
ARMS = ("mlm_bert15", "mlm_span35", "d2v1", "d2v2")


class MLM(nn.Module):
    """The project's text front end + encoder (a Data2Vec student; its teacher is never used) under
    a RoBERTa LM head whose output layer is the input embedding matrix."""

    def __init__(self, cfg):
        super().__init__()
        self.net = Data2Vec(cfg)
        D, V = cfg.encoder.dim, cfg.frontend.vocab_size
        self.dense, self.norm = nn.Linear(D, D), nn.LayerNorm(D)
        self.bias = nn.Parameter(torch.zeros(V))

    def forward(self, ids_in: torch.Tensor, ids: torch.Tensor, sel: torch.Tensor) -> torch.Tensor:
        """ids_in (B, T) corrupted ids, ids (B, T) originals, sel (B, T) bool → mean CE at sel."""
        fe = self.net.frontend
        x, _ = fe.local({"input_ids": ids_in})
        pad = ids == fe.PAD
        h, _ = self.net.encoder(fe.context(x, pad), pad if pad.any() else None)  # (B, T, D)
        z = self.norm(F.gelu(self.dense(h[sel])))  # (N, D)
        return F.cross_entropy(z @ fe.tokens.weight.T + self.bias, ids[sel])


class MLMTrainer:
    """The harness Trainer's loop (same batches, LR schedule, clipping, AdamW groups) for MLM."""

    def __init__(self, cfg: RunConfig, rows: dict):
        self.cfg, t = cfg, cfg.train
        torch.manual_seed(t.seed)
        self.mlm = MLM(cfg.model)
        self.model = self.mlm.net  # what the probes read
        decay = [p for n, p in self.mlm.named_parameters() if p.ndim > 1 and "teacher" not in n]
        no_decay = [p for n, p in self.mlm.named_parameters() if p.ndim <= 1 and "teacher" not in n]
        self.params = decay + no_decay
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay},
                                      {"params": no_decay, "weight_decay": 0.0}], lr=t.lr, betas=t.betas, eps=t.eps)
        self.data, self.step = batches(rows, t.batch_size, t.seed), 0

    def train_step(self) -> float:
        t = self.cfg.train
        inputs, mask = collate(next(self.data), self.cfg.model, step_rng(t.seed, 0, self.step), t.audio_max_samples,
                               t.text_max_tokens)
        self.mlm.train()
        loss = self.mlm(inputs["input_ids_masked"], inputs["input_ids"], mask)
        loss.backward()
        for g in self.opt.param_groups:
            g["lr"] = lr_at(self.step, t)
        if t.clip_norm:
            torch.nn.utils.clip_grad_norm_(self.params, t.clip_norm)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.step += 1
        return float(loss.detach())


def held_out_masks(cfg, rows: dict, n: int = 512) -> list:
    """Fixed BERT-15% masked batches of held-out rows: [(inputs, mask)]."""
    bert = dataclasses.replace(cfg.model, mask=MLM_MASKS["mlm_bert15"])
    data = batches({"input_ids": rows["input_ids"][:n]}, 64, seed=99)
    return [collate(next(data), bert, step_rng(99, 0, k), 16_000, cfg.train.text_max_tokens)
            for k in range(max(1, min(n, len(rows["input_ids"])) // 64))]


@torch.no_grad()
def held_out_ce(mlm: MLM, held: list) -> float:
    mlm.eval()
    losses = [(float(mlm(x["input_ids_masked"], x["input_ids"], m)), int(m.sum())) for x, m in held]
    return sum(a * n for a, n in losses) / sum(n for _, n in losses)


def unigram_ce(pre: dict, held: list, vocab: int) -> float:
    """Cross-entropy (nats) of the pretraining corpus's add-one unigram model at the held-out masked tokens."""
    counts = np.bincount(np.concatenate([np.asarray(r) for r in pre["input_ids"]]), minlength=vocab) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-np.mean(np.concatenate([logp[x["input_ids"][m].numpy()] for x, m in held])))


def arm_config(arm: str, data: str, steps: int, sets: dict) -> RunConfig:
    mode = "d2v2" if arm == "d2v2" else "d2v1"
    cfg = demo_run_config(data, "text", tempfile.mkdtemp(), overrides={"model.mode": mode, "train.max_steps": steps,
                                                                        **sets})
    if arm in MLM_MASKS:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, mask=MLM_MASKS[arm]))
    return cfg


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="runs/demo/data")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--every", type=int, default=640, help="steps between probes (≈ an epoch of the demo corpus)")
    p.add_argument("--arms", default=",".join(ARMS))
    p.add_argument("--set", action="append", default=[], help="config override for every arm, key=value")
    p.add_argument("--probe-rows", type=int, default=0, help="probe on a seeded random N labeled rows per split (0 = all)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (and probe processes)")
    a = p.parse_args(argv)
    arms = a.arms.split(",")
    if unknown := sorted(set(arms) - set(ARMS)):
        print(f"error: --arms: unknown {unknown}; choose from {', '.join(ARMS)}", file=sys.stderr)
        return 2
    torch.set_num_threads(a.threads)
    splits = text_splits(a.data, a.probe_rows)
    if splits is None:
        return 2
    pre, tr, te = splits
    topic, order = (tr, te), (shifted(tr, 0), shifted(te, 1))
    sets = parse_sets(a.set)
    base = arm_config("mlm_bert15", a.data, a.steps, sets)
    held = held_out_masks(base, te)
    uni = unigram_ce(pre, held, base.model.frontend.vocab_size)
    epoch_steps = len(pre["input_ids"]) // base.train.batch_size
    print(f"{len(pre['input_ids'])} pretraining rows ({epoch_steps} steps per epoch); unigram CE at held-out "
          f"BERT-masked tokens {uni:.2f} nats", flush=True)
    curves = {}
    for arm in arms:
        cfg = arm_config(arm, a.data, a.steps, sets)
        tr_ = MLMTrainer(cfg, pre) if arm in MLM_MASKS else Trainer(cfg, pre)
        curve, seconds, losses = [], 0.0, []

        def record(step):
            got = probes(tr_.model, topic, order, n_jobs=a.threads)
            if arm in MLM_MASKS:
                got["mlm_ce"] = held_out_ce(tr_.mlm, held)
            row = {"step": step, "epochs": round(step / epoch_steps, 2), "train_s": round(seconds, 1),
                   "loss": round(float(np.mean(losses[-50:])), 4) if losses else None,
                   **{k: round(v, 3) for k, v in got.items()}}
            curve.append(row)
            print(f"  {arm} " + json.dumps(row), flush=True)

        record(0)
        for s in range(1, a.steps + 1):
            t0 = time.perf_counter()
            losses.append(tr_.train_step() if arm in MLM_MASKS else tr_.train_step(*tr_.next_inputs()))
            seconds += time.perf_counter() - t0
            if not math.isfinite(losses[-1]):
                print(f"error: {arm} loss is {losses[-1]} at step {s}", file=sys.stderr)
                return 1
            if s % a.every == 0 or s == a.steps:
                record(s)
        curves[arm] = curve

    print(f"\n| arm | step | epochs | train s | topic | topic_emb | word_order | held-out MLM CE (unigram {uni:.2f}) |")
    print("|---|---|---|---|---|---|---|---|")
    for arm, curve in curves.items():
        for c in curve:
            ce = f"{c['mlm_ce']:.2f}" if "mlm_ce" in c else "—"
            print(f"| {arm} | {c['step']} | {c['epochs']} | {c['train_s']} | {c['topic']:.3f} | "
                  f"{c['topic_embedding_bag']:.3f} | {c['word_order']:.3f} | {ce} |")
    best = {arm: max(c["topic"] for c in curve[1:] or curve) for arm, curve in curves.items()}
    gap = {}
    mlm_arms, d2v_arms = [x for x in curves if x in MLM_MASKS], [x for x in curves if x not in MLM_MASKS]
    if mlm_arms and d2v_arms:
        for i, c in enumerate(curves[arms[0]]):
            gap[c["step"]] = round(max(curves[x][i]["topic"] for x in d2v_arms)
                                   - max(curves[x][i]["topic"] for x in mlm_arms), 3)
    print(json.dumps({"curves": curves, "unigram_ce": round(uni, 3), "best_topic": best,
                      "d2v_minus_mlm_topic": gap, "steps": a.steps, "vocab_size": base.model.frontend.vocab_size,
                      "overrides": sets}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
