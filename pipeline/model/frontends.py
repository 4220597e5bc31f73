"""Modality front ends: one small interface, one implementation per modality. No Ray.

Every front end has two parts, so the teacher can own or share each (see EMAConfig):
    local(inputs)            raw batch → features (B, T, D) and padding (B, T) bool (or None)
    context(x, pad, mask)    features → features with positions (B, T, D); `mask` (B, T) True =
                             masked: a front end whose positions mix neighbouring steps (audio's
                             conv positions, `mixes_steps`) zeroes masked steps first, so a kept
                             step never sees masked content
plus `num_extra` leading tokens (an image CLS) added by `prepend`, and `grid` for 2-D decoders.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.model.config import ModelConfig

# wav2vec2 feature encoder: (channels, kernel, stride) → 16 kHz in, 50 Hz (stride 320) out.
CONV_LAYERS = [(10, 5)] + [(3, 2)] * 4 + [(2, 2)] * 2


def conv_frames(num_samples: torch.Tensor | int):
    """Frames the CNN yields for `num_samples` waveform samples (e.g. 16000 → 49)."""
    n = num_samples
    for k, s in CONV_LAYERS:
        n = (n - k) // s + 1
    return n


class FrontEnd(nn.Module):
    num_extra: int = 0
    grid: tuple[int, int] | None = None
    mixes_steps: bool = False
    """True when `context` mixes neighbouring steps (so it must see the mask)."""

    def local(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError

    def context(self, x: torch.Tensor, pad: torch.Tensor | None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def prepend(self, x: torch.Tensor, pad: torch.Tensor | None):
        return x, pad


# ----------------------------------------------------------------------------- image
def sincos_2d(dim: int, h: int, w: int) -> torch.Tensor:
    """MAE's fixed 2-D sine-cosine positions: (h*w, dim)."""
    gy, gx = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij")
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))

    def emb(pos):
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return torch.from_numpy(np.concatenate([emb(gy), emb(gx)], axis=1)).float()


