"""LibriSpeech and Common Voice folders preprocess as they are downloaded: real synthesized speech in
the corpora's own formats (16 kHz FLAC + .trans.txt; 48/32 kHz MP3 + split TSVs), each clip with its
transcript, the layout recorded, bad lines failing before Ray, and a CTC run on the result."""
import json
import os
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from pipeline.config import ConfigError, PreprocessConfig
from tests.helpers import tone, write_audio, write_bytes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _speak(text: str, path: str, engine: str) -> tuple[np.ndarray, int]:
    """Real speech for `text`: flite's kal16 voice (16 kHz) or espeak-ng (22.05 kHz) → (wav[T], rate)."""
    cmd = (["flite", "-voice", "kal16", "-t", text, "-o", path] if engine == "flite"
           else ["espeak-ng", "-v", "en-us", "-w", path, text])
    subprocess.run(cmd, check=True, capture_output=True)
    wav, sr = sf.read(path, dtype="float32")
    return wav, sr


def _to_rate(wav: np.ndarray, sr: int, rate: int) -> np.ndarray:
    import torch
    import torchaudio.functional as AF
    return AF.resample(torch.from_numpy(np.ascontiguousarray(wav)), sr, rate).numpy()


# ------------------------------------------------------------------ LibriSpeech
# part/speaker/chapter → [(utterance, transcript or None: a clip its .trans.txt has no line for)]
LIBRI = {
    "train-clean-100/19/198": [("0000", "HELLO WORLD"), ("0001", "THE CAT SAT ON THE MAT"),
                               ("0002", None)],
    "train-clean-100/26/495": [("0000", "GOOD MORNING TO YOU"), ("0003", "ONE TWO THREE FOUR FIVE SIX SEVEN EIGHT NINE TEN")],
    "dev-clean/84/121123": [("0000", "SEVEN EIGHT NINE"), ("0001", "THE DOG RAN HOME")],
}
LONG_UTT = "26-495-0003"  # ~3 s, cut in two at --crop-seconds 2 (the others last 1-1.7 s)


@pytest.fixture(scope="module")
def librispeech(tmp_path_factory):
    """A LibriSpeech/ folder as OpenSLR ships it: 16 kHz 16-bit FLAC (flite's 16 kHz voice), one
    <speaker>-<chapter>.trans.txt per chapter, BOOKS.TXT/SPEAKERS.TXT at the top → (folder,
    {utterance id: (transcript, samples)})."""
    root = tmp_path_factory.mktemp("ls") / "LibriSpeech"
    tmp = str(tmp_path_factory.mktemp("ls_tmp") / "x.wav")
    truth = {}
    for chapter, utts in LIBRI.items():
        _, spk, chap = chapter.split("/")
        lines = []
        for utt, text in utts:
            uid = f"{spk}-{chap}-{utt}"
            wav, sr = _speak(text or "an utterance without a line", tmp, "flite")
            assert sr == 16000
            write_audio(str(root / chapter / f"{uid}.flac"), wav, sr, subtype="PCM_16")
            truth[uid] = (text, len(wav))
            if text:
                lines.append(f"{uid} {text}\n")
        write_bytes(str(root / chapter / f"{spk}-{chap}.trans.txt"), "".join(lines).encode())
    write_bytes(str(root / "SPEAKERS.TXT"), b";ID  |SEX| SUBSET           |MINUTES| NAME\n19   | F | train-clean-100  | 25.19 | Kara\n")
    write_bytes(str(root / "README.TXT"), b"LibriSpeech ASR corpus\n")
    return str(root), truth


def _preprocess(args, capsys):
    from jobs.preprocess import main
    assert main(["--modality", "audio", *args]) == 0
    out = args[args.index("--output") + 1]
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    table = pq.read_table(os.path.join(out, "shards"))
    rejected = [json.loads(line) for line in open(os.path.join(out, "rejected.jsonl"))]
    return manifest, table, rejected, capsys.readouterr().out


