"""Every base/large recipe value against a table copied from fairseq's data2vec configs
(facebookresearch/fairseq @ 3d262bb, examples/data2vec/config/; file per row group below), and
`jobs.pretrain --print-config`."""
import os
import subprocess
import sys

import pytest
import yaml

from pipeline.recipes import demo_patch_size, recipe
from pipeline.train.config import resolve

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# data/mae_image_dataset.py, MaeImageDataset (data2vec 2.0 images): RandomResizedCrop(224, scale=(0.2, 1.0),
# bicubic; torchvision's default ratio 3/4–4/3) + RandomHorizontalFlip() (p=0.5); no colour jitter.
D2V2_IMAGE_VIEWS = {"train.augment": "crop", "train.crop_scale": [0.2, 1.0], "train.crop_ratio": [3 / 4, 4 / 3],
                    "train.hflip": 0.5, "train.color_jitter": 0.0}
# data/mae_finetuning_image_dataset.py → timm create_transform(is_training=True): RandomResizedCrop
# (scale=(0.08, 1.0), ratio=(3/4, 4/3), bicubic) + flip 0.5; with auto_augment set, timm applies no
# colour jitter. RandAugment, random erasing and mixup/cutmix are not modelled (recipes.py says so).
FINETUNE_IMAGE_VIEWS = {"train.augment": "crop", "train.crop_scale": [0.08, 1.0], "train.crop_ratio": [3 / 4, 4 / 3],
                        "train.hflip": 0.5, "train.color_jitter": 0.0}

