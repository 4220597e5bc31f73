"""Ingestion on real Ray with real files: good files land right, broken files land in rejected.jsonl."""
import io
import json
import os
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.config import AudioSettings, ImageSettings, PreprocessConfig, TextSettings
from tests.helpers import png_bytes, tone, write_audio, write_bytes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(cfg):
    from pipeline.ingest import run
    manifest = run(cfg)
    table = pq.read_table(os.path.join(cfg.output, "shards"))
    rejected = [json.loads(l) for l in open(os.path.join(cfg.output, "rejected.jsonl"))]
    return manifest, table, rejected


# ------------------------------------------------------------------ images
def _image_corpus(d):
    good, bad = [], []

    def put(rel, data, ok):
        p = os.path.join(d, rel)
        write_bytes(p, data)
        (good if ok else bad).append(p)

    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8))
    put("cat/rgb.png", png_bytes(rgb), True)
    b = io.BytesIO(); rgb.save(b, "JPEG"); jpeg = b.getvalue()
    put("cat/photo.jpg", jpeg, True)
    b = io.BytesIO(); rgb.convert("CMYK").save(b, "JPEG"); put("cat/cmyk.jpg", b.getvalue(), True)
    b = io.BytesIO(); rgb.save(b, "WEBP"); put("dog/x.webp", b.getvalue(), True)
    pal = rgb.convert("P"); pal.info["transparency"] = 0
    put("dog/palette.png", png_bytes(pal), True)
    put("dog/rgba.png", png_bytes(rgb.convert("RGBA")), True)
    g16 = Image.fromarray((rng.integers(0, 65535, (30, 30))).astype(np.uint16))
    put("dog/gray16.png", png_bytes(g16), True)
    put("dog/gray.png", png_bytes(rgb.convert("L")), True)
    put("dog/misnamed.jpg", png_bytes(rgb), True)  # PNG bytes behind a .jpg name: still a good image
    put("top.png", png_bytes(rgb), True)  # directly under DIR: no label
    # broken
    put("cat/empty.png", b"", False)
    put("cat/truncated.jpg", jpeg[: len(jpeg) // 2], False)
    put("cat/notes.jpg", b"this is not an image\n", False)
    put("dog/random.png", rng.integers(0, 255, 500, dtype=np.uint8).tobytes(), False)
    put("dog/tiny.png", png_bytes(Image.new("RGB", (2, 2))), False)
    put("dog/page.html", b"<html><body>hi</body></html>", False)
    return good, bad


def test_image_ingest_good_and_broken(ray_local, tmp_path):
    good, bad = _image_corpus(str(tmp_path / "raw"))
    cfg = PreprocessConfig(modality="image", input=str(tmp_path / "raw"), output=str(tmp_path / "out"),
                           image=ImageSettings(size=32))
    manifest, table, rejected = _run(cfg)
    assert sorted(table.column("path").to_pylist()) == sorted(good)
    assert sorted(r["path"] for r in rejected) == sorted(bad)
    assert all(r["reason"] for r in rejected)
    import ray
    batch = ray.data.read_parquet(str(tmp_path / "out" / "shards")).take_batch(100, batch_format="numpy")
    from pipeline.augment import eval_views
    imgs, paths = eval_views(batch["image"], 32), list(batch["path"])  # what evaluation will see
    assert imgs.shape == (len(good), 32, 32, 3) and imgs.dtype == np.uint8
    labels = dict(zip(table.column("path").to_pylist(), table.column("label").to_pylist()))
    for p, lab in labels.items():
        expected = None if os.path.dirname(p) == str(tmp_path / "raw") else os.path.basename(os.path.dirname(p))
        assert lab == expected, p
    c = manifest["counts"]
    assert (c["read"], c["written"], c["rejected"]) == (len(good) + len(bad), len(good), len(bad))
    assert manifest["settings"]["size"] == 32 and manifest["labels"] == ["cat", "dog"]
    # The 16-bit image keeps its dynamic range (not clipped to white by a naive 8-bit convert).
    g16 = imgs[paths.index(next(p for p in good if "gray16" in p))]
    assert 40 < g16.mean() < 215 and g16.std() > 20


def test_image_storage_and_eval_view_follow_the_resize_rule():
    import io

    from pipeline.augment import eval_view
    from pipeline.decoders import encode_stored_image
    img = Image.new("RGB", (100, 50), (10, 200, 30))
    stored, fmt = encode_stored_image(png_bytes(img), ImageSettings(size=16))
    assert fmt == "png" and Image.open(io.BytesIO(stored)).size == (36, 18)  # shorter side 16 / 0.875, aspect kept
    out = eval_view(stored, 16)
    assert out.shape == (16, 16, 3)
    assert np.abs(out.astype(int) - [10, 200, 30]).max() <= 1  # centre-cropped, colour kept
    rgba = Image.new("RGBA", (20, 20), (0, 0, 0, 0))  # fully transparent → white background
    assert eval_view(encode_stored_image(png_bytes(rgba), ImageSettings(size=16))[0], 16).min() == 255


# ------------------------------------------------------------------ audio
def test_audio_ingest_resamples_crops_and_rejects(ray_local, tmp_path):
    raw = tmp_path / "raw"
    good = {}
    def g(rel, data, sr, fmt=None, subtype=None, crops=None):
        p = str(raw / rel); write_audio(p, data, sr, fmt, subtype); good[p] = crops
    g("yes/a.wav", tone(1.0, 44100, 2), 44100, subtype="PCM_16", crops=[16000])
    g("yes/b.flac", tone(1.0, 8000), 8000, subtype="PCM_24", crops=[16000])
    g("no/c.ogg", tone(1.0, 22050), 22050, fmt="OGG", subtype="VORBIS", crops=[16000])
    g("no/d.wav", tone(1.0, 48000, 6), 48000, subtype="FLOAT", crops=[16000])
    g("no/u8.wav", tone(1.0, 16000), 16000, subtype="PCM_U8", crops=[16000])
    g("no/long.wav", tone(5.0, 16000), 16000, crops=[32000, 32000, 16000])  # crop 2 s → 2+2+1
    bad = []
    def b(rel, data=None, sr=None, raw_bytes=None, subtype=None):
        p = str(raw / rel)
        if raw_bytes is not None:
            write_bytes(p, raw_bytes)
        else:
            write_audio(p, data, sr, subtype=subtype)
        bad.append(p)
    b("yes/empty.wav", raw_bytes=b"")
    b("yes/notaudio.wav", raw_bytes=b"RIFF....WAVEfmt garbage")
    wav = open(str(raw / "yes/a.wav"), "rb").read()
    b("yes/trunc.wav", raw_bytes=wav[:30])
    b("no/zero_frames.wav", np.zeros((0, 1), np.float32), 16000)
    b("no/short.wav", tone(0.05, 16000), 16000)
    b("no/silent.wav", np.zeros((16000, 1), np.float32), 16000)
    nan = tone(1.0, 16000); nan[100] = np.nan
    b("no/nan.wav", nan, 16000, subtype="FLOAT")
    b("no/readme.txt", raw_bytes=b"hello")

    cfg = PreprocessConfig(modality="audio", input=str(raw), output=str(tmp_path / "out"),
                           audio=AudioSettings(crop_seconds=2.0, min_seconds=0.25))
    manifest, table, rejected = _run(cfg)
    assert sorted(r["path"] for r in rejected) == sorted(bad)
    rows = table.to_pylist()
    by_path = {}
    for r in rows:
        by_path.setdefault(r["path"], []).append(r)
    assert sorted(by_path) == sorted(good)
    for p, crops in good.items():
        rs = sorted(by_path[p], key=lambda r: r["offset"])
        assert [r["num_samples"] for r in rs] == crops, p
        assert [len(r["audio"]) for r in rs] == crops
        assert [r["offset"] for r in rs] == list(np.cumsum([0] + crops[:-1]))
    a = np.asarray(by_path[str(raw / "yes/a.wav")][0]["audio"], np.float32)
    # 440 Hz survives resampling 44.1k → 16k: the spectrum peaks at 440 Hz (1 Hz bins for 1 s).
    assert abs(int(np.argmax(np.abs(np.fft.rfft(a)))) - 440) <= 2
    assert table.schema.field("audio").type.value_type == "float"
    assert manifest["settings"]["sample_rate"] == 16000
    assert {r["label"] for r in rows} == {"yes", "no"}
    # No transcript files: the column exists and is null everywhere; every file counts as read.
    assert table.schema.field("transcript").type == "string"
    assert table.column("transcript").null_count == len(rows)
    c = manifest["counts"]
    assert (c["read"], c["transcript_files"], c["transcripts"], c["transcripts_dropped_cropped"]) == \
        (len(good) + len(bad), 0, 0, 0)
    assert "transcript" in manifest["columns"] and manifest["arrow_schema"]["transcript"] == "string"


def _transcripts_of(table):
    """path → [transcript per row, in crop order]."""
    out = {}
    for r in sorted(table.to_pylist(), key=lambda r: (r["path"], r["offset"])):
        out.setdefault(r["path"], []).append(r["transcript"])
    return out


def test_audio_transcripts_beside_clips(ray_local, tmp_path):
    raw = tmp_path / "raw"
    write_audio(str(raw / "a/b/clip7.wav"), tone(1.0, 22050), 22050)
    write_bytes(str(raw / "a/b/clip7.txt"), b"  three one four\n\n")  # stripped
    write_audio(str(raw / "a/b/clip8.flac"), tone(1.0, 16000), 16000)
    write_bytes(str(raw / "a/b/clip8.txt"), "\ufeffneuf \u00e9t\u00e9\r\n".encode())  # BOM, CRLF, UTF-8
    write_audio(str(raw / "a/plain.wav"), tone(1.0, 16000), 16000)  # no transcript
    write_audio(str(raw / "a/long.wav"), tone(3.5, 16000), 16000)   # 2 crops of 2 s → none kept
    write_bytes(str(raw / "a/long.txt"), b"the whole file")
    write_audio(str(raw / "a/blank.wav"), tone(1.0, 16000), 16000)
    write_bytes(str(raw / "a/blank.txt"), b" \n")                    # empty transcript → rejected
    write_bytes(str(raw / "a/notes.txt"), b"no clip of this name")   # lone .txt: not a transcript
    cfg = PreprocessConfig(modality="audio", input=str(raw), output=str(tmp_path / "out"),
                           audio=AudioSettings(crop_seconds=2.0))
    manifest, table, rejected = _run(cfg)
    got = _transcripts_of(table)
    assert got == {str(raw / "a/b/clip7.wav"): ["three one four"],
                   str(raw / "a/b/clip8.flac"): ["neuf \u00e9t\u00e9"],
                   str(raw / "a/plain.wav"): [None],
                   str(raw / "a/long.wav"): [None, None],
                   str(raw / "a/blank.wav"): [None]}
    assert [(r["path"], r["reason"]) for r in rejected] == [
        (str(raw / "a/blank.txt"), "transcript is empty"),
        (str(raw / "a/notes.txt"), rejected[1]["reason"])]  # decoded as audio, as before
    c = manifest["counts"]
    assert c["read"] == 6  # 5 clips + notes.txt; the 4 side .txt files are transcripts, not inputs
    assert (c["transcript_files"], c["transcripts"], c["transcripts_dropped_cropped"]) == (4, 2, 1)
    assert (c["written"], c["files_used"], c["rejected_files"]) == (6, 5, 2)


@pytest.mark.parametrize("form", ["tsv", "jsonl"])
def test_audio_transcripts_from_manifest(ray_local, tmp_path, form):
    raw = tmp_path / "raw"
    for rel, sec in (("spk1/x.wav", 1.0), ("spk1/y.wav", 1.0), ("spk2/z.wav", 1.0), ("long.wav", 3.5),
                     ("none.wav", 1.0)):
        write_audio(str(raw / rel), tone(sec, 16000), 16000)
    entries = [("spk1/x.wav", "  one two  "), ("./spk1/y.wav", "seven"), ("spk2/z.wav", "eight nine"),
               ("long.wav", "cut in two")]
    if form == "tsv":
        body = "path\ttranscript\n" + "".join(f"{p}\t{t}\n" for p, t in entries) + "\n"
    else:
        body = "".join(json.dumps({"path": p, "transcript": t}) + "\n" for p, t in entries)
    write_bytes(str(raw / f"transcripts.{form}"), body.encode())
    cfg = PreprocessConfig(modality="audio", input=str(raw), output=str(tmp_path / "out"),
                           audio=AudioSettings(crop_seconds=2.0))
    manifest, table, rejected = _run(cfg)
    assert rejected == []  # the manifest is not decoded as audio
    assert _transcripts_of(table) == {str(raw / "spk1/x.wav"): ["one two"], str(raw / "spk1/y.wav"): ["seven"],
                                      str(raw / "spk2/z.wav"): ["eight nine"], str(raw / "long.wav"): [None, None],
                                      str(raw / "none.wav"): [None]}
    c = manifest["counts"]
    assert (c["read"], c["transcript_files"], c["transcripts"], c["transcripts_dropped_cropped"]) == (5, 1, 3, 1)


@pytest.mark.parametrize("name,body,needle", [
    ("transcripts.tsv", "path\ttranscript\na.wav\tone\nb.wav one two\n", "transcripts.tsv line 3: expected 2 tab-separated"),
    ("transcripts.tsv", "a.wav\tone\tx\n", "transcripts.tsv line 1: expected 2 tab-separated columns (path, transcript), got 3"),
    ("transcripts.tsv", "a.wav\tone\nmissing.wav\ttwo\n", "transcripts.tsv line 2: 'missing.wav' does not exist"),
    ("transcripts.tsv", "a.wav\t   \n", "transcripts.tsv line 1: empty transcript for 'a.wav'"),
    ("transcripts.tsv", "a.wav\tone\na.wav\ttwo\n", "transcripts.tsv line 2: 'a.wav' already has a transcript"),
    ("transcripts.tsv", "../a.wav\tone\n", "transcripts.tsv line 1: path '../a.wav' must be relative"),
    ("transcripts.jsonl", '{"path": "a.wav", "transcript": "one"}\n{"path": "a.wav"\n', "transcripts.jsonl line 2: invalid JSON"),
    ("transcripts.jsonl", '\n\n{"path": "a.wav", "text": "one"}\n', 'transcripts.jsonl line 3: expected an object with string keys "path" and "transcript"'),
    ("transcripts.jsonl", '{"path": "b.txt", "transcript": "one"}\n', "transcripts.jsonl line 1: 'b.txt' is a transcript file, not audio"),
    ("transcripts.jsonl", '{"path": "b.wav", "transcript": "one"}\n', "transcripts.jsonl line 1: 'b.wav' already has a transcript (its side file"),
])
def test_bad_transcript_manifest_fails_before_ray(tmp_path, capsys, name, body, needle):
    raw = tmp_path / "raw"
    write_audio(str(raw / "a.wav"), tone(1.0, 16000), 16000)
    write_audio(str(raw / "b.wav"), tone(1.0, 16000), 16000)
    write_bytes(str(raw / "b.txt"), b"side transcript")
    write_bytes(str(raw / name), body.encode())
    from jobs.preprocess import main
    from pipeline.config import ConfigError
    from pipeline.ingest import check_paths
    cfg = PreprocessConfig(modality="audio", input=str(raw), output=str(tmp_path / "out"))
    with pytest.raises(ConfigError, match="transcripts: ") as e:
        check_paths(cfg)
    assert f"{raw}/{needle}" in str(e.value)
    assert main(["--modality", "audio", "--input", str(raw), "--output", str(tmp_path / "out")]) == 2
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ text
def test_text_ingest_tokenizer_and_rejects(ray_local, tmp_path):
    raw = tmp_path / "raw"
    lines = [f"the quick brown fox number {i} jumps over the lazy dog" for i in range(300)]
    good = {}
    def g(rel, text):
        p = str(raw / rel); write_bytes(p, text.encode()); good[p] = text
    g("animals/a.txt", "\n".join(lines[:150]) + "\n")
    g("animals/b.txt", "\n".join(lines[150:]))
    g("mixed/c.jsonl", "\n".join(json.dumps({"text": l, "label": "override"}) for l in lines[:20])
      + "\nnot json\n")
    bad = []
    def b(rel, data):
        p = str(raw / rel); write_bytes(p, data); bad.append(p)
    b("animals/empty.txt", b"")
    b("animals/latin1.txt", "café crème\n".encode("latin-1"))
    b("animals/nul.txt", b"hello\x00world\n")
    b("animals/huge.txt", b"x" * 200_001)
    b("animals/blank.txt", b"\n\n   \n")
    b("mixed/broken.jsonl", b'{"text": 3}\n[1,2]\n')
    b("mixed/data.csv", b"a,b\n1,2\n")

    cfg = PreprocessConfig(modality="text", input=str(raw), output=str(tmp_path / "out"),
                           text=TextSettings(max_length=16, vocab_size=400, max_chars=100_000))
    manifest, table, rejected = _run(cfg)
    rej_files = {r["path"] for r in rejected}
    assert rej_files == set(bad) | {str(raw / "mixed/c.jsonl")}  # c.jsonl: only its bad line
    assert [r["reason"] for r in rejected if r["path"].endswith("c.jsonl")] == ["line 21: invalid JSON (Expecting value)"]
    assert sorted(set(table.column("path").to_pylist())) == sorted(good)
    ids = table.column("input_ids").to_pylist()
    assert all(2 < len(x) <= 16 and x[0] == 0 and x[-1] == 2 for x in ids)
    assert table.column("length").to_pylist() == [len(x) for x in ids]
    labels = set(table.column("label").to_pylist())
    assert labels == {"animals", "override"}  # jsonl 'label' field wins over the folder name

    from pipeline.tokenizer import load_tokenizer
    tok = load_tokenizer(str(tmp_path / "out" / "tokenizer.json"))
    for s in ["the quick brown fox", "Ünïcödé ✓ and emoji 🦊\ttabs"]:
        assert tok.decode(tok.encode(s).ids) == s  # byte-level BPE round-trips any text
    # Chunks of one line re-join into the original line.
    rows = [r for r in table.to_pylist() if r["path"].endswith("a.txt")]
    text = "".join(tok.decode(r["input_ids"][1:-1]) for r in rows)
    assert text == "".join(lines[:150])
    assert manifest["settings"]["vocab_size"] == tok.get_vocab_size() <= 400

    # A probe split reuses the pretraining tokenizer: identical ids for identical text.
    cfg2 = PreprocessConfig(modality="text", input=str(raw / "animals"), output=str(tmp_path / "out2"),
                            tokenizer=str(tmp_path / "out" / "tokenizer.json"),
                            text=TextSettings(max_length=16))
    _, t2, _ = _run(cfg2)
    first = {tuple(x) for x in t2.column("input_ids").to_pylist()}
    assert first <= {tuple(x) for x in ids}


def test_paragraph_unit_and_packing():
    from pipeline.decoders import split_text
    from pipeline.tokenizer import BOS_ID, EOS_ID, chunk_ids, pack_rows
    samples, _ = split_text(b"a b\nc\n\n\nd e\n", "x.txt", TextSettings(unit="paragraph"))
    assert [s for s, _ in samples] == ["a b\nc", "d e"]
    rows = [np.array([BOS_ID, 7, EOS_ID])] * 5
    packed = pack_rows(rows, 7)
    assert [len(r) for r in packed] == [6, 6, 3]
    assert [len(c) for c in chunk_ids(list(range(10, 25)), 8)] == [8, 8, 5]  # 15 ids, 6 per row + <s>,</s>


# ------------------------------------------------------------------ bad arguments
@pytest.mark.parametrize("args,needle", [
    (["--modality", "video", "--input", "{tmp}/in", "--output", "{tmp}/o"], "modality"),
    (["--modality", "image", "--input", "{tmp}/missing", "--output", "{tmp}/o"], "input"),
    (["--modality", "image", "--input", "{tmp}/in", "--output", "{tmp}/in/inside"], "output"),
    (["--modality", "image", "--input", "{tmp}/in", "--output", "{tmp}/o", "--image-size", "3"], "image.size"),
    (["--modality", "text", "--input", "{tmp}/in", "--output", "{tmp}/o", "--tokenizer", "{tmp}/nope.json"], "tokenizer"),
])
def test_bad_arguments_exit_with_one_line(tmp_path, args, needle):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "x.png").write_bytes(b"x")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    r = subprocess.run([sys.executable, "-m", "jobs.preprocess", *args], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], r.stderr
    assert "ray" not in r.stdout.lower()


def test_int32_lists_equal_arrows_own_conversion():
    """The text path's fast list<int32> column equals pa.array over the rows (offsets, an empty
    row, no rows)."""
    import pyarrow as pa

    from pipeline.ingest import int32_lists

    rows = [np.array([0, 5, 9, 2], np.int32), np.zeros(0, np.int32), np.array([0, 2], np.int32)]
    assert int32_lists(rows).equals(pa.array(rows, pa.list_(pa.int32())))
    assert int32_lists([]).equals(pa.array([], pa.list_(pa.int32())))


def test_text_tasks_reload_a_tokenizer_rewritten_at_the_same_path(tmp_path):
    """Text is tokenized by map tasks that keep the tokenizer loaded in their worker process: a re-run
    that writes another tokenizer to the same path (--overwrite) must not get the old one's ids."""
    import hashlib

    import pyarrow.fs as pafs

    from pipeline.ingest import _Files, text_batch
    from pipeline.tokenizer import train_tokenizer
    write_bytes(str(tmp_path / "raw/a/x.txt"), b"zebra quartz zebra quartz\n")
    cfg = PreprocessConfig(modality="text", input=str(tmp_path / "raw"), output=str(tmp_path / "out"),
                           text=TextSettings(max_length=64, vocab_size=300))
    fs = pafs.LocalFileSystem()
    files = _Files(fs, fs, str(tmp_path / "out"))
    path = str(tmp_path / "tokenizer.json")
    ids = []
    for corpus in (["zebra quartz"] * 50, ["quite different words"] * 50):
        tok_json = train_tokenizer(corpus, vocab_size=300).to_str()
        open(path, "w").write(tok_json)
        out = text_batch({"path": [str(tmp_path / "raw/a/x.txt")]}, tokenizer_file=path,
                         tokenizer_sha=hashlib.sha256(tok_json.encode()).hexdigest(), cfg=cfg,
                         root=str(tmp_path / "raw"), files=files)
        ids.append(out.column("input_ids").to_pylist())
    assert ids[0] != ids[1] and len(ids[0][0]) < len(ids[1][0])  # the first tokenizer has "zebra" merged
