"""What does pretraining buy? Fine-tuned test accuracy (CER/WER for CTC) from the data2vec encoder vs
the same architecture from scratch vs the classical raw-input baseline, at a fraction and all of
the training labels, with the same budget (steps, batch, recipe) for both inits.

    .venv/bin/python -m benchmarks.finetune --runs RUNS [--output OUT] [--modalities image,audio,text,ctc,langid]
        [--fractions 0.1,1.0] [--steps image=300,audio=300,text=300,ctc=600,langid=200] [--num-workers 1]
        [--encoders image=RUN_DIR/final,audio=...] [--inits data2vec,scratch]

RUNS is a `python -m jobs.demo --output RUNS` folder: RUNS/data/<modality>_{train,test} (labeled
splits) and RUNS/<modality>-d2v2/final (the pretrained encoders). A seeded, class-stratified 15% of
<modality>_train becomes the validation split (model selection); the rest is the training split
that --fractions subsample (`jobs.finetune --label-fraction`); <modality>_test is scored once.
ctc: spoken digit strings made by `jobs.prepare_demo --modalities ctc` (held-out voices in val and
test), fine-tuned from RUNS/audio-d2v2/final. langid: speech the demo never pretrains on — spoken
language identification over 8 languages (`jobs.prepare_demo --modalities langid`: random words of
each language's word list read by its espeak-ng voice, held-out voice variants in val and test),
classified from RUNS/audio-d2v2/final; its classical baseline is MFCC statistics. --encoders
replaces RUNS' encoder of a modality with another one (e.g. a longer `jobs.pretrain` on the same RUNS/data/<modality>_train; use a new
--output, since a finished run with another init is not re-run; `--inits data2vec` skips the
scratch runs, which do not depend on the encoder). The classical baseline (pixels / MFCC statistics /
TF-IDF + logistic regression, `pipeline.probe.classical_probe`) is fitted on the same labeled rows;
it has no CTC counterpart. Every fine-tuning run is one `python -m jobs.finetune` process.
Prints a table, then one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

STEPS = "image=300,audio=300,text=300,ctc=600,langid=200"
# Prepared speech tasks beyond the demo's: name → (task, settings). langid's clips last 2.4-10 s
# (median 5); it trains on random 3-s crops to keep a step short, and scores whole clips.
SPEECH = {"ctc": ("ctc", []), "langid": ("classify", ["--set", "train.audio_max_samples=48000"])}
VAL_FRACTION = 0.15


def run(cmd: list[str], log: str, summary: bool = True) -> dict:
    """Run a job module; its stdout/stderr go to `log`; returns its last JSON line (`summary`)."""
    with open(log, "w") as f:
        r = subprocess.run([sys.executable, "-m", *cmd], cwd=ROOT, stdout=subprocess.PIPE, stderr=f, text=True)
        f.write(r.stdout)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} failed ({r.returncode}); see {log}")
    return json.loads(r.stdout.strip().splitlines()[-1]) if summary else {}


def splits(runs: str, out: str, modality: str, seed: int = 0) -> dict:
    """{"train", "val", "test"} preprocessed folders for one modality (val carved out of train)."""
    from pipeline.finetune.tasks import write_fraction

    if modality in SPEECH:
        raw, prep = os.path.join(out, f"{modality}_raw"), {}
        if not os.path.isdir(os.path.join(raw, modality)):
            run(["jobs.prepare_demo", "--output", raw, "--modalities", modality],
                os.path.join(out, f"{modality}_prepare.log"), summary=False)  # prepare_demo reports in prose
        for s in ("train", "val", "test"):
            prep[s] = os.path.join(out, f"{modality}_{s}")
            if not os.path.exists(os.path.join(prep[s], "manifest.json")):
                run(["jobs.preprocess", "--modality", "audio", "--input", os.path.join(raw, modality, s), "--output",
                     prep[s], "--overwrite"], os.path.join(out, f"{modality}_preprocess_{s}.log"))
        return prep
    train, val = os.path.join(out, f"{modality}_train"), os.path.join(out, f"{modality}_val")
    if not os.path.exists(os.path.join(train, "manifest.json")):
        write_fraction(os.path.join(runs, "data", f"{modality}_train"), val, "label", VAL_FRACTION, seed,
                       stratified=True, rest=train)
    return {"train": train, "val": val, "test": os.path.join(runs, "data", f"{modality}_test")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", required=True, help="a jobs.demo --output folder")
    p.add_argument("--output", default=None, help="work folder (default RUNS/finetune_bench)")
    p.add_argument("--modalities", default="image,audio,text,ctc,langid")
    p.add_argument("--fractions", default="0.1,1.0")
    p.add_argument("--steps", default=STEPS)
    p.add_argument("--num-workers", type=int, default=1)
    p.add_argument("--encoders", default="", help="modality=RUN_DIR/final,... instead of RUNS/<modality>-d2v2/final")
    p.add_argument("--inits", default="data2vec,scratch", help="which of data2vec,scratch to fine-tune")
    a = p.parse_args(argv)
    inits = [i for i in a.inits.split(",") if i]
    if not inits or set(inits) - {"data2vec", "scratch"}:
        p.error(f"--inits: expected data2vec and/or scratch, got {a.inits!r}")
    encoders = dict(kv.split("=", 1) for kv in a.encoders.split(",") if kv)
    out = a.output or os.path.join(a.runs, "finetune_bench")
    os.makedirs(out, exist_ok=True)
    steps = dict(kv.split("=") for kv in a.steps.split(","))
    fractions = [float(f) for f in a.fractions.split(",")]
    results, table = {}, []
    for mod in a.modalities.split(","):
        modality, task = ("audio", SPEECH[mod][0]) if mod in SPEECH else (mod, "classify")
        extra = SPEECH[mod][1] if mod in SPEECH else []
        pretrained = encoders.get(modality) or os.path.join(a.runs, f"{modality}-d2v2", "final")
        if not os.path.exists(os.path.join(pretrained, "model.safetensors")):
            print(f"error: {pretrained} is missing; run `python -m jobs.demo --output {a.runs}` first"
                  " (or pass an existing --encoders folder)", file=sys.stderr)
            return 2
        data = splits(a.runs, out, mod)
        for frac in fractions:
            row = {}
            for name, init in (("data2vec", pretrained), ("scratch", "scratch")):
                if name not in inits:
                    continue
                ft = os.path.join(out, f"{mod}-{name}-{frac:g}")
                t0 = time.time()
                s = run(["jobs.finetune", "--task", task, "--modality", modality, "--init", init,
                         "--train-data", data["train"], "--val-data", data["val"], "--test-data", data["test"],
                         "--output", ft, "--max-steps", steps[mod], "--label-fraction", str(frac),
                         "--num-workers", str(a.num_workers), *extra], ft + ".log")
                row[name] = s["test_cer"] if task == "ctc" else s["test_accuracy"]
                if task == "ctc":
                    row[f"{name}_wer"] = s["test_wer"]
                row[f"{name}_s"] = round(time.time() - t0, 1)
            if task == "classify":
                from pipeline.probe import classical_probe
                sub = os.path.join(out, f"{mod}-{inits[0]}-{frac:g}", "subsets", f"label-{frac:g}-seed0")
                row["classical"] = classical_probe(sub if frac < 1 else data["train"], data["test"], modality,
                                                   n_jobs=2)["probe_accuracy"]
            results[f"{mod}_{frac:g}"] = row
            table.append((mod, frac, row))
            print(f"{mod} {frac:g}: {row}", flush=True)
    print("\n| task | labels | metric | data2vec init | scratch | classical | steps | wall s (data2vec / scratch) |")
    print("|---|---|---|---|---|---|---|---|")
    for mod, frac, row in table:
        metric = "test CER (WER)" if mod == "ctc" else "test accuracy"
        def cell(k: str) -> str:  # "—" for an init not run (--inits) or no classical baseline (CTC)
            if k not in row:
                return "—"
            return f"{row[k]:.3f}" + (f" ({row[k + '_wer']:.3f})" if mod == "ctc" and k != "classical" else "")
        secs = " / ".join(f"{row[k + '_s']:.0f}" if k + "_s" in row else "—" for k in ("data2vec", "scratch"))
        print(f"| {mod} | {frac:.0%} | {metric} | {cell('data2vec')} | {cell('scratch')} | {cell('classical')} "
              f"| {steps[mod]} | {secs} |")
    low = min(fractions)
    better = {mod: (row["data2vec"] < row["scratch"]) if mod == "ctc" else (row["data2vec"] > row["scratch"])
              for mod, frac, row in table if frac == low and {"data2vec", "scratch"} <= set(row)}
    classical = {f"{mod}_{frac:g}": row["data2vec"] > row["classical"] for mod, frac, row in table
                 if "classical" in row and "data2vec" in row}
    print(json.dumps({"results": results, f"data2vec_beats_scratch_at_{low:g}": better,
                      "data2vec_beats_classical": classical, "encoders": encoders}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
