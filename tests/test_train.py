"""Distributed pretraining on a real local Ray cluster (2 gloo workers) with real MLflow."""
import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from pipeline.config import ConfigError
from pipeline.train.config import RunConfig, TrainConfig, parse_sets, resolve
from pipeline.train.step import lr_at

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--num-workers", "2", "--set", "train.batch_size=8", "--set", "train.log_every=2",
         "--set", "train.warmup_steps=2"]


def pretrain(args):
    from jobs.pretrain import main
    return main(args)


def mlflow_metrics(run_dir):
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri="sqlite:///" + os.path.join(run_dir, "mlflow.db"))
    run_id = open(os.path.join(run_dir, "mlflow_run_id")).read().strip()
    run = client.get_run(run_id)
    return client, run


@pytest.mark.slow
@pytest.mark.parametrize("modality", ["audio", "text"])
def test_short_run_each_modality_logs_to_mlflow(demo_shards, tmp_path, modality):
    out = str(tmp_path / "run")
    assert pretrain(["--modality", modality, "--data", demo_shards[modality], "--output", out,
                     "--max-steps", "6", "--set", "train.checkpoint_every=3", *SMALL,
                     "--set", "train.val_fraction=0.2", "--set", "train.eval_every=3"]) == 0
    client, run = mlflow_metrics(out)
    assert run.info.status == "FINISHED"
    # Rank 0's curve points while rank 1 waits in the next all-reduce: the run still finishes.
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_loss")] == [0, 3, 6]
    hist = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in hist] == [2, 4, 6] and all(m.value > 0 for m in hist)
    for key in ("lr", "ema_decay", "target_var", "pred_var", "samples_per_s", "data_wait_fraction"):
        assert client.get_metric_history(run.info.run_id, key), key
    assert run.data.params["train.max_steps"] == "6" and run.data.params["modality"] == modality
    assert run.data.tags["ray.num_workers"] == "2" and run.data.tags["modality"] == modality
    arts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"final", "masks"} <= arts
    # The final encoder loads without pickle and matches its config.
    from pipeline.train.checkpoint import load_final
    model, cfg = load_final(os.path.join(out, "final"))
    assert cfg["modality"] == modality and cfg["train"]["max_steps"] == 6


