"""Mask generators vs their ratio / span / block rules."""
import numpy as np
import pytest

from pipeline import masking


def _runs(row):
    """Lengths of consecutive True runs in a 1-D bool array."""
    padded = np.concatenate([[False], row, [False]]).astype(int)
    d = np.diff(padded)
    return np.flatnonzero(d == -1) - np.flatnonzero(d == 1)


def test_beit_block_mask_exact_count_and_blocks():
    rng = np.random.default_rng(0)
    m = masking.beit_block_mask(64, 14, 14, 120, rng)  # data2vec vision: 120 of 196 patches
    assert m.shape == (64, 196) and (m.sum(1) == 120).all()
    # Blocks, not salt-and-pepper: a masked patch's 4-neighbours are mostly masked too.
    g = m.reshape(64, 14, 14)
    same = (g[:, 1:, :] == g[:, :-1, :]).mean()
    assert same > 0.75  # independent random masks at p=0.61 would give ≈ 0.52


def test_inverse_block_mask_2d_count_and_clustering():
    rng = np.random.default_rng(1)
    m = masking.inverse_block_mask(64, (14, 14), 0.8, rng, block=3, adjust=0.07)
    assert (m.sum(1) == 196 - int(196 * 0.2)).all()  # exactly 157 masked in every row (80.1%)
    kept = ~m.reshape(64, 14, 14)
    # Kept tokens come in 3×3 blocks: their right-hand neighbour is kept far more often than 20%.
    right = (kept[:, :, :-1] & kept[:, :, 1:]).sum() / kept[:, :, :-1].sum()
    assert right > 0.5


def test_inverse_block_mask_1d_audio():
    rng = np.random.default_rng(2)
    m = masking.inverse_block_mask(16, (250,), 0.5, rng, block=5, adjust=0.05, inverse=False)
    assert (m.sum(1) == 125).all()
    runs = np.concatenate([_runs(r) for r in m])
    assert np.mean(runs) > 3  # spans of 5, not single steps


def test_span_mask_rules():
    rng = np.random.default_rng(3)
    lengths = np.array([500] * 32)
    free = masking.span_mask(lengths, 500, 0.65, 10, rng, require_same=False)
    for row in free:  # every run is a union of length-10 spans (only the tail can be clipped)
        runs = _runs(row)
        assert (runs[:-1] >= 10).all()
    frac = free.mean()
    assert 0.40 < frac < 0.58  # the paper reports ≈ 49% masked at p=0.65, span 10
    same = masking.span_mask(np.array([500, 400, 300]), 500, 0.65, 10, rng)
    assert len(set(same.sum(1))) == 1  # require_same_masks: equal count per sample
    assert not same[2, 300:].any() and not same[1, 400:].any()  # never past a sample's length


def test_token_mask_bert_and_corruption():
    rng = np.random.default_rng(4)
    lengths = np.array([64] * 200 + [20] * 200)
    m = masking.token_mask(lengths, 64, 0.15, rng)
    assert not m[:, 0].any() and not m[np.arange(400), lengths - 1].any()  # <s>, </s> never masked
    assert not m[200:, 20:].any()  # padding never masked
    assert abs(m[:200, 1:63].mean() - 0.15) < 0.01
    ids = rng.integers(5, 1000, size=(400, 64))
    out = masking.corrupt_tokens(ids, m, rng, mask_id=4, vocab_size=1000)
    assert (out[~m] == ids[~m]).all()  # unmasked positions untouched
    n = m.sum()
    to_mask = (out[m] == 4).sum() / n
    kept = (out[m] == ids[m]).sum() / n
    assert abs(to_mask - 0.8) < 0.04 and abs(kept - 0.1) < 0.03  # 80/10/10
    assert out[m].min() >= 4


def test_token_span_mask_length():
    rng = np.random.default_rng(5)
    m = masking.token_mask(np.array([200] * 50), 200, 0.35, rng, span=4)
    runs = np.concatenate([_runs(r) for r in m])
    assert runs.min() >= 1 and np.mean(runs) >= 4


@pytest.mark.parametrize("T,p", [(64, 0.48), (49, 0.8), (10, 0.5)])
def test_random_mask_exact(T, p):
    m = masking.random_mask(32, T, p, np.random.default_rng(6))
    assert (m.sum(1) == T - int(T * (1 - p))).all()
    assert len({tuple(r) for r in m}) > 1  # different per row


def test_masks_are_seeded():
    a = masking.inverse_block_mask(4, (14, 14), 0.8, np.random.default_rng(7))
    b = masking.inverse_block_mask(4, (14, 14), 0.8, np.random.default_rng(7))
    assert (a == b).all()
