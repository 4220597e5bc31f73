"""Raw bytes → arrays, one function per modality. No Ray here.

Each decoder either returns usable data or raises ``Rejected(reason)``; the Ray Data stage
catches it per file so a bad file is recorded and never takes good files down with it.
"""
from __future__ import annotations

import io
import json
import warnings

import numpy as np

from pipeline.config import SAMPLE_RATE, AudioSettings, ImageSettings, TextSettings


class Rejected(Exception):
    """An input that cannot be used; `str(exc)` is the reason written to rejected.jsonl."""


# ---------------------------------------------------------------- images
def load_image(data: bytes, cfg: ImageSettings):
    """Any Pillow-readable image → (PIL image in mode RGB or L, source format e.g. "JPEG"/"PNG").

    Alpha is composited on white, palettes/CMYK converted, 16-bit and float images rescaled to 8
    bits, EXIF orientation applied, animations reduced to their first frame; grayscale stays L
    (stored smaller, decoded to RGB for training).
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not data:
        raise Rejected("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            fmt = img.format
            w, h = img.size
            if w * h > cfg.max_pixels:
                raise Rejected(f"image too large ({w}x{h} > max_pixels={cfg.max_pixels})")
            img.load()  # forces a full decode: truncated files fail here
            rotated = img.getexif().get(0x0112, 1) not in (1, None)
            img = ImageOps.exif_transpose(img)
    except Rejected:
        raise
    except UnidentifiedImageError:
        raise Rejected("not an image Pillow can identify") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise Rejected(f"decompression bomb: {e}") from None
    except Exception as e:  # truncated/corrupt streams raise OSError, SyntaxError, ValueError…
        raise Rejected(f"corrupt image: {type(e).__name__}: {e}") from None

    if min(img.size) < cfg.min_side:
        raise Rejected(f"image too small ({img.size[0]}x{img.size[1]} < min_side={cfg.min_side})")
    # Pillow names many camera JPEGs "MPO" (a JPEG with extra frames; the first is the picture).
    keep_source = fmt in ("JPEG", "MPO") and img.mode in ("RGB", "L") and not rotated
    if img.mode != "L":
        img = _to_rgb(img)
    return img, ("JPEG" if keep_source else None)


def encode_stored_image(data: bytes, cfg: ImageSettings) -> tuple[bytes, str]:
    """A raw image file → (the bytes stored in the shard, "jpeg"|"png"): see augment.encode_image."""
    from pipeline.augment import encode_image

    img, fmt = load_image(data, cfg)
    return encode_image(img, data, fmt, cfg.size)


def _to_rgb(img):
    from PIL import Image

    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # High bit-depth grayscale: Pillow's convert("L") clips, so rescale by the value range.
        a = np.asarray(img, dtype=np.float64)
        if not np.isfinite(a).all():
            raise Rejected("image has non-finite pixel values")
        hi = 65535.0 if img.mode.startswith("I;16") else max(float(a.max()), 1.0)
        lo = 0.0 if img.mode.startswith("I;16") else min(float(a.min()), 0.0)
        a = np.clip((a - lo) / (hi - lo) * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(a, mode="L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return img.convert("RGB")


# ---------------------------------------------------------------- audio
def decode_audio(data: bytes, cfg: AudioSettings) -> list[tuple[int, np.ndarray]]:
    """WAV/FLAC/OGG/… at any rate, depth and channel count → mono float32 16 kHz crops.

    Returns [(offset_in_16k_samples, crop[T])], T ≤ cfg.crop_samples; a tail shorter than
    cfg.min_samples is dropped (the file is rejected only if nothing is left).
    """
    import soundfile as sf

    if not data:
        raise Rejected("empty file (0 bytes)")
    try:
        wav, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)  # (frames, channels)
    except Exception as e:  # soundfile.LibsndfileError, RuntimeError, TypeError on odd headers
        raise Rejected(f"undecodable audio: {type(e).__name__}: {e}") from None
    if wav.shape[0] == 0 or wav.shape[1] == 0:
        raise Rejected("empty audio (0 frames)")
    if not np.isfinite(wav).all():
        raise Rejected("audio has non-finite samples (NaN/inf)")
    mono = wav.mean(axis=1)  # (frames,)
    if sr != SAMPLE_RATE:
        if sr < 1000:
            raise Rejected(f"implausible sample rate {sr} Hz")
        mono = resample(mono, sr)
    if mono.shape[0] < cfg.min_samples:
        raise Rejected(f"too short ({mono.shape[0] / SAMPLE_RATE:.3f} s < min_seconds={cfg.min_seconds})")
    if not np.any(mono):
        raise Rejected("silent audio (all samples are zero)")
    crops = []
    for off in range(0, mono.shape[0], cfg.crop_samples):
        crop = mono[off: off + cfg.crop_samples]
        if crop.shape[0] >= cfg.min_samples:
            crops.append((off, np.ascontiguousarray(crop, dtype=np.float32)))
    return crops


def resample(x: np.ndarray, orig_sr: int) -> np.ndarray:
    """(frames,) float32 at orig_sr → (frames',) float32 at 16 kHz with torchaudio's sinc resampler."""
    import torch
    import torchaudio.functional as AF

    with torch.no_grad():
        y = AF.resample(torch.from_numpy(np.ascontiguousarray(x)), int(orig_sr), SAMPLE_RATE)
    return y.numpy().astype(np.float32, copy=False)


# ---------------------------------------------------------------- text
TEXT_EXTENSIONS = (".txt", ".jsonl")


def split_text(data: bytes, path: str, cfg: TextSettings) -> tuple[list[tuple[str, str | None]], list[str]]:
    """A .txt/.jsonl file → ([(text, label_or_None)], [per-sample rejection reasons]).

    Raises Rejected when the whole file is unusable (not UTF-8, NUL bytes, empty, wrong
    extension, or no usable sample left).
    """
    lower = path.lower()
    if not lower.endswith(TEXT_EXTENSIONS):
        raise Rejected(f"unsupported extension for text (expected {', '.join(TEXT_EXTENSIONS)})")
    if not data:
        raise Rejected("empty file (0 bytes)")
    if b"\x00" in data:
        raise Rejected("contains NUL bytes (binary file?)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise Rejected(f"not UTF-8: {e}") from None
    text = text.lstrip("\ufeff").replace("\r\n", "\n").replace("\r", "\n")

    samples: list[tuple[str, str | None]] = []
    problems: list[str] = []
    if lower.endswith(".jsonl"):
        for n, line in enumerate(text.split("\n"), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                problems.append(f"line {n}: invalid JSON ({e.msg})")
                continue
            if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                problems.append(f"line {n}: expected an object with a string field 'text'")
                continue
            label = rec.get("label")
            if label is not None and not isinstance(label, (str, int)):
                problems.append(f"line {n}: 'label' must be a string or integer")
                continue
            samples.append((rec["text"], None if label is None else str(label)))
    else:
        units = text.split("\n") if cfg.unit == "line" else _paragraphs(text)
        samples = [(u, None) for u in units]

    kept = []
    for i, (s, label) in enumerate(samples):
        s = s.strip()
        if not s:
            continue
        if len(s) > cfg.max_chars:
            problems.append(f"sample {i + 1}: {len(s)} characters > max_chars={cfg.max_chars}")
            continue
        kept.append((s, label))
    if not kept:
        why = "; ".join(problems[:3]) if problems else "no non-blank text"
        raise Rejected(f"no usable text ({why})")
    return kept, problems


def _paragraphs(text: str) -> list[str]:
    paras, cur = [], []
    for line in text.split("\n"):
        if line.strip():
            cur.append(line.strip())
        elif cur:
            paras.append("\n".join(cur))
            cur = []
    if cur:
        paras.append("\n".join(cur))
    return paras