def test_librispeech_part_gives_each_clip_its_transcript_and_speaker(ray_local, librispeech, tmp_path, capsys):
    ls, truth = librispeech
    manifest, table, rejected, out = _preprocess(
        ["--input", f"{ls}/train-clean-100", "--output", str(tmp_path / "out")], capsys)
    assert rejected == []  # the .trans.txt files are transcripts, not audio that fails to decode
    rows = {os.path.basename(r["path"])[:-len(".flac")]: r for r in table.to_pylist()}
    part = {u: t for u, t in truth.items() if not u.startswith("84-")}
    assert sorted(rows) == sorted(part)
    for uid, (text, n) in part.items():
        assert rows[uid]["transcript"] == text, uid  # LibriSpeech's upper case, as written
        assert rows[uid]["label"] == uid.split("-")[0]  # ROOT/<speaker>/...: the speaker folder
        assert rows[uid]["num_samples"] == n and rows[uid]["offset"] == 0  # 16 kHz FLAC, whole clip
    c = manifest["counts"]
    assert (c["read"], c["written"], c["rejected"], c["transcript_files"], c["transcripts"]) == (5, 5, 0, 2, 4)
    assert (c["not_in_split"], c["corpus_files"], c["transcripts_dropped_cropped"]) == (0, 0, 0)
    assert manifest["layout"] == {"name": "librispeech", "chapters": 2}
    assert manifest["labels"] == ["19", "26"]
    assert "audio (LibriSpeech): read 5 files, wrote 5 rows" in out


def test_librispeech_folder_above_its_parts(ray_local, librispeech, tmp_path, capsys):
    """--input LibriSpeech/: every part in it, labels still the speakers (not the part names), the
    corpus' .TXT files neither read nor rejected; a clip cut into crops loses its transcript (note)."""
    ls, truth = librispeech
    manifest, table, rejected, out = _preprocess(
        ["--input", ls, "--output", str(tmp_path / "out"), "--crop-seconds", "2"], capsys)
    assert rejected == []
    got = {}
    for r in sorted(table.to_pylist(), key=lambda r: (r["path"], r["offset"])):
        got.setdefault(os.path.basename(r["path"])[:-len(".flac")], []).append((r["transcript"], r["label"]))
    assert sorted(got) == sorted(truth)
    for uid, (text, n) in truth.items():
        crops = 1 if n <= 32000 else 2
        assert got[uid] == [(text if crops == 1 else None, uid.split("-")[0])] * crops, uid
    assert len(got[LONG_UTT]) == 2 and truth[LONG_UTT][1] > 32000 + 4000
    c = manifest["counts"]
    assert (c["read"], c["transcript_files"], c["transcripts"], c["transcripts_dropped_cropped"],
            c["corpus_files"]) == (7, 3, 5, 1, 2)
    assert manifest["layout"] == {"name": "librispeech", "chapters": 3, "subsets": ["dev-clean", "train-clean-100"]}
    assert manifest["labels"] == ["19", "26", "84"]
    assert "note: 1 clip(s) longer than --crop-seconds 2 were cut into crops and kept no transcript" in out


def _tiny_librispeech(root, trans: bytes):
    for utt in ("0000", "0001"):
        write_audio(str(root / "19" / "198" / f"19-198-{utt}.flac"), tone(1.0, 16000), 16000)
    write_bytes(str(root / "19" / "198" / "19-198.trans.txt"), trans)


@pytest.mark.parametrize("trans,needle", [
    (b"19-198-0000 HELLO\n19-198-0001\n", "19/198/19-198.trans.txt line 2: expected '<utterance-id> <transcript>'"),
    (b"19-198-0000 HELLO\n\n19-198-0007 WORLD\n",
     "19/198/19-198.trans.txt line 3: utterance '19-198-0007' names no audio file in its folder"),
    (b"19-198-0000 HELLO\n19-198-0000 AGAIN\n",
     "19/198/19-198.trans.txt line 2: '19-198-0000' already has a transcript ({raw}/19/198/19-198.trans.txt line 1)"),
    (b"19-198-0000 HELLO\n19-198-0001 CAF\xc9\n", "19/198/19-198.trans.txt line 2: not UTF-8 text (byte 15)"),
], ids=["no-transcript", "no-such-clip", "duplicate-id", "not-utf8"])
def test_bad_librispeech_transcripts_fail_before_ray(tmp_path, capsys, trans, needle):
    raw = tmp_path / "train-clean-100"
    _tiny_librispeech(raw, trans)
    needle = needle.format(raw=raw)
    from jobs.preprocess import main
    from pipeline.ingest import check_paths
    with pytest.raises(ConfigError, match="^transcripts: ") as e:
        check_paths(PreprocessConfig(modality="audio", input=str(raw), output=str(tmp_path / "out")))
    assert f"{raw}/{needle}" in str(e.value)
    assert main(["--modality", "audio", "--input", str(raw), "--output", str(tmp_path / "out")]) == 2
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ Common Voice
CV_HEADER = ["client_id", "path", "sentence_id", "sentence", "sentence_domain", "up_votes", "down_votes",
             "age", "gender", "accents", "variant", "locale", "segment"]