# (modality, mode, size) → {dotted field: reference value}. Batch = per GPU (× the GPU count noted).
REFERENCE = {
    # vision/pretraining/base_imagenet_d2v1.yaml (batch 128 × 16 GPUs)
    ("image", "d2v1", "base"): {
        "train.reference_batch": 2048,
        "train.lr": 5e-4, "train.betas": [0.9, 0.999], "train.eps": 1e-8, "train.weight_decay": 0.05,
        "train.clip_norm": 3.0, "train.schedule": "cosine", "train.warmup_steps": 12_510,
        "train.max_steps": 375_300, "train.batch_size": 128, "train.min_lr_scale": 0.0,
        "model.mask.prob": 75 / 196, "model.mask.min_block": 16, "model.target.top_k": 6,
        "model.target.layer_norm": "none", "model.target.final_norm": "layer", "model.loss.beta": 2.0,
        "model.loss.scale": None, "model.ema.decay": 0.999, "model.ema.end_decay": 0.9998,
        "model.ema.anneal_end_step": 375_300, "model.ema.ema_local": False, "model.ema.ema_context": False,
        "model.encoder.pre_norm": True, "model.encoder.layer_output": "block", "model.encoder.attn_dropout": 0.05,
        "model.encoder.dim": 768, "model.encoder.depth": 12, "model.encoder.heads": 12,
        "model.frontend.patch_size": 16,
        # data/mae_image_dataset.py, MaeImageDataset with beit_transforms: ColorJitter(0.4, 0.4, 0.4),
        # RandomHorizontalFlip(p=0.5), RandomResizedCropAndInterpolationWithTwoPic(scale=(0.08, 1.0),
        # ratio=(3/4, 4/3), bicubic)
        **{"train.augment": "crop", "train.crop_scale": [0.08, 1.0], "train.crop_ratio": [3 / 4, 4 / 3],
           "train.hflip": 0.5, "train.color_jitter": 0.4}},
    # v2/base_images_only_task.yaml (16 × 16 GPUs)
    ("image", "d2v2", "base"): {
        "train.reference_batch": 256,
        "train.lr": 1e-3, "train.betas": [0.9, 0.95], "train.eps": 1e-8, "train.weight_decay": 0.05,
        "train.clip_norm": 4.0, "train.schedule": "cosine", "train.warmup_steps": 50_040,
        "train.max_steps": 375_300, "train.batch_size": 16, "train.min_lr_scale": 0.0,
        "model.mask.prob": 0.8, "model.mask.length": 3, "model.mask.adjust": 0.07,
        "model.decoder.clone_batch": 16, "model.target.top_k": 10, "model.target.layer_norm": "instance",
        "model.target.final_norm": "layer", "model.loss.beta": 0.0, "model.loss.scale": None,
        "model.decoder.cls_loss": 0.01, "model.ema.decay": 0.9998, "model.ema.end_decay": 0.99999,
        "model.ema.anneal_end_step": 100_000, "model.ema.ema_local": True,
        "model.decoder.dim": 768, "model.decoder.kernel": 3, "model.decoder.groups": 16, "model.decoder.layers": 6,
        "model.decoder.residual": True, "model.decoder.mask_noise_std": 0.01,
        "model.encoder.dropout": 0.0, "model.encoder.attn_dropout": 0.0, "model.encoder.dim": 768,
        "model.encoder.heads": 12, "model.collapse.min_target_var": 0.0, "model.collapse.min_pred_var": 0.0,
        **D2V2_IMAGE_VIEWS},
    # v2/large_images_only_task.yaml (8 × 16 GPUs)
    ("image", "d2v2", "large"): {
        "train.reference_batch": 128,
        "train.lr": 4e-4, "train.betas": [0.9, 0.95], "train.eps": 1e-8, "train.weight_decay": 0.05,
        "train.clip_norm": 4.0, "train.warmup_steps": 50_040, "train.max_steps": 375_300, "train.batch_size": 8,
        "model.mask.prob": 0.75, "model.mask.length": 3, "model.mask.adjust": 0.1, "model.decoder.clone_batch": 16,
        "model.target.top_k": 18, "model.ema.decay": 0.9998, "model.ema.end_decay": 0.99999,
        "model.ema.anneal_end_step": 150_000, "model.decoder.dim": 1024, "model.decoder.kernel": 5,
        "model.decoder.layers": 3, "model.encoder.dim": 1024, "model.encoder.depth": 24,
        "model.encoder.heads": 16, "model.encoder.dropout": 0.0, **D2V2_IMAGE_VIEWS},
    # audio/pretraining/base_librispeech.yaml (max_tokens 3.8M × 16 GPUs)
    ("audio", "d2v1", "base"): {
        "train.reference_batch": 192,
        "train.lr": 5e-4, "train.betas": [0.9, 0.98], "train.eps": 1e-6, "train.weight_decay": 0.01,
        "train.clip_norm": 0.0, "train.schedule": "tri_stage", "train.warmup_steps": 12_000,
        "train.max_steps": 400_000, "train.min_lr_scale": 0.01, "train.audio_max_samples": 320_000,
        "train.audio_batching": "crop", "model.mask.prob": 0.65, "model.mask.length": 10,
        "model.target.top_k": 8, "model.target.layer_norm": "instance", "model.loss.beta": 0.0,
        "model.loss.scale": None, "model.ema.decay": 0.999, "model.ema.end_decay": 0.9999,
        "model.ema.anneal_end_step": 30_000, "model.ema.ema_local": False, "model.ema.ema_context": False,
        "model.encoder.dropout": 0.1, "model.encoder.attn_dropout": 0.1, "model.encoder.pre_norm": False,
        "model.frontend.conv_channels": 512, "model.frontend.conv_pos_width": 95,
        "model.frontend.conv_pos_depth": 5, "model.frontend.conv_pos_groups": 16,
        "model.collapse.min_target_var": 0.1, "model.collapse.min_pred_var": 0.01,
        "model.collapse.warmup_steps": 5000},
    # v2/base_audio_only_task.yaml (max_tokens 1M × 8 GPUs)
    ("audio", "d2v2", "base"): {
        "train.reference_batch": 32,
        "train.lr": 7.5e-4, "train.betas": [0.9, 0.98], "train.eps": 1e-6, "train.weight_decay": 0.01,
        "train.clip_norm": 0.0, "train.schedule": "cosine", "train.warmup_steps": 8000,
        "train.max_steps": 400_000, "train.min_lr_scale": 0.0, "train.audio_max_samples": 320_000,
        "model.mask.prob": 0.5, "model.mask.length": 5, "model.mask.adjust": 0.05,
        "model.decoder.clone_batch": 8, "model.target.top_k": 8, "model.target.layer_norm": "instance",
        "model.ema.decay": 0.999, "model.ema.end_decay": 0.99999, "model.ema.anneal_end_step": 75_000,
        "model.ema.ema_local": False, "model.ema.ema_context": True, "model.decoder.dim": 384,
        "model.decoder.kernel": 7, "model.decoder.groups": 16, "model.decoder.layers": 4,
        "model.encoder.dropout": 0.1, "model.encoder.attn_dropout": 0.1},
    # v2/large_audio_only_task.yaml (max_tokens 320k × 48 GPUs)
    ("audio", "d2v2", "large"): {
        "train.reference_batch": 48,
        "train.lr": 4e-4, "train.clip_norm": 1.0, "train.warmup_steps": 10_000, "train.max_steps": 600_000,
        "model.mask.prob": 0.55, "model.mask.adjust": 0.1, "model.decoder.clone_batch": 12,
        "model.target.top_k": 16, "model.ema.decay": 0.9997, "model.ema.end_decay": 1.0,
        "model.ema.anneal_end_step": 300_000, "model.decoder.dim": 768, "model.encoder.dim": 1024},
    # text/pretraining/base.yaml (max_tokens 8192 = 16 × 512 tokens × 16 GPUs)
    ("text", "d2v1", "base"): {
        "train.reference_batch": 256,
        "train.lr": 2e-4, "train.betas": [0.9, 0.98], "train.eps": 1e-6, "train.weight_decay": 0.01,
        "train.clip_norm": 5.0, "train.schedule": "cosine", "train.warmup_steps": 10_000,
        "train.max_steps": 1_000_000, "train.batch_size": 16, "train.text_max_tokens": 512,
        "model.mask.prob": 0.35, "model.mask.length": 4, "model.mask.bert_corrupt": False,
        "model.target.top_k": 10, "model.target.layer_norm": "layer", "model.loss.beta": 4.0,
        "model.loss.scale": 1.0, "model.head_layers": 2, "model.ema.decay": 0.999,
        "model.ema.end_decay": 0.9999, "model.ema.anneal_end_step": 300_000, "model.ema.ema_local": False,
        "model.frontend.max_positions": 512, "model.encoder.dropout": 0.1},
    # v2/base_text_only_task.yaml (4 × 16 GPUs)
    ("text", "d2v2", "base"): {
        "train.reference_batch": 64,
        "train.lr": 2e-4, "train.betas": [0.9, 0.98], "train.eps": 1e-6, "train.weight_decay": 0.01,
        "train.clip_norm": 1.0, "train.schedule": "cosine", "train.warmup_steps": 4000,
        "train.max_steps": 1_000_000, "train.batch_size": 4, "train.min_lr_scale": 0.0,
        "model.mask.prob": 0.48, "model.mask.length": 1, "model.decoder.clone_batch": 8,
        "model.target.top_k": 12, "model.target.layer_norm": "instance", "model.target.final_norm": "none",
        "model.loss.scale": 1.0, "model.loss.beta": 0.0, "model.ema.decay": 0.9999,
        "model.ema.end_decay": 0.99999, "model.ema.anneal_end_step": 100_000, "model.decoder.dim": 768,
        "model.decoder.kernel": 9, "model.decoder.groups": 1, "model.decoder.layers": 5,
        "model.decoder.residual": False, "model.decoder.projection_layers": 2, "model.encoder.dropout": 0.1},
    # v2/large_text_only_task.yaml (2 × 32 GPUs)
    ("text", "d2v2", "large"): {
        "train.reference_batch": 64,
        "train.lr": 1e-4, "train.max_steps": 600_000, "train.batch_size": 2, "train.warmup_steps": 4000,
        "model.mask.prob": 0.5, "model.target.top_k": 24, "model.target.layer_norm": "layer",
        "model.target.final_norm": "instance", "model.decoder.dim": 768, "model.encoder.dim": 1024,
        "model.encoder.depth": 24},
}


