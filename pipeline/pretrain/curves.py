"""Learning curves while pretraining runs, computed on rank 0 every `train.eval_every` steps:

    validation loss  — the data2vec loss on held-out rows with masks drawn once (the same masks at
                       every point, so the curve moves only with the weights);
    online probe     — the student's mean-pooled final-layer features on a seeded subset of labeled
                       rows → cosine kNN and a logistic regression, scored on the probe test split.

Both read their rows once, in-process, with pyarrow (a few hundred rows: no Ray Data pipeline).
No Ray imports.
"""
from __future__ import annotations

import numpy as np
import torch

from pipeline.train.batches import collate
from pipeline.train.stream import COLUMNS, Chunk, labeled_rows, read_rows

# The online probe's logistic-regression C is fixed (standardized features). On its few hundred rows
# it reads lower than the final probe; the curve's shape is what matters while training (the final
# probe, pipeline.probe, uses every row and cross-validates C).
ONLINE_PROBE_C = 1.0


class ValidationLoss:
    """Fixed (inputs, masks) batches of held-out rows; `__call__` gives the model's mean loss."""

    def __init__(self, chunks: list[Chunk], cfg, seed: int):
        t, m = cfg.train, cfg.model
        self.seed = seed
        rows = read_rows(chunks, COLUMNS[cfg.modality], t.val_batches * t.batch_size)
        n = len(next(iter(rows.values())))
        self.batches = []
        for i, a in enumerate(range(0, n - t.batch_size + 1, t.batch_size)):
            b = {k: v[a: a + t.batch_size] for k, v in rows.items()}
            rng = np.random.default_rng([seed, 104729, i])  # the same masks at every evaluation
            self.batches.append(collate(b, m, rng, t.audio_max_samples, t.text_max_tokens, t.audio_batching))
        if not self.batches:
            raise ValueError(f"validation data has {n} rows, fewer than one batch of {t.batch_size}")

    @torch.no_grad()
    def __call__(self, model, device, autocast) -> float:
        was = model.training
        model.eval()
        # The forward's own randomness (2.0 decoder noise) is seeded too, in a forked RNG: the
        # training run's random stream is left as it was.
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(self.seed)
            try:
                total = 0.0
                for inputs, mask in self.batches:
                    with autocast():
                        out = model({k: v.to(device) for k, v in inputs.items()}, mask.to(device))
                    total += float(out.loss)
                return total / len(self.batches)
            finally:
                model.train(was)


def _labeled_subset(data: str, modality: str, n: int, seed: int) -> tuple[dict, np.ndarray]:
    """A seeded random subset of up to `n` labeled rows of a preprocessed folder."""
    inputs, labels = labeled_rows(data, modality)
    keep = np.sort(np.random.default_rng([seed, 15485863]).permutation(len(labels))[:n])
    return {c: v[keep] for c, v in inputs.items()}, labels[keep]


class _OnDevice:
    """The model, taking CPU inputs to `device` and giving float32 CPU features back."""

    def __init__(self, model, device):
        self.model, self.device, self.cfg = model, device, model.cfg

    def extract(self, inputs: dict, layers=(-1,)):
        return self.model.extract({k: v.to(self.device) for k, v in inputs.items()}, layers=layers).float().cpu()


class OnlineProbe:
    """kNN and linear probe accuracy of the student's features, on fixed labeled subsets."""

    def __init__(self, train_dir: str, test_dir: str, cfg, seed: int, batch_size: int = 64):
        self.modality, self.batch_size = cfg.modality, batch_size
        n = cfg.train.probe_samples
        self.train = _labeled_subset(train_dir, cfg.modality, n, seed)
        self.test = _labeled_subset(test_dir, cfg.modality, n, seed + 1)

    def _features(self, model, rows: dict, device) -> np.ndarray:
        from pipeline.probe import batch_features

        n = len(next(iter(rows.values())))
        out = []
        for a in range(0, n, self.batch_size):
            out.append(batch_features(_OnDevice(model, device), {k: v[a: a + self.batch_size] for k, v in rows.items()}))
        return np.concatenate(out)

    @torch.no_grad()
    def __call__(self, model, device) -> dict[str, float]:
        from pipeline.probe import fit_probes

        was = model.training
        model.eval()
        try:
            xtr, xte = self._features(model, self.train[0], device), self._features(model, self.test[0], device)
        finally:
            model.train(was)
        r = fit_probes(xtr, self.train[1], xte, self.test[1], cs=(ONLINE_PROBE_C,))
        return {"probe.knn_accuracy": r["knn_accuracy"], "probe.linear_accuracy": r["probe_accuracy"]}