# clip number → (sentence, MP3 rate). Quotes are text: an unbalanced one must not swallow the next rows.
CV_CLIPS = {
    100: ('"Quoted," she said, "twice."', 48000),
    101: ('He said "hello there', 32000),
    102: ("It's nine o'clock", 48000),
    103: ("Not in any split", 48000),
}
CV_SPLITS = {"train": [100, 101], "dev": [102], "test": [], "validated": [100, 101, 102]}


def _tsv_row(n: int, sentence: str) -> str:
    row = dict.fromkeys(CV_HEADER, "")
    row.update(client_id=f"{n % 2:0128x}", path=f"common_voice_en_{n}.mp3", sentence_id=f"{n:064x}",
               sentence=sentence, up_votes="2", down_votes="0", locale="en")
    return "\t".join(row[c] for c in CV_HEADER) + "\n"


def _cv_tsvs(root, splits: dict, extra: str = "") -> None:
    for split, clips in splits.items():
        body = "\t".join(CV_HEADER) + "\n" + "".join(_tsv_row(n, CV_CLIPS[n][0]) for n in clips)
        write_bytes(str(root / f"{split}.tsv"), (body + (extra if split == "train" else "")).encode())
    write_bytes(str(root / "clip_durations.tsv"), b"clip\tduration[ms]\ncommon_voice_en_100.mp3\t2100\n")


@pytest.fixture(scope="module")
def common_voice(tmp_path_factory):
    """A cv-corpus-XX/en folder as Mozilla ships it: clips/*.mp3 (mono, 48 or 32 kHz, real espeak-ng
    speech encoded by libsndfile's LAME), train/dev/test/validated.tsv and clip_durations.tsv →
    (folder, {clip path: the speech at 16 kHz, what the row should hold})."""
    root = tmp_path_factory.mktemp("cv") / "cv-corpus-21.0" / "en"
    tmp = str(tmp_path_factory.mktemp("cv_tmp") / "x.wav")
    ref = {}
    for n, (sentence, rate) in CV_CLIPS.items():
        wav, sr = _speak(sentence, tmp, "espeak")
        path = str(root / "clips" / f"common_voice_en_{n}.mp3")
        write_audio(path, _to_rate(wav, sr, rate), rate, fmt="MP3", subtype="MPEG_LAYER_III")
        assert sf.info(path).samplerate == rate and sf.info(path).format == "MP3"
        ref[path] = _to_rate(wav, sr, 16000)
    _cv_tsvs(root, CV_SPLITS)
    return str(root), ref


def _similar(a: np.ndarray, b: np.ndarray) -> float:
    """Peak normalized cross-correlation within ±50 ms (an MP3 decoder may shift the start)."""
    n = min(len(a), len(b))
    a, b = a[:n] - a[:n].mean(), b[:n] - b[:n].mean()
    best = max(float(np.dot(a[max(0, s):n + min(0, s)], b[max(0, -s):n - max(0, s)])) for s in range(-800, 801, 8))
    return best / float(np.linalg.norm(a) * np.linalg.norm(b))


