"""Seeded mask generators: numpy in, numpy out (usable in Ray Data map tasks and in the model).

Convention everywhere: a mask is a bool array (B, T) with True = masked (hidden from the student).
Every generator takes an explicit `np.random.Generator`, so a (seed, step) pair reproduces it.

| generator            | used by                      | reference                                         |
|----------------------|------------------------------|---------------------------------------------------|
| beit_block_mask      | image, data2vec 1.0          | BEiT MaskingGenerator, 120/196 patches (~60%)     |
| inverse_block_mask   | image 2.0 (2-D), audio 2.0 (1-D) | fairseq compute_block_mask_2d/1d             |
| span_mask            | audio 1.0                    | fairseq compute_mask_indices (p=0.65, len 10)     |
| token_mask           | text 1.0 (BERT 15% / spans)  | fairseq MaskTokensDataset                         |
| random_mask          | text 2.0 (MAE-style, 48%)    | fairseq random_masking                            |
"""
from __future__ import annotations

import math

import numpy as np


def fix_counts(mask: np.ndarray, target: int, rng: np.random.Generator) -> np.ndarray:
    """Exactly `target` True per row of a (B, L) bool mask: rows with more drop a uniformly random
    subset of their True positions, rows with fewer gain a uniformly random subset of their False
    ones. One sort for the whole batch: True positions score in [1, 2), False ones in [0, 1), and
    each row keeps its `target` highest scores."""
    B, L = mask.shape
    out = np.zeros((B, L), dtype=bool)
    if target <= 0:
        return out
    if target >= L:
        return ~out
    score = mask + rng.random((B, L))
    top = np.argpartition(-score, target - 1, axis=1)[:, :target]
    np.put_along_axis(out, top, True, axis=1)
    return out


def _choose(n_from: np.ndarray, k: np.ndarray, width: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Per row b, k[b] distinct integers drawn uniformly from range(n_from[b]) (no replacement).
    Returns (values (B, K), valid (B, K)) with K = max(k); entries past k[b] are not valid."""
    B, K = len(n_from), int(k.max(initial=0))
    score = rng.random((B, width))
    score[np.arange(width)[None, :] >= n_from[:, None]] = -1.0  # outside the row's range: never chosen
    if K == 0:
        return np.zeros((B, 0), np.int64), np.zeros((B, 0), bool)
    values = np.argpartition(-score, K - 1, axis=1)[:, :K] if K < width else np.argsort(-score, axis=1)
    return values, np.arange(K)[None, :] < k[:, None]


def _mark_spans(out: np.ndarray, starts: np.ndarray, valid: np.ndarray, span: int, limit: np.ndarray,
                offset: int = 0) -> None:
    """Set out[b, offset + s … offset + s + span - 1] for each valid start s (B, K) of row b, clipped
    to the row's `limit` (B,) steps."""
    idx = starts[:, :, None] + np.arange(span)[None, None, :]  # (B, K, span)
    keep = valid[:, :, None] & (idx < limit[:, None, None])
    b = np.broadcast_to(np.arange(len(out))[:, None, None], idx.shape)
    out[b[keep], offset + idx[keep]] = True


def beit_block_mask(batch: int, h: int, w: int, num_masked: int, rng: np.random.Generator,
                    min_block: int = 16, max_block: int | None = None,
                    min_aspect: float = 0.3) -> np.ndarray:
    """BEiT block-wise masking: rectangles (area min_block..max_block, aspect 0.3..3.3) until
    exactly `num_masked` of the h*w patches are masked. Returns (B, h*w) bool.

    Every row draws one rectangle per round (at most 100 rounds), all rows at once: a row stops
    when it has enough, or when what it still needs is below the smallest block."""
    max_block = max_block or num_masked
    log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))
    m = np.zeros((batch, h, w), dtype=bool)
    count = np.zeros(batch, np.int64)
    active = np.ones(batch, dtype=bool)
    rows, cols = np.arange(h)[None, :, None], np.arange(w)[None, None, :]
    for _ in range(100):
        max_area = np.minimum(num_masked - count, max_block)
        active &= (count < num_masked) & (max_area >= min(min_block, max_block))
        if not active.any():
            break
        lo = np.minimum(min_block, max_area)
        area = rng.uniform(lo, np.maximum(max_area, lo))  # (B,)
        aspect = np.exp(rng.uniform(*log_aspect, size=batch))
        bh = np.round(np.sqrt(area * aspect)).astype(np.int64)
        bw = np.round(np.sqrt(area / aspect)).astype(np.int64)
        fits = active & (bh >= 1) & (bw >= 1) & (bh <= h) & (bw <= w)
        top = (rng.random(batch) * np.maximum(h - bh + 1, 1)).astype(np.int64)
        left = (rng.random(batch) * np.maximum(w - bw + 1, 1)).astype(np.int64)
        t, l_, bh_, bw_ = (x[:, None, None] for x in (top, left, bh, bw))
        rect = (rows >= t) & (rows < t + bh_) & (cols >= l_) & (cols < l_ + bw_)  # (B, h, w)
        new = (rect & ~m).sum((1, 2))
        take = fits & (new > 0) & (new <= max_area)
        m |= rect & take[:, None, None]
        count += np.where(take, new, 0)
    return fix_counts(m.reshape(batch, -1), num_masked, rng)  # exact count, as data2vec requires


