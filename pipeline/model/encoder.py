"""The Transformer encoder shared by every modality. Single-device code; no Ray.

Shapes: B batch, T tokens, D model width, H heads. `pad` is (B, T) bool, True = padding.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.model.config import EncoderConfig


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, pad: torch.Tensor | None) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # 3×(B,H,T,hd)
        attn_mask = None if pad is None else ~pad[:, None, None, :]  # (B,1,1,T) True = may attend
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(B, T, D))


class Block(nn.Module):
    """Post-LN (data2vec audio/text, 2.0) or pre-LN (ViT/BEiT) block.

    Returns (x, ffn): the block output and the FFN output before dropout, the last residual and
    LayerNorm — data2vec's target for speech/text (fairseq `layer_result` / `fc_result`).
    """

    def __init__(self, cfg: EncoderConfig, drop_path: float = 0.0):
        super().__init__()
        self.pre_norm = cfg.pre_norm
        self.drop_path = drop_path
        self.attn = Attention(cfg.dim, cfg.heads, cfg.attn_dropout)
        self.norm1 = nn.LayerNorm(cfg.dim)
        self.norm2 = nn.LayerNorm(cfg.dim)
        hidden = int(cfg.dim * cfg.mlp_ratio)
        self.fc1 = nn.Linear(cfg.dim, hidden)
        self.fc2 = nn.Linear(hidden, cfg.dim)
        self.drop = nn.Dropout(cfg.dropout)

    def _branch(self, y: torch.Tensor) -> torch.Tensor:
        """Dropout, then stochastic depth: in training a whole sample's branch is dropped with
        probability `drop_path` and kept ones are scaled by 1/(1 - drop_path) (fine-tuning only)."""
        y = self.drop(y)
        if self.drop_path > 0 and self.training:
            keep = 1.0 - self.drop_path
            y = y * torch.empty(y.shape[0], 1, 1, device=y.device, dtype=y.dtype).bernoulli_(keep) / keep
        return y

    def forward(self, x, pad):
        if self.pre_norm:
            x = x + self._branch(self.attn(self.norm1(x), pad))
            ffn = self.fc2(F.gelu(self.fc1(self.norm2(x))))
            return x + self._branch(ffn), ffn
        x = self.norm1(x + self._branch(self.attn(x, pad)))
        ffn = self.fc2(F.gelu(self.fc1(x)))
        return self.norm2(x + self._branch(ffn)), ffn


class Encoder(nn.Module):
    def __init__(self, cfg: EncoderConfig, drop_path: float = 0.0, final_norm: bool = True):
        """`drop_path`: stochastic depth of the last block (BEiT/MAE fine-tuning), rising linearly
        from 0 at the first block; pretraining uses 0. `final_norm=False` builds a pre-LN encoder
        without its last LayerNorm: a head that pools first and normalizes the pooled vector
        itself (BEiT/MAE mean pooling) owns that norm, and a norm no loss reaches would leave DDP
        waiting for its gradient."""
        super().__init__()
        self.cfg = cfg
        rates = [drop_path * i / max(1, cfg.depth - 1) for i in range(cfg.depth)]
        self.blocks = nn.ModuleList(Block(cfg, r) for r in rates)
        # Pre-LN models normalize the output once at the end. Post-LN models normalize the input
        # once instead; that LayerNorm lives in the front end's context part (wav2vec2's
        # `encoder.layer_norm` after the conv positions, RoBERTa's embedding LayerNorm), which
        # keeps the layouts identical to Hugging Face's Data2Vec* classes.
        self.norm = nn.LayerNorm(cfg.dim) if cfg.pre_norm and final_norm else None
        self.apply(_init_weights)

    def forward(self, x: torch.Tensor, pad: torch.Tensor | None = None,
                layers: str | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """x (B,T,D) → (final (B,T,D), per-layer outputs [depth × (B,T,D)]).

        layers: None (no per-layer outputs), "ffn" or "block" (see EncoderConfig.layer_output)."""
        outs = []
        for blk in self.blocks:
            x, ffn = blk(x, pad)
            if layers is not None:
                outs.append(ffn if layers == "ffn" else x)
        if self.norm is not None:
            x = self.norm(x)
        return x, outs


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