def test_common_voice_default_split_reads_train_tsv_and_decodes_mp3(ray_local, common_voice, tmp_path, capsys):
    cv, ref = common_voice
    manifest, table, rejected, out = _preprocess(["--input", cv, "--output", str(tmp_path / "out")], capsys)
    assert rejected == []  # the TSVs and the clips of other splits are not inputs
    rows = {r["path"]: r for r in table.to_pylist()}
    expect = {f"{cv}/clips/common_voice_en_{n}.mp3": CV_CLIPS[n][0] for n in CV_SPLITS["train"]}
    assert {p: r["transcript"] for p, r in rows.items()} == expect  # quotes kept verbatim
    for p in expect:
        r = rows[p]
        assert r["label"] is None and r["offset"] == 0
        # 48 and 32 kHz MP3 → 16 kHz: the same length (± 60 ms of MP3 padding) and the same speech.
        assert abs(r["num_samples"] - len(ref[p])) < 960, (p, r["num_samples"], len(ref[p]))
        assert _similar(np.asarray(r["audio"], np.float32), ref[p]) > 0.9, p
    c = manifest["counts"]
    assert (c["read"], c["written"], c["transcripts"], c["transcript_files"], c["not_in_split"],
            c["corpus_files"]) == (2, 2, 2, 1, 2, 4)  # clips 102, 103; dev, test, validated, clip_durations
    assert manifest["layout"] == {"name": "common_voice", "split": "train", "tsv": "train.tsv"}
    assert manifest["labels"] == []
    assert "audio (Common Voice, split train): read 2 files" in out


def test_common_voice_split_flag_chooses_the_rows(ray_local, common_voice, tmp_path, capsys):
    cv, _ = common_voice
    for split in ("dev", "validated"):
        manifest, table, rejected, _ = _preprocess(
            ["--input", cv, "--split", split, "--output", str(tmp_path / split)], capsys)
        got = {os.path.basename(r["path"]): r["transcript"] for r in table.to_pylist()}
        assert got == {f"common_voice_en_{n}.mp3": CV_CLIPS[n][0] for n in CV_SPLITS[split]}, split
        c = manifest["counts"]
        assert (c["read"], c["not_in_split"], c["rejected"]) == (len(got), 4 - len(got), 0)
        assert manifest["layout"]["split"] == split and rejected == []


def test_common_voice_without_train_tsv_defaults_to_validated(tmp_path):
    from pipeline.ingest import audio_inputs, storage
    root = tmp_path / "en"
    for n in CV_CLIPS:
        write_bytes(str(root / "clips" / f"common_voice_en_{n}.mp3"), b"mp3")
    _cv_tsvs(root, {"validated": [100, 102], "other": [103]})
    fs, r = storage.resolve(str(root))
    got = audio_inputs(fs, r, storage.list_files(fs, r))
    assert got.layout == {"name": "common_voice", "split": "validated", "tsv": "validated.tsv"}
    assert got.audio == [f"{root}/clips/common_voice_en_{n}.mp3" for n in (100, 102)]
    assert len(got.not_in_split) == 2 and len(got.corpus_files) == 2  # other.tsv, clip_durations.tsv


@pytest.mark.parametrize("case,args,needle", [
    ("cv", ["--split", "nope"], "split: --split nope: {raw}/nope.tsv does not exist; this Common Voice "
                                "folder has: clip_durations, dev, test, train, validated"),
    ("cv", ["--split", "clip_durations"], "split: {raw}/clip_durations.tsv is not a Common Voice clip list"),
    ("cv", ["--split", "test"], "split: {raw}/test.tsv lists no clips"),
    ("cv", ["--split", "dev.tsv"], "split: --split takes a TSV's name without .tsv"),
    ("cv_missing", [], "transcripts: {raw}/train.tsv line 4: clip 'common_voice_en_999.mp3' does not exist "
                       "under {raw}/clips"),
    ("cv_twice", [], "transcripts: {raw}/train.tsv line 4: clip 'common_voice_en_100.mp3' already has a "
                     "transcript ({raw}/train.tsv line 2)"),
    ("cv_columns", [], "transcripts: {raw}/train.tsv line 4: expected 13 tab-separated columns"),
    ("cv_no_default", [], "split: {raw} is a Common Voice folder without train.tsv or validated.tsv; "
                          "choose one of its TSVs with --split: clip_durations, dev"),
    ("plain", ["--split", "train"], "split: --split train needs a Common Voice folder (clips/ and train.tsv); "
                                    "{raw} is not a Common Voice folder"),
    ("librispeech", ["--split", "train"], "{raw} is a LibriSpeech folder"),
    ("cv_release", [], "input: {raw} is a Common Voice release holding language folders (de, en): pass one "
                       "of them, e.g. --input {raw}/de"),
], ids=["no-such-tsv", "not-a-clip-list", "empty-split", "tsv-suffix", "missing-clip", "duplicate-row",
        "columns", "no-default-split", "plain-folder", "librispeech-folder", "release-above-languages"])
