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
    """Fixed (inputs, masks) batches of held-out rows — val_batches × batch_size rows (or all there
    are, if fewer), in pieces of the micro-batch (the memory fit changes only the pieces); `__call__` gives the model's loss
    over all of them (summed over their loss positions / their count, as a training step)."""

    def __init__(self, chunks: list[Chunk], cfg, seed: int):
        t, m = cfg.train, cfg.model
        self.seed = seed
        self.cls_weight = m.decoder.cls_loss * t.batch_size * (m.decoder.clone_batch if m.mode == "d2v2" else 1)
        want = t.val_batches * t.batch_size
        rows = read_rows(chunks, COLUMNS[cfg.modality], want)
        n = len(next(iter(rows.values())))
        if n == 0:
            raise ValueError("validation data has no rows")
        self.batches = []
        for a in range(0, n, t.micro):
            b = {k: v[a: a + t.micro] for k, v in rows.items()}
            rngs = [np.random.default_rng([seed, 104729, i]) for i in range(a, a + len(b[COLUMNS[cfg.modality][0]]))]
            self.batches.append(collate(b, m, rngs, t.audio_max_samples, t.text_max_tokens, t.audio_batching))

    @torch.no_grad()
    def __call__(self, model, device, autocast) -> float:
        was = model.training
        model.eval()
        # The forward's own randomness (2.0 decoder noise) is seeded too, in a forked RNG: the
        # training run's random stream is left as it was.
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(self.seed)
            try:
                total = cls = 0.0
                count = rows = 0
                for inputs, mask in self.batches:
                    with autocast():
                        out = model({k: v.to(device) for k, v in inputs.items()}, mask.to(device))
                    total, count = total + float(out.sum), count + out.count
                    cls, rows = cls + float(out.cls_sum), rows + mask.shape[0]
                # the CLS term as a training step weighs it: cls_loss × b·C × its mean over the rows
                return total / max(count, 1) + self.cls_weight * cls / max(rows, 1)
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
