"""The demo's steps, one modality at a time: preprocess → pretrain (learning curves in MLflow) →
probe against random init and a classical baseline; the parent MLflow run with the summary table and
chart; the optional CTC fine-tuning. The command, its options and what it prints: jobs/demo.py.
`a` below is that command's arguments."""
from __future__ import annotations

import json
import os
import sys
import time

from pipeline.config import AudioSettings, ConfigError, ImageSettings, PreprocessConfig, TextSettings
from pipeline.raycluster import print_result

# Pretraining budget per modality at the demo preset (steps of batch 32, one worker per 2 cores):
# audio 2.0 is past its quality bar by ~36 steps (benchmarks/time_to_accuracy); text does not move
# its probe at any CPU budget tried (README), so the demo spends little on it.
DEMO_STEPS = {"image": 120, "audio": 36, "text": 40}
SPLITS = {"image": ("train", "train", "test"), "audio": ("train", "train", "test"),
          "text": ("pretrain", "train", "test")}  # (pretraining input, probe train, probe test)


def preprocess_all(mod: str, raw: str, out: str) -> dict[str, str]:
    from pipeline.ingest import run

    settings = {"image": dict(image=ImageSettings(size=28)),
                "audio": dict(audio=AudioSettings(crop_seconds=2.0)),
                "text": dict(text=TextSettings(max_length=64, vocab_size=4000))}[mod]
    dirs, done = {}, []
    for split in dict.fromkeys(SPLITS[mod]):
        d = os.path.join(out, f"{mod}_{split}")
        dirs[split] = d
        if os.path.isfile(os.path.join(d, "manifest.json")):
            continue
        tok = None if (mod != "text" or split == "pretrain") else os.path.join(out, "text_pretrain", "tokenizer.json")
        m = run(PreprocessConfig(modality=mod, input=os.path.join(raw, mod, split), output=d, tokenizer=tok,
                                 overwrite=True, **settings))
        done.append(f"{split} {m['counts']['written']} rows ({m['counts']['rejected']} rejected, {m['seconds']:.0f} s)")
    if done:
        print(f"[demo] {mod}: preprocessed " + ", ".join(done), flush=True)
    return dirs


EXPERIMENT = "data2vec-demo"