class ImageFrontEnd(FrontEnd):
    """16×16 (configurable) patch embedding, fixed 2-D sin-cos positions, optional CLS token.

    Input batch["image"]: (B, 3, H, W) float, normalized."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        f, D = cfg.frontend, cfg.encoder.dim
        self.patch = f.patch_size
        self.grid = (f.image_size // f.patch_size, f.image_size // f.patch_size)
        self.proj = nn.Conv2d(3, D, kernel_size=f.patch_size, stride=f.patch_size)
        self.register_buffer("pos", sincos_2d(D, *self.grid)[None], persistent=False)  # (1, N, D)
        # Post-LN encoders get their input LayerNorm here (fairseq data2vec 2.0's prenet norm).
        self.norm = None if cfg.encoder.pre_norm else nn.LayerNorm(D)
        self.num_extra = 1 if f.cls_token else 0
        if f.cls_token:
            self.cls = nn.Parameter(torch.zeros(1, 1, D))
            nn.init.trunc_normal_(self.cls, std=0.02)

    def local(self, batch):
        x = self.proj(batch["image"])  # (B, D, h, w)
        return x.flatten(2).transpose(1, 2), None  # (B, N, D)

    def context(self, x, pad, mask=None):  # fixed positions: nothing crosses steps
        x = x + self.pos
        return x if self.norm is None else self.norm(x)

    def prepend(self, x, pad):
        if not self.num_extra:
            return x, pad
        return torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1), pad


# ----------------------------------------------------------------------------- audio
class _ChannelNorm(nn.Module):
    """LayerNorm over channels of a (B, C, T) tensor (wav2vec2 `extractor_mode: layer_norm`)."""

    def __init__(self, c: int, affine: bool = True):
        super().__init__()
        self.norm = nn.LayerNorm(c, elementwise_affine=affine)

    def forward(self, x):
        return self.norm(x.transpose(1, 2)).transpose(1, 2)


class WaveCNN(nn.Sequential):
    """wav2vec2's feature encoder (layer-norm variant): [Conv1d, _ChannelNorm, GELU] per layer,
    (B, 1, L) waveform → (B, C, T) features. Same modules and state-dict keys as the plain
    Sequential, but run channels-last: each conv is the Conv1d weight applied as a (1 × k) conv2d
    to a channels-last (B, C, 1, T) tensor (oneDNN's native layout), so the LayerNorm over channels
    reads a free permuted view instead of a transposed copy, both ways. The demo step's CNN
    forward + backward went from 1.14 to 0.68 s (batch 32 × 1 s, 128 channels, 2 threads);
    outputs equal the Conv1d path to ~5e-6."""

    def forward(self, x):  # (B, 1, L)
        y = x[:, :, None, :].contiguous(memory_format=torch.channels_last)  # (B, 1, 1, L)
        for conv, norm, act in zip(self[0::3], self[1::3], self[2::3]):
            y = F.conv2d(y, conv.weight[:, :, None, :], stride=(1, conv.stride[0]))  # (B, C, 1, T')
            y = act(norm.norm(y.permute(0, 2, 3, 1))).permute(0, 3, 1, 2)  # LayerNorm over C
        return y[:, :, 0, :]  # (B, C, T), a view of channels-last memory


class AudioFrontEnd(FrontEnd):
    """wav2vec2 CNN (layer-norm variant) → LayerNorm → Linear to D; convolutional positions.

    Input batch["audio"]: (B, L) float 16 kHz, per-clip normalized; batch["lengths"]: (B,) samples.
    Deviation: data2vec 2.0 audio adds learned-scale ALiBi attention biases; we keep only the
    convolutional positions (same as data2vec 1.0), which keeps the encoder one code path and
    exportable to Hugging Face's Data2VecAudio.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        f, D = cfg.frontend, cfg.encoder.dim
        C = f.conv_channels
        layers, cin = [], 1
        for k, s in CONV_LAYERS:
            layers += [nn.Conv1d(cin, C, k, stride=s, bias=False), _ChannelNorm(C), nn.GELU()]
            cin = C
        self.cnn = WaveCNN(*layers)
        self.feat_norm = nn.LayerNorm(C)
        self.feat_proj = nn.Linear(C, D)
        k = max(3, f.conv_pos_width // f.conv_pos_depth)
        self.pos_k = k
        self.pos_conv = nn.ModuleList(
            nn.Sequential(nn.Conv1d(D, D, k, padding=k // 2, groups=f.conv_pos_groups), _Trim(k),
                          _ChannelNorm(D, affine=False), nn.GELU())
            for _ in range(f.conv_pos_depth))
        self.pos_norm = nn.LayerNorm(D)  # wav2vec2 `encoder.layer_norm`, applied after the positions

    def local(self, batch):
        return self.project(self.cnn(batch["audio"][:, None, :]), batch.get("lengths"))

    def project(self, x: torch.Tensor, lengths: torch.Tensor | None):
        """CNN output (B, C, T) → features (B, T, D) and padding (B, T) (or None); fine-tuning calls
        it on the output of a frozen CNN run without gradients."""
        x = self.feat_proj(self.feat_norm(x.transpose(1, 2)))  # (B, T, D)
        pad = None
        if lengths is not None:
            n = conv_frames(lengths.long())  # (B,) valid frames
            pad = torch.arange(x.shape[1], device=x.device)[None, :] >= n[:, None]
            if not pad.any():
                pad = None
        return x, pad

    mixes_steps = True

    def context(self, x, pad, mask=None):
        # data2vec 2.0 (fairseq modalities/base.py `contextualized_features` → `apply_mask` with
        # encoder_zero_mask=True): masked frames are zeroed before the relative (conv) positional
        # encoder, so a kept frame's positional term depends on kept frames only; the student
        # then keeps x + positions at its unmasked frames. Padded frames are zeroed before every
        # conv layer so they never leak into real ones.
        keep = None if pad is None else (~pad)[:, None, :].to(x.dtype)  # (B, 1, T)
        y = x.transpose(1, 2)  # (B, D, T)
        if mask is not None:
            y = y * (~mask)[:, None, :].to(x.dtype)
        for layer in self.pos_conv:
            if keep is not None:
                y = y * keep
            y = layer(y)
        return self.pos_norm(x + y.transpose(1, 2))


class _Trim(nn.Module):
    """Even conv kernels with padding k//2 yield one extra step (fairseq SamePad)."""

    def __init__(self, k: int):
        super().__init__()
        self.extra = 1 if k % 2 == 0 else 0

    def forward(self, x):
        return x[..., : x.shape[-1] - self.extra] if self.extra else x


# ----------------------------------------------------------------------------- text
class TextFrontEnd(FrontEnd):
    """RoBERTa-style token + learned position embeddings, then LayerNorm (pad id 1).

    Input batch["input_ids"]: (B, T) long, padded with <pad>=1."""

    PAD = 1

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        f, D = cfg.frontend, cfg.encoder.dim
        self.tokens = nn.Embedding(f.vocab_size, D, padding_idx=self.PAD)
        self.positions = nn.Embedding(f.max_positions, D)
        self.norm = nn.LayerNorm(D)
        self.drop = nn.Dropout(cfg.encoder.dropout)
        nn.init.normal_(self.tokens.weight, std=0.02)
        nn.init.normal_(self.positions.weight, std=0.02)
        with torch.no_grad():
            self.tokens.weight[self.PAD].zero_()

    def local(self, batch):
        ids = batch["input_ids"]
        pad = ids == self.PAD
        return self.tokens(ids), (pad if pad.any() else None)

    def context(self, x, pad, mask=None):  # learned absolute positions: nothing crosses steps
        T = x.shape[1]
        return self.drop(self.norm(x + self.positions.weight[:T][None]))


def build_frontend(cfg: ModelConfig) -> FrontEnd:
    return {"image": ImageFrontEnd, "audio": AudioFrontEnd, "text": TextFrontEnd}[cfg.modality](cfg)


# ----------------------------------------------------------------------------- 2.0 decoders
class Decoder(nn.Module):
    """data2vec 2.0 conv decoder: [Conv → LayerNorm(no affine) → GELU] × L with residuals,
    then a projection to D. 1-D over time, or 2-D over the patch grid when `grid` is given."""

    def __init__(self, cfg: ModelConfig, grid: tuple[int, int] | None):
        super().__init__()
        d, D = cfg.decoder, cfg.encoder.dim
        self.grid, self.residual = grid, d.residual
        Conv = nn.Conv2d if grid else nn.Conv1d
        self.blocks = nn.ModuleList()
        cin = D
        for _ in range(d.layers):
            self.blocks.append(nn.ModuleDict({
                "conv": Conv(cin, d.dim, d.kernel, padding=d.kernel // 2, groups=d.groups),
                "norm": nn.LayerNorm(d.dim, elementwise_affine=False)}))
            cin = d.dim
        if d.projection_layers == 1:
            self.proj = nn.Linear(d.dim, D)
        else:
            self.proj = nn.Sequential(nn.Linear(d.dim, d.dim * 2), nn.GELU(), nn.Linear(d.dim * 2, D))

    def forward(self, x: torch.Tensor, pad: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, D) → (B, T, D); for images T = h*w in row-major grid order. `pad` (B, T) True
        at padding: zeroed before every conv, so a real step's prediction never depends on how
        much padding its batch has (deviation: fairseq's decoder convolves over padding — its
        audio pretraining crops instead of padding, its text batches pad; here a sample's
        update must not depend on which micro-batch it lands in, train/step.py)."""
        B, T, D = x.shape
        y = x.transpose(1, 2)  # (B, D, T)
        if self.grid:
            y = y.reshape(B, D, *self.grid)  # (B, D, h, w)
        keep = None if pad is None or self.grid else (~pad)[:, None, :].to(y.dtype)  # (B, 1, T)
        residual = y
        for blk in self.blocks:
            if keep is not None:
                y = y * keep
            y = blk["conv"](y)
            y = F.gelu(blk["norm"](y.movedim(1, -1)).movedim(-1, 1))
            if self.residual and residual.shape == y.shape:
                y = y + residual
            residual = y
        y = y.flatten(2).transpose(1, 2)  # (B, T, dec_dim)
        return self.proj(y)


def regression_head(cfg: ModelConfig) -> nn.Module:
    """data2vec 1.0 head: Linear(D, D) (speech/vision), or 2 layers D→2D→D (text)."""
    D = cfg.encoder.dim
    if cfg.head_layers == 1:
        return nn.Linear(D, D)
    return nn.Sequential(nn.Linear(D, 2 * D), nn.GELU(), nn.Linear(2 * D, D))