def _get(d: dict, dotted: str):
    for k in dotted.split("."):
        d = d[k]
    return d


@pytest.mark.parametrize("key", sorted(REFERENCE), ids=lambda k: "-".join(k))
def test_recipe_matches_reference_config(key):
    modality, mode, size = key
    fe = {"image": {"image_size": 224}, "text": {"vocab_size": 50_000}}.get(modality, {})
    cfg = resolve(modality, "data", "out", size, None, {"model.mode": mode}, model_frontend=fe).to_dict()
    wrong = {k: (_get(cfg, k), v) for k, v in REFERENCE[key].items()
             if not (_get(cfg, k) == pytest.approx(v) if isinstance(v, float) else _get(cfg, k) == v)}
    assert not wrong, wrong  # field: (ours, reference)


# Fine-tuning (modality, task, encoder) → {dotted field: the cited config's value} (fairseq @ 3d262bb).
# Batch = per GPU (reference_batch = × its GPU count). Fields a config leaves unset take fairseq's
# defaults: clip_norm 0, weight_decay 0, min_lr 0.
FINETUNE_REFERENCE = {
    # examples/data2vec/config/vision/finetuning/mae_imagenet_clean.yaml (+ MaeImageClassificationConfig)
    ("image", "classify", "post-LN"): {
        "train.lr": 1e-3, "train.batch_size": 32, "train.reference_batch": 512, "train.betas": [0.9, 0.95],
        "train.eps": 1e-8, "train.weight_decay": 0.05, "train.schedule": "cosine", "train.warmup_steps": 16_000,
        "train.max_steps": 250_200, "train.min_lr_scale": 1e-6 / 1e-3, "train.clip_norm": 0.0,
        "finetune.layer_decay": 0.65, "finetune.drop_path": 0.1, "finetune.label_smoothing": 0.1,
        "model.encoder.dropout": 0.0, "model.encoder.attn_dropout": 0.0, **FINETUNE_IMAGE_VIEWS},
    # examples/data2vec/config/vision/finetuning/imagenet.yaml (+ Data2VecImageClassificationConfig)
    ("image", "classify", "pre-LN"): {
        "train.lr": 5e-4, "train.batch_size": 64, "train.reference_batch": 512, "train.betas": [0.9, 0.98],
        "train.eps": 1e-6, "train.weight_decay": 0.01, "train.schedule": "cosine", "train.warmup_steps": 10_000,
        "train.max_steps": 100_000, "train.min_lr_scale": 0.0, "train.clip_norm": 0.0,
        "finetune.layer_decay": 1.0, "finetune.label_smoothing": 0.1,
        # not overridden by that model: the checkpoint's pretraining config (pretraining/base_imagenet_d2v1.yaml)
        "finetune.drop_path": 0.25, "model.encoder.attn_dropout": 0.05, "model.encoder.dropout": 0.0,
        **FINETUNE_IMAGE_VIEWS},
    # examples/wav2vec/config/finetuning/base_100h.yaml (batch: max_tokens 3.2M × 2 GPUs × update_freq 4)
    **{("audio", task, "post-LN"): {
        "train.lr": 3e-5, "train.reference_batch": 64, "train.betas": [0.9, 0.98], "train.eps": 1e-8,
        "train.weight_decay": 0.0, "train.schedule": "tri_stage", "train.warmup_steps": 8_000,
        "train.tri_stage_hold": 0.4, "train.min_lr_scale": 0.05, "train.max_steps": 80_000, "train.clip_norm": 0.0,
        "finetune.freeze_encoder_steps": 0, "finetune.freeze_feature_encoder": True,
        "finetune.mask_time_prob": 0.65, "finetune.mask_time_length": 10,
        "model.encoder.dropout": 0.0, "model.encoder.attn_dropout": 0.0} for task in ("classify", "ctc")},
    # examples/data2vec/config/v2/text_finetuning/sst_2.yaml (batch 32 on 1 GPU; polynomial decay to 0)
    ("text", "classify", "post-LN"): {
        "train.lr": 2e-5, "train.batch_size": 32, "train.reference_batch": 32, "train.betas": [0.9, 0.98],
        "train.eps": 1e-6, "train.weight_decay": 0.1, "train.clip_norm": 0.0, "train.warmup_steps": 1_256,
        "train.max_steps": 20_935, "train.min_lr_scale": 0.0, "finetune.head_dropout": 0.0,
        "model.encoder.dropout": 0.1, "model.encoder.attn_dropout": 0.1},
}


