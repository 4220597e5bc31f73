"""Raw files → tokenized Arrow blocks (Parquet shards) with Ray Data.

    list files (driver) → from_items(paths) → map_batches(read + decode per modality) → write_parquet

Output folder:
    OUT/shards/*.parquet   the rows (schema per modality, see `SCHEMAS`)
    OUT/manifest.json      modality, counts, settings, column schema
    OUT/rejected.jsonl     {"path", "reason"} per unusable input
    OUT/tokenizer.json     text only: the tokenizer the ids come from

Audio transcripts (optional; the `transcript` column is null without them), either
    DIR/a/b/clip7.txt                 beside DIR/a/b/clip7.wav (same folder, same stem), or
    DIR/transcripts.tsv               `<path relative to DIR>\t<transcript>` per line,
                                      optional header line `path\ttranscript`, or
    DIR/transcripts.jsonl             {"path": "<relative to DIR>", "transcript": "..."} per line.
Transcript files are not audio: they are neither decoded nor counted in counts.read (they
have their own count, counts.transcript_files). A `.txt` whose stem matches no other file in
its folder is not a transcript and is treated like any other input (rejected as not audio).
The top-level manifests are read and checked on the driver before any Ray work: a bad line, an
empty transcript, a path that names no audio file, or a clip given a transcript twice raises
ConfigError naming the file and line. Side `.txt` files are read by the map tasks; an
unreadable, non-UTF-8 or empty one is recorded in rejected.jsonl and its clip gets no transcript.
A transcript describes the whole file, so it is kept only when the file yields exactly one crop.

Speech corpora preprocess as they are downloaded (`detect_layout` tells them apart; manifest.json
records {"layout": {"name", ...}}):
    LibriSpeech    DIR = a part (train-clean-100/) or the LibriSpeech/ folder above its parts:
                   <speaker>/<chapter>/<speaker>-<chapter>-<utt>.flac and one
                   <speaker>-<chapter>.trans.txt per chapter, lines `<utterance-id> <TRANSCRIPT>`.
                   Each clip gets its line's transcript and its speaker folder as label; the
                   .trans.txt files count as transcript files, BOOKS.TXT, SPEAKERS.TXT, ... as
                   counts.corpus_files.
    Common Voice   DIR = cv-corpus-XX/<lang>/: clips/*.mp3 and <split>.tsv (train, dev, test,
                   validated, ...; tab-separated with a header; `path` names a file in clips/,
                   `sentence` is its transcript; quotes are text). Only the clips that the chosen
                   split's TSV lists are read (--split; default train, else validated), with no
                   label; the other clips count as counts.not_in_split, the other TSVs as
                   counts.corpus_files.
Their transcript files are read on the driver before any Ray work and follow the manifests' rules:
a bad line, an utterance id or TSV row naming no clip, or a clip given a transcript twice raises
ConfigError naming the file and line.

Bad files never raise out of a map task: each decoder raises `Rejected` per file, the batch
function catches it, keeps the good rows and writes the reason to OUT/_rejected/ (merged into
rejected.jsonl at the end, duplicates from task retries removed).
"""
from __future__ import annotations

import collections
import json
import os
import posixpath
import time
import uuid
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import ray

from pipeline import storage
from pipeline.config import ROW_GROUP_ROWS, SAMPLE_RATE, ConfigError, PreprocessConfig
from pipeline.decoders import Rejected, decode_audio, encode_stored_image, split_text
from pipeline.tokenizer import chunk_ids, pack_rows, train_tokenizer

SHARDS = "shards"

# Column contract between ingestion and training (label is null for unlabeled files).
SCHEMAS = {
    "image": {"image": "binary: the image as JPEG or PNG, shorter side <= settings.stored_short_side "
                       "(size / 0.875); see pipeline/augment.py",
              "format": "string: jpeg or png", "label": "string", "path": "string"},
    "audio": {"audio": "list<float32> mono 16 kHz", "num_samples": "int64",
              "offset": "int64 (crop start, in 16 kHz samples)", "label": "string", "path": "string",
              "transcript": "string: the clip's transcript, whitespace-stripped; null when it has "
                            "none or the file was cut into several crops"},
    "text": {"input_ids": "list<int32> (<s> … </s>)", "length": "int32", "label": "string",
             "path": "string"},
}
BATCH_FILES = {"image": 64, "audio": 8, "text": 16}  # files per map_batches call


REJECTS = "_rejected"  # side files written by map tasks, merged into rejected.jsonl at the end


class _Files:
    """Per-batch helper for map tasks: reads each file's bytes, collects rejections, writes them
    to OUT/_rejected/<uuid>.jsonl (works on local disks, shared FS and object stores alike)."""

    def __init__(self, in_fs, out_fs, out_root: str):
        self.in_fs, self.out_fs, self.out_root = in_fs, out_fs, out_root

    def read(self, paths, rejected: list):
        for path in paths:
            try:
                with self.in_fs.open_input_stream(path) as f:
                    data = f.read()
            except OSError as e:
                rejected.append((path, f"unreadable: {e}"))
                continue
            yield path, data

    def flush(self, rejected: list) -> None:
        if rejected:
            body = "".join(json.dumps(storage.redact({"path": p, "reason": r})) + "\n" for p, r in rejected)
            storage.write_text(self.out_fs, f"{self.out_root}/{REJECTS}/{uuid.uuid4().hex}.jsonl", body)


