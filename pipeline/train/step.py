"""One optimizer step of data2vec pretraining, written once. Ray Train workers, the in-process
harness (benchmarks/harness.py) and fine-tuning all call `train_step`, so the autocast / compiled
path is the one everything runs. No Ray here: DDP is plain torch.distributed.

    micro-batches [(inputs, mask)] (this rank's share of the step, step_layout)
      └ the step's sample size: loss positions counted from the masks, summed over every rank
      └ for each: forward (bf16 autocast on GPU) → health check, agreed by every rank →
                  backward of (its loss sum / the step's sample size) (DDP all-reduces on the
                  last micro-batch only)
    → clip → optimizer step (LR from the schedule × lr_scale) → EMA teacher update → metrics

The normalization is fairseq's (data2vec2.py returns the loss summed over masked steps with
`sample_size = masked.sum()`; trainer.py all-reduces sample_size and scales the gradients by
world / sample_size): the update is the mean over every loss position of the global batch, however
the batch is cut into workers and micro-batches, uneven shares and variable lengths included.
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Callable

import torch
import torch.distributed as dist

from pipeline.model.data2vec import Data2Vec
from pipeline.model.objective import HEALTHY, health_error, step_health
from pipeline.train.config import TrainConfig


def lr_at(step: int, t: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): a pure function, so resume needs no state."""
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    if t.schedule == "cosine":
        p = (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps)
        return t.lr * (t.min_lr_scale + (1 - t.min_lr_scale) * 0.5 * (1 + math.cos(math.pi * min(p, 1.0))))
    # tri_stage (fairseq, phase_ratio [warm-up, hold, rest]): hold for tri_stage_hold of the run
    # after the warm-up, then decay exponentially to lr × min_lr_scale.
    hold_end = min(t.max_steps, t.warmup_steps + int(t.tri_stage_hold * t.max_steps))
    if step < hold_end:
        return t.lr
    p = (step - hold_end) / max(1, t.max_steps - hold_end)
    return t.lr * max(t.min_lr_scale, 1e-12) ** min(p, 1.0)


def build_optimizer(model: Data2Vec, t: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over the student; no weight decay on biases, norms, positions, CLS and mask tokens
    (data2vec 2.0's `weight_decay_scale: 0` groups)."""
    decay, no_decay = [], []
    teacher = {id(p) for p in model.teacher_parameters()}
    for name, p in model.named_parameters():
        if id(p) in teacher or not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(("cls", "mask_emb")) else decay).append(p)
    return adamw([{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], t)


def adamw(groups: list[dict], t: TrainConfig) -> torch.optim.Optimizer:
    """torch's fused AdamW (one kernel over every tensor, on CPU and CUDA): the same update as the
    default for-each kernels to float rounding, 2–3% of a base audio 2.0 step faster on CPU
    (benchmarks/README, efficiency). A run resumed from a checkpoint written before (2026-12-04)
    keeps the for-each kernels: loading an optimizer's state restores its saved settings."""
    return torch.optim.AdamW(groups, lr=t.lr, betas=t.betas, eps=t.eps, fused=True)


def autocast_for(device: torch.device) -> Callable[[], object]:
    """A factory of fresh autocast contexts: bf16 on CUDA, none on CPU (tests enter the CPU bf16
    path explicitly with `torch.autocast("cpu", dtype=torch.bfloat16)`)."""
    if device.type == "cuda":
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext


def _agree_on_health(model: Data2Vec, out, step: int, rank: int, world: int) -> None:
    """Every rank learns whether any rank's step is unhealthy and raises the same named error,
    before any backward: a rank that raised alone would leave the others blocked in all-reduce."""
    c = model.cfg.collapse
    code, value = step_health(out.loss.detach(), float(out.target_var), float(out.pred_var), step,
                              c.min_target_var, c.min_pred_var, c.warmup_steps)
    where = ""
    if world > 1:
        table = torch.zeros(world, 2, dtype=torch.float64, device=out.loss.device)  # (rank, [code, value])
        table[rank, 0], table[rank, 1] = code, value
        dist.all_reduce(table)
        bad = (table[:, 0] > 0).nonzero()
        if len(bad):
            r = int(bad[0])
            code, value, where = int(table[r, 0]), float(table[r, 1]), f" (on rank {r})"
    if code != HEALTHY:
        raise health_error(code, value, step, c.min_target_var, c.min_pred_var, where)


def global_sum(values: list[float], device, world: int) -> list[float]:
    """Sums of this rank's micro-batches → sums over every rank (the step's sample size, its
    logged metrics)."""
    x = torch.tensor(values, dtype=torch.float64, device=device)
    if world > 1:
        dist.all_reduce(x)
    return x.tolist()


def train_step(model: Data2Vec, net: torch.nn.Module, opt: torch.optim.Optimizer,
               micro: list[tuple[dict, torch.Tensor]], step: int, t: TrainConfig, *,
               lr_scale: float = 1.0, autocast: Callable[[], object] = nullcontext, rank: int = 0,
               world: int = 1, poison: bool = False) -> dict:
    """Run one optimizer step over this rank's micro-batches of the step.

    `model` is the Data2Vec module; `net` is what runs forward (the model itself, or its DDP
    wrapper). The loss is each micro-batch's sum over its loss positions divided by the step's
    global count G (all ranks, all micro-batches), × world for DDP's average: the gradient is
    that of the global batch's mean, for any cut of it. The image 2.0 CLS term keeps fairseq's
    weight at the recipe's per-GPU batch b (cls_loss × the sum over a b·C-row batch of the
    per-row loss, train.batch_size, which the memory fit never changes): cls_loss × b·C × its
    mean over the step's rows. `poison` makes this step's loss NaN (tests of the health guard).
    Returns the step's metrics (loss: the global batch's; target/pred variance: averaged over
    the loss positions of every rank)."""
    lr = lr_at(step, t) * lr_scale
    for g in opt.param_groups:
        g["lr"] = lr
    device = micro[0][1].device
    G = max(global_sum([sum(model.loss_positions(x, m).sum().item() for x, m in micro)], device, world)[0], 1.0)
    cls_weight = model.cfg.decoder.cls_loss * t.batch_size / t.effective_batch  # × cls_sum: b·C × the rows' mean
    loss = tv = pv = n = 0.0
    for i, (inputs, mask) in enumerate(micro):
        last = i == len(micro) - 1
        # A fresh no_sync() per micro-batch: DDP all-reduces gradients only on the group's last.
        with (net.no_sync() if world > 1 and not last else nullcontext()):
            with autocast():
                out = net(inputs, mask)
            piece = out.sum / G + cls_weight * out.cls_sum  # this micro-batch's part of the step's loss
            if poison:
                piece = piece * float("nan")
                out.loss = out.loss * float("nan")
            _agree_on_health(model, out, step, rank, world)
            (piece * world).backward()
        loss += float(piece.detach())
        tv += float(out.target_var) * out.count
        pv += float(out.pred_var) * out.count
        n += out.count
    loss, tv, pv, n = global_sum([loss, tv, pv, n], device, world)
    grad_norm = float("nan")
    if t.clip_norm > 0:
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.student_parameters(), t.clip_norm))
    opt.step()
    opt.zero_grad(set_to_none=True)
    decay = model.ema_step(step)
    return {"loss": loss, "target_var": tv / max(n, 1), "pred_var": pv / max(n, 1), "lr": lr, "ema_decay": decay,
            "grad_norm": grad_norm}
