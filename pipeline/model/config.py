"""Typed, validated model configs and named presets (demo, base, large) per modality and mode.

Values follow fairseq's data2vec configs (github.com/facebookresearch/fairseq, examples/data2vec/
config/: 1.0 and 2.0, pretraining per modality; the papers arXiv:2202.03555 and 2212.07525); the `demo`
preset is small enough to learn visibly in minutes on 2 CPU cores. A bad value raises
`ConfigError` naming the field (e.g. "model.encoder.heads: ...").
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from pipeline.config import check, check_fields

MODES = ("d2v1", "d2v2")
NORMS = ("instance", "layer", "none")


def _check(cond: bool, name: str, msg: str) -> None:
    check(cond, f"model.{name}", msg)


@dataclass(frozen=True, kw_only=True)
class EncoderConfig:
    dim: int = 768
    depth: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    dropout: float = 0.1
    attn_dropout: float = 0.1
    pre_norm: bool = False
    """False = post-LN blocks (data2vec audio/text and 2.0); True = pre-LN (BEiT/ViT, vision 1.0)."""
    layer_output: str = "ffn"
    """Per-layer output used for targets: "ffn" (FFN output before the last residual/LayerNorm,
    data2vec speech/text/2.0) or "block" (full block output, vision 1.0)."""

    def __post_init__(self):
        _check(self.dim > 0 and self.depth > 0, "encoder.dim/depth", "must be > 0")
        _check(self.heads > 0 and self.dim % self.heads == 0, "encoder.heads",
               f"must divide encoder.dim={self.dim}, got {self.heads}")
        _check(0 <= self.dropout < 1 and 0 <= self.attn_dropout < 1, "encoder.dropout", "must be in [0, 1)")
        _check(self.layer_output in ("ffn", "block"), "encoder.layer_output",
               f"must be 'ffn' or 'block', got {self.layer_output!r}")


@dataclass(frozen=True, kw_only=True)
class FrontEndConfig:
    # image
    image_size: int = 224
    patch_size: int = 16
    cls_token: bool = True
    # audio: wav2vec2 CNN (512,10,5) + (512,3,2)x4 + (512,2,2)x2 → 320x downsampling, 50 Hz
    conv_channels: int = 512
    conv_pos_width: int = 95
    conv_pos_depth: int = 5
    conv_pos_groups: int = 16
    # text
    vocab_size: int = 8000
    max_positions: int = 512
    mask_id: int = 4
    """Id of the tokenizer's <mask> token: 4 for tokenizers trained here, the last id for
    RoBERTa-style ones (50264 for roberta-base); the data's manifest carries it (special_ids)."""

    def __post_init__(self):
        _check(self.image_size % self.patch_size == 0, "frontend.patch_size",
               f"must divide frontend.image_size={self.image_size}, got {self.patch_size}")
        _check(self.conv_channels > 0, "frontend.conv_channels", "must be > 0")
        _check(self.conv_pos_depth >= 1 and self.conv_pos_width >= 3, "frontend.conv_pos_width",
               "needs width >= 3 and depth >= 1")
        _check(self.vocab_size >= 6, "frontend.vocab_size", "must be >= 6 (5 specials + tokens)")
        _check(self.max_positions >= 8, "frontend.max_positions", "must be >= 8")
        _check(4 <= self.mask_id < self.vocab_size, "frontend.mask_id",
               f"must be a non-special id in [4, vocab_size={self.vocab_size}) (0-3 are <s>, <pad>, </s>, "
               f"<unk>), got {self.mask_id}")


@dataclass(frozen=True, kw_only=True)
class MaskConfig:
    prob: float = 0.65
    """Fraction masked: image 1.0 ≈ num_patches/(h·w); audio 1.0 span-start scale; text 1.0
    BERT prob; 2.0: exact masked fraction."""
    length: int = 10
    """Span length (audio 1.0: 10; audio 2.0: 5; image 2.0: block side 3; text 1.0: 1 = BERT)."""
    adjust: float = 0.05
    """2.0 block masking: extra block centres to compensate overlaps (image 0.07, audio 0.05)."""
    min_block: int = 16
    """Image 1.0 BEiT blocks: minimum area in patches."""
    bert_corrupt: bool = True
    """Text 1.0: 80/10/10 replacement (<mask>/random/kept); False = always <mask>."""

    def __post_init__(self):
        _check(0.0 < self.prob < 1.0, "mask.prob", f"must be in (0, 1), got {self.prob}")
        _check(self.length >= 1, "mask.length", "must be >= 1")
        _check(0.0 <= self.adjust < 0.5, "mask.adjust", "must be in [0, 0.5)")


@dataclass(frozen=True, kw_only=True)
class TargetConfig:
    top_k: int = 8
    """Average of the teacher's top-K layer outputs."""
    layer_norm: str = "instance"
    """Normalization of each layer before averaging: "instance" (over time), "layer", "none"."""
    final_norm: str = "none"
    """Normalization of the average: "layer", "instance", "none"."""

    def __post_init__(self):
        _check(self.top_k >= 1, "target.top_k", "must be >= 1")
        _check(self.layer_norm in NORMS, "target.layer_norm", f"must be one of {NORMS}")
        _check(self.final_norm in NORMS, "target.final_norm", f"must be one of {NORMS}")


