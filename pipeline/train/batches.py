"""Numpy batches from Ray Data → model-ready torch tensors + masks. No Ray imports.

Masks (and audio crops) are drawn here, in the data path, from one generator per sample seeded by
(seed, step, the sample's stable row id): a resumed run draws exactly the masks the uninterrupted
run would have drawn, and so does a run cut into other workers or micro-batches. `Ahead` runs this
collation for the next steps in a background thread while the current step trains.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from pipeline.augment import eval_views
from pipeline.model.config import ModelConfig
from pipeline.model.data2vec import draw_masks
from pipeline.model.frontends import conv_frames
from pipeline.train.background import Background
from pipeline.tokenizer import PAD_ID

IMAGE_MEAN = np.array([0.485, 0.456, 0.406], np.float32)  # ImageNet statistics
IMAGE_STD = np.array([0.229, 0.224, 0.225], np.float32)


def image_tensor(column, size: int) -> torch.Tensor:
    """Images → (B, 3, size, size) float, ImageNet-normalized. `column`: the views the read tasks
    drew ((B, size·size·3) uint8, stream.RankStream with a view), or stored JPEG/PNG bytes, which
    get the evaluation view (validation loss, probes, fine-tuning evaluation)."""
    if isinstance(column, np.ndarray) and column.dtype == np.uint8:
        x = column.reshape(-1, size, size, 3)
    else:
        x = eval_views(column, size)  # (B, size, size, 3)
    x = (x.astype(np.float32) / 255.0 - IMAGE_MEAN) / IMAGE_STD
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def audio_tensor(column, max_samples: int, rng,
                 mode: str = "pad") -> tuple[torch.Tensor, torch.Tensor]:
    """Variable-length clips → (B, L) float, per-clip zero mean / unit variance (fairseq
    `normalize: true`), and their lengths.

    mode "crop": every clip randomly cropped to the batch's shortest (fairseq pretraining, good for
    long similar-length crops); "pad": clips longer than max_samples randomly cropped, the rest
    zero-padded to the batch's longest (good for short clips of unequal length). `rng`: one
    generator per clip, or one for all. Only "pad" keeps a clip independent of its batch."""
    rngs = [rng] * len(column) if isinstance(rng, np.random.Generator) else rng
    clips = []
    for a, r in zip(column, rngs):
        a = np.asarray(a, np.float32)
        L = min(len(a), max_samples) if mode == "pad" else min(min(len(c) for c in column), max_samples)
        off = int(r.integers(0, len(a) - L + 1))
        c = a[off: off + L]
        clips.append((c - c.mean()) / np.sqrt(c.var() + 1e-5))
    T = max(len(c) for c in clips)
    out = np.zeros((len(clips), T), np.float32)
    for i, c in enumerate(clips):
        out[i, : len(c)] = c
    return torch.from_numpy(out), torch.tensor([len(c) for c in clips], dtype=torch.long)


def text_tensor(column, max_tokens: int) -> torch.Tensor:
    """Variable-length id rows → (B, T) padded with <pad>; rows longer than max_tokens are cut
    (keeping </s> last)."""
    rows = [np.asarray(r, np.int64) for r in column]
    rows = [r if len(r) <= max_tokens else np.concatenate([r[: max_tokens - 1], r[-1:]]) for r in rows]
    T = max(len(r) for r in rows)
    out = np.full((len(rows), T), PAD_ID, np.int64)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return torch.from_numpy(out)


def collate(batch: dict, cfg: ModelConfig, rng, audio_max_samples: int,
            text_max_tokens: int, audio_batching: str = "pad") -> tuple[dict, torch.Tensor]:
    """One numpy batch → (model inputs, mask (B or B·clone_batch, T) bool). `rng`: a generator per
    sample (sample_rngs), or one generator split into one per sample."""
    m = cfg.modality
    B = len(next(iter(batch.values())))
    rng = rng.spawn(B) if isinstance(rng, np.random.Generator) else rng
    if m == "image":
        inputs = {"image": image_tensor(batch["image"], cfg.frontend.image_size)}
        B, T, lengths, ids = inputs["image"].shape[0], (cfg.frontend.image_size // cfg.frontend.patch_size) ** 2, None, None
    elif m == "audio":
        wav, lengths = audio_tensor(batch["audio"], audio_max_samples, rng, audio_batching)
        inputs = {"audio": wav, "lengths": lengths}
        B, T = wav.shape[0], int(conv_frames(wav.shape[1]))
        lengths, ids = conv_frames(lengths).numpy(), None  # valid frames per clip
    else:
        ids_t = text_tensor(batch["input_ids"], min(text_max_tokens, cfg.frontend.max_positions))
        inputs = {"input_ids": ids_t}
        B, T = ids_t.shape
        ids = ids_t.numpy()
        lengths = (ids != PAD_ID).sum(1)
    masks = draw_masks(cfg, B, T, rng, lengths=lengths, input_ids=ids)
    if "input_ids_masked" in masks:
        inputs["input_ids_masked"] = torch.from_numpy(masks["input_ids_masked"])
    return inputs, torch.from_numpy(masks["mask"])


def eval_inputs(batch: dict, modality: str, image_size: int, max_positions: int) -> dict:
    """A numpy batch → model inputs without random cropping (whole clips, padded)."""
    if modality == "image":
        return {"image": image_tensor(batch["image"], image_size)}
    if modality == "audio":
        clips = [np.asarray(a, np.float32) for a in batch["audio"]]
        L = max(len(c) for c in clips)
        out = np.zeros((len(clips), L), np.float32)
        for i, c in enumerate(clips):
            out[i, : len(c)] = (c - c.mean()) / np.sqrt(c.var() + 1e-5)
        return {"audio": torch.from_numpy(out), "lengths": torch.tensor([len(c) for c in clips])}
    return {"input_ids": text_tensor(batch["input_ids"], max_positions)}


def step_rng(seed: int, rank: int, step: int, micro: int = 0) -> np.random.Generator:
    """One generator for a whole batch (benchmarks and tests that have no row ids)."""
    return np.random.default_rng([seed, rank, step, micro])


def sample_rngs(seed: int, step: int, row_ids) -> list[np.random.Generator]:
    """One generator per sample of optimizer step `step`, from its stable row id: what a sample
    draws (crop, masks) does not depend on the rank, micro-batch or neighbours it is trained with."""
    return [np.random.default_rng([seed, step, int(r), 7727]) for r in row_ids]


class Ahead:
    """The next `depth` optimizer steps, prepared in a background thread while the current one
    trains: reading, collation and mask drawing leave the critical path, and `get()` blocks only
    when the step would otherwise wait for data (the data wait a run reports).

    `make(step)` builds one step's micro-batches; it is called in order for steps first … last-1,
    and its randomness comes from sample_rngs(…, step, …), so the batches are exactly what a
    synchronous loop would build: resume stays bit-identical. An error in `make` is raised by the
    `get()` that would have returned that step. `close()` abandons what is queued (a rollback, an
    early stop, the end of the epoch)."""

    def __init__(self, make: Callable[[int], object], first: int, last: int, depth: int = 2):
        self._steps = Background(((step, make(step)) for step in range(first, last)), depth, "prepare-next-steps")
        self._thread = self._steps._thread

    def get(self) -> tuple[int, object]:
        """(step, its micro-batches), in step order."""
        return self._steps.next()

    def close(self) -> None:
        self._steps.close()
