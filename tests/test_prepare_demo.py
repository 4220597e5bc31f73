"""The CTC demo data: real espeak-ng/flite clips with digit-string transcripts, held-out test voices,
and the audio preprocessing job carrying each .txt into the `transcript` column; the spoken
language-identification data of benchmarks.finetune."""
import json
import os

import pyarrow.parquet as pq
import soundfile as sf

from jobs.prepare_demo import DIGITS, LANGID_LANGS, LANGID_VARIANTS, VARIANTS, main, prepare_ctc, prepare_langid

SIZES = {"train": 12, "val": 4, "test": 6}


def test_prepare_ctc_layout_voices_and_transcripts(ray_local, tmp_path):
    out = str(tmp_path / "demo")
    assert prepare_ctc(out, **SIZES) == sum(SIZES.values())
    ctc = os.path.join(out, "ctc")
    info = json.load(open(os.path.join(ctc, "voices.json")))
    texts = {}
    for split, n in SIZES.items():
        ids = [f"{i:05d}" for i in range(n)]
        assert sorted(os.listdir(os.path.join(ctc, split))) == sorted(f"{i}.{e}" for i in ids for e in ("wav", "txt"))
        for i in ids:
            text = open(os.path.join(ctc, split, f"{i}.txt"), encoding="utf-8").read()
            assert text.endswith("\n") and text.strip() == text[:-1]
            words = text[:-1].split(" ")  # lowercase digit words, single spaces
            assert 3 <= len(words) <= 5 and all(w in DIGITS for w in words), text
            wav = sf.info(os.path.join(ctc, split, f"{i}.wav"))
            assert wav.samplerate in (16000, 22050) and 0.3 < wav.duration < 15.0  # one crop each
            texts[f"{split}/{i}"] = text.strip()
            assert info["clips"][f"{split}/{i}"] in info["splits"][split]
    voices = {s: set(v) for s, v in info["splits"].items()}
    assert not voices["test"] & voices["train"] and not voices["val"] & voices["train"]
    assert not voices["test"] & voices["val"]
    used = {s: {v for c, v in info["clips"].items() if c.startswith(s + "/")} for s in SIZES}
    assert len(used["train"]) == SIZES["train"] and not used["test"] & used["train"]  # round-robin voices

    # Same command, same files.
    again = str(tmp_path / "again")
    assert main(["--output", again, "--modalities", "ctc", "--ctc-sizes", "12,4,6"]) == 0
    for c in texts:
        for ext in ("wav", "txt"):
            a, b = (open(os.path.join(d, "ctc", f"{c}.{ext}"), "rb").read() for d in (out, again))
            assert a == b, (c, ext)

    # The audio job reads each clip's .txt into the transcript column (not as audio).
    from jobs.preprocess import main as preprocess
    shards = str(tmp_path / "train_shards")
    assert preprocess(["--modality", "audio", "--input", os.path.join(ctc, "train"), "--output", shards]) == 0
    rows = pq.read_table(os.path.join(shards, "shards"), columns=["path", "transcript", "offset"]).to_pylist()
    got = {os.path.relpath(r["path"], ctc)[:-len(".wav")]: r["transcript"] for r in rows}
    assert len(rows) == SIZES["train"] and all(r["offset"] == 0 for r in rows)
    assert got == {c: t for c, t in texts.items() if c.startswith("train/")}
    manifest = json.load(open(os.path.join(shards, "manifest.json")))
    c = manifest["counts"]
    assert (c["read"], c["written"], c["rejected"], c["transcript_files"], c["transcripts"],
            c["transcripts_dropped_cropped"]) == (12, 12, 0, 12, 12, 0)


def test_prepare_langid_languages_held_out_voices_and_labels(ray_local, tmp_path):
    """8 languages round-robin in every split, real espeak-ng speech of 6-10 words, voice variants
    split by speaker (test's never heard in train, val or the demo's digits), the same files from the
    same seed, and the audio job labelling each clip by its language folder."""
    sizes = {"train": 16, "val": 8, "test": 8}
    out, again = str(tmp_path / "a"), str(tmp_path / "b")
    assert prepare_langid(out, sizes=sizes) == prepare_langid(again, sizes=sizes) == 32
    for split, n in sizes.items():
        root = os.path.join(out, "langid", split)
        assert sorted(os.listdir(root)) == sorted(LANGID_LANGS)
        assert [len(os.listdir(os.path.join(root, lang))) for lang in LANGID_LANGS] == [n // len(LANGID_LANGS)] * 8
        for lang in LANGID_LANGS:
            for f in os.listdir(os.path.join(root, lang)):
                wav = sf.info(os.path.join(root, lang, f))
                assert wav.samplerate == 22050 and 1.5 < wav.duration < 15.0, (lang, f, wav.duration)
                a, b = (open(os.path.join(d, "langid", split, lang, f), "rb").read() for d in (out, again))
                assert a == b
    held = {s: set(v) for s, v in LANGID_VARIANTS.items()}
    assert not held["test"] & (held["train"] | held["val"] | set(VARIANTS)) and not held["val"] & held["train"]

    from jobs.preprocess import main as preprocess
    shards = str(tmp_path / "test_shards")
    assert preprocess(["--modality", "audio", "--input", os.path.join(out, "langid", "test"), "--output", shards]) == 0
    manifest = json.load(open(os.path.join(shards, "manifest.json")))
    assert sorted(manifest["labels"]) == sorted(LANGID_LANGS) and manifest["counts"]["written"] == 8
