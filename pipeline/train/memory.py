"""Pre-flight memory estimate of one training step, from the resolved config alone (no Ray, no
data): a step that does not fit a worker is cut into smaller micro-batches (train.micro_batch:
the same effective batch and the same update, `fit_memory`); a run is refused, naming the fields
to change, only when a micro-batch of one sample does not fit.

    peak ≈ weights (student + teacher) + gradients + AdamW state (+ DDP buckets)
         + student activations kept for backward   (sequences × tokens × width × depth)
         + attention scores                         (sequences × heads × tokens² × depth)
         + 2.0 decoder activations                  (B·C × all tokens × decoder width × layers)
         + the teacher's forward (no grad: its top-K layer outputs and targets)
         + the process itself (PyTorch + a Ray worker)

The constants (floats saved per token per block) were counted on real steps and the totals checked
against the measured peak RSS of real steps on CPU (benchmarks/memory_estimate.py,
tests/test_memory.py).
"""
from __future__ import annotations

import dataclasses
import os

from pipeline.config import ConfigError
from pipeline.model.finetune import frozen_cnn_chunk
from pipeline.model.frontends import conv_frames
from pipeline.train.config import RunConfig

GB = 1024 ** 3
# A Ray Train worker with torch and the pipeline loaded is 0.63 GiB here (VmHWM at the start of the
# training function); building the model and the first batch takes a bare process from 0.61 to
# 0.73 GiB before any step (benchmarks/memory_estimate.py, "of it, the process"). The same process
# measured 0.83 GiB on another machine of the same kind (CI). 0.27 GiB of it here are resident
# pages of torch's shared libraries (RssFile), a share that can differ between machines (file
# system read-ahead, likely; not pinned down). The constant covers the larger one.
PROCESS_BYTES = 1.0 * GB
# Floats × width kept per token per block through a step. Autograd's saved tensors alone are ~8 × D
# + 2 × MLP width without dropout (qkv, attention out, norms, residuals, fc1 out, GELU); these
# constants also cover the backward's transients.
SAVED_PER_TOKEN = 14
SAVED_PER_HIDDEN = 3
CNN_MAPS_TRAINED = 10  # first-layer-sized maps a trained audio CNN keeps through its backward (7 layers)
OVERHEAD = 1.25  # on what a step allocates and frees: allocator fragmentation, the largest op's temporaries


_COUNTS: dict[str, tuple[int, int]] = {}


def _param_counts(cfg) -> tuple[int, int]:
    """(student, teacher) parameter counts, from the model built on the meta device (no memory),
    once per architecture. Fine-tuning (a FineTuneConfig) has no teacher."""
    key = repr((cfg.model, getattr(cfg, "finetune", None), len(getattr(cfg, "labels", None) or [])))
    if key not in _COUNTS:
        _COUNTS[key] = _count(cfg)
    return _COUNTS[key]


def _count(cfg) -> tuple[int, int]:
    import torch

    from pipeline.model.data2vec import Data2Vec
    from pipeline.model.finetune import FineTuneModel

    if getattr(cfg, "finetune", None) is not None:
        with torch.device("meta"):
            model = FineTuneModel.for_task(cfg.model, cfg.finetune, len(cfg.labels))
        return sum(p.numel() for p in model.parameters()), 0
    with torch.device("meta"):
        model = Data2Vec(cfg.model)
    teacher = sum(p.numel() for p in model.teacher_parameters())
    return sum(p.numel() for p in model.parameters()) - teacher, teacher