@pytest.mark.parametrize("key", sorted(FINETUNE_REFERENCE), ids=lambda k: "-".join(k))
def test_finetune_recipe_matches_reference_config(key):
    """Through resolve_finetune (what jobs.finetune runs), from a pretrained init of that layout."""
    import dataclasses

    from pipeline.train.config import resolve_finetune
    modality, task, layout = key
    fe = {"image": {"image_size": 224}, "text": {"vocab_size": 50_000}}.get(modality, {})
    model = recipe(modality, "d2v1" if layout == "pre-LN" else "d2v2", "base", **fe).model
    assert model.encoder.pre_norm == (layout == "pre-LN")
    model = dataclasses.replace(model, target=dataclasses.replace(model.target, top_k=1))
    cfg = resolve_finetune(modality=modality, task=task, init="/ckpt/final", model=model, train_data="a",
                           val_data="b", test_data="c", output="o", labels=["x", "y"], preset_name="base").to_dict()
    wrong = {k: (_get(cfg, k), v) for k, v in FINETUNE_REFERENCE[key].items()
             if not (_get(cfg, k) == pytest.approx(v) if isinstance(v, float) else _get(cfg, k) == v)}
    assert not wrong, wrong  # field: (ours, reference)


def test_demo_recipe_keeps_the_patch_grid_small_for_any_image_size():
    for px, patch in ((28, 4), (32, 4), (64, 8), (96, 8), (100, 10), (224, 16), (384, 32)):
        assert demo_patch_size(px) == patch
        for mode in ("d2v1", "d2v2"):
            f = recipe("image", mode, "demo", image_size=px).model.frontend
            assert f.image_size // f.patch_size <= 14