# ------------------------------------------------------------------ batch functions (map tasks)
def image_batch(batch: dict, *, cfg: PreprocessConfig, root: str, files: _Files) -> pa.Table:
    """{"path"} → {"image" (stored JPEG/PNG bytes, shorter side ≤ size / 0.875), "format", "label",
    "path"}: compact (a 224 recipe's photo is ~20–30 kB instead of 150 kB of pixels) and with room
    for each epoch's random crop (pipeline/augment.py)."""
    images, formats, labels, paths, rejected = [], [], [], [], []
    for path, data in files.read(batch["path"], rejected):
        try:
            stored, fmt = encode_stored_image(data, cfg.image)
        except Rejected as e:
            rejected.append((path, str(e)))
            continue
        images.append(stored)
        formats.append(fmt)
        labels.append(storage.label_of(root, path))
        paths.append(path)
    files.flush(rejected)
    return pa.table({"image": pa.array(images, pa.binary()), "format": pa.array(formats, pa.string()),
                     "label": pa.array(labels, pa.string()), "path": pa.array(paths, pa.string())})


def audio_batch(batch: dict, *, cfg: PreprocessConfig, root: str, files: _Files) -> pa.Table:
    """{"path"[, "transcript", "transcript_file", "label"]} → one row per 16 kHz crop:
    {"audio", "num_samples", "offset", "label", "path", "transcript"}.

    `transcript` (from a manifest or a corpus layout's transcripts) and `transcript_file` (a side
    .txt to read) are "" when the clip has none; the row's transcript is set only when the file
    yields one crop. `label` is the driver's label ("" = none; without the column: ROOT/<class>/...).
    """
    cols = {k: [] for k in ("audio", "num_samples", "offset", "label", "path", "transcript")}
    n = len(batch["path"])
    labels = batch["label"] if "label" in batch else [storage.label_of(root, p) or "" for p in batch["path"]]
    known = dict(zip(batch["path"], zip(batch.get("transcript", [""] * n),
                                        batch.get("transcript_file", [""] * n), labels)))
    rejected = []
    for path, data in files.read(batch["path"], rejected):
        try:
            crops = decode_audio(data, cfg.audio)
        except Rejected as e:
            rejected.append((path, str(e)))
            continue
        text, side, label = known.get(path, ("", "", ""))
        label = label or None
        if len(crops) != 1 or crops[0][1].shape[0] >= cfg.audio.crop_samples:
            # Several crops, or one full-length crop whose short tail may have been dropped: the
            # transcript of the whole file fits none of them.
            text = None
        elif side:
            text = _read_transcript(files, side, rejected)
        else:
            text = text or None
        for off, wav in crops:
            cols["audio"].append(wav)
            cols["num_samples"].append(wav.shape[0])
            cols["offset"].append(off)
            cols["label"].append(label)
            cols["path"].append(path)
            cols["transcript"].append(text)
    files.flush(rejected)
    return pa.table({
        "audio": pa.array(cols["audio"], pa.list_(pa.float32())),
        "num_samples": pa.array(cols["num_samples"], pa.int64()),
        "offset": pa.array(cols["offset"], pa.int64()),
        "label": pa.array(cols["label"], pa.string()),
        "path": pa.array(cols["path"], pa.string()),
        "transcript": pa.array(cols["transcript"], pa.string()),
    })


def _read_transcript(files: _Files, path: str, rejected: list) -> str | None:
    """A side .txt → its stripped text, or None (and a rejection) when unusable."""
    for _, data in files.read([path], rejected):
        try:
            text = data.decode("utf-8-sig").strip()
        except UnicodeDecodeError as e:
            rejected.append((path, f"transcript is not UTF-8 text (byte {e.start})"))
            return None
        if not text:
            rejected.append((path, "transcript is empty"))
            return None
        return text
    return None  # unreadable: files.read recorded why


# ------------------------------------------------------------------ audio transcripts (driver)
TRANSCRIPT_MANIFESTS = ("transcripts.tsv", "transcripts.jsonl")  # at the top of the input folder


