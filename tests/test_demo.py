"""jobs.demo end to end on a small slice of the real demo data: the story it tells on the console
(a file, as CI and `ray job submit` logs are), in MLflow, and in the MLflow UI in a real browser."""
import json
import os
import subprocess
import sys
import tempfile

import pytest

from tests.servers import ROOT, alone_on_this_machine, artifact_page, mlflow_ui, on_port, page_text


@pytest.mark.slow
def test_demo_logs_probes_curves_and_a_summary_run_to_mlflow(demo_raw, ray_local, tmp_path, capsys, monkeypatch):
    from mlflow.tracking import MlflowClient

    from jobs.demo import main
    from pipeline.demo import EXPERIMENT
    out = str(tmp_path / "demo")
    # As a user runs it, with its own local Ray cluster, its console going to a file.
    env = {**os.environ, "RAY_TMPDIR": tempfile.mkdtemp(prefix="rt", dir="/tmp")}
    for k in ("RAY_ADDRESS", "RAY_DATA_DISABLE_PROGRESS_BARS"):  # the test session's settings, not a user's
        env.pop(k, None)
    with open(tmp_path / "console.txt", "w+") as console, alone_on_this_machine():
        r = subprocess.run([sys.executable, "-m", "jobs.demo", "--data", demo_raw, "--output", out, "--modalities",
                            "image", "--steps-scale", "0.05"], cwd=ROOT, env=env, stdout=console,
                           stderr=subprocess.STDOUT, timeout=900)
        console.seek(0)
        lines = console.read().splitlines()
    text = "\n".join(lines)
    assert r.returncode == 0, text[-4000:]
    # The story, not Ray's plumbing: no progress blocks of Ray Data, no start-up and report lines
    # of Ray Train, no error-level lines from a normal run.
    assert len(lines) <= 25, text  # one modality of the ~40 lines the whole demo prints
    for noise in ("logging_progress", "Reporting training result", "Failed to kill actor", " E ", "Traceback"):
        assert noise not in text, (noise, text)
    assert "[demo] image: preprocessed" in text and "step 6/6 loss" in text and "then open http" in text
    last = json.loads(lines[-1])
    row = last["demo"][0]
    assert row["modality"] == "image" and row["steps"] == 6
    assert row["samples_per_s"] > 0 and 0 <= row["data_wait"] < 1  # whole-run figures

    client = MlflowClient("sqlite:///" + os.path.join(out, "mlflow.db"))
    exp = client.get_experiment_by_name(EXPERIMENT)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"  # the UI opens on training runs
    parent = client.get_run(last["mlflow_parent_run_id"])
    assert parent.info.run_name == "demo" and parent.info.status == "FINISHED"
    for k in ("probe_random", "probe_pretrained", "probe_classical"):
        assert parent.data.metrics[f"image.{k}"] == pytest.approx(row[k], abs=1e-3)
    arts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"summary.md", "summary.csv", "probe_accuracy.png"} <= arts
    table = open(client.download_artifacts(parent.info.run_id, "summary.csv", str(tmp_path))).read().splitlines()
    assert table[0].startswith("modality,") and table[1].startswith("image,")

    child, = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")

    # The MLflow UI at the URLs the demo printed (served here on a free port), in headless Chromium.
    with mlflow_ui(f"sqlite:///{out}/mlflow.db") as base:
        demo_run = on_port(last["mlflow_ui_demo_run"], base)
        assert parent.info.run_id in demo_run
        runs, files, curves = page_text(on_port(last["mlflow_ui"], base), artifact_page(demo_run, "probe_accuracy.png"),
                                        demo_run.replace(parent.info.run_id, child.info.run_id))
        # The runs table: the 'demo' run, its pretraining run nested (collapsed) under it.
        assert "2 matching runs" in runs and " demo " in runs, runs[-3000:]
        assert "probe_accuracy.png" in files and "summary.md" in files, files[-3000:]
        assert "val_loss" in curves and "image-d2v2-demo" in curves, curves[-3000:]
    m = child.data.metrics
    assert m["final_probe.linear_pretrained"] == pytest.approx(row["probe_pretrained"], abs=1e-3)
    for k in ("final_probe.linear_random_init", "final_probe.linear_classical", "final_probe.knn_pretrained"):
        assert 0 <= m[k] <= 1, k
    # Learning curves from step 0 (validation loss on held-out rows, the online probe).
    for key in ("val_loss", "probe.knn_accuracy", "probe.linear_accuracy"):
        steps = [p.step for p in client.get_metric_history(child.info.run_id, key)]
        assert steps[0] == 0 and steps[-1] == 6, (key, steps)

    # A failing pretraining (a NaN loss from an absurd LR; the preprocessed data copied over):
    # exit 1 with the worker's own error, and no MLflow run of the demo left RUNNING.
    import shutil

    import pipeline.demo
    bad = str(tmp_path / "bad")
    shutil.copytree(os.path.join(out, "data"), os.path.join(bad, "data"))
    settings = pipeline.demo.curve_settings
    monkeypatch.setattr(pipeline.demo, "curve_settings", lambda mod, steps: {
        **settings(mod, steps), "train.lr": 1e30, "train.warmup_steps": 1, "train.max_failures": 0})
    capsys.readouterr()
    assert main(["--data", demo_raw, "--output", bad, "--modalities", "image", "--steps-scale", "0.05"]) == 1
    err = capsys.readouterr().err
    assert "error: image pretraining failed: " in err and "NonFiniteLoss" in err, err[-2000:]
    client = MlflowClient("sqlite:///" + os.path.join(bad, "mlflow.db"))
    runs = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id])
    assert {r.info.run_name: r.info.status for r in runs} == {"demo": "FAILED", "image-d2v2-demo": "FAILED"}


def test_demo_refuses_arguments_that_cannot_work(tmp_path, capsys):
    from jobs.demo import main
    for args, needle in ((["--modalities", "image,video"], "--modalities must be a subset"),
                         (["--mode", "d2v3"], "--mode d2v1|d2v2"), (["--steps-scale", "0"], "--steps-scale > 0"),
                         (["--modalities", "image", "--ctc"], "--ctc fine-tunes the demo's audio encoder")):
        assert main(["--data", str(tmp_path / "raw"), "--output", str(tmp_path / "out"), *args]) == 2, args
        assert needle in capsys.readouterr().err, args
    assert not os.path.exists(tmp_path / "raw")  # refused before preparing any data
