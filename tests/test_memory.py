"""The pre-flight memory estimate: an upper bound of measured steps, and refusals that name fields."""
import json
import os
import subprocess
import sys

import pytest

from pipeline.config import ConfigError
from pipeline.train.config import resolve
from pipeline.train.memory import GB, check_memory, estimate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_estimate_bounds_the_measured_peak_of_real_steps():
    """Two real steps per config in a fresh process (benchmarks/memory_estimate.py): the estimate
    is at least the measured peak RSS and at most twice it."""
    r = subprocess.run([sys.executable, "benchmarks/memory_estimate.py", "--config", "image,demo,d2v2,32",
                        "--config", "audio,demo,d2v2,32"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert 1.0 <= res["min_ratio"] and res["max_ratio"] <= 2.0, res


def test_base_image_recipe_on_224px_is_refused_where_it_cannot_fit():
    cfg = resolve("image", "d", "o", "base", None, {"train.num_workers": 2, "train.worker_memory_gb": 8},
                  model_frontend={"image_size": 224})
    with pytest.raises(ConfigError) as e:
        check_memory(cfg)
    msg = str(e.value)
    assert msg.startswith("train.batch_size:") and "model.decoder.clone_batch" in msg and "196 tokens" in msg
    assert estimate(cfg)["total"] > 8 * GB
    small = resolve("image", "d", "o", "base", None, {"train.batch_size": 1, "train.worker_memory_gb": 8},
                    model_frontend={"image_size": 224})
    check_memory(small)  # batch 1 fits in 8 GiB


def test_pretrain_refuses_an_oversized_step_before_ray_starts(demo_shards, tmp_path):
    r = subprocess.run([sys.executable, "-m", "jobs.pretrain", "--modality", "image", "--data", demo_shards["image"],
                        "--output", str(tmp_path / "o"), "--set", "train.batch_size=200000"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error: train.batch_size: a step needs about"), r.stderr
    assert not (tmp_path / "o").exists()  # nothing started


def test_finetuning_estimate_has_no_teacher_or_decoder_and_refuses_an_oversized_step():
    from pipeline.train.config import resolve_finetune

    pre = resolve("image", "d", "o", "base", None, {"train.batch_size": 64, "train.worker_memory_gb": 8},
                  model_frontend={"image_size": 224})
    ft = resolve_finetune(modality="image", task="classify", init="scratch", model=pre.model, train_data="d",
                          val_data="v", test_data="t", output="o", labels=[str(i) for i in range(10)],
                          preset_name="base", overrides={"train.batch_size": 64, "train.worker_memory_gb": 8})
    parts = estimate(ft)
    assert "teacher" not in parts and "decoder" not in parts
    # the whole 197-token sequence of every image goes through the encoder (no clones, no masking)
    assert parts["attention"] == 64 * 12 * 197 * 197 * 12 * 2 * 4
    with pytest.raises(ConfigError, match=r"^train\.batch_size: a step needs about .*196 tokens per sample"):
        check_memory(ft)
    small = resolve_finetune(modality="image", task="classify", init="scratch", model=pre.model, train_data="d",
                             val_data="v", test_data="t", output="o", labels=["a", "b"], preset_name="base",
                             overrides={"train.batch_size": 8, "train.worker_memory_gb": 8})
    check_memory(small)
