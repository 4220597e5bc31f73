"""Typed, validated settings for turning raw files into Arrow blocks.

Every field is checked in ``__post_init__`` and a bad value raises ``ConfigError`` naming the
field, so a job fails before Ray starts. Leaf module: imports nothing from the project.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

MODALITIES = ("image", "audio", "text")
# Rows per Parquet row group of the shards, sized by bytes (readers and object stores like row
# groups of ~1 MB and up, and each group costs a footer entry): a 224-px JPEG row is ~30 kB (64 rows
# ≈ 2 MB), a 15-s audio crop 960 kB (16 ≈ 15 MB), a text row 0.1–2 kB (512 ≈ 0.1–1 MB). Training
# shuffles smaller chunks of them (stream.CHUNK_ROWS) and reads each group once per read task.
ROW_GROUP_ROWS = {"image": 64, "audio": 16, "text": 512}
EVAL_CROP = 0.875  # MAE/BEiT evaluation: shorter side resized to size / 0.875 (256 for 224), center crop
JPEG_QUALITY = 90  # stored images (pipeline/augment.py)
SAMPLE_RATE = 16_000  # every audio shard is mono float32 at 16 kHz (data2vec's speech rate)


def stored_side(size: int) -> int:
    """Shorter side of a stored image for training size `size` (256 for 224, 32 for 28)."""
    return int(round(size / EVAL_CROP))


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the field."""


def check(cond: bool, name: str, msg: str) -> None:
    """Raise ConfigError("<name>: <msg>") unless `cond` holds (shared by every config module)."""
    if not cond:
        raise ConfigError(f"{name}: {msg}")


_check = check


@dataclass(frozen=True, kw_only=True)
class ImageSettings:
    size: int = 224
    """Training side in pixels. Images are stored (JPEG, or PNG when smaller) with their shorter side
    resized to size / 0.875 (256 for 224) and their aspect kept, so every epoch can draw its own
    random crop (pipeline/augment.py)."""
    min_side: int = 8
    """Images whose shorter side is below this are rejected ("image too small")."""
    max_pixels: int = 100_000_000
    """Larger images are rejected (decompression-bomb guard)."""

    def __post_init__(self) -> None:
        _check(16 <= self.size <= 4096, "image.size", f"must be in [16, 4096], got {self.size}")
        _check(1 <= self.min_side, "image.min_side", f"must be >= 1, got {self.min_side}")
        _check(self.max_pixels > 0, "image.max_pixels", "must be > 0")


@dataclass(frozen=True, kw_only=True)
class AudioSettings:
    crop_seconds: float = 15.0
    """Long files are cut into consecutive crops of at most this many seconds."""
    min_seconds: float = 0.25
    """Files (and tail crops) shorter than this are rejected / dropped ("too short")."""

    def __post_init__(self) -> None:
        _check(0.1 <= self.crop_seconds <= 600, "audio.crop_seconds",
               f"must be in [0.1, 600], got {self.crop_seconds}")
        _check(0.0 < self.min_seconds <= self.crop_seconds, "audio.min_seconds",
               f"must be in (0, crop_seconds={self.crop_seconds}], got {self.min_seconds}")

    @property
    def crop_samples(self) -> int:
        return int(round(self.crop_seconds * SAMPLE_RATE))

    @property
    def min_samples(self) -> int:
        return int(round(self.min_seconds * SAMPLE_RATE))


@dataclass(frozen=True, kw_only=True)
class TextSettings:
    unit: str = "line"
    """How a .txt file splits into samples: "line" (one per line) or "paragraph" (blank-line separated)."""
    max_length: int = 512
    """Tokens per row including <s> and </s>; longer samples are chunked."""
    pack: bool = False
    """Pack consecutive short samples of the same file (same label) into rows up to max_length."""
    max_chars: int = 100_000
    """A single sample longer than this many characters is rejected (huge line)."""
    tokenizer_type: str = "bpe"
    """"bpe" (byte-level BPE, RoBERTa-style) or "unigram"; used when no tokenizer is given."""
    vocab_size: int = 8000
    """Vocabulary size when training a tokenizer."""
    tokenizer_max_samples: int = 1_000_000
    """At most this many samples feed tokenizer training."""

    def __post_init__(self) -> None:
        _check(self.unit in ("line", "paragraph"), "text.unit",
               f"must be 'line' or 'paragraph', got {self.unit!r}")
        _check(8 <= self.max_length <= 65536, "text.max_length",
               f"must be in [8, 65536], got {self.max_length}")
        _check(self.max_chars >= 1, "text.max_chars", "must be >= 1")
        _check(self.tokenizer_type in ("bpe", "unigram"), "text.tokenizer_type",
               f"must be 'bpe' or 'unigram', got {self.tokenizer_type!r}")
        _check(300 <= self.vocab_size <= 1_000_000, "text.vocab_size",
               f"must be in [300, 1000000] (byte-level BPE needs 256 bytes + specials), got {self.vocab_size}")
        _check(self.tokenizer_max_samples >= 1, "text.tokenizer_max_samples", "must be >= 1")


@dataclass(frozen=True, kw_only=True)
class PreprocessConfig:
    modality: str
    input: str
    """Folder (local path or URI) of raw files; DIR/<class>/<file> gives a `label` column."""
    output: str
    """Folder (local path or URI) for shards/, manifest.json, rejected.jsonl (and tokenizer.json)."""
    tokenizer: str | None = None
    """Existing tokenizer.json to reuse (text only), e.g. the pretraining run's for a probe split."""
    overwrite: bool = False
    rows_per_file: int = 2000
    """Target rows per Parquet shard."""
    image: ImageSettings = field(default_factory=ImageSettings)
    audio: AudioSettings = field(default_factory=AudioSettings)
    text: TextSettings = field(default_factory=TextSettings)

    def __post_init__(self) -> None:
        _check(self.modality in MODALITIES, "modality",
               f"unknown modality {self.modality!r}; expected one of {', '.join(MODALITIES)}")
        _check(bool(self.input), "input", "is required")
        _check(bool(self.output), "output", "is required")
        _check(self.rows_per_file >= 1, "rows_per_file", "must be >= 1")
        _check(self.tokenizer is None or self.modality == "text", "tokenizer",
               "only applies to --modality text")

    def settings(self) -> dict:
        """The settings recorded in manifest.json (only those of this modality)."""
        out = {"rows_per_file": self.rows_per_file}
        if self.modality == "image":
            out.update(dataclasses.asdict(self.image), channels=3, stored="encoded",
                       stored_short_side=stored_side(self.image.size), jpeg_quality=JPEG_QUALITY)
        elif self.modality == "audio":
            out.update(dataclasses.asdict(self.audio), sample_rate=SAMPLE_RATE, channels=1,
                       dtype="float32")
        else:
            out.update(dataclasses.asdict(self.text))
        return out