def curve_settings(mod: str, steps: int) -> dict:
    """Learning-curve points cheap enough for the demo's short runs: 3 points (start, middle, end);
    audio features cost ~25 ms per clip on 2 cores, so audio probes 128 clips per split. About six
    progress lines (and MLflow points) per run keep the console a page long."""
    log = {"train.log_every": max(10, steps // 6)}
    if mod == "audio":
        return {"train.eval_every": max(1, steps // 2), "train.val_batches": 1, "train.probe_samples": 128, **log}
    return {"train.eval_every": max(1, steps // 2), "train.val_batches": 2, "train.probe_samples": 256, **log}


def probe_modality(mod: str, final: str, probe_train: str, probe_test: str) -> dict:
    """Linear probe (and kNN) accuracy of the pretrained encoder, of the same network at random
    init, and of the classical raw-input baseline."""
    from pipeline import probe

    acc = {}
    # In this process: on one machine, for a few thousand rows, an actor pool's start-up costs more
    # than the extraction (jobs.evaluate uses the Ray Data actor pool, probe.extract_splits).
    train, test = probe.extract_splits_in_process([probe_train, probe_test], final, mod,
                                                  variants=("random", "pretrained"))
    for name in ("random", "pretrained"):
        r = probe.fit_probes(*train[name], *test[name], n_jobs=2)  # the cluster is idle while probing
        acc[name], acc[f"{name}_knn"] = r["probe_accuracy"], r["knn_accuracy"]
    acc["classical"] = probe.classical_probe(probe_train, probe_test, mod, n_jobs=2)["probe_accuracy"]
    return acc


def parent_run(uri: str, output: str) -> str:
    """The demo's parent MLflow run (one per output folder: a re-run logs into it again)."""
    from mlflow.tracking import MlflowClient

    from pipeline.train.tracking import prepare_experiment

    exp_id = prepare_experiment(uri, EXPERIMENT)
    client = MlflowClient(uri)
    id_file = os.path.join(output, "mlflow_demo_run_id")
    if os.path.exists(id_file):
        run_id = open(id_file).read().strip()
        client.update_run(run_id, status="RUNNING")
        return run_id
    run = client.create_run(exp_id, run_name="demo", tags={"demo": "parent"})
    open(id_file, "w").write(run.info.run_id)
    return run.info.run_id


NOTE = "mlflow.note.content"  # a run's description: the MLflow UI renders it (Markdown) on the run's Overview tab
CHART = "probe_accuracy.png"
MODES = {"d2v1": "data2vec 1.0", "d2v2": "data2vec 2.0"}


def table_markdown(rows: list[dict]) -> str:
    """The summary table (one row per modality, the columns the printed table has) as Markdown."""
    cols = list(rows[0]) if rows else []
    return ("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n"
            + "".join("| " + " | ".join(str(r[c]) for c in cols) + " |\n" for r in rows))


def code_block(text: str) -> str:
    """Text (an error message) shown as it is in Markdown."""
    return "```\n" + text.strip().replace("```", "'''") + "\n```"


def note_parent(uri: str, parent_id: str, rows: list[dict], *, todo=(), failed: str | None = None,
                ctc: dict | None = None, total_s: float | None = None) -> None:
    """The 'demo' run's description: what is still running or what failed, the summary table as far
    as it is known, the probe chart's link (once logged), then what the columns mean."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    parts = []  # the Overview tab shows a description's first lines until "Show more": the table first
    if failed:
        parts.append("**Failed**, the demo stopped:\n\n" + code_block(failed))
    elif todo:
        parts.append("Still running: " + ", ".join(todo) + ".")
    if rows:
        parts.append(table_markdown(rows))
    if ctc:
        parts.append(f"Speech recognition (CTC) from the pretrained audio encoder: CER {ctc['test_cer']:.3f}, "
                     f"WER {ctc['test_wer']:.3f} on unheard voices ({ctc['steps']} steps).")
    if total_s is not None:
        exp = client.get_run(parent_id).info.experiment_id
        parts.append(f"[Probe accuracy chart](#/experiments/{exp}/runs/{parent_id}/artifacts/{CHART}) "
                     f"(artifact `{CHART}`; the table as `summary.md` and `summary.csv`). "
                     f"Total wall time {total_s:.0f} s.")
    parts.append("Probe accuracy: a linear probe on frozen features, test split, at random init (`probe_random`), "
                 "after pretraining (`probe_pretrained`), and of a classical raw-input baseline "
                 "(`probe_classical`). One child run per modality holds its learning curves.")
    client.set_tag(parent_id, NOTE, "\n\n".join(parts))


def note_child(uri: str, run_id: str, cfg, row: dict | None, acc: dict | None, data_rows: int,
               error: str | None = None) -> None:
    """A modality's run description: what it trained, and its probe result (random init → pretrained)."""
    from mlflow.tracking import MlflowClient

    e = cfg.model.encoder
    what = (f"**{cfg.modality}** pretraining, {MODES.get(cfg.model.mode, cfg.model.mode)} (`{cfg.model.mode}`), "
            f"recipe `{cfg.preset}` ({e.dim}-dim encoder, {e.depth} layers, {e.heads} heads), "
            f"on {data_rows:,} preprocessed rows")
    if error:
        text = f"{what}: **failed**:\n\n" + code_block(error)
    else:
        steps, batch = row["steps"] or 0, cfg.train.effective_batch
        text = (f"{what}: {steps} step{'s' * (steps != 1)} × {batch} = {steps * batch:,} samples "
                f"in {row['pretrain_s']:.0f} s.\n\n"
                f"Linear probe on frozen features (test split): **{acc['random']:.3f} → {acc['pretrained']:.3f}** "
                f"(random init → pretrained); kNN {acc['random_knn']:.3f} → {acc['pretrained_knn']:.3f}; "
                f"classical raw-input baseline {acc['classical']:.3f}.")
    MlflowClient(uri).set_tag(run_id, NOTE, text)


def log_summary(uri: str, parent_id: str, rows: list[dict], total_s: float, ctc: dict | None = None) -> None:
    """The parent run gets every modality's numbers, the table (Markdown + CSV), a bar chart of
    random init vs pretrained vs classical, and its description with the table and the chart's link."""
    import tempfile

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    for r in rows:
        for k in ("probe_random", "probe_pretrained", "probe_classical", "samples_per_s", "data_wait", "pretrain_s"):
            client.log_metric(parent_id, f"{r['modality']}.{k}", float(r[k]))
    client.log_metric(parent_id, "total_s", total_s)
    cols = list(rows[0]) if rows else []
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "summary.csv"), "w") as f:
            f.write(",".join(cols) + "\n" + "".join(",".join(str(r[c]) for c in cols) + "\n" for r in rows))
        with open(os.path.join(d, "summary.md"), "w") as f:
            f.write(table_markdown(rows) + f"\nTotal wall time {total_s:.0f} s.\n")
        fig, ax = plt.subplots(figsize=(1.8 + 2.2 * len(rows), 3.4))
        w = 0.26
        for i, (key, label) in enumerate((("probe_random", "random init"), ("probe_pretrained", "data2vec"),
                                          ("probe_classical", "classical"))):
            xs = [j + (i - 1) * w for j in range(len(rows))]
            ax.bar(xs, [r[key] for r in rows], w, label=label)
        ax.set_xticks(range(len(rows)), [r["modality"] for r in rows])
        ax.set_ylabel("probe accuracy (test split)")
        ax.set_ylim(0, 1)
        ax.legend(loc="lower right", fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(d, CHART), dpi=100)
        plt.close(fig)
        for f in ("summary.csv", "summary.md", CHART):
            client.log_artifact(parent_id, os.path.join(d, f))
    note_parent(uri, parent_id, rows, ctc=ctc, total_s=total_s)
    client.set_terminated(parent_id)


def end_parent(uri: str, parent_id: str, status: str) -> None:
    from mlflow.tracking import MlflowClient

    MlflowClient(uri).set_terminated(parent_id, status)


def run_demo(a, mods: list[str], uri: str, parent_id: str, t_start: float) -> int:
    """Every modality's preprocess → pretraining → probe, then the summary; 0, or the exit code
    of the first failure (its message printed). The 'demo' run's description follows along: the
    table so far after each modality, or what failed."""
    rows = []
    note_parent(uri, parent_id, rows, todo=mods + (["CTC fine-tuning"] if a.ctc else []))
    for i, mod in enumerate(mods):
        try:
            row, failure = run_modality(a, mod, uri, parent_id)
        except Exception as e:
            note_parent(uri, parent_id, rows, failed=f"{mod}: {type(e).__name__}: {e}")
            raise
        if failure:
            code, what = failure
            note_parent(uri, parent_id, rows, failed=what)
            return code
        rows.append(row)
        note_parent(uri, parent_id, rows, todo=mods[i + 1:] + (["CTC fine-tuning"] if a.ctc else []))

    ctc = None
    if a.ctc:
        ctc = finetune_ctc(a, uri, parent_id)
        if isinstance(ctc, int):
            note_parent(uri, parent_id, rows, failed=f"CTC fine-tuning (exit code {ctc}; its error is on the console)")
            return ctc
    total = time.time() - t_start
    log_summary(uri, parent_id, rows, total, ctc)
    print("\nmodality  mode  steps  pretrain_s  samples/s  data_wait  probe_random  probe_pretrained  classical")
    for r in rows:
        print(f"{r['modality']:9} {r['mode']:5} {r['steps']:5}  {r['pretrain_s']:10.1f}  {r['samples_per_s']:9.1f}  "
              f"{r['data_wait']:9.2%}  {r['probe_random']:12.3f}  {r['probe_pretrained']:16.3f}  {r['probe_classical']:9.3f}")
    from pipeline.train.tracking import ui_hint

    hint, url = ui_hint(uri, EXPERIMENT)
    _, parent_url = ui_hint(uri, EXPERIMENT, parent_id)
    print(f"\ntotal {total:.0f} s (samples/s and data wait: whole pretraining runs). The runs, in experiment "
          f"{EXPERIMENT} — the 'demo' run holds the summary table and the probe chart:\n{hint}\n"
          f"  the 'demo' run: {parent_url}")
    print_result({"demo": rows, "total_s": round(total, 1), "mlflow_parent_run_id": parent_id, "mlflow_ui": url,
                  "mlflow_ui_demo_run": parent_url, **({"ctc": ctc} if ctc else {})})
    return 0


def run_modality(a, mod: str, uri: str, parent_id: str) -> tuple[dict | None, tuple[int, str] | None]:
    """One modality's preprocess → pretraining (a child run of the demo's) → probe: (its summary-table
    row, None), or (None, (exit code, what failed)), the error printed (and in the child run's
    description when the run started)."""
    from mlflow.tracking import MlflowClient

    from pipeline.train.config import resolve
    from pipeline.train.launch import fit_error, frontend_from_manifest, read_manifest
    from pipeline.pretrain.launch import run_pretraining

    dirs = preprocess_all(mod, a.data, os.path.join(a.output, "data"))
    pre, ptr, pte = (dirs[s] for s in SPLITS[mod])
    try:
        # Learning curves in MLflow: validation loss on 5% of the pretraining rows held out, and
        # the online probe on the labeled splits.
        steps = max(1, int(DEMO_STEPS[mod] * a.steps_scale))
        manifest = read_manifest(pre, mod)
        cfg = resolve(mod, pre, os.path.join(a.output, f"{mod}-{a.mode}"), "demo", None,
                      {"train.max_steps": steps, "model.mode": a.mode, "train.val_fraction": 0.05,
                       **curve_settings(mod, steps)},
                      model_frontend=frontend_from_manifest(manifest),
                      tracking_uri=uri, experiment=EXPERIMENT, parent_run_id=parent_id,
                      probe_train=ptr, probe_test=pte)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return None, (2, f"{mod} configuration: {e}")
    data_rows = manifest["counts"]["written"]
    id_file = os.path.join(cfg.output, "mlflow_run_id")
    t0 = time.time()
    result, error = fit_error(lambda: run_pretraining(cfg))
    if error:
        print(f"error: {mod} pretraining failed: {error}", file=sys.stderr)
        if os.path.exists(id_file):
            note_child(uri, open(id_file).read().strip(), cfg, None, None, data_rows, error=str(error))
        return None, (1, f"{mod} pretraining: {error}")
    wall = time.time() - t0
    acc = probe_modality(mod, os.path.join(cfg.output, "final"), ptr, pte)
    m = result.metrics or {}
    row = {"modality": mod, "mode": a.mode, "steps": m.get("step"), "pretrain_s": round(wall, 1),
           "samples_per_s": round(m.get("run_samples_per_s", 0.0), 1),
           "data_wait": round(m.get("run_data_wait_fraction", 0.0), 4),
           "probe_random": round(acc["random"], 3), "probe_pretrained": round(acc["pretrained"], 3),
           "probe_classical": round(acc["classical"], 3)}
    run_id = open(id_file).read().strip()
    MlflowClient(uri).log_batch(run_id, metrics=_metrics({
        "final_probe.linear_random_init": acc["random"], "final_probe.linear_pretrained": acc["pretrained"],
        "final_probe.knn_random_init": acc["random_knn"], "final_probe.knn_pretrained": acc["pretrained_knn"],
        "final_probe.linear_classical": acc["classical"]}, m.get("step") or 0))
    note_child(uri, run_id, cfg, row, acc, data_rows)
    print(f"[demo] {mod}: probe accuracy {acc['random']:.3f} (random init) → {acc['pretrained']:.3f} "
          f"(pretrained, {m.get('step')} steps, {wall:.0f} s); classical baseline {acc['classical']:.3f}",
          flush=True)
    return row, None


CTC_STEPS = 300


def finetune_ctc(a, uri: str, parent_id: str) -> dict | int:
    """Spoken digit strings (a.data/ctc, which jobs.demo prepares) → CTC fine-tuning of the demo's
    pretrained audio encoder (a child run of the demo), scored on held-out voices. Returns {"test_cer", "test_wer", "steps", "finetune_s"},
    or the exit code of a failure (its message printed): 2 for a config the pre-flight refuses, 1
    for a failed run."""
    from types import SimpleNamespace

    from pipeline.ingest import run
    from pipeline.finetune import launch as fl
    from pipeline.train.launch import fit_error

    data = {}
    for split in ("train", "val", "test"):
        data[f"{split}_data"] = d = os.path.join(a.output, "data", f"ctc_{split}")
        if not os.path.isfile(os.path.join(d, "manifest.json")):
            run(PreprocessConfig(modality="audio", input=os.path.join(a.data, "ctc", split), output=d, overwrite=True))
    out = os.path.join(a.output, "audio-ctc")
    args = SimpleNamespace(modality="audio", task="ctc", init=os.path.join(a.output, f"audio-{a.mode}", "final"),
                           output=out, preset="demo", config=None, tracking_uri=uri, experiment=EXPERIMENT,
                           parent_run_id=parent_id, **data)
    try:
        cfg = fl.build(args, {"train.max_steps": a.ctc_steps})
        cfg, memory_line = fl.check(cfg)  # the same pre-flight as jobs.finetune: memory and resume
        if memory_line:
            print(memory_line, flush=True)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t0 = time.time()
    if not os.path.isfile(os.path.join(out, "final", "metrics.json")):
        _, error = fit_error(lambda: fl.run_finetuning(cfg))
        if error:
            print(f"error: CTC fine-tuning failed: {error}", file=sys.stderr)
            return 1
    m = json.load(open(os.path.join(out, "final", "metrics.json")))
    r = {"test_cer": round(m["test_cer"], 3), "test_wer": round(m["test_wer"], 3), "steps": m["steps"],
         "finetune_s": round(time.time() - t0, 1)}
    print(f"[demo] speech recognition (CTC) from the pretrained audio encoder: CER {r['test_cer']:.3f}, "
          f"WER {r['test_wer']:.3f} on unheard voices ({r['steps']} steps, {r['finetune_s']:.0f} s)", flush=True)
    return r


def _metrics(values: dict, step: int) -> list:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [Metric(k, float(v), now, step) for k, v in values.items()]
