"""The per-row Python mask generators as they were before vectorization (pipeline/masking.py at
da86843), kept only so benchmarks/masks.py can time the vectorized ones against them side by side and
tests can compare their statistics. Not used by training."""
from __future__ import annotations

import math

import numpy as np


def _fix_count(row: np.ndarray, target: int, rng: np.random.Generator) -> np.ndarray:
    """Unmask / mask random positions of a 1-D bool row until exactly `target` are True."""
    n = int(row.sum())
    if n > target:
        on = np.flatnonzero(row)
        row[rng.choice(on, n - target, replace=False)] = False
    elif n < target:
        off = np.flatnonzero(~row)
        row[rng.choice(off, target - n, replace=False)] = True
    return row


def beit_block_mask(batch: int, h: int, w: int, num_masked: int, rng: np.random.Generator,
                    min_block: int = 16, max_block: int | None = None,
                    min_aspect: float = 0.3) -> np.ndarray:
    """BEiT block-wise masking: rectangles (area min_block..max_block, aspect 0.3..3.3) until
    exactly `num_masked` of the h*w patches are masked. Returns (B, h*w) bool."""
    max_block = max_block or num_masked
    log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))
    out = np.zeros((batch, h * w), dtype=bool)
    for b in range(batch):
        m = np.zeros((h, w), dtype=bool)
        count, tries = 0, 0
        while count < num_masked and tries < 100:
            tries += 1
            max_area = min(num_masked - count, max_block)
            if max_area < min(min_block, max_block):
                break
            area = rng.uniform(min(min_block, max_area), max_area)
            aspect = math.exp(rng.uniform(*log_aspect))
            bh = int(round(math.sqrt(area * aspect)))
            bw = int(round(math.sqrt(area / aspect)))
            if bh < 1 or bw < 1 or bh > h or bw > w:
                continue
            top, left = rng.integers(0, h - bh + 1), rng.integers(0, w - bw + 1)
            patch = m[top: top + bh, left: left + bw]
            new = int((~patch).sum())
            if 0 < new <= max_area:
                patch[:] = True
                count += new
        out[b] = _fix_count(m.reshape(-1), num_masked, rng)  # exact count, as data2vec requires
    return out


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
    out = np.zeros((batch, L), dtype=bool)
    for b in range(batch):
        m = np.zeros(shape, dtype=bool)
        centers = rng.integers(0, L, size=n_centers)  # with replacement, like torch.multinomial
        coords = np.unravel_index(centers, shape)
        for delta in np.ndindex(*([block] * d)):
            idx = tuple(np.clip(c + k - off, 0, s - 1) for c, k, s in zip(coords, delta, shape))
            m[idx] = True
        row = _fix_count(m.reshape(-1), int(L * p), rng)
        out[b] = ~row if inverse else row
    return out


def span_mask(lengths: np.ndarray, T: int, mask_prob: float, span: int, rng: np.random.Generator,
              min_masks: int = 2, require_same: bool = True) -> np.ndarray:
    """wav2vec2/data2vec span masking: int(p·len/span + U[0,1)) span starts per sample, each
    masking `span` steps (overlaps allowed, so ~49% are masked at p=0.65, span=10). With
    `require_same`, every row is trimmed to the smallest count in the batch. Steps at or past
    a sample's length are never masked. Returns (B, T) bool."""
    lengths = np.asarray(lengths, dtype=np.int64)
    rows = []
    for sz in lengths:
        sz = int(sz)
        num = max(min_masks, int(mask_prob * sz / span + rng.random()))
        min_len = span
        if sz - min_len <= num:
            min_len = sz - num - 1
        starts = rng.choice(max(sz - min_len, 1), min(num, max(sz - min_len, 1)), replace=False)
        idx = (starts[:, None] + np.arange(span)[None, :]).reshape(-1)
        rows.append(np.unique(idx[idx < sz]))
    out = np.zeros((len(lengths), T), dtype=bool)
    target = min(len(r) for r in rows) if rows else 0
    for b, idx in enumerate(rows):
        if require_same and len(idx) > target:
            idx = rng.choice(idx, target, replace=False)
        out[b, idx] = True
    return out


def token_mask(lengths: np.ndarray, T: int, mask_prob: float, rng: np.random.Generator,
               span: int = 1, special_edges: bool = True) -> np.ndarray:
    """BERT/fairseq token masking: int(p·n/span + U[0,1)) spans of `span` tokens per sample over
    the n maskable tokens (excluding <s> at 0 and </s> at len-1 when `special_edges`)."""
    out = np.zeros((len(lengths), T), dtype=bool)
    for b, sz in enumerate(np.asarray(lengths, dtype=np.int64)):
        lo, hi = (1, int(sz) - 1) if special_edges else (0, int(sz))
        n = hi - lo
        if n <= 0:
            continue
        num = int(mask_prob * n / span + rng.random())
        num = min(max(num, 1), max(n // span, 1))
        starts = rng.choice(max(n - span + 1, 1), num, replace=False)
        idx = (starts[:, None] + np.arange(span)[None, :]).reshape(-1)
        out[b, lo + idx[idx < n]] = True
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