@pytest.mark.slow
def test_stop_and_resume_gives_identical_weights(demo_shards, tmp_path):
    base = ["--modality", "image", "--data", demo_shards["image"], "--max-steps", "8",
            "--set", "train.checkpoint_every=4", *SMALL]
    a, b = str(tmp_path / "straight"), str(tmp_path / "split")
    assert pretrain([*base, "--output", a]) == 0
    assert pretrain([*base, "--output", b, "--stop-at-step", "4"]) == 0
    assert not os.path.exists(os.path.join(b, "final"))  # stopped early: no final model yet
    # A resume that would change the schedule is refused before Ray starts, naming the field …
    r = subprocess.run([sys.executable, "-m", "jobs.pretrain", *base, "--output", b, "--set", "train.lr=5e-4"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "train.lr: " in r.stderr and "--allow-config-change" in r.stderr, r.stderr
    assert pretrain([*base, "--output", b]) == 0  # … the same command resumes
    wa = load_file(os.path.join(a, "final", "model.safetensors"))
    wb = load_file(os.path.join(b, "final", "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k  # bit-identical, teacher included
    # and training did change the weights
    init_enc = [k for k in wa if k.startswith("encoder.blocks.0.fc1.weight")]
    assert init_enc and not torch.equal(wa[init_enc[0]], wa["teacher_encoder.blocks.0.fc1.weight"])
    _, run = mlflow_metrics(b)  # one MLflow run across both invocations
    assert run.info.status == "FINISHED"


@pytest.mark.slow
def test_each_epoch_draws_new_crops_and_a_resume_draws_the_same(demo_shards, tmp_path, monkeypatch):
    """Random resized crops (the 2.0 recipe's views) on 2 workers over more than two epochs: every
    row is trained on another crop in epoch 1 than in epoch 0, and a run stopped mid-epoch 1 and
    resumed trains on exactly the crops (and ends with exactly the weights) of an uninterrupted run."""
    data = demo_shards["image_test"]
    per_epoch = json.load(open(os.path.join(data, "manifest.json")))["counts"]["written"] // 16
    steps = 2 * per_epoch + 1
    base = ["--modality", "image", "--data", data, "--max-steps", str(steps), "--set", "train.checkpoint_every=3",
            "--set", "train.augment=crop", "--set", "train.crop_scale=[0.2, 1.0]", *SMALL]
    logs = {}
    for name, stops in (("straight", [None]), ("split", [per_epoch + 2, None])):
        logs[name] = str(tmp_path / f"{name}.jsonl")
        monkeypatch.setenv("D2V_SAMPLE_LOG", logs[name])
        for stop in stops:
            assert pretrain([*base, "--output", str(tmp_path / name),
                             *(["--stop-at-step", str(stop)] if stop else [])]) == 0

    def views(log):  # (step, rank) → (epoch, rows, views) of the attempt that counted (the last)
        return {(x["step"], x["rank"]): (x["epoch"], x["rows"], x["views"]) for x in map(json.loads, open(log))}

    a, b = views(logs["straight"]), views(logs["split"])
    assert sorted(a) == [(s, r) for s in range(steps) for r in (0, 1)]
    assert a == b  # the resumed run saw the same rows in the same crops
    crop = {}
    for epoch, rows, vs in a.values():
        for r, v in zip(rows, vs):
            crop.setdefault(r, {})[epoch] = v
    both = [c for c in crop.values() if 0 in c and 1 in c]
    assert len(both) > 50 and all(c[0] != c[1] for c in both)  # another crop of each image every epoch
    wa, wb = (load_file(os.path.join(tmp_path / n, "final", "model.safetensors")) for n in ("straight", "split"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.slow
def test_worker_crash_restarts_from_checkpoint(demo_shards, tmp_path):
    """A worker dies after step 5 (rank 0 has logged it): the run resumes from its last checkpoint,
    step 4 — with checkpoint_every=100, written by time-based checkpoints due every step
    (train.checkpoint_every_s; step-based ones are in every stop/resume test) — says how many logged
    steps it re-runs, and MLflow holds one value per step (the history is the committed one)."""
    from tests.servers import session_ray_address
    out = str(tmp_path / "run")
    env = {**os.environ, "D2V_FAIL_AT_STEP": "5", "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
           "RAY_ADDRESS": session_ray_address()}  # the job joins the session's cluster
    every = ["--set", "train.checkpoint_every=100", "--set", "train.checkpoint_every_s=0.001"]
    r = subprocess.run([sys.executable, "-m", "jobs.pretrain", "--modality", "image", "--data",
                        demo_shards["image"], "--output", out, "--max-steps", "8", *every,
                        "--set", "train.augment=crop", *SMALL, "--set", "train.log_every=1"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert os.path.exists(os.path.join(out, ".fault_injected"))  # the fault really happened
    logs = r.stdout + r.stderr
    assert "injected fault at step 5" in logs and "resumed from step 4 " in logs
    assert "re-runs 1 step(s) the last attempt had logged" in logs  # rank 0 logged step 5; rank 1 died in it
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["step"] == 8 and summary["final"]
    client, run = mlflow_metrics(out)
    assert [m.step for m in sorted(client.get_metric_history(run.info.run_id, "loss"), key=lambda m: m.step)] \
        == list(range(1, 9))  # one value per step
    assert [m.value for m in client.get_metric_history(run.info.run_id, "rerun_steps")] == [1.0]


def test_config_errors_name_the_field(demo_shards, tmp_path, capsys):
    """Each wrong setting exits 2 with one stderr line naming its field (the command's own main,
    in this process); the last case runs the real command line."""
    base = ["--modality", "image", "--data", demo_shards["image"], "--output", str(tmp_path / "o")]
    cases = [(["--set", "train.lr=-1"], "train.lr"), (["--set", "model.mask.prob=1.5"], "model.mask.prob"),
             (["--set", "train.nope=1"], "train.nope"), (["--max-steps", "0"], "train.max_steps"),
             (["--preset", "huge"], "preset"), (["--set", "model.encoder.heads=5"], "model.encoder.heads"),
             (["--set", "model.frontend.image_size=56"], "model.frontend.image_size"),
             # types, from each field's annotation, before any range check compares the value
             (["--set", "train.lr=abc"], "train.lr: must be a number, got 'abc'"),
             (["--set", "train.batch_size=1.5"], "train.batch_size: must be an integer, got 1.5"),
             (["--set", "model.encoder.pre_norm=3"], "model.encoder.pre_norm: must be true or false, got 3"),
             (["--set", "train.crop_scale=[0.2]"], "train.crop_scale: must be a list of 2 numbers"),
             (["--set", "train.reference_batch=lots"], "train.reference_batch: must be an integer or null"),
             # a whole section given a value
             (["--set", "model.encoder=5"], "model.encoder: a config section, must be a mapping of its fields"),
             (["--set", "train=5"], "train: a config section"),
             (["--config", str(tmp_path / "list.yaml")], "model: a config section, must be a mapping of its fields (e.g. "
              "--set model.FIELD=VALUE), got [1, 2]"),
             (["--config", str(tmp_path / "str.yaml")], "model.encoder: a config section")]
    (tmp_path / "list.yaml").write_text("model: [1, 2]\n")
    (tmp_path / "str.yaml").write_text("model: {encoder: abc}\n")
    for extra, needle in cases:
        rc, err = pretrain([*base, *extra]), capsys.readouterr().err
        assert rc == 2 and needle in err and err.count("\n") == 1, (extra, err)
    assert not os.path.exists(tmp_path / "o")  # refused before anything was written
    r = subprocess.run([sys.executable, "-m", "jobs.pretrain", "--modality", "audio", "--data",
                        demo_shards["image"], "--output", str(tmp_path / "o")], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "holds image data" in r.stderr


def test_resolve_layers_file_and_sets(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model:\n  mode: d2v1\n  encoder: {dim: 64, heads: 4}\ntrain:\n  lr: 0.0005\n")
    cfg = resolve("audio", "d", "o", "demo", str(f), parse_sets(["train.lr=2e-4", "model.mask.prob=0.5"]))
    assert cfg.model.mode == "d2v1" and cfg.model.encoder.dim == 64
    assert cfg.train.lr == 2e-4 and cfg.model.mask.prob == 0.5
    assert cfg.model.mask.length == 10  # the d2v1 audio preset's span length
    with pytest.raises(ConfigError, match="train.stop_at_step"):
        TrainConfig(max_steps=5, stop_at_step=9)


def test_lr_schedules():
    t = TrainConfig(lr=1.0, warmup_steps=10, max_steps=110, min_lr_scale=0.0)
    assert lr_at(0, t) == pytest.approx(0.1) and lr_at(9, t) == pytest.approx(1.0)
    assert lr_at(60, t) == pytest.approx(0.5)  # half-way through the cosine
    assert lr_at(110, t) == pytest.approx(0.0, abs=1e-12)
    tri = TrainConfig(lr=1.0, warmup_steps=10, max_steps=110, min_lr_scale=0.01, schedule="tri_stage")
    assert lr_at(50, tri) == 1.0 and lr_at(110, tri) == pytest.approx(0.01)
    # fine-tuning's phase ratio [0.1, 0.4, 0.5], final scale 0.05: hold to step 10 + 40, then
    # decay exponentially over the last 50 steps (half-way: 0.05 ** 0.5)
    ft = TrainConfig(lr=1.0, warmup_steps=10, max_steps=100, min_lr_scale=0.05, schedule="tri_stage",
                     tri_stage_hold=0.4)
    assert lr_at(49, ft) == 1.0 and lr_at(75, ft) == pytest.approx(0.05 ** 0.5) and lr_at(100, ft) == pytest.approx(0.05)


def test_reference_batch_is_the_effective_batch_at_every_worker_count():
    """A base recipe's effective batch (per-GPU batch × the reference's GPUs) is the run's, exactly,
    on any number of workers: shares that differ by at most one sample, micro-batches of at most
    batch_size (or micro_batch) that differ by at most one. Nothing is rounded, so no LR rescale."""
    from pipeline.train.config import split_evenly, step_layout

    fe = {"image_size": 224}
    t = resolve("image", "d", "o", "base", None, {}, model_frontend=fe).train  # image 2.0 base: 16 × 16 GPUs
    assert (t.reference_batch, t.batch_size, t.effective_batch) == (256, 16, 256)
    for world, shares, micro in ((1, [256], [16] * 16), (2, [128] * 2, [16] * 8), (16, [16] * 16, [16]),
                                 (3, [86, 85, 85], [15, 15, 14, 14, 14, 14]), (5, [52, 51, 51, 51, 51], [13] * 4)):
        lay = step_layout(t, world)
        assert lay.shares == shares and sum(lay.shares) == 256 and lay.micro[0] == micro, (world, lay)
        assert all(sum(m) == s and max(m) <= 16 and max(m) - min(m) <= 1 for m, s in zip(lay.micro, lay.shares))
    assert step_layout(t, 3).line() == ("effective batch 256 = 3 worker(s) × 86 or 85 samples, in 6 "
                                        "micro-batch(es) of 15 or 14")
    assert t.batch_line(16) == "effective batch 256 = 16 worker(s) × 16 samples, in 1 micro-batch(es) of 16"
    small = dataclasses.replace(t, micro_batch=5)  # the memory fit's field: the same step in smaller pieces
    assert small.effective_batch == 256 and step_layout(small, 2).micro[0] == split_evenly(128, 26)
    assert TrainConfig(batch_size=8, grad_accum=3).effective_batch == 24  # no reference: as given
    assert TrainConfig(batch_size=8, grad_accum=3, num_workers=4).batch_line(3) == \
        "effective batch 96 = 3 worker(s) × 32 samples, in 4 micro-batch(es) of 8"
    with pytest.raises(ConfigError, match=r"^train\.num_workers: 5 workers cannot share an effective batch of 4"):
        step_layout(TrainConfig(batch_size=4), 5)
    with pytest.raises(ConfigError, match=r"^train\.grad_accum: derived from train\.reference_batch=256"):
        resolve("image", "d", "o", "base", None, {"train.grad_accum": 2}, model_frontend=fe)
    own = resolve("image", "d", "o", "base", None, {"train.reference_batch": None, "train.grad_accum": 2},
                  model_frontend=fe).train
    assert own.grad_accum == 2 and own.effective_batch == 32
    # building a config never rewrites another field (dataclasses.replace re-runs the checks only)
    assert dataclasses.replace(t, batch_size=7).grad_accum == t.grad_accum == 1
    assert RunConfig.from_dict({**resolve("text", "d", "o").to_dict(),
                                "train": {**resolve("text", "d", "o").to_dict()["train"], "scale_lr": False}})


def test_streaming_dataset_is_not_materialized(demo_shards):
    """The trainer receives a lazy read_parquet dataset: nothing is executed or pinned up front."""
    import ray
    from pipeline.train.stream import COLUMNS
    ds = ray.data.read_parquet(os.path.join(demo_shards["image"], "shards"), columns=COLUMNS["image"])
    from ray.data.dataset import MaterializedDataset
    assert isinstance(ds, ray.data.Dataset) and not isinstance(ds, MaterializedDataset)
    first = next(iter(ds.iter_batches(batch_size=4, batch_format="numpy")))  # streams the first block
    assert list(first) == ["image"]


# ------------------------------------------------------------------ scale paths
def _image_folder_224(demo_raw, root):
    """The demo's MNIST folder (class per sub-folder) preprocessed with the default 224 px."""
    from pipeline.config import PreprocessConfig
    from pipeline.ingest import run
    out = str(root / "image224")
    run(PreprocessConfig(modality="image", input=os.path.join(demo_raw, "image", "test"), output=out))
    return out


@pytest.mark.slow
def test_two_workers_accumulate_on_224px_folders_through_file_uris(demo_raw, ray_local, tmp_path):
    """The path a new user takes: preprocessing defaults (224 px) + the demo preset + 2 workers ×
    2 micro-batches of 4 (a reference batch of 16), with data and output given as file:// URIs. The demo recipe picks 16-px patches
    (14 × 14 tokens) so it fits; threads per worker come from the worker's node."""
    data = _image_folder_224(demo_raw, tmp_path)
    out = tmp_path / "run"
    rc = pretrain(["--modality", "image", "--data", f"file://{data}", "--output", f"file://{out}",
                   "--num-workers", "2", "--max-steps", "3", "--set", "train.batch_size=4",
                   "--set", "train.reference_batch=16", "--set", "train.log_every=1", "--set", "train.warmup_steps=1"])
    assert rc == 0
    client, run = mlflow_metrics(str(out))
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2, 3]
    from pipeline.train.loop import node_cpus, threads_for_worker
    assert run.data.tags["torch.threads_per_worker"] == str(threads_for_worker(node_cpus(), 2))
    assert run.data.tags["train.effective_batch"] == "16"
    cfg = json.load(open(out / "final" / "config.json"))
    assert cfg["model"]["frontend"]["patch_size"] == 16 and cfg["train"]["reference_batch"] == 16
    import pyarrow.parquet as pq
    from pipeline.config import ROW_GROUP_ROWS
    from pipeline.train.checkpoint import load_final
    for f in os.listdir(os.path.join(data, "shards")):  # preprocessing writes small row groups
        meta = pq.ParquetFile(os.path.join(data, "shards", f)).metadata
        assert max(meta.row_group(g).num_rows for g in range(meta.num_row_groups)) <= ROW_GROUP_ROWS["image"]
    model, _ = load_final(f"file://{out}/final", teacher=True)  # final/ loads from a URI too
    assert model.frontend.grid == (14, 14)


@pytest.mark.slow
def test_nan_on_one_rank_stops_the_run_or_rolls_back(demo_shards, tmp_path, monkeypatch, capsys):
    """Rank 1's loss turns NaN at step 3 (twice): with on_collapse=raise the run fails at once with
    NonFiniteLoss naming rank 1 (not after the collective timeout); with rollback it restores
    step 2's checkpoint twice, the LR cut compounding (× 0.5, × 0.25), and finishes, logging each
    rollback to MLflow."""
    import time
    monkeypatch.setenv("D2V_NAN_AT_STEP", "3:1:2")
    base = ["--modality", "image", "--data", demo_shards["image"], "--max-steps", "4",
            "--set", "train.checkpoint_every=2", "--set", "train.max_failures=0", *SMALL]
    t0 = time.time()
    assert pretrain([*base, "--output", str(tmp_path / "raise")]) == 1
    assert time.time() - t0 < 300
    err = capsys.readouterr().err
    assert "NonFiniteLoss" in err and "(on rank 1)" in err, err[-2000:]
    assert pretrain([*base, "--output", str(tmp_path / "rollback"), "--set", "train.on_collapse=rollback"]) == 0
    client, run = mlflow_metrics(str(tmp_path / "rollback"))
    assert sorted(m.value for m in client.get_metric_history(run.info.run_id, "rollback")) == [1.0, 2.0]
    assert sorted(m.value for m in client.get_metric_history(run.info.run_id, "rollback_lr_scale")) == [0.25, 0.5]
    assert "NonFiniteLoss" in run.data.tags["rollback.1"] and "rollback.2" in run.data.tags
    lrs = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "lr")}
    assert lrs[4] < lr_at(3, resolve("image", "d", "o", "demo", None, parse_sets(
        ["train.max_steps=4", "train.warmup_steps=2"])).train)  # the LR after the rollback is scaled down
    for key in ("loss", "lr"):  # the abandoned step 3 was never logged: one value per step
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        assert sorted(steps) == sorted(set(steps)), (key, steps)


@pytest.mark.slow
def test_run_is_browsable_after_ray_is_gone_with_curves_and_one_progress_line(demo_shards, tmp_path):
    """A user's run as a separate process with its own local Ray cluster (its temporary folder
    under RAY_TMPDIR): after it ends and Ray's whole temporary folder is deleted, every artifact
    still downloads through MlflowClient; the learning curves (validation loss on a held-out
    fraction, online probe) are in MLflow from step 0; each progress line is printed once."""
    import shutil
    import tempfile

    ray_tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # unix socket paths must stay < 108 bytes
    out = str(tmp_path / "run")
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    r = subprocess.run([sys.executable, "-m", "jobs.pretrain", "--modality", "image", "--data", demo_shards["image"],
                        "--output", out, "--max-steps", "4", "--set", "train.batch_size=8",
                        "--set", "train.log_every=2", "--set", "train.warmup_steps=2", "--set", "train.eval_every=2",
                        "--set", "train.val_fraction=0.2", "--set", "train.probe_samples=100",
                        "--probe-train", demo_shards["image_train"], "--probe-test", demo_shards["image_test"]],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    printed = r.stdout + r.stderr
    assert printed.count("step 2/4 loss") == 1 and printed.count("step 4/4 loss") == 1, printed[-3000:]
    assert os.listdir(ray_tmp), "Ray did not use RAY_TMPDIR"
    shutil.rmtree(ray_tmp)

    client, run = mlflow_metrics(out)
    exp = client.get_experiment(run.info.experiment_id)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    assert exp.artifact_location == "file://" + os.path.join(out, "mlartifacts")  # absolute, in the run folder
    listed = []

    def walk(path=None):
        for a in client.list_artifacts(run.info.run_id, path):
            walk(a.path) if a.is_dir else listed.append(a.path)
    walk()
    assert {"final/model.safetensors", "final/config.json"} <= set(listed) and any(p.startswith("masks/") for p in listed)
    dst = tmp_path / "downloaded"
    for p in listed:
        assert os.path.getsize(client.download_artifacts(run.info.run_id, p, str(dst))) > 0
    # Curves: points at step 0 (the network at init) and every eval_every steps.
    for key in ("val_loss", "probe.knn_accuracy", "probe.linear_accuracy"):
        hist = client.get_metric_history(run.info.run_id, key)
        assert [m.step for m in hist] == [0, 2, 4], key
    assert all(0.0 <= m.value <= 1.0 for m in client.get_metric_history(run.info.run_id, "probe.knn_accuracy"))
    val = [m.value for m in client.get_metric_history(run.info.run_id, "val_loss")]
    assert all(v > 0 for v in val) and val[-1] != val[0]
    for key in ("run_samples_per_s", "run_data_wait_fraction", "run_eval_fraction"):
        assert client.get_metric_history(run.info.run_id, key), key
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["samples_per_s"] > 0 and 0 <= summary["data_wait_fraction"] < 1

    # The MLflow UI, in a real browser, at the URL the run printed (served on a free port here).
    from tests.servers import artifact_page, mlflow_ui, on_port, page_text

    assert f"then open {summary['mlflow_ui']}" in r.stdout
    with mlflow_ui(f"sqlite:///{out}/mlflow.db") as base:
        run_url = on_port(summary["mlflow_ui"], base).replace("/runs?", f"/runs/{run.info.run_id}?")
        runs, page, files = page_text(on_port(summary["mlflow_ui"], base), run_url, artifact_page(run_url, "final"))
        assert run.info.run_name in runs and "1 matching run" in runs, runs[-2000:]  # the runs table
        assert "val_loss" in page and "probe.knn_accuracy" in page, page[-2000:]
        assert "model.safetensors" in files and "masks" in files, files[-2000:]


def test_resume_accepts_a_run_written_before_fields_were_added(tmp_path):
    """A run whose config.json predates the fields in ADDED_FIELDS (model.frontend.mask_id,
    train.reference_batch, …) resumes, since they meant the values written there; a real change is
    still refused."""
    from pipeline.train.launch import ADDED_FIELDS, check_resume

    cfg = resolve("image", "d", str(tmp_path), "demo", None, {})
    old, removed = cfg.to_dict(), set()
    for key, value in ADDED_FIELDS.items():
        *path, last = key.split(".")
        section = old
        for p in path:
            section = section.get(p, {})
        if last in section:
            assert section.pop(last) == value  # today's default is what an old run meant
            removed.add(key)
    assert removed >= {"model.frontend.mask_id", "train.reference_batch", "train.tri_stage_hold"}
    old["train"]["scale_lr"] = False  # a field this version dropped (the effective batch is exact now)
    (tmp_path / "config.json").write_text(json.dumps(old))
    (tmp_path / "ray" / "pretrain").mkdir(parents=True)
    check_resume(cfg)
    with pytest.raises(ConfigError, match=r"^train\.reference_batch: .*\(train\.reference_batch: None → 64\)"):
        check_resume(resolve("image", "d", str(tmp_path), "demo", None, {"train.reference_batch": 64}))


def test_resume_accepts_new_keys_under_a_resumable_mapping_field(tmp_path):
    """train.worker_resources is resumable: its keys (flattened to train.worker_resources.trainer)
    may be added, changed or dropped on a resume; a field that merely shares its prefix is not."""
    from pipeline.train.launch import RESUMABLE, check_resume, resumable

    assert resumable("train.worker_resources.trainer", RESUMABLE["pretrain"])
    assert not resumable("train.worker_resourcesx", {"train.worker_resources"})
    (tmp_path / "ray" / "pretrain").mkdir(parents=True)
    for before, now in (({}, {"trainer": 1}), ({"trainer": 1}, {"trainer": 2, "ssd": 1}), ({"trainer": 1}, {})):
        cfg = resolve("text", "d", str(tmp_path), "demo", None, {"train.worker_resources": before})
        (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict()))
        check_resume(resolve("text", "d", str(tmp_path), "demo", None, {"train.worker_resources": now}))
    with pytest.raises(ConfigError, match=r"^train\.batch_size: "):
        check_resume(resolve("text", "d", str(tmp_path), "demo", None, {"train.worker_resources": {"trainer": 3},
                                                                       "train.batch_size": 3}))


def test_elastic_world_sizes_keep_the_runs_effective_batch():
    """--num-workers MIN-MAX: every world size trains the run's effective batch exactly (the
    configured num_workers' batch × grad_accum), in shares that differ by at most one sample."""
    from pipeline.train.config import parse_workers, step_layout

    assert parse_workers("4") == {"train.num_workers": 4}
    assert parse_workers("1-8") == {"train.num_workers": 8, "train.min_workers": 1}
    with pytest.raises(ConfigError, match="^train.num_workers: --num-workers takes N or MIN-MAX"):
        parse_workers("2..4")
    with pytest.raises(ConfigError, match=r"^train.min_workers: must be in \[1, num_workers=2\]"):
        TrainConfig(num_workers=2, min_workers=3)
    cfg = resolve("text", "d", "o", "demo", None, {**parse_workers("1-4"), "train.batch_size": 8,
                                                   "train.grad_accum": 1, "train.reference_batch": None})
    assert cfg.train.effective_batch == 32
    for world, shares, micro in ((4, [8] * 4, [8]), (2, [16] * 2, [8, 8]), (1, [32], [8] * 4), (3, [11, 11, 10], [6, 5])):
        lay = step_layout(cfg.train, world)
        assert (lay.shares, lay.micro[0], lay.effective) == (shares, micro, 32), world


@pytest.mark.slow
def test_any_cut_of_the_global_batch_trains_the_same_steps(demo_shards, tmp_path, capsys):
    """4 optimizer steps of the same global batch of 6 clips (spoken digits: unequal lengths) on
    1 worker × grad_accum 6, 2 workers × 3, 3 workers × shares of 2, 4 workers × shares of
    2/2/1/1, and 1 worker whose memory fit cuts its 6 into micro-batches: the same final weights,
    to float rounding (fairseq's normalization: train/step.py). The 2.0 decoder's noise is off
    here: it is drawn per process, not per sample (README, "Nodes that vanish")."""
    from pipeline.train.config import resolve
    from pipeline.train.memory import GB, estimate, with_micro_batch

    common = ["--modality", "audio", "--data", demo_shards["audio"], "--max-steps", "4",
              "--set", "train.reference_batch=6", "--set", "model.decoder.mask_noise_std=0",
              "--set", "train.warmup_steps=1", "--set", "train.log_every=1"]
    cfg = resolve("audio", demo_shards["audio"], "o", "demo", None, {"train.batch_size": 6, "train.reference_batch": 6})
    room = (estimate(with_micro_batch(cfg, 3))["total"] + estimate(with_micro_batch(cfg, 4))["total"]) / 2 / GB
    cuts = {"1x6": ["--num-workers", "1", "--set", "train.batch_size=1"],
            "2x3": ["--num-workers", "2", "--set", "train.batch_size=1"],
            "3x2": ["--num-workers", "3", "--set", "train.batch_size=2"],
            "4 uneven": ["--num-workers", "4", "--set", "train.batch_size=2"],
            "fitted": ["--num-workers", "1", "--set", "train.batch_size=6", "--set", f"train.worker_memory_gb={room:.4f}"]}
    weights, printed = {}, {}
    for name, args in cuts.items():
        out = str(tmp_path / name.replace(" ", "_"))
        assert pretrain(common + args + ["--output", out]) == 0, name
        printed[name] = capsys.readouterr().out
        weights[name] = load_file(os.path.join(out, "final", "model.safetensors"))
    assert "effective batch 6 = 4 worker(s) × 2 or 1 samples, in 1 micro-batch(es) of 2 or 1" in printed["4 uneven"]
    assert "memory: micro-batches of at most 3 " in printed["fitted"], printed["fitted"]
    assert "effective batch 6 = 1 worker(s) × 6 samples, in 2 micro-batch(es) of 3" in printed["fitted"]
    ref = weights["1x6"]
    norm = sum(float(v.double().norm()) ** 2 for v in ref.values() if v.is_floating_point()) ** 0.5
    for name, w in weights.items():
        diff = sum(float((w[k].double() - v.double()).norm()) ** 2 for k, v in ref.items() if v.is_floating_point())
        assert diff ** 0.5 <= 1e-6 * norm, (name, diff ** 0.5 / norm)
    init = {k: v for k, v in ref.items() if k.startswith("teacher_encoder.")}
    assert any(not torch.equal(ref[k.replace("teacher_encoder.", "encoder.", 1)], v) for k, v in init.items())


@pytest.mark.slow
def test_base_image_recipe_on_three_workers_fits_and_trains_exactly_2048(ray_local, tmp_path):
    """data2vec 1.0 image base (reference batch 2048 = 128 per GPU × 16) on 3 workers whose memory
    forces a fit: the exact command prints an effective batch of exactly 2048 (683 + 683 + 682, in
    micro-batches that fit); the same recipe with a one-block encoder, so a CPU can run the step,
    trains each step on exactly 2048 distinct images cut that way."""
    from benchmarks.photos import write_photos
    from pipeline.config import ImageSettings, PreprocessConfig
    from pipeline.ingest import run as ingest
    from pipeline.train.memory import GB, estimate, with_micro_batch

    raw, data = str(tmp_path / "raw"), str(tmp_path / "photos224")
    os.makedirs(raw)
    write_photos(raw, 2100, seed=3, min_side=240, max_side=320)
    ingest(PreprocessConfig(modality="image", input=raw, output=data, image=ImageSettings(size=224)))
    cmd = [sys.executable, "-m", "jobs.pretrain", "--preset", "base", "--modality", "image", "--set", "model.mode=d2v1",
           "--num-workers", "3", "--data", data]
    proc = subprocess.Popen([*cmd, "--output", str(tmp_path / "base"), "--set", "train.worker_memory_gb=6"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    printed = []
    for line in proc.stdout:  # the lines before Ray starts: what the run will train
        printed.append(line)
        if line.startswith("batch: "):
            break
    proc.kill()
    proc.wait()
    text = "".join(printed)
    memory = next(x for x in printed if x.startswith("memory: micro-batches of at most "))
    micro = int(memory.split()[5])
    assert 1 <= micro < 128, text
    n = -(-683 // micro)
    assert f"batch: effective batch 2048 = 3 worker(s) × 683 or 682 samples, in {n} micro-batch(es)" in text, text

    small = ["--set", "model.encoder.depth=1", "--set", "model.encoder.dim=64", "--set", "model.encoder.heads=2",
             "--set", "model.target.top_k=1"]
    cfg = resolve("image", data, "o", "base", None, {"model.mode": "d2v1", "train.num_workers": 3,
                                                    **parse_sets([s for s in small if s != "--set"])},
                  model_frontend={"image_size": 224})
    room = (estimate(with_micro_batch(cfg, 100))["total"] + estimate(with_micro_batch(cfg, 101))["total"]) / 2 / GB
    from tests.servers import session_ray_address
    log, out = str(tmp_path / "rows.jsonl"), str(tmp_path / "small")
    env = {**os.environ, "D2V_SAMPLE_LOG": log, "RAY_ADDRESS": session_ray_address()}
    r = subprocess.run([*cmd, *small, "--output", out, "--max-steps", "2", "--set", f"train.worker_memory_gb={room:.4f}"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "memory: micro-batches of at most 100 " in r.stdout, r.stdout[-3000:]
    assert "batch: effective batch 2048 = 3 worker(s) × 683 or 682 samples, in 7 micro-batch(es) of 98 or 97" \
        in r.stdout, r.stdout[-3000:]
    steps = {}
    for x in map(json.loads, open(log)):
        steps.setdefault(x["step"], {})[x["rank"]] = x["rows"]
    assert sorted(steps) == [0, 1]
    for ranks in steps.values():
        assert sorted(len(v) for v in ranks.values()) == [682, 683, 683]
        rows = [i for v in ranks.values() for i in v]
        assert len(rows) == len(set(rows)) == 2048
    client, run = mlflow_metrics(out)
    assert {m.value for m in client.get_metric_history(run.info.run_id, "effective_batch")} == {2048.0}


def test_a_restart_from_an_older_checkpoint_does_not_log_committed_steps_again(tmp_path):
    """A node lost right after a checkpoint's report, before Ray Train registered it: the restart
    resumes from the checkpoint before and re-runs steps whose values MLflow already holds. Each
    step keeps one value (the restart's are the same rows and values)."""
    import mlflow

    from pipeline.train.tracking import MLflowSink, prepare_experiment

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    prepare_experiment(uri, "x")
    (tmp_path / "run").mkdir()
    first = MLflowSink(uri, "x", str(tmp_path / "run"), "run", {"a": 1})
    for step in range(1, 7):
        first.log_metrics({"loss": step}, step)
        if step % 2 == 0:
            first.commit(step)  # checkpoints at 2, 4, 6: the history holds steps 1-6
    mlflow.end_run(status="FAILED")  # the attempt dies; Ray Train registered only step 4's checkpoint
    again = MLflowSink(uri, "x", str(tmp_path / "run"), "run", {"a": 1})
    assert again.run_id == first.run_id and again.committed == 6
    for step in range(5, 9):  # re-runs 5 and 6, then goes on
        again.log_metrics({"loss": step}, step)
    again.commit(8)  # the last checkpoint; a fine-tune's test metrics come after it, at the same step
    again.log_event({"test_accuracy": 0.5}, 8)
    again.close()
    client = mlflow.MlflowClient(uri)
    assert sorted(m.step for m in client.get_metric_history(first.run_id, "loss")) == list(range(1, 9))
    assert client.get_run(first.run_id).data.metrics["test_accuracy"] == 0.5


def test_the_printed_mlflow_ui_command_pastes_into_a_shell_with_a_space_in_the_store_path(tmp_path):
    import shlex

    from pipeline.train.tracking import prepare_experiment, ui_hint

    db = tmp_path / "run dir" / "mlflow.db"
    db.parent.mkdir()
    uri = f"sqlite:///{db}"
    prepare_experiment(uri, "x")
    hint, _ = ui_hint(uri, "x")
    words = shlex.split(hint.splitlines()[0].removeprefix("MLflow UI: "))
    assert words == [".venv/bin/mlflow", "ui", "--backend-store-uri", uri, "--port", "5000"]