def tokens_per_sample(cfg: RunConfig) -> int:
    """Worst-case sequence length T of one sample (image patches, audio frames, text tokens)."""
    m, t = cfg.model, cfg.train
    if m.modality == "image":
        return (m.frontend.image_size // m.frontend.patch_size) ** 2
    if m.modality == "audio":
        return int(conv_frames(t.audio_max_samples))
    return min(t.text_max_tokens, m.frontend.max_positions)


def estimate(cfg) -> dict[str, float]:
    """Peak bytes of one worker's training step, by part (a RunConfig, or a FineTuneConfig: the
    whole unmasked sequence through the encoder and a head, no teacher, no decoder)."""
    m, t = cfg.model, cfg.train
    finetune = getattr(cfg, "finetune", None) is not None
    D, L, H = m.encoder.dim, m.encoder.depth, m.encoder.heads
    hidden = int(D * m.encoder.mlp_ratio)
    T = tokens_per_sample(cfg)
    extra = 1 if m.modality == "image" and m.frontend.cls_token else 0
    B = t.micro  # the largest micro-batch a worker runs
    act = 2 if t.use_gpu else 4  # bf16 autocast on GPU
    if m.mode == "d2v2" and not finetune:
        seqs, S = B * m.decoder.clone_batch, T - int(round(T * m.mask.prob)) + extra
    else:
        seqs, S = B, T + extra
    per_token = SAVED_PER_TOKEN * D + SAVED_PER_HIDDEN * hidden
    parts = {"activations": seqs * S * L * per_token * act}
    if m.encoder.attn_dropout > 0:  # the math kernel: softmax out, dropout mask, dropped scores
        parts["attention"] = seqs * H * S * S * L * 3 * act
    else:  # the fused kernel keeps no (S × S) scores for backward, a log-sum-exp per row
        parts["attention"] = seqs * H * S * L * 4
    if m.mode == "d2v2" and not finetune:
        d = m.decoder
        parts["decoder"] = seqs * T * (D * 3 + d.dim * 4 * d.layers) * act
    # Teacher (no grad): one block's working set + the kept top-K outputs, targets (fp32).
    if not finetune:
        parts["teacher"] = B * (T + extra) * ((m.target.top_k + 3) * D * 4 + per_token * act) + B * H * (T + extra) ** 2 * act
    student, teacher = _param_counts(cfg)
    parts["weights+grads+adam"] = student * 4 * (4 + (1 if t.num_workers > 1 else 0)) + teacher * 4
    if t.on_collapse == "rollback" and not finetune:  # the in-memory copy of the last checkpoint (weights + AdamW)
        parts["rollback snapshot"] = (student * 3 + teacher) * 4
    if m.modality == "audio":  # the waveform, and the CNN's maps: 7 layers ≈ 2× the first's length (L/5)
        parts["inputs"] = B * t.audio_max_samples * 4 * 4
        C = m.frontend.conv_channels
        if finetune and cfg.finetune.freeze_feature_encoder:
            # A frozen CNN runs without grad, a few clips at a time (model.finetune.frozen_cnn), before
            # the encoder: the working set of one chunk (a conv's output, its channel-last copy, the
            # norm's and the GELU's outputs: 4 maps of the first layer's size, measured 3.6–4.1) is gone
            # when the encoder's activations build up; the outputs of all chunks stay.
            chunk = min(B, frozen_cnn_chunk(t.audio_max_samples))
            working = chunk * t.audio_max_samples // 5 * C * 4 * 4
            parts["activations"] = max(parts["activations"], working) + 2 * B * T * C * 4
        else:
            parts["activations"] += B * t.audio_max_samples // 5 * C * CNN_MAPS_TRAINED * act
    state = parts["weights+grads+adam"] + parts.get("rollback snapshot", 0)  # allocated once, in place
    parts["total"] = PROCESS_BYTES + state + (sum(parts.values()) - state) * OVERHEAD
    return parts


def available_per_worker(cfg: RunConfig) -> tuple[float | None, str]:
    """(bytes one worker may use, where that number comes from). None: unknown (no local GPU)."""
    t = cfg.train
    if t.worker_memory_gb is not None:
        return t.worker_memory_gb * GB, "train.worker_memory_gb"
    if t.use_gpu and os.environ.get("RAY_ADDRESS"):
        return None, "a remote cluster (set train.worker_memory_gb)"
    if t.use_gpu:
        import torch

        if torch.cuda.is_available():
            return float(torch.cuda.get_device_properties(0).total_memory), "the local GPU"
        return None, "no local GPU to measure"
    if os.environ.get("RAY_ADDRESS"):  # a remote cluster: this machine says nothing about its nodes
        return None, "a remote cluster (set train.worker_memory_gb)"
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    # Ray's memory monitor kills at 95% of the node; leave room for the object store and Ray Data.
    return total * 0.8 / t.num_workers, f"this machine's memory shared by {t.num_workers} worker(s)"


def with_micro_batch(cfg, micro: int):
    """`cfg` with micro-batches of at most `micro` samples (train.micro_batch): the step, its
    effective batch and its update stay the same (train/step.py normalizes by the global batch)."""
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, micro_batch=micro))


