"""Probes prove learning; sweeps run on Ray Tune with nested MLflow runs."""
import json
import os
import pathlib
import warnings

import numpy as np
import pytest

from pipeline.probe import fit_probes


def test_fit_probes_on_separable_and_random_features():
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(4), 50).astype(str)
    x_good = rng.normal(size=(200, 8)) + np.eye(8)[np.repeat(np.arange(4), 50)] * 5
    x_bad = rng.normal(size=(200, 8))
    good = fit_probes(x_good[::2], y[::2], x_good[1::2], y[1::2])
    bad = fit_probes(x_bad[::2], y[::2], x_bad[1::2], y[1::2])
    assert good["probe_accuracy"] > 0.95 and good["knn_accuracy"] > 0.95
    assert bad["probe_accuracy"] < 0.5  # chance is 0.25
    assert good["n_train"] == 100 and good["classes"] == 4
    assert bad["majority_accuracy"] == 0.25  # balanced classes: the majority guess is right 1 time in 4


def test_probe_regularization_is_chosen_by_cross_validation():
    """The probe's C is the grid value with the best 3-fold accuracy on the training split,
    checked against a hand-written cross-validation loop (few samples, 300 mostly-noise dims:
    the regime where a fixed C over- or under-fits)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold
    from sklearn.preprocessing import StandardScaler

    from pipeline.probe import PROBE_CS
    rng = np.random.default_rng(1)
    y = np.repeat(np.array(["a", "b"]), 100)
    x = rng.normal(size=(200, 300))
    x[:, :3] += np.where(y == "a", 1.5, -1.5)[:, None]
    xtr, ytr, xte, yte = x[::2], y[::2], x[1::2], y[1::2]
    got = fit_probes(xtr, ytr, xte, yte)
    z = StandardScaler().fit_transform(xtr)
    scores = []
    for c in PROBE_CS:
        accs = [LogisticRegression(C=c, max_iter=2000).fit(z[a], ytr[a]).score(z[b], ytr[b])
                for a, b in StratifiedKFold(3).split(z, ytr)]
        scores.append(np.mean(accs))
    assert got["probe_c"] == PROBE_CS[int(np.argmax(scores))]
    fixed = fit_probes(xtr, ytr, xte, yte, cs=(got["probe_c"],))
    assert fixed["probe_c"] == got["probe_c"] and abs(fixed["probe_accuracy"] - got["probe_accuracy"]) < 0.02


@pytest.mark.slow
def test_quality_bar_image_pretraining_beats_random_init(demo_shards, image_encoder):
    """End to end on real MNIST digits: a short data2vec 2.0 run (120 steps, conftest) must lift the
    linear probe on a held-out split by >= 5 points over the same network at random init."""
    from jobs.evaluate import main as evaluate
    out = image_encoder  # ".../image encoder/run", written through --output file:///…/image%20encoder/run
    res = {}
    for flag, final in (([], pathlib.Path(out, "final").as_uri()), (["--random-init"], os.path.join(out, "final"))):
        import contextlib
        import io
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            assert evaluate(["--checkpoint", final, "--train-data", demo_shards["image_train"],
                             "--test-data", demo_shards["image_test"], *flag]) == 0
        r = json.loads(buf.getvalue().strip().splitlines()[-1])
        res[r["encoder"]] = r
    print(res)
    assert res["pretrained"]["n_test"] == 150
    assert res["pretrained"]["probe_accuracy"] >= res["random-init"]["probe_accuracy"] + 0.05
    # jobs.evaluate logged the probe to the pretraining run
    from mlflow.tracking import MlflowClient
    client = MlflowClient("sqlite:///" + os.path.join(out, "mlflow.db"))
    run = client.get_run(open(os.path.join(out, "mlflow_run_id")).read().strip())
    assert run.data.metrics["probe.pretrained.probe_accuracy"] == pytest.approx(res["pretrained"]["probe_accuracy"])
    # Every job found the one run folder (the export reads final/config.json, then refuses a 2.0
    # image encoder for its post-LN layout; test_finetune's CTC test exports through file:// URIs),
    # and no job made a literal "%20" folder.
    from jobs.export_hf import main as export
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert export(["--checkpoint", pathlib.Path(out, "final").as_uri(), "--output",
                       (pathlib.Path(out).parent / "hf model").as_uri()]) == 2
    assert "post-LN" in err.getvalue() and "no model.safetensors" not in err.getvalue()
    runs = pathlib.Path(out).parent.parent
    assert not [p for p in runs.rglob("*") if "%20" in p.name] and not (pathlib.Path.cwd() / "file:").exists()


@pytest.mark.slow
def test_sweep_chooses_on_validation_and_nests_mlflow_runs(demo_shards, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    from jobs.sweep import main as sweep
    out = str(tmp_path / "a b" / "sweep")  # named below as file:///…/a%20b/sweep, as is the search space
    space = tmp_path / "a b" / "space.yaml"
    space.parent.mkdir()
    space.write_text("model.ema.decay: {choice: [0.99, 0.999]}\nmodel.mask.prob: {uniform: [0.6, 0.85]}\n"
                     "model.target.top_k: {choice: [1, 3]}\n")
    rc = sweep(["--modality", "image", "--data", demo_shards["image"], "--probe-train", demo_shards["image_train"],
                "--probe-test", demo_shards["image_test"], "--num-samples", "2", "--max-concurrent", "2",
                "--search-space", space.as_uri(), "--output", pathlib.Path(out).as_uri(), "--rounds", "2",
                "--steps-per-round", "4",
                "--set", "train.batch_size=16", "--set", "train.log_every=2"])
    assert rc == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # The sweep ran its own tracking server over SWEEP_DIR/mlflow.db (trials never open the SQLite
    # file themselves); the store is read here directly, after the server stopped.
    client = MlflowClient("sqlite:///" + os.path.join(out, "mlflow.db"))
    parent_id = open(os.path.join(out, "mlflow_parent_run_id")).read().strip()
    exp = client.get_experiment_by_name("data2vec-sweep")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    assert exp.artifact_location == f"file://{os.path.abspath(out)}/mlartifacts"  # readable without the server
    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent_id}'")
    assert len(children) == 2
    for c in children:
        assert "val_probe_accuracy" in c.data.metrics and "probe_accuracy" not in c.data.metrics
        assert float(c.data.params["model.ema.decay"]) in (0.99, 0.999)
        assert c.data.params["model.target.top_k"] in ("1", "3")
    # Chosen on the validation split: the chosen config is (one of) the best children by validation
    # accuracy.
    top = max(c.data.metrics["val_probe_accuracy"] for c in children)
    assert last["val_probe_accuracy"] == pytest.approx(top)
    best = [c for c in children if c.data.metrics["val_probe_accuracy"] == pytest.approx(top)]
    assert any(float(c.data.params["model.mask.prob"]) == pytest.approx(last["best_config"]["model.mask.prob"])
               for c in best)
    parent = client.get_run(parent_id)
    assert parent.data.metrics["test_probe_accuracy"] == pytest.approx(last["test_probe_accuracy"])
    assert 0.1 < last["test_probe_accuracy"] <= 1.0
    assert json.loads(parent.data.params["trial_resources"]) == {"CPU": 3, "GPU": 0}
    arts = {a.path for a in client.list_artifacts(parent_id)}
    assert {"best_config.json", "val_probe_vs_params.png"} <= arts


def test_sweep_refuses_what_cannot_work_before_ray(tmp_path, capsys):
    """Arguments and search-space entries that cannot work exit 2 naming what is wrong; every
    supported distribution builds its Tune domain."""
    from ray import tune

    from jobs.sweep import main as sweep
    from pipeline.config import ConfigError
    from pipeline.sweep import DEFAULT_SPACE, tune_space

    space = tune_space({**DEFAULT_SPACE, "train.lr": {"loguniform": [3e-4, 3e-3]}, "x.k": {"randint": [1, 5]}})
    assert isinstance(space["model.ema.decay"], tune.search.sample.Categorical)
    assert isinstance(space["train.lr"], tune.search.sample.Float) and space["train.lr"].lower == 3e-4
    assert isinstance(space["x.k"], tune.search.sample.Integer) and (space["x.k"].lower, space["x.k"].upper) == (1, 5)
    with pytest.raises(ConfigError, match=r"^search-space\.model\.mask\.prob: expected one of"):
        tune_space({"model.mask.prob": {"normal": [0.7, 0.1]}})
    base = ["--modality", "image", "--data", str(tmp_path), "--probe-train", str(tmp_path), "--probe-test",
            str(tmp_path), "--output", str(tmp_path / "sweep")]
    assert sweep([*base, "--num-samples", "2", "--search-space", str(tmp_path / "none.yaml")]) == 2
    assert "search-space: " in capsys.readouterr().err
    assert sweep([*base, "--num-samples", "0"]) == 2
    assert "num-samples" in capsys.readouterr().err


def test_stratified_split_holds_out_every_class_seeded():
    from pipeline.probe import stratified_split
    y = np.array([0] * 40 + [1] * 8 + [2] * 1)
    fit, held = stratified_split(y, 0.25, seed=0)
    assert sorted(np.concatenate([fit, held]).tolist()) == list(range(len(y)))  # a partition
    assert np.bincount(y[held], minlength=3).tolist() == [10, 2, 0]  # a quarter of each; a singleton stays
    assert (stratified_split(y, 0.25, seed=0)[1] == held).all()
    assert not (stratified_split(y, 0.25, seed=1)[1] == held).all()


def test_evaluate_refuses_data_the_checkpoint_cannot_read(tmp_path, capsys):
    """Labeled folders that do not fit the checkpoint fail before Ray starts, naming the field and
    the fix: other modality, no labels, other image size, other vocabulary, other tokenizer."""
    from jobs.evaluate import main as evaluate

    def folder(name, modality, labels=("a", "b"), tokenizer=None, **settings):
        d = tmp_path / name
        d.mkdir()
        (d / "manifest.json").write_text(json.dumps({"modality": modality, "labels": list(labels),
                                                     "settings": settings}))
        if tokenizer is not None:
            (d / "tokenizer.json").write_text(tokenizer)
        return str(d)

    pre = folder("pretrain", "text", labels=(), tokenizer='{"bpe": 1}', vocab_size=300)
    ckpt = tmp_path / "final"
    ckpt.mkdir()
    (ckpt / "model.safetensors").write_bytes(b"")
    (ckpt / "config.json").write_text(json.dumps({"data": pre, "model": {
        "modality": "text", "encoder": {"depth": 4}, "frontend": {"vocab_size": 300, "image_size": 28}}}))
    good = folder("good", "text", tokenizer='{"bpe": 1}', vocab_size=300)
    cases = {
        "image": (folder("img", "image", size=28), "but the checkpoint is a text encoder"),
        "unlabeled": (folder("unlab", "text", labels=(), tokenizer='{"bpe": 1}', vocab_size=300), "has no labels"),
        "vocab": (folder("vocab", "text", tokenizer='{"bpe": 2}', vocab_size=500), "500-token vocabulary"),
        "tokenizer": (folder("tok", "text", tokenizer='{"bpe": 2}', vocab_size=300), "another tokenizer"),
    }
    for name, (bad, message) in cases.items():
        capsys.readouterr()
        rc = evaluate(["--checkpoint", str(ckpt), "--train-data", good, "--test-data", bad])
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith("error: test-data: ") and message in err, (name, err)
    rc = evaluate(["--checkpoint", str(ckpt), "--train-data", good, "--test-data", good, "--layers", "5"])
    assert rc == 2 and "layers: [5] out of range" in capsys.readouterr().err

    ckpt_img = json.loads((ckpt / "config.json").read_text())
    ckpt_img["model"]["modality"] = "image"
    (ckpt / "config.json").write_text(json.dumps(ckpt_img))
    small = folder("small", "image", size=32, stored="encoded")
    rc = evaluate(["--checkpoint", str(ckpt), "--train-data", small, "--test-data", small])
    assert rc == 2 and "images are 32 px but the encoder takes 28 px" in capsys.readouterr().err
    old = folder("old", "image", size=28)  # raw pixels, written before images were stored encoded
    rc = evaluate(["--checkpoint", str(ckpt), "--train-data", old, "--test-data", old])
    err = capsys.readouterr().err
    assert rc == 2 and "stores raw 28-px pixels" in err and "python -m jobs.preprocess --modality image" in err, err


@pytest.mark.slow
def test_in_process_extraction_matches_the_actor_pool(demo_shards, tmp_path):
    """The demo's in-process extraction gives the features the Ray Data actor pool gives (rows may
    come back in another order): both variants, both splits."""
    from benchmarks.harness import Trainer, demo_run_config, load_rows
    from pipeline import probe
    from pipeline.train.checkpoint import save_final
    out = str(tmp_path / "run")  # a text encoder one step (the workers' step, in this process) from init
    cfg = demo_run_config(os.path.dirname(demo_shards["text"]), "text", out,
                          overrides={"train.batch_size": 8, "train.warmup_steps": 0})
    trainer = Trainer(cfg, load_rows(cfg.data, "text"))
    trainer.train(1)
    save_final(os.path.join(out, "final"), trainer.model, cfg.to_dict())
    dirs = [demo_shards["text_train"], demo_shards["text_test"]]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        pool = probe.extract_splits(dirs, os.path.join(out, "final"), "text", variants=("random", "pretrained"))
    # The pool is no larger than the input files: no actor is started only to wait.
    assert not [w for w in seen if "concurrent actors" in str(w.message)], [str(w.message) for w in seen]
    local = probe.extract_splits_in_process(dirs, os.path.join(out, "final"), "text",
                                            variants=("random", "pretrained"))
    for a, b in zip(pool, local):
        for v in ("random", "pretrained"):
            (xa, ya), (xb, yb) = a[v], b[v]
            assert xa.shape == xb.shape and sorted(ya.tolist()) == sorted(yb.tolist())
            # Every row of each has its twin in the other: rows are matched by nearest neighbour, not
            # by sorting one column (two different rows can share a first feature to float rounding).
            d = (xa ** 2).sum(1)[:, None] + (xb ** 2).sum(1)[None, :] - 2 * xa @ xb.T  # (Na, Nb) squared distances
            np.testing.assert_allclose(xa, xb[d.argmin(1)], rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(xb, xa[d.argmin(0)], rtol=1e-4, atol=1e-5)
    assert not np.allclose(pool[0]["random"][0].mean(0), pool[0]["pretrained"][0].mean(0))


@pytest.mark.slow
def test_a_failing_sweep_exits_non_zero_with_the_workers_error_and_failed_runs(demo_shards, tmp_path, capsys):
    """Ray Train V2's fit() raises on a failed run: the trial fails with the worker's own error
    (here a NaN loss from an absurd LR), the sweep says so and exits 1, and both the trial's and
    the sweep's MLflow runs end FAILED — none is left RUNNING."""
    from mlflow.tracking import MlflowClient

    from jobs.sweep import main as sweep
    out = str(tmp_path / "sweep")
    space = tmp_path / "space.yaml"
    space.write_text("model.ema.decay: {choice: [0.999]}\n")
    rc = sweep(["--modality", "image", "--data", demo_shards["image"], "--probe-train", demo_shards["image_train"],
                "--probe-test", demo_shards["image_test"], "--num-samples", "1", "--search-space", str(space),
                "--output", out, "--rounds", "1", "--steps-per-round", "3", "--set", "train.batch_size=16",
                "--set", "train.lr=1e30", "--set", "train.warmup_steps=1", "--set", "train.max_failures=0"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "error: a trial failed: " in err and "NonFiniteLoss" in err, err[-2000:]
    client = MlflowClient("sqlite:///" + os.path.join(out, "mlflow.db"))
    parent_id = open(os.path.join(out, "mlflow_parent_run_id")).read().strip()
    assert client.get_run(parent_id).info.status == "FAILED"
    exp = client.get_experiment_by_name("data2vec-sweep")
    trial, = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent_id}'")
    assert trial.info.status == "FAILED"
