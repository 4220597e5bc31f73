"""FLOP counting and the machine's matmul rate, shared by the benchmarks.

    with counter() as fc:          # torch's FlopCounterMode with grouped-conv backward fixed
        step()
    fc.get_total_flops()
    matmul_peak(device)            # FLOP/s of a large GEMM: fp32 on CPU, bf16 on CUDA

torch 2.11's formula for `convolution_backward` ignores `groups`: for a grouped convolution
(data2vec 2.0's decoders, the audio positional conv with 16 groups) it counts ~17× the forward
instead of 2× (checked: Conv1d 768→768, k=7, groups=16). `counter()` replaces it with
forward FLOPs × (grad_input needed + grad_weight needed), exact for any `groups`.
"""
from __future__ import annotations

import time

import torch
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count


def _conv_backward_flop(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                        _output_padding, _groups, output_mask, out_shape=None) -> int:
    forward = conv_flop_count(list(x_shape), list(w_shape), list(grad_out_shape), transposed=transposed)
    return forward * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


def counter() -> FlopCounterMode:
    return FlopCounterMode(display=False, custom_mapping={
        torch.ops.aten.convolution_backward: _conv_backward_flop})


def sync(device: torch.device) -> None:
    """Wait for queued CUDA work before reading the clock (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(device: torch.device | None = None, trials: int = 3) -> float:
    """Best FLOP/s over a few timed runs of a large square GEMM (2048² fp32 on CPU, 8192² bf16 on
    CUDA), each long enough (~0.5 s on this CPU) to be timed reliably."""
    device = device or torch.device("cpu")
    cuda = device.type == "cuda"
    n, dtype = (8192, torch.bfloat16) if cuda else (2048, torch.float32)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    reps = 50 if cuda else 10
    for _ in range(3):
        a @ b
    best = 0.0
    for _ in range(trials):
        sync(device)
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync(device)
        best = max(best, 2 * n ** 3 * reps / (time.perf_counter() - t))
    return best
