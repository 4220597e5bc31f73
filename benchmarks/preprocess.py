"""Rows/s of the Ray Data ingestion vs a plain single-process loop over the same files.

    .venv/bin/python -m benchmarks.preprocess [--data DIR] [--modalities image,audio,text]
        [--image-size 224] [--limit N] [--repeats 3]

Both sides decode with the same functions and write Parquet; the Ray side is `pipeline.ingest.run`
on a warm local cluster (start-up excluded, one warm-up run first). Each modality repeats the pair
(single, Ray) `--repeats` times, alternating, so drift on a shared machine hits both sides. Prints
a table, then one JSON line: {"image_ratio", "audio_ratio", "text_ratio"} = median of Ray rate /
(CPU cores × single-process rate), and "<modality>_ratio_range": [lowest, highest pair].
"""
from __future__ import annotations

import argparse
import json
import os
import statistics

os.environ.setdefault("RAYON_NUM_THREADS", "1")  # a per-core baseline: the tokenizer would use every core
import shutil
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from pipeline import storage  # noqa: E402
from pipeline.config import AudioSettings, ImageSettings, PreprocessConfig, TextSettings  # noqa: E402
from pipeline.decoders import Rejected, decode_audio, encode_stored_image, split_text  # noqa: E402
from pipeline.tokenizer import chunk_ids  # noqa: E402


def single_process(cfg: PreprocessConfig, files: list[str], out: str, tokenizer_json: str | None) -> int:
    """The loop a user would write without us: read, decode, collect, write one Parquet file."""
    rows = []
    tok = None
    if tokenizer_json:
        from tokenizers import Tokenizer
        tok = Tokenizer.from_str(tokenizer_json)
    for path in files:
        with open(path, "rb") as f:
            data = f.read()
        try:
            if cfg.modality == "image":
                rows.append({"image": encode_stored_image(data, cfg.image)[0], "path": path})
            elif cfg.modality == "audio":
                rows.extend({"audio": w, "path": path} for _, w in decode_audio(data, cfg.audio))
            else:
                samples, _ = split_text(data, path, cfg.text)
                for enc in tok.encode_batch([t for t, _ in samples], add_special_tokens=False):
                    rows.extend({"input_ids": r, "path": path} for r in chunk_ids(enc.ids, cfg.text.max_length))
        except Rejected:
            pass
    os.makedirs(out, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), os.path.join(out, "part.parquet"))
    return len(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--data", default=os.path.join(ROOT, "benchmarks", "_work", "demo"))
    p.add_argument("--modalities", default="image,audio,text")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--limit", type=int, default=None, help="files per modality (a quick CI smoke run)")
    p.add_argument("--repeat", type=int, default=None,
                   help="copies of each file (hard links), so start-up costs are amortized "
                        "(default: image 3, audio 4, text 25)")
    p.add_argument("--repeats", type=int, default=3, help="paired (single, Ray) measurements per modality")
    a = p.parse_args(argv)
    if not os.path.isdir(os.path.join(a.data, "text")):
        from jobs.prepare_demo import main as prep
        prep(["--output", a.data])
    work = os.path.join(ROOT, "benchmarks", "_work", "pp")
    shutil.rmtree(work, ignore_errors=True)

    import ray
    from pipeline.ingest import run
    cores = os.cpu_count() or 1
    ray.init(address="local", num_cpus=cores, include_dashboard=False, logging_level="error")
    ray.data.DataContext.get_current().enable_progress_bars = False

    # Text needs a tokenizer on both sides: train it once (not timed) with the pipeline itself.
    text_in = os.path.join(a.data, "text", "pretrain")
    run(PreprocessConfig(modality="text", input=text_in, output=os.path.join(work, "tok"),
                         text=TextSettings(max_length=128, vocab_size=8000)))
    tok_path = os.path.join(work, "tok", "tokenizer.json")

    cases = {
        "image": PreprocessConfig(modality="image", input=os.path.join(a.data, "image", "train"), output="-",
                                  image=ImageSettings(size=a.image_size)),
        "audio": PreprocessConfig(modality="audio", input=os.path.join(a.data, "audio", "train"), output="-",
                                  audio=AudioSettings(crop_seconds=15)),
        "text": PreprocessConfig(modality="text", input=text_in, output="-", tokenizer=tok_path,
                                 text=TextSettings(max_length=128)),
    }
    results = {}
    print(f"{'modality':8} {'files':>6} {'rows':>7} {'single rows/s':>14} {'ray rows/s':>11} "
          f"{'ray/(cores*single) median (range)':>34}")
    for mod in a.modalities.split(","):
        base = cases[mod]
        files = storage.list_files(*storage.resolve(base.input))[: a.limit]
        repeat = a.repeat or {"image": 3, "audio": 4, "text": 25}[mod]
        inp = os.path.join(work, f"{mod}_input")  # `repeat` hard links of each chosen file
        for f in files:
            rel = os.path.relpath(f, base.input)
            for r in range(repeat):
                stem, ext = os.path.splitext(rel)
                dst = os.path.join(inp, f"{stem}-{r}{ext}")
                os.makedirs(os.path.dirname(dst), exist_ok=True)
                os.link(f, dst)
        files = storage.list_files(*storage.resolve(inp))
        tok_json = open(tok_path).read() if mod == "text" else None

        def ray_run(tag):
            cfg = PreprocessConfig(**{**base.__dict__, "input": inp, "output": os.path.join(work, f"{mod}_{tag}")})
            t = time.perf_counter()
            m = run(cfg)
            return m["counts"]["written"], time.perf_counter() - t
        ray_run("warm")
        singles, rates, ratios = [], [], []
        for r in range(max(1, a.repeats)):
            t = time.perf_counter()
            n1 = single_process(base, files, os.path.join(work, f"{mod}_single{r}"), tok_json)
            singles.append(n1 / (time.perf_counter() - t))
            n2, dt = ray_run(f"ray{r}")
            assert n1 == n2, (mod, n1, n2)
            rates.append(n2 / dt)
            ratios.append(rates[-1] / (cores * singles[-1]))
            for tag in (f"single{r}", f"ray{r}", "warm"):  # 224-px images: ~1.7 GB per copy
                shutil.rmtree(os.path.join(work, f"{mod}_{tag}"), ignore_errors=True)
        results[f"{mod}_ratio"] = round(statistics.median(ratios), 3)
        results[f"{mod}_ratio_range"] = [round(min(ratios), 3), round(max(ratios), 3)]
        print(f"{mod:8} {len(files):6d} {n2:7d} {statistics.median(singles):14.1f} {statistics.median(rates):11.1f} "
              f"{results[f'{mod}_ratio']:9.3f} ({min(ratios):.3f}..{max(ratios):.3f})")
    ray.shutdown()
    print(f"# {cores} CPU cores; image size {a.image_size}; {a.repeats} pairs per modality (median, range);"
          " goal: ratio >= 0.8")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
