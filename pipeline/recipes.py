"""Training recipes: one per (modality, mode, size), each owning its model *and* its optimisation.

    r = recipe("audio", "d2v2", "base", **data_settings)   # → Recipe(model=ModelConfig, train={...})

`base` / `large` are the reference's settings, read from fairseq's configs (facebookresearch/fairseq
@ 3d262bb, examples/data2vec/config/…; file named in each function). `demo` scales each recipe down
so it learns visibly in minutes on 2 CPU cores. `tests/test_recipes.py` checks every resolved base /
large value against a table copied from those configs. Where we cannot follow the reference, the
line says so and why.

Batch sizes are per worker (per GPU in the reference); base/large recipes also set
`train.reference_batch` (per-GPU batch × the reference's GPU count): the run's effective batch on
any worker count (train/config.py step_layout), so 4 GPUs reproduce a 16-GPU recipe's step.
No Ray, no data code: configs only.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from pipeline.config import ConfigError
from pipeline.model.config import (CollapseConfig, DecoderConfig, EMAConfig, EncoderConfig, FrontEndConfig,
                                   LossConfig, MaskConfig, ModelConfig, TargetConfig)

SIZES = ("demo", "base", "large")
WIDTHS = {"demo": (128, 4, 4), "base": (768, 12, 12), "large": (1024, 24, 16)}  # (dim, depth, heads)
DEMO_MAX_GRID = 14  # demo image recipes keep the patch grid at most 14 × 14 for any image size


@dataclass(frozen=True)
class Recipe:
    model: ModelConfig
    train: dict
    """TrainConfig fields this recipe sets (the rest keep TrainConfig's defaults)."""


def demo_patch_size(image_size: int) -> int:
    """Smallest patch (≥ 4 px) that divides `image_size` and keeps the grid ≤ 14 × 14 — so the demo
    recipe stays small on 224-px folders (16-px patches) as on 28-px MNIST (4-px patches)."""
    lo = max(4, -(-image_size // DEMO_MAX_GRID))
    return next(p for p in range(lo, image_size + 1) if image_size % p == 0)


def _demo_image_frontend(fe: dict) -> FrontEndConfig:
    px = fe.get("image_size", 28)
    return FrontEndConfig(**{"patch_size": demo_patch_size(px), **fe, "image_size": px})


def _encoder(size: str, dropout: float, attn_dropout: float, **kw) -> EncoderConfig:
    dim, depth, heads = WIDTHS[size]
    return EncoderConfig(dim=dim, depth=depth, heads=heads, dropout=dropout, attn_dropout=attn_dropout, **kw)


# Demo runs: few hundred steps, batch 32, on a laptop; dropout off (too short to overfit).
DEMO_TRAIN = dict(max_steps=300, batch_size=32, lr=1e-3, warmup_steps=30, weight_decay=0.05, schedule="cosine",
                  min_lr_scale=0.01, betas=(0.9, 0.98), eps=1e-6, clip_norm=4.0, checkpoint_every=100,
                  log_every=10, audio_max_samples=16_000, audio_batching="pad", text_max_tokens=64)
DEMO_EMA = EMAConfig(decay=0.999, end_decay=0.9999, anneal_end_step=2000)


# ----------------------------------------------------------------------------- image
# The view of every image each epoch (train.augment & co., drawn in the Ray Data read tasks from
# (seed, epoch, row id): pipeline/augment.py). fairseq examples/data2vec/data/mae_image_dataset.py,
# MaeImageDataset: data2vec 2.0 trains on RandomResizedCrop(224, scale=(0.2, 1.0), bicubic) +
# RandomHorizontalFlip; data2vec 1.0 (`beit_transforms`) on ColorJitter(0.4, 0.4, 0.4) +
# RandomHorizontalFlip + RandomResizedCropAndInterpolationWithTwoPic(224, scale=(0.08, 1.0),
# ratio=(3/4, 4/3), bicubic). Both normalize with ImageNet's mean/std (batches.image_tensor).
D2V2_VIEWS = dict(augment="crop", crop_scale=(0.2, 1.0), crop_ratio=(3 / 4, 4 / 3), hflip=0.5, color_jitter=0.0)
D2V1_VIEWS = dict(augment="crop", crop_scale=(0.08, 1.0), crop_ratio=(3 / 4, 4 / 3), hflip=0.5, color_jitter=0.4)
# Fine-tuning (fairseq mae_finetuning_image_dataset.py → timm create_transform, is_training): random
# resized crop (0.08, 1.0) + flip; evaluation resizes to size / 0.875 and center-crops (augment.py).
# Deviation: timm's RandAugment (rand-m9-mstd0.5-inc1), random erasing (0.25) and mixup/cutmix are
# not modelled.
FINETUNE_VIEWS = dict(augment="crop", crop_scale=(0.08, 1.0), crop_ratio=(3 / 4, 4 / 3), hflip=0.5,
                      color_jitter=0.0)
# Demo recipes (28-px digits): the evaluation view every epoch, as before augmentation existed: the
# demo's budget (300 steps) and its measured probe were set without it, and a flip turns digits
# into other shapes. `--set train.augment=crop` turns the reference's crops on.
DEMO_VIEWS = dict(augment="none")


def image_d2v1(size: str, fe: dict) -> Recipe:
    """fairseq vision/pretraining/base_imagenet_d2v1.yaml (the fairseq port of the paper's BEiT code).
    Not modelled: drop_path 0.25, layer scale 1e-4 and the shared relative position bias (we use
    fixed sin-cos positions). fairseq ships no d2v1 large config: `large` puts base's optimisation
    on the large encoder with the paper's top-6 targets."""
    if size == "demo":
        f = _demo_image_frontend(fe)
        return Recipe(ModelConfig(
            modality="image", mode="d2v1", frontend=f,
            encoder=_encoder(size, 0.0, 0.0, pre_norm=True, layer_output="block"),
            mask=MaskConfig(prob=0.6, min_block=4),
            target=TargetConfig(top_k=3, layer_norm="layer", final_norm="layer"),
            loss=LossConfig(beta=2.0, scale=1.0 / 128),
            ema=replace(DEMO_EMA, ema_local=True, ema_context=True)), dict(DEMO_TRAIN, **DEMO_VIEWS))
    return Recipe(ModelConfig(
        modality="image", mode="d2v1", frontend=FrontEndConfig(**fe),
        encoder=_encoder(size, 0.0, 0.05, pre_norm=True, layer_output="block"),  # end-of-block targets
        mask=MaskConfig(prob=75 / 196, min_block=16),  # num_mask_patches 75 (code default) of 14×14
        target=TargetConfig(top_k=6, layer_norm="none", final_norm="layer"),  # layer_norm_targets
        loss=LossConfig(beta=2.0, scale=None),  # loss_beta 2, loss_scale null → 1/√D
        # ema_transformer_only: the teacher averages the encoder, fed the student's patch features
        ema=EMAConfig(decay=0.999, end_decay=0.9998, anneal_end_step=375_300)),
        dict(max_steps=375_300, batch_size=128, lr=5e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05,
             clip_norm=3.0, schedule="cosine", warmup_steps=12_510, min_lr_scale=0.0,
             checkpoint_every=2000, reference_batch=128 * 16, **D2V1_VIEWS))  # × 16 GPUs


def image_d2v2(size: str, fe: dict) -> Recipe:
    """fairseq v2/base_images_only_task.yaml, v2/large_images_only_task.yaml. Deviation: fairseq's
    base runs 2 prenet blocks + 10 shared blocks and regresses the 10 shared ones; our 12 blocks
    with top-10 targets regress the same layers.
    Demo size: 2 masked clones per image, not 16. On the demo digits (batch 32, 300-step cosine)
    the probe passed 1.0's 1000-step accuracy after 75 / 75 / 100 steps with 2 / 4 / 8 clones
    (seed 0) and 50 / 100 / 50 (seed 1), and a step with 2 clones costs ~0.09 s vs 0.25 s with 8:
    at this scale more clones buy no sample efficiency, only time (benchmarks/README.md,
    time_to_accuracy)."""
    if size == "demo":
        f = _demo_image_frontend(fe)
        return Recipe(ModelConfig(
            modality="image", mode="d2v2", frontend=f, encoder=_encoder(size, 0.0, 0.0),
            mask=MaskConfig(prob=0.8, length=2, adjust=0.07),
            target=TargetConfig(top_k=3, layer_norm="instance", final_norm="layer"),
            ema=replace(DEMO_EMA, ema_local=True, ema_context=True),
            decoder=DecoderConfig(dim=128, kernel=3, layers=3, groups=16, clone_batch=2, cls_loss=0.01)),
            dict(DEMO_TRAIN, **DEMO_VIEWS))
    base = size == "base"
    return Recipe(ModelConfig(
        modality="image", mode="d2v2", frontend=FrontEndConfig(**fe), encoder=_encoder(size, 0.0, 0.0),
        mask=MaskConfig(prob=0.8 if base else 0.75, length=3, adjust=0.07 if base else 0.1),
        target=TargetConfig(top_k=10 if base else 18, layer_norm="instance", final_norm="layer"),
        ema=EMAConfig(decay=0.9998, end_decay=0.99999, anneal_end_step=100_000 if base else 150_000,
                      ema_local=True, ema_context=True),  # ema_local_encoder: a full copy minus decoder
        decoder=DecoderConfig(dim=768 if base else 1024, kernel=3 if base else 5, layers=6 if base else 3,
                              groups=16, clone_batch=16, cls_loss=0.01),
        collapse=CollapseConfig(min_target_var=0.0, min_pred_var=0.0)),  # the image configs turn it off
        dict(max_steps=375_300, batch_size=16 if base else 8, lr=1e-3 if base else 4e-4, betas=(0.9, 0.95),
             eps=1e-8, weight_decay=0.05, clip_norm=4.0, schedule="cosine", warmup_steps=50_040,
             min_lr_scale=0.0, checkpoint_every=2000, reference_batch=(16 if base else 8) * 16,
             **D2V2_VIEWS))  # × 16 GPUs


# ----------------------------------------------------------------------------- audio
# fairseq batches audio by samples (max_tokens); our batch counts clips, cropped to the batch's
# shortest (audio_batching "crop") and at most 20 s (320k samples), as fairseq pretraining crops.
def audio_d2v1(size: str, fe: dict) -> Recipe:
    """fairseq audio/pretraining/base_librispeech.yaml. Not modelled: encoder_layerdrop 0.05.
    No d2v1 large config exists: `large` puts base's optimisation on the large encoder."""
    if size == "demo":
        return Recipe(ModelConfig(
            modality="audio", mode="d2v1", encoder=_encoder(size, 0.0, 0.0),
            frontend=FrontEndConfig(**{"conv_channels": 128, "conv_pos_width": 38, "conv_pos_depth": 2, **fe}),
            mask=MaskConfig(prob=0.65, length=10), target=TargetConfig(top_k=3, layer_norm="instance"),
            ema=DEMO_EMA), dict(DEMO_TRAIN))
    return Recipe(ModelConfig(
        modality="audio", mode="d2v1", frontend=FrontEndConfig(**fe), encoder=_encoder(size, 0.1, 0.1),
        mask=MaskConfig(prob=0.65, length=10), target=TargetConfig(top_k=8, layer_norm="instance"),
        ema=EMAConfig(decay=0.999, end_decay=0.9999, anneal_end_step=30_000)),  # ema_transformer_only
        # max_tokens 3.8M samples/GPU ≈ 12 clips of 20 s; × 16 GPUs. tri_stage [0.03, 0.9, 0.07].
        dict(max_steps=400_000, batch_size=12, lr=5e-4, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.01,
             clip_norm=0.0, schedule="tri_stage", warmup_steps=12_000, min_lr_scale=0.01,
             audio_max_samples=320_000, audio_batching="crop", shuffle_buffer=256, checkpoint_every=2000,
             reference_batch=12 * 16))


def audio_d2v2(size: str, fe: dict) -> Recipe:
    """fairseq v2/base_audio_only_task.yaml, v2/large_audio_only_task.yaml. Not modelled: ALiBi
    attention biases (see AudioFrontEnd), layerdrop 0.05, decoder input dropout 0.1 and the large
    model's 8 prenet blocks (our large runs 24 blocks with top-16 targets)."""
    if size == "demo":
        return Recipe(ModelConfig(
            modality="audio", mode="d2v2", encoder=_encoder(size, 0.0, 0.0),
            frontend=FrontEndConfig(**{"conv_channels": 128, "conv_pos_width": 38, "conv_pos_depth": 2, **fe}),
            mask=MaskConfig(prob=0.5, length=5, adjust=0.05), target=TargetConfig(top_k=3, layer_norm="instance"),
            ema=replace(DEMO_EMA, ema_context=True),
            # 2 masked copies and 10 warm-up steps, not 8 and 30 (2026-12-04, 1-s digit clips, batch 32,
            # probe every 5 steps): the CNN runs once per clip whatever the copies, so the copies buy
            # little — 8 copies 1.03 s/step, 0.865 at step 25; 2 copies 0.77 s/step, 0.862 at step 25 — and the
            # shorter warm-up reaches 0.904 by step 25 (benchmarks/README, time to accuracy).
            decoder=DecoderConfig(dim=128, kernel=7, layers=3, groups=16, clone_batch=2)),
            {**DEMO_TRAIN, "warmup_steps": 10})
    base = size == "base"
    return Recipe(ModelConfig(
        modality="audio", mode="d2v2", frontend=FrontEndConfig(**fe), encoder=_encoder(size, 0.1, 0.1),
        mask=MaskConfig(prob=0.5 if base else 0.55, length=5, adjust=0.05 if base else 0.1),
        target=TargetConfig(top_k=8 if base else 16, layer_norm="instance"),
        # ema_local_encoder false: the teacher owns EMA positions + blocks, fed the student's CNN
        ema=EMAConfig(decay=0.999 if base else 0.9997, end_decay=0.99999 if base else 1.0,
                      anneal_end_step=75_000 if base else 300_000, ema_context=True),
        decoder=DecoderConfig(dim=384 if base else 768, kernel=7, layers=4, groups=16,
                              clone_batch=8 if base else 12)),
        # base: max_tokens 1M/GPU ≈ 4 clips × 8 GPUs; large: 320k ≈ 1 clip × 48 GPUs
        dict(max_steps=400_000 if base else 600_000, batch_size=4 if base else 1, lr=7.5e-4 if base else 4e-4,
             betas=(0.9, 0.98), eps=1e-6, weight_decay=0.01, clip_norm=0.0 if base else 1.0, schedule="cosine",
             warmup_steps=8000 if base else 10_000, min_lr_scale=0.0, audio_max_samples=320_000,
             audio_batching="crop", shuffle_buffer=256, checkpoint_every=2000,
             reference_batch=4 * 8 if base else 1 * 48))


# ----------------------------------------------------------------------------- text
def text_d2v1(size: str, fe: dict) -> Recipe:
    """fairseq text/pretraining/base.yaml: the released config masks spans (35%, multiples of 4
    tokens, every selected token → <mask>; the paper text describes BERT 15% 80/10/10, which
    `model.mask.prob=0.15 model.mask.length=1 model.mask.bert_corrupt=true` gives). No d2v1 large
    config exists: `large` puts base's optimisation on the large encoder.
    Deviation at demo size: the paper's BERT masking, not the released spans. Over 10 epochs of the
    demo corpus it learns word order (bigram-shift probe 0.485 → 0.546), where span masking leaves
    it at chance; neither moves the topic probe (benchmarks/README.md, text_control)."""
    if size == "demo":
        return Recipe(ModelConfig(
            modality="text", mode="d2v1", frontend=FrontEndConfig(**{"max_positions": 128, **fe}),
            encoder=_encoder(size, 0.0, 0.0), mask=MaskConfig(prob=0.15, length=1, bert_corrupt=True),
            target=TargetConfig(top_k=3, layer_norm="layer"), loss=LossConfig(beta=4.0, scale=1.0),
            head_layers=2, ema=DEMO_EMA), dict(DEMO_TRAIN))
    return Recipe(ModelConfig(
        modality="text", mode="d2v1", frontend=FrontEndConfig(**fe), encoder=_encoder(size, 0.1, 0.1),
        mask=MaskConfig(prob=0.35, length=4, bert_corrupt=False),
        target=TargetConfig(top_k=10, layer_norm="layer"), loss=LossConfig(beta=4.0, scale=1.0), head_layers=2,
        ema=EMAConfig(decay=0.999, end_decay=0.9999, anneal_end_step=300_000)),  # ema_transformer_layers_only
        # max_tokens 8192/GPU = 16 rows of 512 tokens; × 16 GPUs
        dict(max_steps=1_000_000, batch_size=16, lr=2e-4, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.01,
             clip_norm=5.0, schedule="cosine", warmup_steps=10_000, min_lr_scale=0.0, text_max_tokens=512,
             checkpoint_every=2000, reference_batch=16 * 16))


def text_d2v2(size: str, fe: dict) -> Recipe:
    """fairseq v2/base_text_only_task.yaml, v2/large_text_only_task.yaml. Deviation: fairseq feeds
    the teacher the student's embedding output *with* its dropout; our teacher never sees dropout."""
    if size == "demo":
        return Recipe(ModelConfig(
            modality="text", mode="d2v2", frontend=FrontEndConfig(**{"max_positions": 128, **fe}),
            encoder=_encoder(size, 0.0, 0.0), mask=MaskConfig(prob=0.48, length=1),
            target=TargetConfig(top_k=3, layer_norm="instance"), loss=LossConfig(scale=1.0), ema=DEMO_EMA,
            decoder=DecoderConfig(dim=128, kernel=9, layers=3, groups=1, residual=False, projection_layers=2,
                                  clone_batch=4)), dict(DEMO_TRAIN))
    base = size == "base"
    return Recipe(ModelConfig(
        modality="text", mode="d2v2", frontend=FrontEndConfig(**fe), encoder=_encoder(size, 0.1, 0.1),
        mask=MaskConfig(prob=0.48 if base else 0.5, length=1),
        target=TargetConfig(top_k=12 if base else 24, layer_norm="instance" if base else "layer",
                            final_norm="none" if base else "instance"),
        loss=LossConfig(scale=1.0), ema=EMAConfig(decay=0.9999, end_decay=0.99999, anneal_end_step=100_000),
        decoder=DecoderConfig(dim=768, kernel=9, layers=5, groups=1, residual=False,
                              projection_layers=2, clone_batch=8)),
        # base: 4 rows of 512 tokens × 16 GPUs; large: 2 × 32 GPUs
        dict(max_steps=1_000_000 if base else 600_000, batch_size=4 if base else 2, lr=2e-4 if base else 1e-4,
             betas=(0.9, 0.98), eps=1e-6, weight_decay=0.01, clip_norm=1.0, schedule="cosine", warmup_steps=4000,
             min_lr_scale=0.0, text_max_tokens=512, checkpoint_every=2000,
             reference_batch=4 * 16 if base else 2 * 32))


RECIPES = {("image", "d2v1"): image_d2v1, ("image", "d2v2"): image_d2v2, ("audio", "d2v1"): audio_d2v1,
           ("audio", "d2v2"): audio_d2v2, ("text", "d2v1"): text_d2v1, ("text", "d2v2"): text_d2v2}


def recipe(modality: str, mode: str = "d2v2", size: str = "base", **frontend) -> Recipe:
    """The recipe for (modality, mode, size); `frontend` carries data-derived settings (image_size,
    vocab_size) and explicit front-end overrides."""
    if size not in SIZES:
        raise ConfigError(f"preset: unknown {size!r}; expected one of {', '.join(SIZES)}")
    if (modality, mode) not in RECIPES:
        if modality not in ("image", "audio", "text"):
            raise ConfigError(f"model.modality: must be image, audio or text, got {modality!r}")
        raise ConfigError(f"model.mode: must be 'd2v1' or 'd2v2', got {mode!r}")
    return RECIPES[modality, mode](size, dict(frontend))


# ----------------------------------------------------------------------------- fine-tuning
@dataclass(frozen=True)
class FineTuneRecipe:
    train: dict
    """TrainConfig fields."""
    task: dict
    """TaskConfig fields."""
    dropout: float
    """Encoder (and text embedding) dropout while fine-tuning."""
    attn_dropout: float | None = None
    """Attention dropout while fine-tuning; None: `dropout`."""


def finetune_recipe(modality: str, task: str, size: str, pre_norm: bool = False) -> FineTuneRecipe:
    """Fine-tuning recipe for (modality, task, size); `pre_norm`: the encoder to fine-tune is pre-LN
    (image: data2vec 1.0 / BEiT layout) or post-LN (data2vec 2.0).

    base/large take the values of the fairseq fine-tuning configs each modality cites (every one
    checked against a table from those files in tests/test_recipes.py; fairseq @ 3d262bb):
    - image, post-LN (2.0): examples/data2vec/config/vision/finetuning/mae_imagenet_clean.yaml —
      lr 1e-3, batch 32 × 16 GPUs = 512, Adam β (0.9, 0.95), eps 1e-8, wd 0.05, cosine to min_lr
      1e-6, 16k warm-up, 250.2k updates, no clipping; MaeImageClassificationConfig's layer decay
      0.65, drop-path 0.1, label smoothing 0.1, mean pooling + fc_norm.
    - image, pre-LN (1.0): examples/data2vec/config/vision/finetuning/imagenet.yaml — lr 5e-4,
      batch 64 × 8 GPUs = 512, Adam β (0.9, 0.98), eps 1e-6, wd 0.01, cosine to 0, 10k warm-up,
      100k updates, no clipping, no layer decay; label smoothing 0.1 (its model config's default);
      drop-path 0.25 and attention dropout 0.05 come from the checkpoint's pretraining config
      (vision/pretraining/base_imagenet_d2v1.yaml), which that model does not override; it also
      replaces the encoder's final norm by an Identity, as our head does. Deviation: its plain
      Adam decays every weight, ours exempts biases and norms (as data2vec 2.0's groups do).
      Deviation, both: mixup/cutmix (0.7-0.8 / 1.0) and RandAugment are not modelled.
    - audio: examples/wav2vec/config/finetuning/base_100h.yaml (data2vec's README fine-tunes audio
      with the wav2vec configs) — lr 3e-5, Adam β (0.9, 0.98), eps 1e-8, wd 0, tri_stage phases
      [0.1, 0.4, 0.5] to final scale 0.05, 80k updates, no clipping, freeze_finetune_updates 0,
      feature_grad_mult 0 (frozen CNN), time masks p 0.65 × 10 frames, dropout 0. Its batch is
      max_tokens 3.2M samples (200 s) × 2 GPUs × update_freq 4; ours is 8 clips of ≤ 20 s (≤ 2.56M
      samples) × reference 8. Deviation: layerdrop 0.1, activation dropout 0.1 and channel masks
      (p 0.5 × 64) are not modelled.
    - text: examples/data2vec/config/v2/text_finetuning/sst_2.yaml (RoBERTa's finetuning/sst_2.yaml
      has the same values but lr 1e-5) — lr 2e-5, batch 32 on 1 GPU, Adam β (0.9, 0.98), eps 1e-6,
      wd 0.1, no clipping, 1 256 warm-up of 20 935 updates, pooler dropout 0, encoder dropout 0.1.
      Deviation: its polynomial (linear) decay to 0 is our cosine to 0.

    `demo` scales them to minutes on 2 CPU cores: higher LR (small, briefly trained encoders),
    fewer steps, time masks shortened to one-second digit clips, gradient clipping at 1.0, and audio
    classification trains the CNN (a CNN pretrained for minutes is no feature extractor to freeze;
    measured in the recipe below). Deviation,
    demo only: image and audio classification standardize the pooled features over the batch before the head
    (`finetune.feature_bn`, MAE's linear-probe head). The demo's encoders, pretrained for minutes,
    put every sample near one common vector that a new head cannot read for tens of steps; measured
    2026-11-29 (`benchmarks.finetune`, 10% labels, test accuracy): image 0.681 → 0.779; audio
    0.600 → 0.742 with the norm alone (0.719 together with the fine-tuning tri-stage phases, which
    at 100% labels lift audio from 0.704 to 0.881). Text keeps RoBERTa's head (with the norm:
    0.348 → 0.331, it overfits sooner).

    A `scratch` init (the baseline) trains every layer at the full LR from the first step: the audio
    CNN is not frozen, there is no layer-wise decay and no head warm-up (resolve_finetune) — a
    random encoder has nothing to protect, and freezing or slowing it would handicap the baseline."""
    if size not in SIZES:
        raise ConfigError(f"preset: unknown {size!r}; expected one of {', '.join(SIZES)}")
    demo = size == "demo"
    # A labeled folder is often class-sorted; pretraining's 1024-row shuffle window over 64-row
    # chunks then holds ~16 class blocks, so the label mix drifts from window to window and the
    # classifier chases it (measured: the demo's image fine-tuning did not learn at 100% labels,
    # while 10% — one window — did). 4096 rows mix better; audio base keeps 1024 (memory).
    common = dict(log_every=10, checkpoint_every=100 if demo else 2000,
                  shuffle_buffer=1024 if (modality == "audio" and not demo) else 4096)
    demo_opt = dict(betas=(0.9, 0.999), eps=1e-8, clip_norm=1.0, min_lr_scale=0.01)
    if modality == "image":
        if demo:
            return FineTuneRecipe(
                {**common, **demo_opt, **DEMO_VIEWS, "max_steps": 300, "batch_size": 32, "lr": 1e-3,
                 "warmup_steps": 30, "weight_decay": 0.05, "schedule": "cosine", "eval_every": 50,
                 "reference_batch": None},
                {"task": task, "layer_decay": 0.75, "drop_path": 0.1, "label_smoothing": 0.1, "feature_bn": True},
                dropout=0.0)
        if pre_norm:  # vision/finetuning/imagenet.yaml: batch 64 × 8 GPUs
            return FineTuneRecipe(
                {**common, "max_steps": 100_000, "batch_size": 64, "reference_batch": 64 * 8, "lr": 5e-4,
                 "betas": (0.9, 0.98), "eps": 1e-6, "weight_decay": 0.01, "clip_norm": 0.0, "schedule": "cosine",
                 "warmup_steps": 10_000, "min_lr_scale": 0.0, "eval_every": 2500, **FINETUNE_VIEWS},
                {"task": task, "layer_decay": 1.0, "drop_path": 0.25, "label_smoothing": 0.1, "feature_bn": False},
                dropout=0.0, attn_dropout=0.05)
        return FineTuneRecipe(  # vision/finetuning/mae_imagenet_clean.yaml: batch 32 × 16 GPUs
            {**common, "max_steps": 250_200, "batch_size": 32, "reference_batch": 32 * 16, "lr": 1e-3,
             "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.05, "clip_norm": 0.0, "schedule": "cosine",
             "warmup_steps": 16_000, "min_lr_scale": 1e-6 / 1e-3, "eval_every": 2500, **FINETUNE_VIEWS},
            {"task": task, "layer_decay": 0.65, "drop_path": 0.1, "label_smoothing": 0.1, "feature_bn": False},
            dropout=0.0)
    if modality == "audio":
        ctc = task == "ctc"
        if demo:
            return FineTuneRecipe(
                {**common, **demo_opt, "max_steps": 600 if ctc else 300, "batch_size": 16, "lr": 1e-3,
                 "warmup_steps": 60 if ctc else 30, "weight_decay": 0.01, "audio_max_samples": 320_000,
                 # fairseq's tri_stage phases; the demo's CTC keeps the peak for 90% and ends at 1%: it
                 # emits only blanks for its first ~175 steps, and its measured curves (README) were
                 # taken with that schedule.
                 "schedule": "tri_stage", "tri_stage_hold": 0.9 if ctc else 0.4, "min_lr_scale": 0.01 if ctc else 0.05,
                 "eval_every": 50, "reference_batch": None},
                # Deviation, demo classification only: the CNN trains (fairseq freezes it, after 400k
                # pretraining steps). A CNN pretrained for minutes on the demo's digits is no feature
                # extractor to keep: on unseen speech (spoken language identification, 8 languages,
                # benchmarks.finetune langid, 10% labels, 200 steps, 2026-12-04) the demo encoder
                # reached 0.308 test accuracy frozen, 0.723 training its CNN, scratch 0.650. CTC keeps
                # it frozen (its measured curves, README).
                {"task": task, "freeze_feature_encoder": ctc, "feature_bn": not ctc,
                 # Deviation, demo CTC only: 30 head-only steps (fairseq base_100h has
                 # freeze_finetune_updates 0); a minutes-long run's random head otherwise drags the
                 # briefly pretrained encoder for its first steps.
                 "freeze_encoder_steps": 30 if ctc else 0, "mask_time_prob": 0.1, "mask_time_length": 4},
                dropout=0.0)
        return FineTuneRecipe(  # wav2vec/config/finetuning/base_100h.yaml
            {**common, "max_steps": 80_000, "batch_size": 8, "reference_batch": 8 * 8, "lr": 3e-5,
             "betas": (0.9, 0.98), "eps": 1e-8, "weight_decay": 0.0, "clip_norm": 0.0, "warmup_steps": 8_000,
             "schedule": "tri_stage", "tri_stage_hold": 0.4, "min_lr_scale": 0.05, "audio_max_samples": 320_000,
             "eval_every": 2000},
            {"task": task, "freeze_feature_encoder": True, "feature_bn": False, "freeze_encoder_steps": 0,
             "mask_time_prob": 0.65, "mask_time_length": 10},
            dropout=0.0)
    if modality == "text":
        if demo:
            return FineTuneRecipe(
                {**common, **demo_opt, "max_steps": 300, "batch_size": 32, "lr": 5e-4, "warmup_steps": 18,
                 "weight_decay": 0.01, "schedule": "cosine", "text_max_tokens": 128, "eval_every": 50,
                 "reference_batch": None},
                {"task": task, "head_dropout": 0.1},
                dropout=0.1)
        return FineTuneRecipe(  # data2vec/config/v2/text_finetuning/sst_2.yaml: batch 32 on one GPU
            {**common, "max_steps": 20_935, "batch_size": 32, "reference_batch": 32, "lr": 2e-5,
             "betas": (0.9, 0.98), "eps": 1e-6, "weight_decay": 0.1, "clip_norm": 0.0, "warmup_steps": 1_256,
             "schedule": "cosine", "min_lr_scale": 0.0, "text_max_tokens": 512, "eval_every": 1000},
            {"task": task, "head_dropout": 0.0},
            dropout=0.1)
    raise ConfigError(f"modality: must be image, audio or text, got {modality!r}")


def preset(modality: str, size: str = "base", mode: str = "d2v2", **frontend) -> ModelConfig:
    """The model half of the recipe for (modality, mode, size); `frontend` carries data-derived
    settings (image_size, vocab_size) and overrides."""
    return recipe(modality, mode, size, **frontend).model
