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
from pipeline.train.config import TrainConfig, parse_sets, resolve
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
    from tests.servers import session_ray_address
    out = str(tmp_path / "run")
    env = {**os.environ, "D2V_FAIL_AT_STEP": "5", "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
           "RAY_ADDRESS": session_ray_address()}  # the job joins the session's cluster
    r = subprocess.run([sys.executable, "-m", "jobs.pretrain", "--modality", "image", "--data",
                        demo_shards["image"], "--output", out, "--max-steps", "8",
                        "--set", "train.checkpoint_every=4", "--set", "train.augment=crop", *SMALL],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert os.path.exists(os.path.join(out, ".fault_injected"))  # the fault really happened
    logs = r.stdout + r.stderr
    assert "injected fault at step 5" in logs and "resumed from step 4" in logs
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["step"] == 8 and summary["final"]


def test_config_errors_name_the_field(demo_shards, tmp_path, capsys):
    """Each wrong setting exits 2 with one stderr line naming its field (the command's own main,
    in this process); the last case runs the real command line."""
    base = ["--modality", "image", "--data", demo_shards["image"], "--output", str(tmp_path / "o")]
    cases = [(["--set", "train.lr=-1"], "train.lr"), (["--set", "model.mask.prob=1.5"], "model.mask.prob"),
             (["--set", "train.nope=1"], "train.nope"), (["--max-steps", "0"], "train.max_steps"),
             (["--preset", "huge"], "preset"), (["--set", "model.encoder.heads=5"], "model.encoder.heads"),
             (["--set", "model.frontend.image_size=56"], "model.frontend.image_size")]
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


def test_reference_batch_derives_accumulation_for_the_worker_count():
    """A base recipe's effective batch (per-GPU batch × the reference's GPUs) is kept on fewer
    workers by accumulating; the LR is scaled only when asked, and only when the batch differs."""
    fe = {"image_size": 224}
    for workers, accum in ((1, 16), (2, 8), (4, 4), (16, 1)):  # image 2.0 base: 16 per GPU × 16 GPUs
        t = resolve("image", "d", "o", "base", None, {"train.num_workers": workers}, model_frontend=fe).train
        assert (t.reference_batch, t.grad_accum, t.effective_batch) == (256, accum, 256)
        assert t.peak_lr == t.lr == 1e-3 and t.batch_line().endswith("(the recipe's reference batch)")
    t = TrainConfig(batch_size=32, num_workers=3, reference_batch=256, lr=1.0)  # 256 / 96 → 3 steps of 96
    assert (t.grad_accum, t.effective_batch, t.peak_lr) == (3, 288, 1.0)
    assert "≠ the recipe's reference batch 256; lr not scaled" in t.batch_line()
    s = TrainConfig(batch_size=32, num_workers=3, reference_batch=256, lr=1.0, scale_lr=True, warmup_steps=0,
                    schedule="tri_stage", max_steps=100)
    assert s.peak_lr == pytest.approx(288 / 256) and lr_at(5, s) == pytest.approx(288 / 256)
    assert TrainConfig(batch_size=64, num_workers=8, reference_batch=256).grad_accum == 1  # never below 1
    assert TrainConfig(batch_size=8, grad_accum=3).effective_batch == 24  # no reference: as given
    with pytest.raises(ConfigError, match=r"^train\.grad_accum: derived from train\.reference_batch=256"):
        resolve("image", "d", "o", "base", None, {"train.grad_accum": 2}, model_frontend=fe)
    own = resolve("image", "d", "o", "base", None, {"train.reference_batch": None, "train.grad_accum": 2},
                  model_frontend=fe).train
    assert own.grad_accum == 2 and own.effective_batch == 32


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
    grad_accum 2 (derived from a reference batch of 16), with data and output given as file:// URIs. The demo recipe picks 16-px patches
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
    assert cfg["model"]["frontend"]["patch_size"] == 16 and cfg["train"]["grad_accum"] == 2
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
    assert removed >= {"model.frontend.mask_id", "train.reference_batch", "train.scale_lr", "train.tri_stage_hold"}
    (tmp_path / "config.json").write_text(json.dumps(old))
    (tmp_path / "ray" / "pretrain").mkdir(parents=True)
    check_resume(cfg)
    with pytest.raises(ConfigError, match=r"^train\.grad_accum: .*1 → 2, train\.reference_batch: None → 64"):
        check_resume(resolve("image", "d", str(tmp_path), "demo", None, {"train.reference_batch": 64}))


def test_elastic_world_sizes_keep_the_runs_effective_batch(capsys):
    """--num-workers MIN-MAX, and at_world: each world size re-derives grad_accum for the same
    effective batch; where it cannot be met, scale_lr decides the LR."""
    from pipeline.train.config import parse_workers
    from pipeline.train.loop import at_world

    assert parse_workers("4") == {"train.num_workers": 4}
    assert parse_workers("1-8") == {"train.num_workers": 8, "train.min_workers": 1}
    with pytest.raises(ConfigError, match="^train.num_workers: --num-workers takes N or MIN-MAX"):
        parse_workers("2..4")
    with pytest.raises(ConfigError, match=r"^train.min_workers: must be in \[1, num_workers=2\]"):
        TrainConfig(num_workers=2, min_workers=3)
    cfg = resolve("text", "d", "o", "demo", None, {**parse_workers("1-4"), "train.batch_size": 8,
                                                   "train.grad_accum": 1, "train.reference_batch": None})
    assert cfg.train.effective_batch == 32
    for world, accum in ((4, 1), (2, 2), (1, 4)):
        t = at_world(cfg, world, rank=0).train
        assert (t.num_workers, t.grad_accum, t.effective_batch, t.peak_lr) == (world, accum, 32, cfg.train.lr)
    t = at_world(cfg, 3, rank=0).train  # 32 / 24 rounds to 1 step of 24: said, LR as the recipe's rule says
    assert (t.grad_accum, t.effective_batch) == (1, 24)
    assert "elastic: 3 worker(s) of 1-4: effective batch 24" in capsys.readouterr().out
    scaled = at_world(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, scale_lr=True)), 3, 0).train
    assert scaled.peak_lr == pytest.approx(cfg.train.lr * 24 / 32)
