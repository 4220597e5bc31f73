"""The pre-flight memory estimate: an upper bound of measured steps, and refusals that name fields."""
import json
import os
import subprocess
import sys

import pytest

from pipeline.config import ConfigError
from pipeline.train.config import resolve
from pipeline.train.memory import GB, check_memory, estimate, fit_memory, with_micro_batch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_estimate_bounds_the_measured_peak_of_real_steps():
    """Two real steps per config in a fresh process (benchmarks/memory_estimate.py), pretraining and
    fine-tuning (20-s clips, frozen CNN): the estimate is at least the measured peak RSS and at most
    twice it."""
    r = subprocess.run([sys.executable, "benchmarks/memory_estimate.py", "--config", "image,demo,d2v2,32",
                        "--config", "audio,demo,d2v2,32", "--config", "ft:audio,demo,classify,16"],
                       cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert 1.0 <= res["min_ratio"] and res["max_ratio"] <= 2.0, res


def test_base_image_recipe_on_224px_fits_by_smaller_micro_batches_or_is_refused():
    """Fit, don't refuse: the largest micro-batch that fits (train.micro_batch), the effective
    batch, batch_size and grad_accum untouched; refused, naming the fields, only when one sample
    does not fit."""
    cfg = resolve("image", "d", "o", "base", None, {"train.num_workers": 2, "train.worker_memory_gb": 8},
                  model_frontend={"image_size": 224})
    assert estimate(cfg)["total"] > 8 * GB
    with pytest.raises(ConfigError) as e:
        check_memory(cfg)
    msg = str(e.value)
    assert msg.startswith("train.batch_size:") and "model.decoder.clone_batch" in msg and "196 tokens" in msg
    assert "train.micro_batch (the same step in smaller pieces)" in msg
    fitted, line = fit_memory(cfg)
    t, f = cfg.train, fitted.train
    assert (f.effective_batch, f.batch_size, f.grad_accum) == (t.effective_batch, t.batch_size, t.grad_accum)
    assert f.micro_batch < t.batch_size and estimate(fitted)["total"] <= 8 * GB
    assert estimate(with_micro_batch(cfg, f.micro_batch + 1))["total"] > 8 * GB  # the largest that fits
    assert line.startswith(f"memory: micro-batches of at most {f.micro_batch} (one of {t.batch_size} needs about")
    assert "of 8.0 (train.worker_memory_gb)" in line and line.endswith(f.batch_line())
    assert fit_memory(fitted) == (fitted, None)  # what fits is left as it is
    tiny = resolve("image", "d", "o", "base", None, {"train.worker_memory_gb": 1}, model_frontend={"image_size": 224})
    with pytest.raises(ConfigError, match=r"^train\.batch_size: a step needs about .*micro-batch 1, 196 tokens"):
        fit_memory(tiny)  # the process alone needs more than 1 GiB


def test_pretrain_refuses_a_step_that_cannot_fit_before_ray_starts(demo_shards, tmp_path):
    r = subprocess.run([sys.executable, "-m", "jobs.pretrain", "--modality", "image", "--data", demo_shards["image"],
                        "--output", str(tmp_path / "o"), "--set", "train.worker_memory_gb=0.5"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error: train.batch_size: a step needs about"), r.stderr
    assert not (tmp_path / "o").exists()  # nothing started


def test_audio_finetuning_estimate_keeps_no_activations_of_a_frozen_cnn():
    from pipeline.recipes import recipe
    from pipeline.train.config import resolve_finetune
    model = recipe("audio", "d2v2", "demo").model
    kw = dict(modality="audio", task="classify", model=model, train_data="d", val_data="v", test_data="t",
              output="o", labels=["a", "b"], preset_name="demo")
    frozen = estimate(resolve_finetune(init="/x/final", overrides={"finetune.freeze_feature_encoder": True},
                                       **kw))  # as the base recipe and CTC freeze it
    trained = estimate(resolve_finetune(init="scratch", **kw))  # scratch trains it
    from pipeline.model.finetune import frozen_cnn_chunk
    from pipeline.train.memory import CNN_MAPS_TRAINED
    B, L, C, T = 16, 320_000, model.frontend.conv_channels, 999
    encoder = trained["activations"] - B * L // 5 * C * CNN_MAPS_TRAINED * 4  # a trained CNN keeps its maps
    assert frozen_cnn_chunk(L) == 2
    # a frozen one runs 2 clips at a time before the encoder; only its outputs stay
    assert frozen["activations"] == max(encoder, 2 * L // 5 * C * 4 * 4) + 2 * B * T * C * 4


def test_finetuning_estimate_has_no_teacher_or_decoder_and_refuses_an_oversized_step():
    from pipeline.train.config import resolve_finetune

    pre = resolve("image", "d", "o", "base", None, {"train.batch_size": 64, "train.worker_memory_gb": 8},
                  model_frontend={"image_size": 224})
    ft = resolve_finetune(modality="image", task="classify", init="scratch", model=pre.model, train_data="d",
                          val_data="v", test_data="t", output="o", labels=[str(i) for i in range(10)],
                          preset_name="base", overrides={"train.batch_size": 64, "train.worker_memory_gb": 8})
    parts = estimate(ft)
    assert "teacher" not in parts and "decoder" not in parts
    # the whole 197-token sequence of every image goes through the encoder (no clones, no masking);
    # without attention dropout (the 2.0 recipe) the fused attention kernel keeps a log-sum-exp per
    # row, with it (the 1.0 recipe: 0.05) three (S × S) tensors: softmax out, dropout mask, dropped
    assert parts["attention"] == 64 * 12 * 197 * 12 * 4
    v1 = resolve("image", "d", "o", "base", None, {"model.mode": "d2v1"}, model_frontend={"image_size": 224})
    ft1 = resolve_finetune(modality="image", task="classify", init="/x/final", model=v1.model, train_data="d",
                           val_data="v", test_data="t", output="o", labels=["a", "b"], preset_name="base",
                           overrides={"train.batch_size": 64})
    assert ft1.model.encoder.attn_dropout == 0.05 and estimate(ft1)["attention"] == 64 * 12 * 197 * 197 * 12 * 3 * 4
    with pytest.raises(ConfigError, match=r"^train\.batch_size: a step needs about .*196 tokens per sample"):
        check_memory(ft)
    small = resolve_finetune(modality="image", task="classify", init="scratch", model=pre.model, train_data="d",
                             val_data="v", test_data="t", output="o", labels=["a", "b"], preset_name="base",
                             overrides={"train.batch_size": 8, "train.worker_memory_gb": 8})
    check_memory(small)
