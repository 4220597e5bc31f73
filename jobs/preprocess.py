"""Raw files → Parquet shards + manifest.json + rejected.jsonl, with Ray Data.

    python -m jobs.preprocess --modality image --input DIR --output OUT [--image-size 224]
    python -m jobs.preprocess --modality audio --input DIR --output OUT [--crop-seconds 15]
    python -m jobs.preprocess --modality text  --input DIR --output OUT [--tokenizer PATH]

Audio transcripts (optional) fill the `transcript` column: DIR/a/clip7.txt beside DIR/a/clip7.wav,
or DIR/transcripts.tsv (`path<TAB>transcript` per line, paths relative to DIR, optional header)
or DIR/transcripts.jsonl ({"path": ..., "transcript": ...} per line). They are not read as audio
(counts.read counts audio inputs only; counts.transcript_files counts them). A clip cut into several
crops keeps no transcript (counts.transcripts_dropped_cropped); counts.transcripts = rows with one.
A bad line in transcripts.tsv/.jsonl stops the job before Ray starts, naming the file and line.

Speech corpora need no converting (manifest.json's "layout" says which was found):
    python -m jobs.preprocess --modality audio --input LibriSpeech/train-clean-100 --output OUT --crop-seconds 35
        <speaker>/<chapter>/*.flac + <speaker>-<chapter>.trans.txt; label = speaker. --input LibriSpeech/
        (the folder above the parts) reads every part in it.
    python -m jobs.preprocess --modality audio --input cv-corpus-XX/en --split dev --output OUT
        clips/*.mp3 + <split>.tsv: only the clips listed in <split>.tsv, each with its `sentence`;
        --split defaults to train (validated when there is no train.tsv).
LibriSpeech utterances last up to ~35 s: at the default --crop-seconds 15 the longer ones are cut into
crops and keep no transcript (counts.transcripts_dropped_cropped).
"""
from __future__ import annotations

import argparse
import sys

from pipeline import storage
from pipeline.raycluster import print_result
from pipeline.config import (MODALITIES, AudioSettings, ConfigError, ImageSettings,
                             PreprocessConfig, TextSettings)


def parse_args(argv=None) -> PreprocessConfig:
    p = argparse.ArgumentParser(prog="python -m jobs.preprocess", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modality", required=True, help=f"one of {', '.join(MODALITIES)}")
    p.add_argument("--input", type=storage.path_arg, required=True, help="folder (or URI) of raw files; DIR/<class>/<file> gives labels")
    p.add_argument("--output", type=storage.path_arg, required=True, help="folder (or URI) for shards/, manifest.json, rejected.jsonl")
    p.add_argument("--overwrite", action="store_true", help="replace existing preprocessed data in --output")
    p.add_argument("--rows-per-file", type=int, default=2000, help="target rows per Parquet shard")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs for a local Ray cluster (default: all)")
    g = p.add_argument_group("image")
    g.add_argument("--image-size", type=int, default=224, help="output side in pixels (default 224)")
    g.add_argument("--min-image-side", type=int, default=8, help="reject smaller images")
    g = p.add_argument_group("audio")
    g.add_argument("--crop-seconds", type=float, default=15.0, help="cut long files into crops of this length")
    g.add_argument("--min-seconds", type=float, default=0.25, help="reject clips (and drop tails) shorter than this")
    g.add_argument("--split", default=None, metavar="NAME",
                   help="Common Voice folders: preprocess the clips listed in NAME.tsv (train, dev, test, "
                        "validated, ...; default train, else validated)")
    g = p.add_argument_group("text")
    g.add_argument("--tokenizer", type=storage.path_arg, default=None, help="reuse this tokenizer.json (e.g. the pretraining data's)")
    g.add_argument("--text-unit", default="line", help="'line' or 'paragraph' samples for .txt files")
    g.add_argument("--max-length", type=int, default=512, help="tokens per row incl. <s> and </s>")
    g.add_argument("--pack", action="store_true", help="pack consecutive short samples of a file into one row")
    g.add_argument("--vocab-size", type=int, default=8000, help="vocabulary size when training a tokenizer")
    g.add_argument("--tokenizer-type", default="bpe", help="'bpe' (byte-level) or 'unigram'")
    g.add_argument("--max-chars", type=int, default=100_000, help="reject samples longer than this")
    a = p.parse_args(argv)
    cfg = PreprocessConfig(
        modality=a.modality, input=a.input, output=a.output, tokenizer=a.tokenizer,
        overwrite=a.overwrite, rows_per_file=a.rows_per_file, split=a.split,
        image=ImageSettings(size=a.image_size, min_side=a.min_image_side),
        audio=AudioSettings(crop_seconds=a.crop_seconds, min_seconds=a.min_seconds),
        text=TextSettings(unit=a.text_unit, max_length=a.max_length, pack=a.pack,
                          vocab_size=a.vocab_size, tokenizer_type=a.tokenizer_type, max_chars=a.max_chars))
    return cfg, a.num_cpus


def main(argv=None) -> int:
    try:
        cfg, num_cpus = parse_args(argv)
        from pipeline.ingest import check_paths
        check_paths(cfg)  # fail before Ray starts
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from pipeline.ingest import run
    from pipeline.raycluster import init_ray
    init_ray(num_cpus=num_cpus)
    try:
        manifest = run(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    c = manifest["counts"]
    layout = manifest.get("layout", {"name": "plain"})
    shown = {"librispeech": " (LibriSpeech)", "common_voice": f" (Common Voice, split {layout.get('split')})"}
    print(f"{cfg.modality}{shown.get(layout['name'], '')}: read {c['read']} files, wrote {c['written']} rows "
          f"to {storage.join(cfg.output, 'shards')}, rejected {c['rejected']} (see {storage.join(cfg.output, 'rejected.jsonl')}) "
          f"in {manifest['seconds']} s")
    if c.get("transcripts_dropped_cropped"):
        print(f"note: {c['transcripts_dropped_cropped']} clip(s) longer than --crop-seconds "
              f"{cfg.audio.crop_seconds:g} were cut into crops and kept no transcript; raise --crop-seconds "
              f"to keep them for CTC fine-tuning")
    print_result({"manifest": storage.join(cfg.output, "manifest.json"), **c})
    return 0


if __name__ == "__main__":
    sys.exit(main())