def fit_memory(cfg) -> tuple[object, str | None]:
    """(cfg, None) when a step fits a worker (or the memory is unknown); else (cfg with the
    largest micro-batch that fits, the line saying so and what runs). Raises ConfigError naming
    the fields to change when even a micro-batch of one sample does not fit — or, for a
    fine-tuning head that standardizes over its micro-batch (finetune.feature_bn), any micro-batch
    below train.batch_size (the BatchNorm would see another batch)."""
    parts = estimate(cfg)
    have, source = available_per_worker(cfg)
    if have is None or parts["total"] <= have:
        return cfg, None
    t = cfg.train
    if getattr(getattr(cfg, "finetune", None), "feature_bn", False):
        check_memory(cfg)  # raises, naming the fields
        raise AssertionError("unreachable")
    lo, hi = 1, t.micro - 1  # the largest micro-batch in [lo, hi] that fits: the need grows with it
    if hi < 1 or estimate(with_micro_batch(cfg, 1))["total"] > have:
        check_memory(with_micro_batch(cfg, 1))  # raises, naming the fields
        raise AssertionError("unreachable: a micro-batch of one sample did not fit")
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if estimate(with_micro_batch(cfg, mid))["total"] <= have:
            lo = mid
        else:
            hi = mid - 1
    fitted = with_micro_batch(cfg, lo)
    need = estimate(fitted)["total"]
    return fitted, (f"memory: micro-batches of at most {lo} (one of {t.micro} needs about {parts['total'] / GB:.1f} "
                    f"GiB), estimated {need / GB:.1f} GiB of {have / GB:.1f} ({source}); {fitted.train.batch_line()}")


def check_memory(cfg) -> dict[str, float]:
    """Raise ConfigError, naming the fields to change, when a step cannot fit in a worker."""
    parts = estimate(cfg)
    have, source = available_per_worker(cfg)
    if have is not None and parts["total"] > have:
        m, t = cfg.model, cfg.train
        T = tokens_per_sample(cfg)
        knobs = ["train.micro_batch (the same step in smaller pieces)", "train.batch_size"]
        if getattr(getattr(cfg, "finetune", None), "feature_bn", False):
            knobs[0] = ("finetune.feature_bn=false (its BatchNorm standardizes over a micro-batch of "
                        f"train.batch_size={t.batch_size}: the fit cannot cut it smaller)")
        if m.mode == "d2v2" and getattr(cfg, "finetune", None) is None:
            knobs.append("model.decoder.clone_batch")
        if m.modality == "image":
            knobs.append(f"model.frontend.patch_size ({T} tokens per image; or preprocess with a smaller --image-size)")
        elif m.modality == "audio":
            knobs.append("train.audio_max_samples")
        else:
            knobs.append("train.text_max_tokens")
        knobs += ["model.encoder.dim / depth (or a smaller --preset)", "train.num_workers (on one machine)"]
        big = max((k for k in parts if k != "total"), key=parts.get)
        raise ConfigError(
            f"train.batch_size: a step needs about {parts['total'] / GB:.1f} GiB per worker (largest part: "
            f"{big} {parts[big] / GB:.1f} GiB; micro-batch {t.micro}, {T} tokens per sample, width "
            f"{m.encoder.dim} × depth {m.encoder.depth}) but {source} gives {have / GB:.1f} GiB. Lower one of: "
            f"{'; '.join(knobs)}")
    return parts
