"""jobs.demo end to end on a small slice of the real demo data: the story it tells in MLflow."""
import json
import os

import pytest


@pytest.mark.slow
def test_demo_logs_probes_curves_and_a_summary_run_to_mlflow(demo_raw, ray_local, tmp_path, capsys, monkeypatch):
    from mlflow.tracking import MlflowClient

    from jobs.demo import EXPERIMENT, main
    out = str(tmp_path / "demo")
    assert main(["--data", demo_raw, "--output", out, "--modalities", "image", "--steps-scale", "0.05"]) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
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

    import jobs.demo
    bad = str(tmp_path / "bad")
    shutil.copytree(os.path.join(out, "data"), os.path.join(bad, "data"))
    settings = jobs.demo.curve_settings
    monkeypatch.setattr(jobs.demo, "curve_settings", lambda mod, steps: {
        **settings(mod, steps), "train.lr": 1e30, "train.warmup_steps": 1, "train.max_failures": 0})
    capsys.readouterr()
    assert main(["--data", demo_raw, "--output", bad, "--modalities", "image", "--steps-scale", "0.05"]) == 1
    err = capsys.readouterr().err
    assert "error: image pretraining failed: " in err and "NonFiniteLoss" in err, err[-2000:]
    client = MlflowClient("sqlite:///" + os.path.join(bad, "mlflow.db"))
    runs = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id])
    assert {r.info.run_name: r.info.status for r in runs} == {"demo": "FAILED", "image-d2v2-demo": "FAILED"}
