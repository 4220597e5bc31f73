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


def _type_name(tp) -> str:
    import types
    import typing

    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if tp is type(None):
        return "null"
    if origin in (tuple, list):
        inner = [a for a in args if a is not Ellipsis]
        plural = {int: "integers", float: "numbers", str: "strings", bool: "true/false values"}
        if origin is tuple and inner and Ellipsis not in args:
            return f"a list of {len(inner)} {plural.get(inner[0], 'values')}"
        return "a list" + (f" of {plural.get(inner[0], 'values')}" if inner else "")
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string", dict: "a mapping",
            list: "a list", tuple: "a list"}.get(origin or tp, getattr(tp, "__name__", str(tp)))


def _fits(value, tp) -> bool:
    import types
    import typing

    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is typing.Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if origin in (tuple, list) or tp in (tuple, list):
        if not isinstance(value, (tuple, list)):
            return False
        inner = [a for a in args if a is not Ellipsis]
        if origin is tuple and inner and Ellipsis not in args:
            return len(value) == len(inner) and all(_fits(v, a) for v, a in zip(value, inner))
        return not inner or all(_fits(v, inner[0]) for v in value)
    if (origin or tp) is dict:
        return isinstance(value, dict)
    return True  # sections (their own classes) are checked field by field where they are built


def check_fields(cls, values: dict, section: str) -> None:
    """Raise ConfigError naming the field and the type it must have when a value in `values` (a
    mapping of field → value about to build dataclass `cls`, e.g. from YAML or --set) does not fit
    its annotation: `train.lr: must be a number, got 'abc'` — before any range check compares it."""
    import typing

    hints = typing.get_type_hints(cls)
    for name, value in values.items():
        if name in hints and not _fits(value, hints[name]):
            raise ConfigError(f"{section}{name}: must be {_type_name(hints[name])}, got {value!r}")


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
    split: str | None = None
    """Audio, Common Voice folders only: preprocess the clips listed in INPUT/<split>.tsv (default
    train.tsv, else validated.tsv; see pipeline/ingest.py)."""

    def __post_init__(self) -> None:
        _check(self.modality in MODALITIES, "modality",
               f"unknown modality {self.modality!r}; expected one of {', '.join(MODALITIES)}")
        _check(bool(self.input), "input", "is required")
        _check(bool(self.output), "output", "is required")
        _check(self.rows_per_file >= 1, "rows_per_file", "must be >= 1")
        _check(self.tokenizer is None or self.modality == "text", "tokenizer",
               "only applies to --modality text")
        _check(self.split is None or self.modality == "audio", "split",
               "--split only applies to --modality audio (a Common Voice folder)")
        _check(self.split is None or (bool(self.split) and "/" not in self.split
                                      and not self.split.endswith(".tsv")), "split",
               f"--split takes a TSV's name without .tsv (train, dev, test, validated, ...), got {self.split!r}")

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
