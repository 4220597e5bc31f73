"""Fine-tuning's optimizer (layer-wise LR decay) and step: the supervised loss of the step's global
batch over this rank's micro-batches, the head-only warm-up, the same LR schedules as pretraining
(train/step.py)."""
from __future__ import annotations

from contextlib import nullcontext
from typing import Callable

import torch
import torch.distributed as dist

from pipeline.finetune.tasks import loss_fn
from pipeline.train.config import TrainConfig
from pipeline.train.step import adamw, global_sum, lr_at


def build_finetune_optimizer(model, t: TrainConfig, layer_decay: float = 1.0) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters, one group per (depth, weight decay or not); each group's
    `lr_scale` is layer_decay^(depth + 1 - its depth) (BEiT's layer-wise LR decay; 1 = off)."""
    top = model.cfg.encoder.depth + 1
    groups: dict = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        lid = model.layer_id(name)
        no_wd = p.ndim <= 1 or name.endswith(("cls", "mask_emb"))
        g = groups.setdefault((lid, no_wd), {"params": [], "weight_decay": 0.0 if no_wd else t.weight_decay,
                                              "lr_scale": layer_decay ** (top - lid), "depth": lid})
        g["params"].append(p)
    return adamw(list(groups.values()), t)


def finetune_step(model, net: torch.nn.Module, opt: torch.optim.Optimizer, micro: list[tuple[dict, dict, object]],
                  step: int, t: TrainConfig, f, *, autocast: Callable[[], object] = nullcontext,
                  world: int = 1) -> dict:
    """One optimizer step of fine-tuning over this rank's micro-batches (inputs, targets, time mask).

    Each micro-batch's loss is summed over its samples and divided by the step's global batch
    (train.effective_batch; × world for DDP's average), as fairseq normalizes by sample_size
    (sentences: classification, and CTC with sentence_avg): the update is the global batch's mean
    however it is cut. BatchNorm (`finetune.feature_bn`) standardizes over each micro-batch, so
    the memory fit never cuts a feature_bn run below train.batch_size. During the head warm-up
    (`f.freeze_encoder_steps`) only the head's (and time-mask embedding's) gradients are applied:
    the others are dropped after the backward (which DDP needs to run on every parameter)."""
    lr = lr_at(step, t)
    for g in opt.param_groups:
        g["lr"] = lr * g["lr_scale"]
    total = 0.0
    for i, (inputs, y, mask) in enumerate(micro):
        last = i == len(micro) - 1
        with (net.no_sync() if world > 1 and not last else nullcontext()):
            with autocast():
                out = net(inputs, mask)
            loss = loss_fn(model, out, y, f.label_smoothing, reduction="sum") / t.effective_batch
            bad = torch.tensor([0.0 if torch.isfinite(loss) else 1.0], device=loss.device)
            if world > 1:  # every rank learns it before any backward's all-reduce (see _agree_on_health)
                dist.all_reduce(bad)
            if bad.item():
                from pipeline.model.objective import NonFiniteLoss
                raise NonFiniteLoss(f"fine-tuning loss is not finite at step {step} (on {int(bad.item())} rank(s))")
            (loss * world).backward()
        total += float(loss.detach())
    if step < f.freeze_encoder_steps:
        for name, p in model.named_parameters():
            if not name.startswith(("head", "mask_emb")):
                p.grad = None
    total, = global_sum([total], next(model.parameters()).device, world)  # the global batch's loss, for the log
    grad_norm = float("nan")
    if t.clip_norm > 0:
        grad_norm = float(torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None],
                                                         t.clip_norm))
    opt.step()
    opt.zero_grad(set_to_none=True)
    return {"loss": total, "lr": lr, "grad_norm": grad_norm}
