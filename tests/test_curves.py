"""Learning curves (pipeline/pretrain/curves.py): held-out chunks, validation loss at fixed masks,
the online probe; on the real preprocessed demo data, in-process (no Ray Train)."""
from contextlib import nullcontext

import numpy as np
import pytest
import torch

from pipeline.model.data2vec import Data2Vec
from pipeline.train.batches import collate
from pipeline.train.config import resolve
from pipeline.pretrain.curves import OnlineProbe, ValidationLoss
from pipeline.train.stream import COLUMNS, list_chunks, read_rows, split_chunks


def _cfg(data, **sets):
    return resolve("image", data, "/tmp/unused", "demo", None, {"train.batch_size": 8, **sets},
                   model_frontend={"image_size": 28})


def test_held_out_chunks_are_seeded_disjoint_and_never_all(demo_shards):
    chunks = list_chunks(demo_shards["image"], COLUMNS["image"])
    kept, held = split_chunks(chunks, 0.2, seed=0)
    assert not set(kept) & set(held) and len(kept) + len(held) == len(chunks)
    assert len(held) == round(0.2 * len(chunks))
    assert split_chunks(chunks, 0.2, seed=0) == (kept, held)  # seeded
    assert any(split_chunks(chunks, 0.2, seed=s)[1] != held for s in range(1, 6))
    assert len(split_chunks(chunks[:2], 0.49, 0)[0]) == 1  # never all held out
    assert len(split_chunks(chunks[:3], 0.01, 0)[1]) == 1  # at least one chunk held out


def test_validation_loss_uses_fixed_masks_and_matches_a_hand_computation(demo_shards):
    cfg = _cfg(demo_shards["image"], **{"train.val_batches": 2})
    chunks = list_chunks(demo_shards["image"], COLUMNS["image"])[:3]
    torch.manual_seed(0)
    model = Data2Vec(cfg.model).train()
    val = ValidationLoss(chunks, cfg, seed=0)
    assert len(val.batches) == 2  # val_batches × batch_size = 16 rows
    a = val(model, torch.device("cpu"), nullcontext)
    state = torch.random.get_rng_state()
    b = val(model, torch.device("cpu"), nullcontext)
    assert a == b and a > 0 and model.training  # same masks → same number; train mode restored
    assert torch.equal(torch.random.get_rng_state(), state)  # the training run's RNG is untouched
    # By hand: the first 16 rows in one batch, each with its own seeded rng, the model in eval
    # mode: the loss summed over all masked patches / their count, plus the CLS term weighted as a
    # training step weighs it (cls_loss × batch_size × clones × its mean over the rows).
    rows = read_rows(chunks, COLUMNS["image"], 16)
    model.eval()
    torch.manual_seed(0)  # the forward's own noise, seeded as ValidationLoss seeds it
    with torch.no_grad():
        out = model(*collate(rows, cfg.model, [np.random.default_rng([0, 104729, i]) for i in range(16)], 250_000, 512))
    C, w = cfg.model.decoder.clone_batch, cfg.model.decoder.cls_loss
    assert w > 0
    hand = float(out.sum) / out.count + w * 8 * C * float(out.cls_sum) / (16 * C)
    assert a == pytest.approx(hand, rel=1e-5)
    # The memory fit's smaller micro-batches change only the pieces: the same rows, the same loss.
    small = ValidationLoss(chunks, _cfg(demo_shards["image"], **{"train.val_batches": 2, "train.micro_batch": 3}), 0)
    assert len(small.batches) == 6 and small(model, torch.device("cpu"), nullcontext) == pytest.approx(a, rel=1e-5)
    # The loss moves with the weights.
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.mul_(0.5)
    assert val(model, torch.device("cpu"), nullcontext) != pytest.approx(a)


def test_online_probe_scores_features_on_fixed_subsets(demo_shards):
    cfg = _cfg(demo_shards["image"], **{"train.probe_samples": 120})
    probe = OnlineProbe(demo_shards["image_train"], demo_shards["image_test"], cfg, seed=0)
    assert len(probe.train[1]) == 120 and len(probe.test[1]) == 120
    assert len(set(probe.train[1].tolist())) == 10  # a random subset, not the first class
    again = OnlineProbe(demo_shards["image_train"], demo_shards["image_test"], cfg, seed=0)
    np.testing.assert_array_equal(again.train[1], probe.train[1])
    torch.manual_seed(0)
    model = Data2Vec(cfg.model)
    r = probe(model, torch.device("cpu"))
    assert set(r) == {"probe.knn_accuracy", "probe.linear_accuracy"}
    # A random network's features are above chance (0.1) on digits, and far from perfect.
    assert 0.15 < r["probe.linear_accuracy"] < 0.9 and 0.0 <= r["probe.knn_accuracy"] < 0.9
