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


def test_fix_counts_is_exact_and_uniform():
    rng = np.random.default_rng(8)
    m = np.zeros((20_000, 6), dtype=bool)
    m[:, :2] = True  # 2 masked, 4 wanted: the 2 added come uniformly from the 4 free positions
    out = masking.fix_counts(m, 4, rng)
    assert (out.sum(1) == 4).all() and out[:, :2].all()
    assert np.allclose(out[:, 2:].mean(0), 0.5, atol=0.02)
    drop = masking.fix_counts(np.ones((20_000, 5), bool), 1, rng)  # 1 of 5 kept, uniformly
    assert (drop.sum(1) == 1).all() and np.allclose(drop.mean(0), 0.2, atol=0.015)


def _stats(m, shape):
    """(masked fraction, mean run length along rows, P(right neighbour masked | masked))."""
    g = m.reshape(len(m), *shape)
    right = (g[..., :-1] & g[..., 1:]).sum() / max(g[..., :-1].sum(), 1)
    return m.mean(), np.mean(np.concatenate([_runs(r) for r in g.reshape(-1, shape[-1])])), right


@pytest.mark.parametrize("name", ["beit", "inverse_2d", "inverse_1d", "span", "token_span"])
def test_vectorized_generators_match_the_per_row_reference(name):
    """The batch-at-once generators draw from the same distributions as the per-row loops they
    replaced (benchmarks/masking_loops.py): same masked fraction, run lengths and block clustering,
    though not the same masks for a seed (they consume the generator in another order)."""
    import benchmarks.masking_loops as loops
    lengths = np.array([500, 420, 300, 480] * 64)
    calls = {"beit": (lambda g, r: g.beit_block_mask(256, 14, 14, 120, r), (14, 14)),
             "inverse_2d": (lambda g, r: g.inverse_block_mask(256, (14, 14), 0.8, r), (14, 14)),
             "inverse_1d": (lambda g, r: g.inverse_block_mask(256, (250,), 0.5, r, block=5, adjust=0.05,
                                                              inverse=False), (250,)),
             "span": (lambda g, r: g.span_mask(lengths, 500, 0.65, 10, r, require_same=False), (500,)),
             "token_span": (lambda g, r: g.token_mask(lengths, 500, 0.35, r, span=4), (500,))}
    call, shape = calls[name]
    new, old = call(masking, np.random.default_rng(9)), call(loops, np.random.default_rng(9))
    assert new.shape == old.shape and new.dtype == bool
    (fn, rn, cn), (fo, ro, co) = _stats(new, shape), _stats(old, shape)
    assert abs(fn - fo) < 0.01 and abs(rn - ro) / ro < 0.1 and abs(cn - co) < 0.03, ((fn, rn, cn), (fo, ro, co))
    if name == "span":  # never past a sample's length
        assert not new[lengths == 300][:, 300:].any()
    if name == "token_span":
        assert not new[:, 0].any() and not new[np.arange(256), lengths - 1].any()