def test_print_config_is_a_config_file_that_resolves_to_itself(tmp_path):
    r = subprocess.run([sys.executable, "-m", "jobs.pretrain", "--modality", "audio", "--preset", "base",
                        "--print-config", "--set", "train.lr=3e-4"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    printed = yaml.safe_load(r.stdout)
    assert printed["train"]["lr"] == 3e-4 and printed["train"]["warmup_steps"] == 8000
    assert printed["model"]["decoder"]["clone_batch"] == 8 and "modality" not in printed
    f = tmp_path / "c.yaml"
    f.write_text(r.stdout)
    again = resolve("audio", "data", "out", "base", str(f), {})
    assert again.to_dict()["model"] == printed["model"]
    assert again.to_dict()["train"] == {**printed["train"], "betas": list(printed["train"]["betas"])}


def test_print_config_shows_the_image_views_and_set_turns_them_off():
    r = subprocess.run([sys.executable, "-m", "jobs.pretrain", "--modality", "image", "--preset", "base",
                        "--print-config"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    t = yaml.safe_load(r.stdout)["train"]
    assert (t["augment"], t["crop_scale"], t["hflip"], t["color_jitter"]) == ("crop", [0.2, 1.0], 0.5, 0.0)
    off = resolve("image", "data", "out", "base", None, {"train.augment": "none"}, model_frontend={"image_size": 224})
    assert off.train.augment == "none" and off.train.crop_scale == (0.2, 1.0)  # only the switch moved
    assert resolve("image", "d", "o", "demo", None, {}, model_frontend={"image_size": 28}).train.augment == "none"
    from pipeline.config import ConfigError
    with pytest.raises(ConfigError, match="train.augment"):
        resolve("image", "d", "o", "base", None, {"train.augment": "mixup"}, model_frontend={"image_size": 224})


def test_audio_finetune_schedule_follows_fairseq_phases():
    """fairseq's wav2vec2/data2vec audio fine-tuning: tri_stage with phase ratio [0.1, 0.4, 0.5] and
    final_lr_scale 0.05 (examples/wav2vec/config/finetuning/base_100h.yaml): the LR holds the peak to
    50% of the run, then decays to 5% of it."""
    from pipeline.recipes import finetune_recipe
    from pipeline.train.config import TrainConfig
    from pipeline.train.step import lr_at

    for task in ("classify", "ctc"):
        t = TrainConfig(**finetune_recipe("audio", task, "base").train)
        assert (t.warmup_steps, t.max_steps, t.lr) == (8_000, 80_000, 3e-5)
        assert lr_at(39_999, t) == t.lr and lr_at(40_001, t) < t.lr
        assert lr_at(80_000, t) == pytest.approx(0.05 * t.lr)
    demo = TrainConfig(**finetune_recipe("audio", "classify", "demo").train)
    assert lr_at(149, demo) == demo.lr and lr_at(300, demo) == pytest.approx(0.05 * demo.lr)


def test_demo_text_d2v1_masks_like_bert_and_steps():
    """The demo text 1.0 recipe (BERT 15%, 80/10/10; benchmarks/README.md text_control): ~15% of
    real tokens selected, ~80% of those become <mask> (id 4 with the demo tokenizer), the rest
    random or kept, and the loss is finite with gradients on the student."""
    import numpy as np
    import torch

    from pipeline.model.data2vec import Data2Vec, draw_masks
    cfg = recipe("text", "d2v1", "demo", vocab_size=500).model
    assert (cfg.mask.prob, cfg.mask.length, cfg.mask.bert_corrupt) == (0.15, 1, True)
    rng = np.random.default_rng(0)
    ids = rng.integers(5, 500, (32, 64))
    m = draw_masks(cfg, 32, 64, np.random.default_rng(1), lengths=np.full(32, 64), input_ids=ids)
    sel, out = m["mask"], m["input_ids_masked"]
    assert 0.12 < sel.mean() < 0.18 and (out[~sel] == ids[~sel]).all()
    assert 0.7 < (out[sel] == 4).mean() < 0.9 and (out[sel] == ids[sel]).mean() < 0.2
    torch.manual_seed(0)
    model = Data2Vec(cfg)
    res = model({"input_ids": torch.from_numpy(ids), "input_ids_masked": torch.from_numpy(out)},
                torch.from_numpy(sel))
    res.loss.backward()
    assert torch.isfinite(res.loss) and res.num_masked == int((out == 4).sum())
    assert model.frontend.tokens.weight.grad.abs().sum() > 0


def test_demo_audio_classification_trains_its_cnn_and_ctc_keeps_it_frozen():
    """A pretrained init: the demo's classification trains the CNN (a minutes-long pretraining's CNN
    is no feature extractor to freeze, recipes.py); demo CTC and the base recipe freeze it."""
    from pipeline.train.config import resolve_finetune
    model = recipe("audio", "d2v2", "demo").model
    frozen = {}
    for task, size in (("classify", "demo"), ("ctc", "demo"), ("classify", "base")):
        cfg = resolve_finetune(modality="audio", task=task, init="/ckpt/final", model=model, train_data="a",
                               val_data="b", test_data="c", output="o", labels=["x", "y"], preset_name=size)
        frozen[task, size] = cfg.finetune.freeze_feature_encoder
    assert frozen == {("classify", "demo"): False, ("ctc", "demo"): True, ("classify", "base"): True}