@dataclass(frozen=True, kw_only=True)
class LossConfig:
    beta: float = 0.0
    """0 → L2; > 0 → smooth L1 with this beta."""
    scale: float | None = None
    """Per-token loss scale; None → 1/sqrt(dim) (data2vec's default)."""

    def __post_init__(self):
        _check(self.beta >= 0, "loss.beta", "must be >= 0")
        _check(self.scale is None or self.scale > 0, "loss.scale", "must be > 0 or null")


@dataclass(frozen=True, kw_only=True)
class EMAConfig:
    decay: float = 0.999
    end_decay: float = 0.9999
    anneal_end_step: int = 30_000
    ema_local: bool = False
    """Teacher owns an EMA copy of the local encoder (patch embed/CNN/token embeddings); False =
    the teacher is fed the student's local features (audio, text)."""
    ema_context: bool = False
    """Teacher owns an EMA copy of the positional encoder; False = uses the student's."""

    def __post_init__(self):
        _check(0.0 <= self.decay <= 1.0, "ema.decay", f"must be in [0, 1], got {self.decay}")
        _check(0.0 <= self.end_decay <= 1.0, "ema.end_decay", f"must be in [0, 1], got {self.end_decay}")
        _check(self.anneal_end_step >= 0, "ema.anneal_end_step", "must be >= 0")


@dataclass(frozen=True, kw_only=True)
class DecoderConfig:
    """data2vec 2.0 convolutional decoder (1-D for audio/text, 2-D for images)."""
    dim: int = 384
    kernel: int = 7
    layers: int = 4
    groups: int = 16
    residual: bool = True
    projection_layers: int = 1
    """Final projection: 1 = Linear(dim, D); 2 = Linear-GELU-Linear (text 2.0)."""
    mask_noise_std: float = 0.01
    clone_batch: int = 8
    """Masks per sample, all sharing one teacher pass."""
    cls_loss: float = 0.0
    """Image 2.0: weight of the CLS output regressing the mean target (0.01 in the reference)."""

    def __post_init__(self):
        _check(self.dim > 0 and self.dim % self.groups == 0, "decoder.groups",
               f"must divide decoder.dim={self.dim}, got {self.groups}")
        _check(self.kernel % 2 == 1, "decoder.kernel", f"must be odd, got {self.kernel}")
        _check(self.layers >= 1, "decoder.layers", "must be >= 1")
        _check(self.projection_layers in (1, 2), "decoder.projection_layers", "must be 1 or 2")
        _check(self.clone_batch >= 1, "decoder.clone_batch", "must be >= 1")


@dataclass(frozen=True, kw_only=True)
class CollapseConfig:
    min_target_var: float = 0.1
    min_pred_var: float = 0.01
    warmup_steps: int = 5000
    """Checks start after this many updates (the reference uses 5000)."""


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    modality: str
    mode: str = "d2v2"
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    frontend: FrontEndConfig = field(default_factory=FrontEndConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    target: TargetConfig = field(default_factory=TargetConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    collapse: CollapseConfig = field(default_factory=CollapseConfig)
    head_layers: int = 1
    """1.0 regression head: 1 = Linear(D, D); 2 = Linear(D, 2D)-GELU-Linear(2D, D) (text)."""

    def __post_init__(self):
        _check(self.modality in ("image", "audio", "text"), "modality",
               f"must be image, audio or text, got {self.modality!r}")
        _check(self.mode in MODES, "mode", f"must be one of {MODES}, got {self.mode!r}")
        _check(self.target.top_k <= self.encoder.depth, "target.top_k",
               f"must be <= encoder.depth={self.encoder.depth}, got {self.target.top_k}")
        _check(self.head_layers in (1, 2), "head_layers", "must be 1 or 2")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        subs = {"encoder": EncoderConfig, "frontend": FrontEndConfig, "mask": MaskConfig,
                "target": TargetConfig, "loss": LossConfig, "ema": EMAConfig,
                "decoder": DecoderConfig, "collapse": CollapseConfig}
        kw = {}
        for k, v in d.items():
            if k in subs:
                known = {f.name for f in dataclasses.fields(subs[k])}
                unknown = set(v) - known
                _check(not unknown, k, f"unknown field(s) {sorted(unknown)}")
                check_fields(subs[k], v, f"model.{k}.")
                kw[k] = subs[k](**v)
            else:
                kw[k] = v
        known = {f.name for f in dataclasses.fields(cls)}
        _check(not set(kw) - known, "", f"unknown field(s) {sorted(set(kw) - known)}")
        check_fields(cls, {k: v for k, v in kw.items() if k not in subs}, "model.")
        return cls(**kw)
