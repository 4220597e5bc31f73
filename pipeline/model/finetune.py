"""Fine-tuning models: the pretrained front end + encoder with a task head. Pure PyTorch, no Ray.

    classify: inputs ─► front end ─► encoder ─► pooled (B, D) ─► head ─► logits (B, num_outputs)
        image: mean over the patch outputs ─► LayerNorm (fc_norm) ─► Linear — the BEiT / MAE /
               data2vec 2.0 fine-tuning head (Hugging Face's Data2VecVisionForImageClassification
               with use_mean_pooling). The head owns the final norm: a pre-LN encoder is built
               without its own (MAE deletes it, BEiT makes it an Identity), so every parameter gets
               a gradient, as DDP requires; the checkpoint's final norm is not used.
               Deviation from "CLS where the encoder has one": the reference fine-tunes images from
               mean-pooled patches, and data2vec 2.0 trains its CLS with a 0.01 loss weight only.
        audio: mean over real (unpadded) frames ─► Linear (Hugging Face's
               Data2VecAudioForSequenceClassification with an identity projector)
        text:  the <s> token ─► dropout ─► Linear(D, D) ─► tanh ─► dropout ─► Linear(D, n)
               (RoBERTa's classification head, as fairseq's and Hugging Face's data2vec text)
    ctc (audio): frames ─► Linear(D, vocab) per 50 Hz frame; blank = id 0
    feature_bn (classify, optional): the pooled vector (text: the <s> output) is standardized over
        the batch by a BatchNorm without affine right before the head — MAE's linear-probe head.
        Briefly pretrained encoders put every sample near one common vector (demo image encoder:
        the samples' spread is 5% of the mean's norm), which a freshly initialized head cannot read
        at a fine-tuning LR for tens of steps while the encoder drifts. In eval mode it is an affine
        map, folded into the head on export.

Parameter names of the front end, encoder and mask embedding are those of `Data2Vec`
("frontend.…", "encoder.…", "mask_emb"). What a pretrained checkpoint gives the model, and what it
leaves out and why, is one table per model: `FineTuneModel.init_table` (used by `load_pretrained`).

Audio fine-tuning follows wav2vec 2.0 / data2vec: the CNN feature encoder is frozen (run without
gradients) and spans of CNN frames are replaced by a learned mask embedding during training (time
masking: `mask` (B, T) bool from `pipeline.masking.span_mask`). Channel masking is not modelled.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from pipeline.model.config import ModelConfig
from pipeline.model.encoder import Encoder
from pipeline.model.frontends import build_frontend

TASKS = ("classify", "ctc")
# A frozen CNN runs without gradients, so nothing of it is kept for backward: it runs over this many
# waveform samples at a time (40 s of 16 kHz audio: its first map, C × samples/5 floats, is 65 MiB at
# C=128), which bounds its working set whatever the batch. On a batch of 16 20-s clips that working set
# is 0.26 GiB instead of ~1.5 GiB (benchmarks/memory_estimate.py). wav2vec2/fairseq and Hugging Face run
# the frozen extractor on the whole batch; per-sample results are the same (every CNN layer normalizes
# within a sample).
FROZEN_CNN_CHUNK_SAMPLES = 640_000


def frozen_cnn_chunk(num_samples: int) -> int:
    """Clips of `num_samples` samples the frozen CNN takes at once."""
    return max(1, FROZEN_CNN_CHUNK_SAMPLES // max(1, num_samples))


def frozen_cnn(cnn: nn.Module, audio: torch.Tensor) -> torch.Tensor:
    """(B, L) waveform → (B, C, T) CNN output, without gradients, a few clips at a time."""
    step = frozen_cnn_chunk(audio.shape[1])
    with torch.no_grad():
        return torch.cat([cnn(audio[i:i + step, None, :]) for i in range(0, audio.shape[0], step)])


class FineTuneModel(nn.Module):
    def __init__(self, cfg: ModelConfig, task: str, num_outputs: int, *, drop_path: float = 0.0,
                 head_dropout: float = 0.0, feature_bn: bool = False, freeze_feature_encoder: bool = False,
                 time_masks: bool = False):
        super().__init__()
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        if task == "ctc" and cfg.modality != "audio":
            raise ValueError("task ctc needs audio")
        self.cfg, self.task, self.num_outputs = cfg, task, num_outputs
        self.frontend = build_frontend(cfg)
        pools = task == "classify" and cfg.modality == "image"  # the head pools, then normalizes (fc_norm)
        self.encoder = Encoder(cfg.encoder, drop_path=drop_path, final_norm=not pools)
        D = cfg.encoder.dim
        self.frozen_cnn = cfg.modality == "audio" and freeze_feature_encoder
        if self.frozen_cnn:
            for p in self.frontend.cnn.parameters():
                p.requires_grad_(False)
        if cfg.modality == "audio" and time_masks:  # wav2vec2's masked_spec_embed
            self.mask_emb = nn.Parameter(torch.zeros(D).uniform_())
        if task == "classify" and cfg.modality == "text":
            self.head = nn.ModuleDict({"dense": nn.Linear(D, D), "out_proj": nn.Linear(D, num_outputs)})
        else:
            self.head = nn.Linear(D, num_outputs)
        if pools:
            self.fc_norm = nn.LayerNorm(D)
        if feature_bn:
            if task != "classify":
                raise ValueError("feature_bn applies to classify only")
            self.feature_bn = nn.BatchNorm1d(D, affine=False)
        self.head_drop = nn.Dropout(head_dropout)
        for m in self.head.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    @classmethod
    def for_task(cls, cfg: ModelConfig, f, num_outputs: int) -> "FineTuneModel":
        """The model a fine-tuning run's task settings (`pipeline.train.config.TaskConfig`) describe."""
        return cls(cfg, f.task, num_outputs, drop_path=f.drop_path, head_dropout=f.head_dropout,
                   feature_bn=f.feature_bn, freeze_feature_encoder=f.freeze_feature_encoder,
                   time_masks=f.mask_time_prob > 0)

    def encode(self, batch: dict, mask: torch.Tensor | None = None):
        """→ (h (B, n_extra + T, D) final encoder output, pad (B, T) or None)."""
        fe = self.frontend
        if self.frozen_cnn:
            x, pad = fe.project(frozen_cnn(fe.cnn, batch["audio"]), batch.get("lengths"))
        else:
            x, pad = fe.local(batch)  # (B, T, D)
        if mask is not None and hasattr(self, "mask_emb"):  # time masking (audio fine-tuning): masked frames → mask embedding
            x = torch.where(mask[..., None], self.mask_emb.to(x.dtype), x)
        h = fe.context(x, pad)
        h, hpad = fe.prepend(h, pad)
        h, _ = self.encoder(h, hpad)
        return h, pad

    def forward(self, batch: dict, mask: torch.Tensor | None = None):
        """classify → logits (B, num_outputs); ctc → (logits (B, T, vocab), pad (B, T) or None)."""
        h, pad = self.encode(batch, mask)
        n = self.frontend.num_extra
        if self.task == "ctc":
            return self.head(self.head_drop(h[:, n:])), pad
        if self.cfg.modality == "text":
            x = self._standardize(h[:, 0])  # <s>
            x = torch.tanh(self.head["dense"](self.head_drop(x)))
            return self.head["out_proj"](self.head_drop(x))
        h = h[:, n:]  # (B, T, D) without the CLS
        if pad is None:
            pooled = h.mean(1)
        else:
            w = (~pad).to(h.dtype)[..., None]
            pooled = (h * w).sum(1) / w.sum(1).clamp(min=1)
        if hasattr(self, "fc_norm"):
            pooled = self.fc_norm(pooled)
        return self.head(self.head_drop(self._standardize(pooled)))

    def _standardize(self, x: torch.Tensor) -> torch.Tensor:
        """(B, D) → (B, D); identity without feature_bn."""
        return self.feature_bn(x) if hasattr(self, "feature_bn") else x

    def init_table(self) -> list[tuple[str, str | None, str]]:
        """How a pretrained checkpoint's weights (Data2Vec naming; a Hugging Face checkpoint is
        mapped to it by pipeline.init_weights) become this model's: (checkpoint name or prefix,
        this model's name or None = not used, why). The first matching row wins; a checkpoint
        weight that matches no row is an error."""
        rows: list[tuple[str, str | None, str]] = []
        if self.encoder.norm is None and self.cfg.encoder.pre_norm:
            rows.append(("encoder.norm.", None, "the pre-LN encoder's final LayerNorm: the image head pools the "
                                                "patches first and normalizes the mean with its own fc_norm "
                                                "(BEiT/MAE fine-tuning)"))
        rows += [("frontend.", "frontend.", "front end"), ("encoder.", "encoder.", "Transformer blocks")]
        if hasattr(self, "mask_emb"):
            rows.append(("mask_emb", "mask_emb", "the pretrained mask embedding fills the time-masked frames "
                                                 "(fairseq and Hugging Face keep it for fine-tuning)"))
        else:
            rows.append(("mask_emb", None, "this fine-tuning masks no inputs"))
        return rows

    def load_pretrained(self, state: dict) -> dict[str, str]:
        """Copy a pretrained student's weights in by `init_table`. Raises ValueError naming the
        front-end / encoder weights the checkpoint lacks (or that have another shape) and any
        weight no row covers. Returns {name: why} for every checkpoint weight not used and every
        weight of this model that keeps its fresh initialization (heads, fc_norm, a mask
        embedding the checkpoint has none of)."""
        own = self.state_dict()
        table = self.init_table()
        load, report, unknown = {}, {}, []
        for name, value in state.items():
            row = next((r for r in table if name == r[0] or (r[0].endswith(".") and name.startswith(r[0]))), None)
            if row is None:
                unknown.append(name)
            elif row[1] is None:
                report[name] = f"not used: {row[2]}"
            else:
                load[row[1] + name[len(row[0]):]] = value
        need = sorted(k for k in own if k.startswith(("frontend.", "encoder.")))
        missing = [k for k in need if k not in load]
        shapes = [f"{k} {tuple(v.shape)} != {tuple(own[k].shape)}" for k, v in load.items()
                  if k in own and v.shape != own[k].shape]
        extra = sorted(set(load) - set(own))
        if unknown or missing or shapes or extra:
            raise ValueError(f"the checkpoint does not fit this model: missing {missing[:4]}, other shapes "
                             f"{shapes[:4]}, weights no mapping covers {(unknown + extra)[:4]}")
        self.load_state_dict(load, strict=False)
        for k in own:
            if k not in load and not k.startswith("feature_bn."):
                report[k] = "fresh: " + ("the task head" if k.startswith(("head.", "fc_norm.")) else
                                         "the checkpoint has none")
        return report

    def load_finetuned(self, state: dict) -> None:
        """Load this model's own saved weights. Image models saved before the head owned the final
        norm carry an `encoder.norm` the head never used: it is skipped."""
        if self.encoder.norm is None:
            state = {k: v for k, v in state.items() if not k.startswith("encoder.norm.")}
        self.load_state_dict(state)

    def layer_id(self, name: str) -> int:
        """Depth of a parameter for layer-wise LR decay: front end and mask embedding 0, block i →
        i + 1, the rest (final norm, head) depth + 1."""
        if name.startswith("frontend.") or name == "mask_emb":
            return 0
        if name.startswith("encoder.blocks."):
            return int(name.split(".")[2]) + 1
        return self.cfg.encoder.depth + 1
