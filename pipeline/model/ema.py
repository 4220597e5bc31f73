"""EMA teacher arithmetic: the decay schedule and the in-place update. No Ray."""
from __future__ import annotations

import torch


def ema_decay_at(step: int, decay: float, end_decay: float, anneal_end_step: int) -> float:
    """Linear anneal from `decay` to `end_decay` over `anneal_end_step` updates, then constant.

    A pure function of the step, so resuming needs no schedule state (fairseq get_annealed_rate).
    """
    if anneal_end_step <= 0 or step >= anneal_end_step:
        return end_decay
    return decay + (end_decay - decay) * step / anneal_end_step


@torch.no_grad()
def ema_update(teacher: list[torch.Tensor], student: list[torch.Tensor], decay: float) -> None:
    """teacher ← decay·teacher + (1-decay)·student, in fp32, with fused foreach kernels."""
    if decay >= 1.0:
        return  # the reference skips the step once the teacher is frozen
    src = [s.detach().to(t.dtype) for s, t in zip(student, teacher)]
    torch._foreach_mul_(teacher, decay)
    torch._foreach_add_(teacher, src, alpha=1.0 - decay)