def inverse_block_mask(batch: int, shape: tuple[int, ...], mask_prob: float, rng: np.random.Generator,
                       block: int = 3, adjust: float = 0.07, inverse: bool = True) -> np.ndarray:
    """data2vec 2.0 block masking on a 1-D (T,) or 2-D (H, W) grid. Returns (B, prod(shape)) bool.

    With `inverse=True` (images) blocks of block×block mark what is *kept*: sample
    int(L·(1-p+adjust)/block^d) block centres, grow them, fix the count to int(L·(1-p)) kept, invert.
    With `inverse=False` (audio) blocks mark what is *masked*, count fixed to int(L·p).
    Every row gets exactly the same number of masked steps.
    """
    L = int(np.prod(shape))
    d = len(shape)
    p = 1.0 - mask_prob if inverse else mask_prob
    n_centers = int(L * (p + adjust) / block ** d)
    off = block // 2
    m = np.zeros((batch, L), dtype=bool)
    centers = rng.integers(0, L, size=(batch, n_centers))  # with replacement, like torch.multinomial
    coords = np.unravel_index(centers, shape)  # d arrays of (B, n_centers)
    rows = np.arange(batch)[:, None]
    for delta in np.ndindex(*([block] * d)):  # grow every centre into its block, all rows at once
        idx = tuple(np.clip(c + k - off, 0, s - 1) for c, k, s in zip(coords, delta, shape))
        m[rows, np.ravel_multi_index(idx, shape)] = True
    m = fix_counts(m, int(L * p), rng)
    return ~m if inverse else m


def span_mask(lengths: np.ndarray, T: int, mask_prob: float, span: int, rng: np.random.Generator,
              min_masks: int = 2, require_same: bool = True) -> np.ndarray:
    """wav2vec2/data2vec span masking: int(p·len/span + U[0,1)) span starts per sample, each
    masking `span` steps (overlaps allowed, so ~49% are masked at p=0.65, span=10). With
    `require_same`, every row is trimmed to the smallest count in the batch. Steps at or past
    a sample's length are never masked. Returns (B, T) bool."""
    lengths = np.asarray(lengths, dtype=np.int64)
    B = len(lengths)
    out = np.zeros((B, T), dtype=bool)
    if B == 0:
        return out
    num = np.maximum(min_masks, (mask_prob * lengths / span + rng.random(B)).astype(np.int64))
    min_len = np.where(lengths - span <= num, lengths - num - 1, span)
    n_from = np.maximum(lengths - min_len, 1)
    starts, valid = _choose(n_from, np.minimum(num, n_from), int(n_from.max()), rng)
    _mark_spans(out, starts, valid, span, lengths)
    if require_same:
        out = fix_counts(out, int(out.sum(1).min()), rng)  # every row has ≥ the minimum: only drops
    return out


def token_mask(lengths: np.ndarray, T: int, mask_prob: float, rng: np.random.Generator,
               span: int = 1, special_edges: bool = True) -> np.ndarray:
    """BERT/fairseq token masking: int(p·n/span + U[0,1)) spans of `span` tokens per sample over
    the n maskable tokens (excluding <s> at 0 and </s> at len-1 when `special_edges`)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    B = len(lengths)
    out = np.zeros((B, T), dtype=bool)
    lo = 1 if special_edges else 0
    n = np.maximum(lengths - 2 * lo, 0)  # maskable tokens per row
    num = (mask_prob * n / span + rng.random(B)).astype(np.int64)
    num = np.where(n > 0, np.minimum(np.maximum(num, 1), np.maximum(n // span, 1)), 0)
    n_from = np.maximum(n - span + 1, 1)
    starts, valid = _choose(n_from, num, max(int(n_from.max(initial=1)), 1), rng)
    _mark_spans(out, starts, valid, span, n, offset=lo)
    return out


def corrupt_tokens(ids: np.ndarray, mask: np.ndarray, rng: np.random.Generator, mask_id: int,
                   vocab_size: int, num_special: int = 5, random_prob: float = 0.1,
                   keep_prob: float = 0.1) -> np.ndarray:
    """BERT 80/10/10: masked positions become <mask> (80%), a random non-special token (10%) or
    stay as they are (10%). Returns a new (B, T) id array."""
    out = ids.copy()
    u = rng.random(ids.shape)
    to_mask = mask & (u < 1.0 - random_prob - keep_prob)
    to_rand = mask & (u >= 1.0 - random_prob - keep_prob) & (u < 1.0 - keep_prob)
    out[to_mask] = mask_id
    out[to_rand] = rng.integers(num_special, vocab_size, size=int(to_rand.sum()))
    return out


def random_mask(batch: int, T: int, mask_prob: float, rng: np.random.Generator) -> np.ndarray:
    """MAE-style random masking: exactly T - int(T·(1-p)) masked per row. Returns (B, T) bool."""
    keep = int(T * (1 - mask_prob))
    noise = rng.random((batch, T))
    order = np.argsort(noise, axis=1)
    out = np.ones((batch, T), dtype=bool)
    np.put_along_axis(out, order[:, :keep], False, axis=1)
    return out