def test_bad_common_voice_input_fails_before_ray_naming_the_flag_or_line(tmp_path, capsys, case, args, needle):
    raw = tmp_path / "en"
    if case == "librispeech":
        _tiny_librispeech(raw, b"19-198-0000 HELLO\n")
    elif case == "plain":
        write_audio(str(raw / "a.wav"), tone(1.0, 16000), 16000)
    elif case == "cv_release":  # cv-corpus-NN/ holding en/ and de/, each a language folder
        for lang in ("en", "de"):
            for n in CV_CLIPS:
                write_bytes(str(raw / lang / "clips" / f"common_voice_{lang}_{n}.mp3"), b"x")
            _cv_tsvs(raw / lang, CV_SPLITS)
    else:
        for n in CV_CLIPS:
            write_bytes(str(raw / "clips" / f"common_voice_en_{n}.mp3"), b"not decoded before Ray")
        extra = {"cv_missing": _tsv_row(999, "gone"), "cv_twice": _tsv_row(100, "again"),
                 "cv_columns": "x\tcommon_voice_en_102.mp3\tsentence\n"}.get(case, "")
        _cv_tsvs(raw, {"dev": [102]} if case == "cv_no_default" else CV_SPLITS, extra)
    needle = needle.format(raw=raw)
    from jobs.preprocess import main
    assert main(["--modality", "audio", "--input", str(raw), "--output", str(tmp_path / "out"), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err
    assert not (tmp_path / "out").exists()


def test_split_errors_exit_before_ray_starts(tmp_path):
    """The command line, in its own process: one error line, and no Ray cluster started."""
    raw = tmp_path / "en"
    write_bytes(str(raw / "clips" / "common_voice_en_100.mp3"), b"x")
    _cv_tsvs(raw, {"train": [100]})
    for args, needle in ((["--modality", "audio", "--split", "dev"], "split: --split dev: "),
                         (["--modality", "image", "--split", "dev"], "split: --split only applies to --modality audio")):
        r = subprocess.run([sys.executable, "-m", "jobs.preprocess", *args, "--input", str(raw),
                            "--output", str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True, timeout=120)
        err = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(err) == 1 and needle in err[0], r.stderr
        assert "ray" not in (r.stdout + r.stderr).lower().replace("--split", "")


# ------------------------------------------------------------------ fine-tuning on a layout
@pytest.mark.slow
def test_ctc_finetunes_on_preprocessed_librispeech(ray_local, librispeech, tmp_path, capsys):
    """jobs.finetune --task ctc trains on LibriSpeech parts preprocessed as they are: the vocabulary
    comes from the .trans.txt lines, a few steps run and the loss is finite."""
    ls, _ = librispeech
    train, dev = str(tmp_path / "train"), str(tmp_path / "dev")
    _preprocess(["--input", f"{ls}/train-clean-100", "--output", train], capsys)
    _preprocess(["--input", f"{ls}/dev-clean", "--output", dev], capsys)
    from jobs.finetune import main
    out = str(tmp_path / "ft")
    assert main(["--task", "ctc", "--modality", "audio", "--init", "scratch", "--train-data", train,
                 "--val-data", dev, "--test-data", dev, "--output", out, "--max-steps", "4",
                 "--num-workers", "1", "--set", "train.batch_size=4", "--set", "train.log_every=1",
                 "--set", "train.warmup_steps=1", "--set", "train.eval_every=4",
                 "--set", "finetune.freeze_feature_encoder=true"]) == 0
    s = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert s["steps"] == 4 and 0 <= s["test_cer"] and 0 <= s["val_cer"]
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri="sqlite:///" + os.path.join(out, "mlflow.db"))
    run_id = open(os.path.join(out, "mlflow_run_id")).read().strip()
    loss = [m.value for m in client.get_metric_history(run_id, "loss")]
    assert len(loss) == 4 and all(np.isfinite(loss)) and all(v > 0 for v in loss)
    # The character vocabulary is the (lower-cased) characters of train-clean-100's .trans.txt lines.
    from pipeline.finetune.tasks import CTC_SPECIALS
    said = "".join(t for c, utts in LIBRI.items() if c.startswith("train") for _, t in utts if t)
    assert json.load(open(os.path.join(out, "final", "config.json")))["labels"] == \
        CTC_SPECIALS + sorted(set(said.lower()) - {" "})