@dataclass
class AudioInputs:
    """An audio input folder's files, split into audio and transcripts (see the module doc)."""

    audio: list[str]
    """Files to decode as audio (everything that is not a transcript or corpus file), sorted."""
    transcripts: dict[str, str] = field(default_factory=dict)
    """Audio path → stripped transcript, from transcripts.tsv / .jsonl or the layout's transcripts."""
    sidecars: dict[str, str] = field(default_factory=dict)
    """Audio path → path of its side <stem>.txt (read by the map tasks)."""
    transcript_files: list[str] = field(default_factory=list)
    """Every transcript file found (manifests, side .txt, *.trans.txt, the split's TSV)."""
    labels: dict[str, str | None] = field(default_factory=dict)
    """Audio path → label where the layout names it (LibriSpeech: the speaker folder, Common Voice:
    none); other files are labeled by storage.label_of (ROOT/<class>/...)."""
    layout: dict = field(default_factory=lambda: {"name": "plain"})
    """manifest.json's "layout": {"name": one of LAYOUTS, ...} (see detect_layout)."""
    not_in_split: list[str] = field(default_factory=list)
    """Common Voice: files under clips/ that the split's TSV does not list (not read, not rejected)."""
    corpus_files: list[str] = field(default_factory=list)
    """The layout's other files, neither audio nor transcripts (not read, not rejected): a Common
    Voice folder's other TSVs, LibriSpeech's SPEAKERS.TXT, CHAPTERS.TXT, ..."""

    def label(self, root: str, path: str) -> str | None:
        return self.labels[path] if path in self.labels else storage.label_of(root, path)


def audio_inputs(fs, root: str, files: list[str], shown: str | None = None,
                 split: str | None = None) -> AudioInputs:
    """Split the listing of an audio input folder into audio files and transcripts, by its layout
    (detect_layout).

    Reads the transcript files (small) here on the driver; raises ConfigError naming the file and
    line for a malformed line, an empty transcript, a path or utterance id that is not an audio
    file of the folder, or a clip given a transcript twice; and naming --split when `split` is
    given for a folder that is not Common Voice, or names no TSV of it. `shown` is how the folder
    is named in messages (default: `root`).
    """
    shown = (shown or root).rstrip("/")
    layout = detect_layout(root, files)
    languages = _common_voice_languages(root, files) if layout == "plain" else []
    if languages:  # a release folder (cv-corpus-NN/) above its language folders: not one corpus
        raise ConfigError(f"input: {shown} is a Common Voice release holding language folders "
                          f"({', '.join(languages)}): pass one of them, e.g. --input {shown}/{languages[0]}")
    if split is not None and layout != "common_voice":
        what = "a LibriSpeech folder" if layout == "librispeech" else "not a Common Voice folder"
        raise ConfigError(f"split: --split {split} needs a Common Voice folder (clips/ and {split}.tsv); "
                          f"{shown} is {what}")
    if layout == "common_voice":
        return _common_voice_inputs(fs, root, files, shown, split)
    listed = set(files)
    manifests = [f"{root}/{n}" for n in TRANSCRIPT_MANIFESTS if f"{root}/{n}" in listed]
    chapters = [f for f in files if f.endswith(LIBRISPEECH_TRANSCRIPTS)] if layout == "librispeech" else []
    corpus_files = [f for f in files if posixpath.basename(f) in LIBRISPEECH_FILES] if chapters else []
    not_audio = set(manifests) | set(chapters) | set(corpus_files)
    rest = [f for f in files if f not in not_audio]
    by_stem: dict[tuple[str, str], list[str]] = {}
    for f in rest:
        d, name = posixpath.split(f)
        by_stem.setdefault((d, os.path.splitext(name)[0]), []).append(f)
    sidecars, side_files = {}, set()
    for group in by_stem.values():
        txts = [f for f in group if f.lower().endswith(".txt")]
        others = [f for f in group if not f.lower().endswith(".txt")]
        if len(txts) == 1 and others:  # clip7.txt beside clip7.wav (a lone .txt is just a file)
            side_files.add(txts[0])
            sidecars.update((o, txts[0]) for o in others)
    audio = [f for f in rest if f not in side_files]
    audio_set = set(audio)
    transcripts: dict[str, str] = {}
    where: dict[str, str] = {}

    def give(p: str, text: str, loc: str, name: str) -> None:  # one transcript per clip, from anywhere
        if p in where:
            raise ConfigError(f"transcripts: {loc}: {name!r} already has a transcript ({where[p]})")
        if p in sidecars:
            raise ConfigError(f"transcripts: {loc}: {name!r} already has a transcript "
                              f"(its side file {shown}/{sidecars[p][len(root) + 1:]})")
        transcripts[p], where[p] = text, loc

    for m in manifests:
        with fs.open_input_stream(m) as fh:
            data = fh.read()
        shown_m = f"{shown}/{posixpath.basename(m)}"
        for lineno, rel, text in _parse_manifest(data, shown_m):
            loc = f"{shown_m} line {lineno}"
            norm = posixpath.normpath(rel)
            if rel.startswith("/") or norm == ".." or norm.startswith("../"):
                raise ConfigError(f"transcripts: {loc}: path {rel!r} must be relative to the input folder")
            p = f"{root}/{norm}"
            if p not in audio_set:
                what = "is a corpus file, not audio" if p in corpus_files else \
                    "is a transcript file, not audio" if p in side_files or p in not_audio else \
                    "does not exist under the input folder"
                raise ConfigError(f"transcripts: {loc}: {rel!r} {what}")
            give(p, text, loc, rel)
    out = AudioInputs(audio=audio, transcripts=transcripts, sidecars=sidecars,
                      transcript_files=sorted(manifests + sorted(side_files) + chapters),
                      corpus_files=corpus_files)
    if chapters:
        _add_librispeech(out, fs, root, chapters, shown, give)
    return out


