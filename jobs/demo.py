"""The whole product on one machine, end to end, in about fifteen minutes on 2 CPU cores.

    python -m jobs.demo [--data demo_data] [--output runs/demo] [--modalities image,audio,text]

1. prepares real demo files if missing (MNIST-5k digits, spoken digits, fortunes),
2. preprocesses them with Ray Data (train/test splits, the text tokenizer trained on the corpus),
3. pretrains a small data2vec 2.0 encoder per modality with Ray Train (logged to MLflow),
4. probes each encoder (linear probe on frozen features) against the same network at random init
   and against the classical raw-input baseline (pixels / MFCC statistics / TF-IDF + logistic regression),
5. prints a summary table and how to open the MLflow UI.
Re-running skips finished steps (preprocessed folders, finished runs).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from pipeline.config import AudioSettings, ConfigError, ImageSettings, PreprocessConfig, TextSettings

# Pretraining budget per modality at the demo preset (steps of batch 32, one worker per 2 cores).
DEMO_STEPS = {"image": 120, "audio": 60, "text": 100}
SPLITS = {"image": ("train", "train", "test"), "audio": ("train", "train", "test"),
          "text": ("pretrain", "train", "test")}  # (pretraining input, probe train, probe test)


def preprocess_all(mod: str, raw: str, out: str) -> dict[str, str]:
    from pipeline.ingest import run

    settings = {"image": dict(image=ImageSettings(size=28)),
                "audio": dict(audio=AudioSettings(crop_seconds=2.0)),
                "text": dict(text=TextSettings(max_length=64, vocab_size=4000))}[mod]
    dirs = {}
    for split in dict.fromkeys(SPLITS[mod]):
        d = os.path.join(out, f"{mod}_{split}")
        dirs[split] = d
        if os.path.isfile(os.path.join(d, "manifest.json")):
            continue
        tok = None if (mod != "text" or split == "pretrain") else os.path.join(out, "text_pretrain", "tokenizer.json")
        m = run(PreprocessConfig(modality=mod, input=os.path.join(raw, mod, split), output=d, tokenizer=tok,
                                 overwrite=True, **settings))
        print(f"[demo] preprocessed {mod}/{split}: {m['counts']['written']} rows, "
              f"{m['counts']['rejected']} rejected, {m['seconds']} s", flush=True)
    return dirs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="demo_data", help="raw demo files (prepared here if missing)")
    p.add_argument("--output", default="runs/demo", help="preprocessed data, runs and mlflow.db")
    p.add_argument("--modalities", default="image,audio,text")
    p.add_argument("--steps-scale", type=float, default=1.0, help="multiply every pretraining budget")
    p.add_argument("--mode", default="d2v2", help="d2v2 (default, learns fast) or d2v1")
    a = p.parse_args(argv)
    mods = [m for m in a.modalities.split(",") if m]
    if set(mods) - set(DEMO_STEPS) or a.mode not in ("d2v1", "d2v2") or a.steps_scale <= 0:
        print("error: --modalities must be a subset of image,audio,text; --mode d2v1|d2v2; --steps-scale > 0",
              file=sys.stderr)
        return 2
    t_start = time.time()
    missing = [m for m in mods if not os.path.isdir(os.path.join(a.data, m))]
    if missing:
        from jobs.prepare_demo import main as prepare
        prepare(["--output", a.data, "--modalities", ",".join(missing)])

    from pipeline import probe
    from pipeline.raycluster import init_ray
    from pipeline.train.config import resolve
    from pipeline.train.launch import frontend_from_manifest, read_manifest, run_pretraining

    os.makedirs(a.output, exist_ok=True)
    # One local cluster for everything: the demo's single training worker + 2 CPUs for Ray Data.
    init_ray(num_cpus=max(os.cpu_count() or 1, 3), dashboard=True)
    uri = "sqlite:///" + os.path.abspath(os.path.join(a.output, "mlflow.db"))
    rows = []
    for mod in mods:
        dirs = preprocess_all(mod, a.data, os.path.join(a.output, "data"))
        pre, ptr, pte = (dirs[s] for s in SPLITS[mod])
        try:
            cfg = resolve(mod, pre, os.path.join(a.output, f"{mod}-{a.mode}"), "demo", None,
                          {"train.max_steps": max(1, int(DEMO_STEPS[mod] * a.steps_scale)),
                           "model.mode": a.mode},
                          model_frontend=frontend_from_manifest(read_manifest(pre, mod)),
                          tracking_uri=uri, experiment="data2vec-demo")
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        t0 = time.time()
        result = run_pretraining(cfg)
        if result.error:
            print(f"error: {mod} pretraining failed: {result.error}", file=sys.stderr)
            return 1
        wall = time.time() - t0
        final = os.path.join(cfg.output, "final")
        acc = {}
        for name, random_init in (("random", True), ("pretrained", False)):
            xtr, ytr = probe.extract(ptr, final, mod, random_init=random_init)
            xte, yte = probe.extract(pte, final, mod, random_init=random_init)
            acc[name] = probe.fit_probes(xtr, ytr, xte, yte)["probe_accuracy"]
        acc["classical"] = probe.classical_probe(ptr, pte, mod)["probe_accuracy"]
        m = result.metrics or {}
        rows.append({"modality": mod, "mode": a.mode, "steps": m.get("step"), "pretrain_s": round(wall, 1),
                     "samples_per_s": round(m.get("samples_per_s", 0.0), 1),
                     "data_wait": round(m.get("data_wait_fraction", 0.0), 4),
                     "probe_random": round(acc["random"], 3), "probe_pretrained": round(acc["pretrained"], 3),
                     "probe_classical": round(acc["classical"], 3)})
        print(f"[demo] {mod}: probe accuracy {acc['random']:.3f} (random init) → {acc['pretrained']:.3f} "
              f"(pretrained, {m.get('step')} steps, {wall:.0f} s); classical baseline {acc['classical']:.3f}",
              flush=True)

    print("\nmodality  mode  steps  pretrain_s  samples/s  data_wait  probe_random  probe_pretrained  classical")
    for r in rows:
        print(f"{r['modality']:9} {r['mode']:5} {r['steps']:5}  {r['pretrain_s']:10.1f}  {r['samples_per_s']:9.1f}  "
              f"{r['data_wait']:9.2%}  {r['probe_random']:12.3f}  {r['probe_pretrained']:16.3f}  {r['probe_classical']:9.3f}")
    print(f"\ntotal {time.time() - t_start:.0f} s. Browse the runs:\n"
          f"  .venv/bin/mlflow ui --backend-store-uri {uri} --port 5000   # then open http://127.0.0.1:5000")
    print(json.dumps({"demo": rows, "total_s": round(time.time() - t_start, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
