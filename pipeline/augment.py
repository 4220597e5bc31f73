"""Images: how they are stored in shards, and the view of each one the model sees. No Ray here.

    raw file ─(preprocessing: `encode_image`)─► JPEG/PNG bytes, shorter side ≤ size / 0.875 (256 for 224)
    stored bytes ─(Ray Data read task, every epoch: `train_views`)─► (N, size, size, 3) uint8
    stored bytes ─(evaluation, probes, validation loss: `eval_view`)─► (size, size, 3) uint8

The training view of a row is a pure function of (seed, epoch, row id): its torchvision transforms
draw from a torch RNG seeded with those three numbers, so a resumed, restarted or resized run sees
exactly the crops an uninterrupted one would. What a recipe applies (train.augment and the crop /
flip / jitter fields) is written in pipeline/recipes.py with the fairseq file it follows.
"""
from __future__ import annotations

import io

import numpy as np

from pipeline.config import JPEG_QUALITY, stored_side

AUGMENTS = ("none", "crop")  # train.augment: "none" = the evaluation view; "crop" = random resized crop


# ----------------------------------------------------------------------------- storage
def encode_image(img, source: bytes, source_format: str | None, size: int) -> tuple[bytes, str]:
    """A decoded, orientation-corrected PIL image (mode RGB or L) → (stored bytes, "jpeg"|"png").

    A shorter side above stored_side(size) is resized down to it (bicubic, antialiased); smaller
    images are kept at their size (the views resize them when read). A JPEG source that needs no
    resizing keeps its own bytes (re-encoding would only lose quality); other images are stored as
    JPEG (quality JPEG_QUALITY) or, when smaller, lossless PNG (tiny digits, flat graphics)."""
    from PIL import Image

    side = stored_side(size)
    w, h = img.size
    if min(w, h) > side:
        scale = side / min(w, h)
        img = img.resize((max(side, round(w * scale)), max(side, round(h * scale))), Image.Resampling.BICUBIC)
    elif source_format == "JPEG":
        return source, "jpeg"
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=JPEG_QUALITY)
    best = (buf.getvalue(), "jpeg")
    w, h = img.size
    if source_format != "JPEG" and (w * h <= 128 * 128 or img.getcolors(256) is not None):
        # A small or few-colour lossless source (digits, flat graphics) may be smaller as PNG, and
        # then loses nothing; for photos PNG never wins and its encode costs ~25 ms, so it is not tried.
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        if len(buf.getvalue()) < len(best[0]):
            best = (buf.getvalue(), "png")
    return best


def decode(data: bytes):
    """Stored bytes → PIL RGB image."""
    from PIL import Image

    return Image.open(io.BytesIO(data)).convert("RGB")


# ----------------------------------------------------------------------------- views
def eval_view(data: bytes, size: int) -> np.ndarray:
    """Stored bytes → (size, size, 3) uint8: shorter side resized to size / 0.875 (a no-op for
    images this pipeline stored at that size), then the center size × size crop."""
    from PIL import Image

    img = decode(data)
    side = stored_side(size)
    w, h = img.size
    if min(w, h) != side:
        scale = side / min(w, h)
        w, h = max(side, round(w * scale)), max(side, round(h * scale))
        img = img.resize((w, h), Image.Resampling.BICUBIC)
    left, top = int(round((w - size) / 2)), int(round((h - size) / 2))  # as torchvision's CenterCrop
    return np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.uint8)


def eval_views(column, size: int) -> np.ndarray:
    """A column of stored images → (N, size, size, 3) uint8 evaluation views."""
    return np.stack([eval_view(b, size) for b in column]) if len(column) else np.zeros((0, size, size, 3), np.uint8)


def train_transform(spec: dict):
    """The recipe's torchvision pipeline for spec = {"size", "augment", "crop_scale", "crop_ratio",
    "hflip", "color_jitter"} (train.* fields): ColorJitter (data2vec 1.0 / BEiT), then
    RandomResizedCrop (bicubic), then RandomHorizontalFlip. BEiT flips before cropping; flip and
    crop commute in distribution, so the order does not change what is drawn, only which draw a
    seed gives."""
    from torchvision.transforms import InterpolationMode, v2

    steps = []
    if spec["color_jitter"] > 0:
        j = spec["color_jitter"]
        steps.append(v2.ColorJitter(brightness=j, contrast=j, saturation=j))
    steps.append(v2.RandomResizedCrop(spec["size"], scale=tuple(spec["crop_scale"]), ratio=tuple(spec["crop_ratio"]),
                                      interpolation=InterpolationMode.BICUBIC, antialias=True))
    if spec["hflip"] > 0:
        steps.append(v2.RandomHorizontalFlip(p=spec["hflip"]))
    return v2.Compose(steps)


def train_views(column, row_ids, spec: dict, seed: int, epoch: int) -> np.ndarray:
    """Stored images → (N, size, size, 3) uint8 training views; row r's view depends only on
    (seed, epoch, row id r). spec["augment"] == "none" gives the evaluation view."""
    size = spec["size"]
    if spec["augment"] == "none":
        return eval_views(column, size)
    import torch

    transform = train_transform(spec)
    out = np.empty((len(column), size, size, 3), np.uint8)
    with torch.random.fork_rng(devices=[]):  # the caller's RNG stream is left as it was
        for i, (b, r) in enumerate(zip(column, row_ids)):
            torch.manual_seed(sample_seed(seed, epoch, int(r)))
            out[i] = np.asarray(transform(decode(b)), dtype=np.uint8)
    return out


def sample_seed(seed: int, epoch: int, row: int) -> int:
    """One 63-bit seed per (run seed, epoch, row id), well mixed (numpy's SeedSequence)."""
    return int(np.random.SeedSequence([seed, epoch, row, 0x1A6E]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def view_of(cfg) -> dict | None:
    """The training view of a run's config (pretraining or fine-tuning): images only, else None."""
    return view_spec(cfg.train, cfg.model.frontend.image_size) if cfg.modality == "image" else None


def view_spec(train, size: int) -> dict:
    """The training-view fields of a TrainConfig for image size `size` (what read tasks get)."""
    return {"size": size, "augment": train.augment, "crop_scale": list(train.crop_scale),
            "crop_ratio": list(train.crop_ratio), "hflip": train.hflip, "color_jitter": train.color_jitter}
