"""Targets, masked regression loss and the collapse guard. No Ray."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


class RepresentationCollapse(RuntimeError):
    """Target or prediction variance fell below its floor after the warm-up."""


class NonFiniteLoss(RuntimeError):
    """The loss is NaN or infinite."""


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 activations (autocast) → fp32 for targets and losses; fp32/fp64 stay as they are."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def instance_norm(x: torch.Tensor, pad: torch.Tensor | None, eps: float = 1e-5) -> torch.Tensor:
    """Normalize each channel over time, using only real (non-padded) steps. x: (B, T, D)."""
    if pad is None:
        mean = x.mean(1, keepdim=True)
        var = x.var(1, unbiased=False, keepdim=True)
    else:
        w = (~pad).to(x.dtype)[..., None]  # (B, T, 1)
        n = w.sum(1, keepdim=True).clamp(min=1)
        mean = (x * w).sum(1, keepdim=True) / n
        var = ((x - mean) ** 2 * w).sum(1, keepdim=True) / n
    return (x - mean) / torch.sqrt(var + eps)


def _norm(x, kind, pad):
    if kind == "instance":
        return instance_norm(x, pad)
    if kind == "layer":
        return F.layer_norm(x, x.shape[-1:])
    return x


def make_targets(layers: list[torch.Tensor], pad: torch.Tensor | None, layer_norm: str,
                 final_norm: str) -> torch.Tensor:
    """Average of the given teacher layers (B, T, D) each normalized, then optionally normalized."""
    y = sum(_norm(at_least_fp32(l), layer_norm, pad) for l in layers) / len(layers)
    return _norm(y, final_norm, pad)


def regression_loss(pred: torch.Tensor, target: torch.Tensor, beta: float,
                    scale: float | None) -> torch.Tensor:
    """(N, D) predictions vs targets at masked steps → summed over D, scaled (default 1/√D),
    averaged over the N masked steps."""
    return regression_sum(pred, target, beta, scale) / max(pred.shape[0], 1)


def regression_sum(pred: torch.Tensor, target: torch.Tensor, beta: float, scale: float | None,
                   per_row: bool = False) -> torch.Tensor:
    """(N, D) predictions vs targets → the loss summed over D, scaled (default 1/√D), and summed
    over the N steps (fairseq data2vec2 `d2v_loss` summed: the step divides by its sample size);
    `per_row`: the (N,) per-step values."""
    pred = at_least_fp32(pred)
    if beta == 0:
        per = F.mse_loss(pred, target, reduction="none")
    else:
        per = F.smooth_l1_loss(pred, target, reduction="none", beta=beta)
    scale = 1.0 / math.sqrt(pred.shape[-1]) if scale is None else scale
    rows = per.sum(-1) * scale
    return rows if per_row else rows.sum()


def feature_std(x: torch.Tensor) -> torch.Tensor:
    """Mean over channels of the std across tokens (fairseq compute_var). x: (N, D)."""
    x = x.detach().float().reshape(-1, x.shape[-1])
    if x.shape[0] < 2:
        return torch.zeros((), device=x.device)
    return torch.sqrt(x.var(dim=0) + 1e-6).mean()


HEALTHY, NON_FINITE, TARGET_COLLAPSE, PRED_COLLAPSE = range(4)


def step_health(loss: torch.Tensor, target_var: float, pred_var: float, step: int,
                min_target_var: float, min_pred_var: float, warmup_steps: int) -> tuple[int, float]:
    """(code, offending value): HEALTHY, or why this step must not train (a number every rank
    can share in one all-reduce, so all of them stop together)."""
    if not torch.isfinite(loss):
        return NON_FINITE, float(loss)
    if step >= warmup_steps:
        if target_var < min_target_var:
            return TARGET_COLLAPSE, target_var
        if pred_var < min_pred_var:
            return PRED_COLLAPSE, pred_var
    return HEALTHY, 0.0


def health_error(code: int, value: float, step: int, min_target_var: float, min_pred_var: float,
                 where: str = "") -> RuntimeError:
    """The named error for a non-HEALTHY code."""
    if code == NON_FINITE:
        return NonFiniteLoss(f"loss is {value} at step {step}{where}")
    if code == TARGET_COLLAPSE:
        return RepresentationCollapse(
            f"target variance {value:.4g} < min_target_var={min_target_var} at step {step}{where}")
    return RepresentationCollapse(
        f"prediction variance {value:.4g} < min_pred_var={min_pred_var} at step {step}{where}")


def check_step(loss: torch.Tensor, target_var: float, pred_var: float, step: int,
               min_target_var: float, min_pred_var: float, warmup_steps: int) -> None:
    """Raise a named error instead of training on garbage."""
    code, value = step_health(loss, target_var, pred_var, step, min_target_var, min_pred_var, warmup_steps)
    if code != HEALTHY:
        raise health_error(code, value, step, min_target_var, min_pred_var)