def _parse_manifest(data: bytes, name: str):
    """transcripts.tsv / transcripts.jsonl bytes → (line number, relative path, stripped text);
    raises ConfigError("transcripts: <name> line N: why") on a bad line."""
    tsv = name.endswith(".tsv")
    first = True
    for lineno, line in _lines(data, name):
        def bad(why):
            return ConfigError(f"transcripts: {name} line {lineno}: {why}")
        if tsv:
            parts = line.split("\t")
            if first and [x.strip().lower() for x in parts] == ["path", "transcript"]:
                first = False
                continue  # header
            if len(parts) != 2:
                raise bad(f"expected 2 tab-separated columns (path, transcript), got {len(parts)}")
            rel, text = parts
        else:
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise bad(f"invalid JSON ({e.msg})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("path"), str) \
                    or not isinstance(obj.get("transcript"), str):
                raise bad('expected an object with string keys "path" and "transcript"')
            rel, text = obj["path"], obj["transcript"]
        first = False
        rel, text = rel.strip(), text.strip()
        if not rel:
            raise bad("empty path")
        if not text:
            raise bad(f"empty transcript for {rel!r}")
        yield lineno, rel, text


def _lines(data: bytes, name: str):
    """A transcript file's bytes → (line number, line) for each non-blank line, without a BOM or
    trailing CR; raises ConfigError("transcripts: <name> line N: not UTF-8 text ...")."""
    for lineno, raw in enumerate(data.split(b"\n"), 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(f"transcripts: {name} line {lineno}: not UTF-8 text (byte {e.start})") from None
        line = line.lstrip("\ufeff").rstrip("\r")
        if line.strip():
            yield lineno, line


def _read_all(fs, paths: list[str]) -> list[bytes]:
    """Small files' bytes, in order, read by 16 threads (a LibriSpeech part has hundreds to
    thousands of chapter transcripts; on an object store each read is a round trip)."""
    from concurrent.futures import ThreadPoolExecutor

    def one(path: str) -> bytes:
        with fs.open_input_stream(path) as f:
            return f.read()

    with ThreadPoolExecutor(max_workers=16) as pool:
        return list(pool.map(one, paths))


# ------------------------------------------------------------------ speech corpus layouts (driver)
LAYOUTS = ("plain", "librispeech", "common_voice")
LIBRISPEECH_TRANSCRIPTS = ".trans.txt"  # <speaker>-<chapter>.trans.txt in each chapter folder
LIBRISPEECH_FILES = ("BOOKS.TXT", "CHAPTERS.TXT", "LICENSE.TXT", "README.TXT", "SPEAKERS.TXT")
COMMON_VOICE_CLIPS = "clips"
COMMON_VOICE_DEFAULT_SPLITS = ("train", "validated")  # without --split: the first TSV of these present


def detect_layout(root: str, files: list[str]) -> str:
    """The input folder's speech corpus layout, from its listing alone (one of LAYOUTS):

        "common_voice"  ROOT/clips/ holds files and ROOT/ a *.tsv other than transcripts.tsv
                        (a Common Voice language folder, cv-corpus-XX/<lang>/);
        "librispeech"   some file is named *.trans.txt, at any depth (a LibriSpeech part such as
                        train-clean-100/, or the LibriSpeech/ folder above its parts);
        "plain"         anything else: side .txt files and transcripts.tsv/.jsonl (module doc).
    """
    clips = f"{root}/{COMMON_VOICE_CLIPS}/"
    tsvs = [f for f in files if posixpath.dirname(f) == root and f.endswith(".tsv")
            and posixpath.basename(f) not in TRANSCRIPT_MANIFESTS]
    if tsvs and any(f.startswith(clips) for f in files):
        return "common_voice"
    if any(f.endswith(LIBRISPEECH_TRANSCRIPTS) for f in files):
        return "librispeech"
    return "plain"


def _common_voice_languages(root: str, files: list[str]) -> list[str]:
    """The folders directly under ROOT that are Common Voice language folders (clips/ and a TSV)."""
    clips, tsvs = set(), set()
    for f in files:
        parts = f[len(root) + 1:].split("/")
        if len(parts) >= 3 and parts[1] == COMMON_VOICE_CLIPS:
            clips.add(parts[0])
        elif len(parts) == 2 and parts[1].endswith(".tsv") and parts[1] not in TRANSCRIPT_MANIFESTS:
            tsvs.add(parts[0])
    return sorted(clips & tsvs)


def _add_librispeech(out: AudioInputs, fs, root: str, chapters: list[str], shown: str, give) -> None:
    """Read each chapter's <speaker>-<chapter>.trans.txt (lines `<utterance-id> <TRANSCRIPT>`) and
    give each line's transcript to the clip <utterance-id>.* beside it (`give` refuses a second
    transcript). Clips of a chapter folder are labeled by their speaker folder; out.layout records
    the chapter count and, when ROOT is the folder above the parts, the parts (LibriSpeech's
    "subsets") found."""
    by_folder: dict[str, dict[str, list[str]]] = {}  # chapter folder → stem → audio files
    for f in out.audio:
        d, name = posixpath.split(f)
        by_folder.setdefault(d, {}).setdefault(os.path.splitext(name)[0], []).append(f)
    subsets = set()
    for t, data in zip(chapters, _read_all(fs, chapters)):
        folder = posixpath.dirname(t)
        shown_t = f"{shown}/{t[len(root) + 1:]}"
        stems = by_folder.get(folder, {})
        for lineno, utt, text in _parse_librispeech(data, shown_t):
            clips = stems.get(utt)
            if not clips:
                raise ConfigError(f"transcripts: {shown_t} line {lineno}: utterance {utt!r} names no audio "
                                  f"file in its folder (expected {utt}.flac beside the .trans.txt)")
            for p in clips:
                give(p, text, f"{shown_t} line {lineno}", utt)
        rel = folder[len(root) + 1:].split("/") if folder != root else []  # [..., <part>,] speaker, chapter
        if len(rel) >= 2:
            out.labels.update((p, rel[-2]) for group in stems.values() for p in group)
        if len(rel) >= 3:
            subsets.add(rel[-3])
    out.layout = {"name": "librispeech", "chapters": len(chapters), **({"subsets": sorted(subsets)} if subsets else {})}


def _parse_librispeech(data: bytes, name: str):
    """A LibriSpeech .trans.txt's bytes → (line number, utterance id, stripped transcript);
    raises ConfigError("transcripts: <name> line N: why") on a bad line."""
    for lineno, line in _lines(data, name):
        parts = line.split(None, 1)
        if len(parts) != 2 or not parts[1].strip():
            raise ConfigError(f"transcripts: {name} line {lineno}: expected '<utterance-id> <transcript>', "
                              f"got {line[:80]!r}")
        yield lineno, parts[0], parts[1].strip()


def _common_voice_inputs(fs, root: str, files: list[str], shown: str, split: str | None) -> AudioInputs:
    """A Common Voice language folder (clips/*.mp3 and one TSV per split) → the clips its
    <split>.tsv lists, each with its `sentence` (default split: COMMON_VOICE_DEFAULT_SPLITS). Every
    other file is left out and counted (not_in_split, corpus_files)."""
    listed = set(files)
    tsvs = {posixpath.basename(f)[:-len(".tsv")]: f for f in files
            if posixpath.dirname(f) == root and f.endswith(".tsv")}
    for n in TRANSCRIPT_MANIFESTS:
        if f"{root}/{n}" in listed:
            raise ConfigError(f"transcripts: {shown}/{n}: a Common Voice folder's transcripts come from its "
                              f"<split>.tsv; move {n} out of {shown}")
    names = ", ".join(sorted(tsvs))
    if split is None:
        split = next((n for n in COMMON_VOICE_DEFAULT_SPLITS if n in tsvs), None)
        if split is None:
            raise ConfigError(f"split: {shown} is a Common Voice folder without train.tsv or validated.tsv; "
                              f"choose one of its TSVs with --split: {names}")
    elif split not in tsvs:
        raise ConfigError(f"split: --split {split}: {shown}/{split}.tsv does not exist; "
                          f"this Common Voice folder has: {names}")
    tsv, shown_t = tsvs[split], f"{shown}/{split}.tsv"
    clips = f"{root}/{COMMON_VOICE_CLIPS}"
    transcripts: dict[str, str] = {}
    where: dict[str, str] = {}
    for lineno, rel, text in _parse_common_voice(_read_all(fs, [tsv])[0], shown_t):
        loc = f"{shown_t} line {lineno}"
        norm = posixpath.normpath(rel)
        if rel.startswith("/") or norm == ".." or norm.startswith("../"):
            raise ConfigError(f"transcripts: {loc}: path {rel!r} must name a file inside clips/")
        p = f"{clips}/{norm}"
        if p not in listed and f"{p}.mp3" in listed:
            p += ".mp3"  # the first releases named clips without their extension
        if p not in listed:
            raise ConfigError(f"transcripts: {loc}: clip {rel!r} does not exist under {shown}/{COMMON_VOICE_CLIPS}")
        if p in where:
            raise ConfigError(f"transcripts: {loc}: clip {rel!r} already has a transcript ({where[p]})")
        transcripts[p], where[p] = text, loc
    if not transcripts:
        raise ConfigError(f"split: {shown_t} lists no clips; choose another split with --split ({names})")
    audio = sorted(transcripts)
    return AudioInputs(
        audio=audio, transcripts=transcripts, transcript_files=[tsv],
        labels=dict.fromkeys(audio),  # every clip is under clips/: no class folder
        layout={"name": "common_voice", "split": split, "tsv": f"{split}.tsv"},
        not_in_split=[f for f in files if f.startswith(clips + "/") and f not in transcripts],
        corpus_files=[f for f in files if f != tsv and not f.startswith(clips + "/")])


def _parse_common_voice(data: bytes, name: str):
    """A Common Voice <split>.tsv's bytes → (line number, path inside clips/, stripped sentence).
    Tab-separated with a header row naming the columns (`path` and `sentence` are used); quotes
    are part of the text, never CSV quoting. Raises ConfigError naming the file and line."""
    header: list[str] | None = None
    for lineno, line in _lines(data, name):
        parts = line.split("\t")
        if header is None:
            header = [c.strip() for c in parts]
            if "path" not in header or "sentence" not in header:
                raise ConfigError(f"split: {name} is not a Common Voice clip list (its header has no 'path' "
                                  f"and 'sentence' columns); choose another split with --split")
            i_path, i_text = header.index("path"), header.index("sentence")
            continue
        if len(parts) != len(header):
            raise ConfigError(f"transcripts: {name} line {lineno}: expected {len(header)} tab-separated "
                              f"columns (as in the header), got {len(parts)}")
        rel, text = parts[i_path].strip(), parts[i_text].strip()
        if not rel:
            raise ConfigError(f"transcripts: {name} line {lineno}: empty path")
        if not text:
            raise ConfigError(f"transcripts: {name} line {lineno}: empty sentence for {rel!r}")
        yield lineno, rel, text


def text_samples_batch(batch: dict, *, cfg: PreprocessConfig, files: _Files) -> dict:
    """{"path"} → {"text"}: the samples only, for tokenizer training (rejections logged later)."""
    texts = []
    for path, data in files.read(batch["path"], []):
        try:
            texts.extend(t for t, _ in split_text(data, path, cfg.text)[0])
        except Rejected:
            pass
    return {"text": np.asarray(texts, dtype=object)}


def int32_lists(rows: list[np.ndarray]) -> pa.ListArray:
    """int32 rows → one Arrow list<int32> column, from flat values and offsets (≈ 15× faster than
    pa.array over the row objects: the text path's per-row cost)."""
    offsets = np.zeros(len(rows) + 1, np.int32)
    np.cumsum([len(r) for r in rows], out=offsets[1:])
    values = np.concatenate(rows).astype(np.int32, copy=False) if rows else np.zeros(0, np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))


_TOKENIZERS: dict = {}  # (tokenizer file, sha256 of its JSON) → Tokenizer, per worker process


def text_batch(batch: dict, *, tokenizer_file: str, tokenizer_sha: str, cfg: PreprocessConfig, root: str,
               files: _Files) -> pa.Table:
    """Map task: files → framed/chunked token-id rows (TextTokenize), the tokenizer read once per
    worker process (keyed by content: a re-run may rewrite the file). Tasks, not an actor pool: Ray
    Data passes a pool's actors their UDF through the object store and lets them restart, which
    Ray's core worker reports on the driver's console as an error-level line."""
    key = (tokenizer_file, tokenizer_sha)
    if key not in _TOKENIZERS:
        # One task holds one CPU: keep the Rust tokenizer from spawning a thread per core.
        os.environ.setdefault("RAYON_NUM_THREADS", "1")
        from tokenizers import Tokenizer

        _TOKENIZERS.clear()
        _TOKENIZERS[key] = Tokenizer.from_str(storage.read_text(*storage.resolve(tokenizer_file)))
    return TextTokenize(_TOKENIZERS[key], cfg, root, files)(batch)


class TextTokenize:
    """A loaded tokenizer's files → framed/chunked token-id rows."""

    def __init__(self, tok, cfg: PreprocessConfig, root: str, files: _Files):
        self.tok, self.cfg, self.root, self.files = tok, cfg, root, files

    def __call__(self, batch: dict) -> pa.Table:
        tcfg = self.cfg.text
        ids_col, labels, paths, rejected = [], [], [], []
        for path, data in self.files.read(batch["path"], rejected):
            try:
                samples, problems = split_text(data, path, tcfg)
            except Rejected as e:
                rejected.append((path, str(e)))
                continue
            rejected.extend((path, p) for p in problems)
            folder_label = storage.label_of(self.root, path)
            encs = self.tok.encode_batch([t for t, _ in samples], add_special_tokens=False)
            rows: list[tuple[np.ndarray, str | None]] = []
            for (_, label), enc in zip(samples, encs):
                label = label if label is not None else folder_label
                rows.extend((r, label) for r in chunk_ids(enc.ids, tcfg.max_length))
            if tcfg.pack:  # pack runs of consecutive rows that share a label
                packed, i = [], 0
                while i < len(rows):
                    j = i
                    while j < len(rows) and rows[j][1] == rows[i][1]:
                        j += 1
                    packed.extend((r, rows[i][1]) for r in pack_rows([r for r, _ in rows[i:j]], tcfg.max_length))
                    i = j
                rows = packed
            for r, label in rows:
                ids_col.append(r)
                labels.append(label)
                paths.append(path)
        self.files.flush(rejected)
        return pa.table({
            "input_ids": int32_lists(ids_col),
            "length": pa.array([len(r) for r in ids_col], pa.int32()),
            "label": pa.array(labels, pa.string()),
            "path": pa.array(paths, pa.string()),
        })


# ------------------------------------------------------------------ driver
def check_paths(cfg: PreprocessConfig):
    """Validate input/output (for audio also the folder's transcripts, layout and --split) before
    any Ray work; returns (in_fs, in_root, out_fs, out_root)."""
    return _checked(cfg)[:4]


def _checked(cfg: PreprocessConfig):
    """check_paths, plus the audio folder's AudioInputs (None for other modalities or no files)."""
    in_fs, in_root = storage.resolve(cfg.input)
    out_fs, out_root = storage.resolve(cfg.output)
    if not storage.is_dir(in_fs, in_root):
        raise ConfigError(f"input: {cfg.input!r} is not an existing directory")
    same_fs = type(in_fs) is type(out_fs)
    if same_fs and (out_root == in_root or out_root.startswith(in_root + "/")):
        raise ConfigError(f"output: {cfg.output!r} is inside input {cfg.input!r}; choose a folder outside it")
    if same_fs and in_root.startswith(out_root + "/"):
        raise ConfigError(f"output: {cfg.output!r} contains input {cfg.input!r}; choose another folder")
    if storage.exists(out_fs, out_root) and not storage.is_dir(out_fs, out_root):
        raise ConfigError(f"output: {cfg.output!r} exists and is not a directory")
    if storage.exists(out_fs, f"{out_root}/manifest.json") or storage.exists(out_fs, f"{out_root}/{SHARDS}"):
        if not cfg.overwrite:
            raise ConfigError(f"output: {cfg.output!r} already holds preprocessed data; pass --overwrite to replace it")
    if cfg.tokenizer is not None:
        tfs, tpath = storage.resolve(cfg.tokenizer)
        if not storage.exists(tfs, tpath):
            raise ConfigError(f"tokenizer: {cfg.tokenizer!r} does not exist")
    audio_in = None
    if cfg.modality == "audio":
        # Small: the listing and the transcript files are read and checked here, so a bad line, a
        # bad --split or a missing clip fails before Ray starts.
        files = storage.list_files(in_fs, in_root)
        audio_in = audio_inputs(in_fs, in_root, files, cfg.input, cfg.split) if files else None
    return in_fs, in_root, out_fs, out_root, audio_in


def run(cfg: PreprocessConfig) -> dict:
    """Run the whole preprocessing job on the current Ray cluster; returns the manifest."""
    t0 = time.time()
    in_fs, in_root, out_fs, out_root, audio_in = _checked(cfg)
    files = audio_in.audio if audio_in is not None else storage.list_files(in_fs, in_root)
    if audio_in is None and not files:
        raise ConfigError(f"input: no files under {cfg.input!r}")
    items = [{"path": p} for p in files]
    if audio_in is not None:
        if not files:
            raise ConfigError(f"input: no audio files under {cfg.input!r} (only transcripts)")
        # "" = none: a column of one type in every block (None would make all-null blocks).
        items = [{"path": p, "transcript": audio_in.transcripts.get(p, ""),
                  "transcript_file": audio_in.sidecars.get(p, ""),
                  "label": audio_in.label(in_root, p) or ""} for p in files]

    tokenizer_json, mask_id = None, None
    if cfg.tokenizer is not None:  # read before --overwrite may delete OUT/tokenizer.json
        # A tokenizer.json file or a Hugging Face tokenizer directory (RoBERTa's: <mask> last).
        from tokenizers import Tokenizer
        from pipeline.tokenizer import check_specials, read_tokenizer_json
        try:
            tokenizer_json = read_tokenizer_json(cfg.tokenizer)
            mask_id = check_specials(Tokenizer.from_str(tokenizer_json))
        except Exception as e:
            raise ConfigError(f"tokenizer: {cfg.tokenizer!r} is not usable: {e}") from None
    if storage.exists(out_fs, out_root):
        for name in (SHARDS, REJECTS, "manifest.json", "rejected.jsonl", "tokenizer.json"):
            p = f"{out_root}/{name}"
            info = out_fs.get_file_info(p)
            if info.type.name == "Directory":
                out_fs.delete_dir(p)
            elif info.type.name == "File":
                out_fs.delete_file(p)
    out_fs.create_dir(f"{out_root}/{REJECTS}", recursive=True)

    n_cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    # Enough read blocks that every CPU gets work, few enough that per-task overhead stays small.
    n_blocks = max(1, min(len(files), max(4 * n_cpus, len(files) // 256)))

    def source():
        # A plain list of paths; each map task reads its own files, so read + decode + write
        # fuse into one operator (no bytes round-trip through the object store).
        return ray.data.from_items(items, override_num_blocks=n_blocks)

    bs = BATCH_FILES[cfg.modality]
    common = dict(cfg=cfg, root=in_root, files=_Files(in_fs, out_fs, out_root))
    extra_settings: dict = {}
    if cfg.modality == "image":
        ds = source().map_batches(image_batch, fn_kwargs=common, batch_size=bs, batch_format="numpy")
    elif cfg.modality == "audio":
        ds = source().map_batches(audio_batch, fn_kwargs=common, batch_size=bs, batch_format="numpy")
    else:
        if tokenizer_json is None:
            tok = train_tokenizer(_iter_texts(source(), cfg, common["files"]),
                                  cfg.text.tokenizer_type, cfg.text.vocab_size)
            tokenizer_json = tok.to_str()
            from pipeline.tokenizer import check_specials
            mask_id = check_specials(tok)  # 4
            extra_settings["tokenizer_trained_on"] = "this corpus"
        else:
            extra_settings["tokenizer_source"] = cfg.tokenizer
        storage.write_text(out_fs, f"{out_root}/tokenizer.json", tokenizer_json)
        from tokenizers import Tokenizer
        extra_settings["vocab_size"] = Tokenizer.from_str(tokenizer_json).get_vocab_size()
        extra_settings["tokenizer"] = storage.join(cfg.output, "tokenizer.json")
        extra_settings["special_ids"] = {"bos": 0, "pad": 1, "eos": 2, "unk": 3, "mask": mask_id}
        # The tasks read the tokenizer from the file just written (a vocabulary is hundreds of KB;
        # the task arguments stay small).
        import hashlib
        sha = hashlib.sha256(tokenizer_json.encode()).hexdigest()
        ds = source().map_batches(
            text_batch, fn_kwargs=dict(tokenizer_file=extra_settings["tokenizer"], tokenizer_sha=sha, **common),
            batch_size=bs, batch_format="numpy")
    # Small row groups: training reads (and shuffles) shards row group by row group.
    ds.write_parquet(f"{out_root}/{SHARDS}", filesystem=out_fs, min_rows_per_file=cfg.rows_per_file,
                     row_group_size=ROW_GROUP_ROWS[cfg.modality])

    rejected = _merge_rejects(out_fs, out_root)
    import pyarrow.dataset as pads
    shards = pads.dataset(f"{out_root}/{SHARDS}", filesystem=out_fs, format="parquet")
    meta = shards.to_table(columns=["path", "label"] + (["transcript"] if audio_in else [])
                           + (["format"] if cfg.modality == "image" else []))
    written = meta.num_rows
    used = set(meta.column("path").unique().to_pylist())
    rejected_files = {p for p, _ in rejected if p not in used}
    extra_counts = {}
    if audio_in is not None:
        rows_of = collections.Counter(meta.column("path").to_pylist())
        extra_counts = {
            "transcript_files": len(audio_in.transcript_files),
            "transcripts": written - meta.column("transcript").null_count,
            # Clips with a transcript that were cut into several crops: their rows carry none (as
            # does a single full-length crop whose tail may have been dropped; not counted here).
            "transcripts_dropped_cropped": sum(rows_of[p] > 1 for p in
                                               set(audio_in.transcripts) | set(audio_in.sidecars)),
            # Files the corpus layout leaves out (neither read nor rejected): Common Voice clips
            # that the split does not list, and the layout's other files (other TSVs, SPEAKERS.TXT, ...).
            "not_in_split": len(audio_in.not_in_split),
            "corpus_files": len(audio_in.corpus_files),
        }
    manifest = {
        "modality": cfg.modality,
        "input": cfg.input,
        "counts": {"read": len(files), "files_used": len(used), "written": written,
                   "rejected": len(rejected), "rejected_files": len(rejected_files), **extra_counts},
        "settings": {**cfg.settings(), **extra_settings},
        "columns": SCHEMAS[cfg.modality],
        "arrow_schema": {f.name: str(f.type) for f in shards.schema},
        "labels": sorted(meta.column("label").drop_null().unique().to_pylist()),
        "seconds": round(time.time() - t0, 2),
    }
    if cfg.modality == "audio":
        manifest["settings"]["sample_rate"] = SAMPLE_RATE
        manifest["layout"] = audio_in.layout
    if cfg.modality == "image":  # what the shards hold: bytes per image (files on disk) and formats
        size = sum(out_fs.get_file_info(f).size for f in shards.files)
        manifest["stored"] = {"bytes": size, "bytes_per_image": round(size / max(written, 1)),
                              "formats": dict(collections.Counter(meta.column("format").to_pylist()))}
    storage.write_text(out_fs, f"{out_root}/rejected.jsonl",
                       "".join(json.dumps(storage.redact({"path": p, "reason": r})) + "\n" for p, r in rejected))
    storage.write_json(out_fs, f"{out_root}/manifest.json", manifest)  # URI credentials as ***
    return manifest


def _merge_rejects(fs, root: str) -> list[tuple[str, str]]:
    """OUT/_rejected/*.jsonl → sorted unique (path, reason) pairs; the side folder is removed."""
    folder = f"{root}/{REJECTS}"
    if not storage.exists(fs, folder):
        return []
    pairs = set()
    for f in storage.list_files(fs, folder):
        for line in storage.read_text(fs, f).splitlines():
            r = json.loads(line)
            pairs.add((r["path"], r["reason"]))
    fs.delete_dir(folder)
    return sorted(pairs)


def _iter_texts(ds, cfg: PreprocessConfig, files: _Files):
    ds = ds.map_batches(text_samples_batch, fn_kwargs=dict(cfg=cfg, files=files), batch_size=BATCH_FILES["text"],
                        batch_format="numpy").limit(cfg.text.tokenizer_max_samples)
    for b in ds.iter_batches(batch_size=1024, batch_format="numpy"):
        yield from b["text"]

