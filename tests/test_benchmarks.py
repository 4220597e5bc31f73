"""Every benchmark script still runs end to end at a tiny size and prints its headline JSON last.
These prove the scripts work (regressions are visible); they time nothing."""
import contextlib
import io
import json
import os

import numpy as np
import pytest
import torch


def run_main(main, argv) -> tuple[str, dict]:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(argv) == 0
    text = buf.getvalue()
    return text, json.loads(text.strip().splitlines()[-1])


def test_harness_step_matches_a_hand_written_loop(demo_shards):
    """The bare step the benchmarks compare against is the worker's step: same weights after 3
    steps as a loop written out here with the same collate, optimizer, LR and EMA."""
    from benchmarks.harness import Trainer, batches, load_rows
    from pipeline.model.data2vec import Data2Vec
    from pipeline.train.batches import collate, step_rng
    from pipeline.train.config import resolve
    from pipeline.train.step import build_optimizer, lr_at

    cfg = resolve("text", demo_shards["text"], "/tmp/unused", "demo", None,
                  {"train.max_steps": 3, "train.batch_size": 4}, model_frontend={"vocab_size": 2000})
    rows = load_rows(demo_shards["text"], "text")
    tr = Trainer(cfg, rows)
    tr.train(3)
    torch.manual_seed(cfg.train.seed)
    model = Data2Vec(cfg.model)
    opt = build_optimizer(model, cfg.train)
    data = batches(rows, 4, cfg.train.seed)
    for step in range(3):
        inputs, mask = collate(next(data), cfg.model, step_rng(cfg.train.seed, 0, step), 16000, 64)
        model(inputs, mask).loss.backward()
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg.train)
        torch.nn.utils.clip_grad_norm_(model.student_parameters(), cfg.train.clip_norm)
        opt.step()
        opt.zero_grad()
        model.ema_step(step)
    for (name, a), b in zip(tr.model.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name


def test_flop_counter_counts_grouped_conv_backward_as_twice_the_forward():
    """torch's own formula counts ~17× the forward for a 16-group conv backward; ours, 2× by hand:
    forward = 2 · B · L_out · C_out · (C_in / groups) · k."""
    from benchmarks.flops import counter
    B, C, L, k, g = 4, 64, 50, 7, 16
    conv = torch.nn.Conv1d(C, C, k, padding=k // 2, groups=g)
    x = torch.randn(B, C, L, requires_grad=True)
    with counter() as fc:
        conv(x).sum().backward()
    forward = 2 * B * L * C * (C // g) * k
    counts = {str(op): n for op, n in fc.get_flop_counts()["Global"].items()}
    assert counts == {"aten.convolution": forward, "aten.convolution_backward": 2 * forward}


def test_step_and_efficiency_scripts_run():
    from benchmarks.efficiency import main as efficiency
    from benchmarks.step import main as step
    _, r = run_main(step, ["--steps", "1", "--sizes", "demo"])
    assert set(r) == {"d1_over_baseline", "d2_over_d1", "cpu_matmul_fraction"} and r["d1_over_baseline"] > 0
    text, r = run_main(efficiency, ["--size", "demo", "--steps", "1", "--modalities", "image,text"])
    assert 0 < r["cpu_matmul_fraction"] < 2 and "cpu_matmul_fraction_text_d2v2" in r
    assert "GFLOP/step" in text


@pytest.mark.slow
def test_time_to_accuracy_script_runs(demo_shards):
    from benchmarks.time_to_accuracy import main
    data = os.path.dirname(demo_shards["image"])
    text, r = run_main(main, ["--data", data, "--modalities", "image", "--budget1", "image=4",
                              "--budget2", "image=4", "--probes", "1", "--probes2", "1", "--seeds", "0,1"])
    assert "time_to_accuracy_speedup_image" in r and "hf_baseline_speedup_image" in r
    lo, hi = r["time_to_accuracy_speedup_image_range"]
    assert lo <= (r["time_to_accuracy_speedup_image"] or 0.0) <= hi
    assert "hf-baseline d2v1" in text
    assert {line.split()[1] for line in text.splitlines() if line.startswith("image ")} == {"0", "1"}  # a row per seed


def test_time_to_accuracy_set1_reaches_only_the_1_0_runs(demo_shards, capsys, monkeypatch):
    """--set1 settings go into the data2vec 1.0 runs' config (validated there: a wrong field exits 2
    naming it), and not into 2.0's."""
    import benchmarks.time_to_accuracy as tta
    data = os.path.dirname(demo_shards["image"])
    args = ["--data", data, "--modalities", "image", "--budget1", "image=1", "--budget2", "image=1", "--no-hf"]
    assert tta.main([*args, "--set1", "train.nope=1"]) == 2
    assert "train.nope" in capsys.readouterr().err
    seen = {}
    monkeypatch.setattr(tta, "curve", lambda *a, **k: [(0.0, 0, 0.5)])  # configs only: no training
    real = tta.demo_run_config
    monkeypatch.setattr(tta, "demo_run_config", lambda *a, overrides, **k: seen.setdefault(
        overrides["model.mode"], real(*a, overrides=overrides, **k)))
    assert tta.main([*args, "--set1", "train.lr=5e-4"]) == 0
    assert seen["d2v1"].train.lr == 5e-4 and seen["d2v2"].train.lr != 5e-4


@pytest.mark.slow
def test_ray_benchmarks_run(demo_shards):
    from benchmarks.input_pipeline import main as input_pipeline
    from benchmarks.scaling import main as scaling
    data = os.path.dirname(demo_shards["image"])
    _, r = run_main(input_pipeline, ["--data", data, "--modalities", "text", "--sizes", "demo", "--steps", "6",
                                     "--repeats", "1", "--warmup-s", "0", "--measure-s", "0"])
    assert 0 <= r["data_wait_fraction"] < 1 and np.isfinite(r["ray_overhead"])
    assert 0 < r["ray_fixed_s"] < 300  # start-up and shut-down of one run: Ray Train, the worker group, …
    assert 0 < r["ray_background_cores"] < os.cpu_count()  # raylet, GCS, dashboard, … do use some CPU
    _, r = run_main(scaling, ["--data", data, "--modality", "text", "--steps", "4", "--model-modalities", "text"])
    assert r["two_worker_speedup"] > 0 and 0 < r["efficiency_64_gpus_text"] <= 1


def test_input_pipeline_step_counts_cover_the_asked_seconds(demo_shards, tmp_path):
    """The warm-up and measured steps derived from timed bare steps: at least --steps measured,
    a whole number of measured windows of warm-up, and more steps when more seconds are asked."""
    from benchmarks.input_pipeline import run_config, step_counts
    data = os.path.dirname(demo_shards["text"])
    cfg = run_config("text", data, "demo", 2, 2, str(tmp_path))
    assert step_counts(cfg, 2, 0, 0) == (2, 2)
    warm, measured = step_counts(cfg, 2, 2.0, 1.0)
    assert measured >= 2 and warm >= measured and warm % measured == 0
    long_warm, long_measured = step_counts(cfg, 2, 20.0, 10.0)
    assert long_measured > measured and long_warm > warm and long_warm % long_measured == 0


def test_text_diagnostics_word_order_rows_and_variance_shares():
    """The word-order probe rows swap exactly two adjacent, different sub-word tokens in the
    shifted half and leave the rest (and <s>/</s>) untouched; the R² of per-group means equals a
    hand computation of 1 - within-group / total sum of squares."""
    from benchmarks.text_diagnostics import _group_means, _r2, shifted

    rng = np.random.default_rng(0)
    rows = {"input_ids": [np.array([0, *rng.integers(5, 50, size=int(rng.integers(6, 20))), 2]) for _ in range(400)]
            + [np.array([0, 7, 7, 7, 2])]}  # too short: dropped
    out = shifted(rows, seed=3)
    assert len(out["label"]) == 400 and 0.4 < np.mean(np.array(out["label"]) == "shifted") < 0.6
    for orig, new, lab in zip(rows["input_ids"], out["input_ids"], out["label"]):
        diff = np.nonzero(orig != new)[0]
        assert new[0] == 0 and new[-1] == 2 and sorted(new) == sorted(orig)
        if lab == "original":
            assert len(diff) == 0
        else:
            assert len(diff) == 2 and diff[1] == diff[0] + 1
            assert new[diff[0]] == orig[diff[1]] and new[diff[1]] == orig[diff[0]]

    groups = rng.integers(0, 5, size=300)
    y = rng.normal(size=(300, 3)) + groups[:, None] * np.array([1.0, -2.0, 0.5])
    within = sum(((y[groups == g] - y[groups == g].mean(0)) ** 2).sum() for g in range(5))
    total = ((y - y.mean(0)) ** 2).sum()
    assert _r2(y, _group_means(y, groups)) == pytest.approx(1 - within / total)


@pytest.mark.slow
def test_text_diagnostics_script_runs(demo_shards):
    from benchmarks.text_diagnostics import main
    data = os.path.dirname(demo_shards["text"])
    text, r = run_main(main, ["--data", data, "--steps", "2", "--every", "2", "--init-embeddings", "cooccurrence",
                                 "--probe-rows", "400"])
    assert {"tfidf", "lsa128", "cooc128"} <= set(r["ceilings"]) and [c["step"] for c in r["curve"]] == [0, 2]
    assert all(0 <= c["topic_embedding_bag"] <= 1 for c in r["curve"]) and "topic_emb" in text


def test_text_diagnostics_ppmi_matches_a_hand_count():
    """Row-level PPMI on a 3-row corpus, against counts done by hand; the SVD word vectors of a
    corpus with two disjoint topics put each topic's words together."""
    from benchmarks.text_diagnostics import cooccurrence_embeddings, ppmi_matrix

    # ids 5..8; <s>=0 and </s>=2 are left out; repeats within a row count once.
    rows = {"input_ids": [[0, 5, 6, 6, 2], [0, 5, 6, 7, 2], [0, 7, 8, 2]]}
    got = ppmi_matrix(rows, 9)
    # pairs (a≠b) sharing a row: 5-6: 2, 5-7: 1, 6-7: 1, 7-8: 1 (symmetric) → N = 10
    co = {(5, 6): 2, (5, 7): 1, (6, 7): 1, (7, 8): 1}
    marg = {5: 3, 6: 3, 7: 3, 8: 1}
    for a in range(9):
        for b in range(9):
            c = co.get((min(a, b), max(a, b)), 0)
            want = max(0.0, np.log(c * 10 / (marg[a] * marg[b]))) if c else 0.0
            assert got[a, b] == pytest.approx(want), (a, b)

    rng = np.random.default_rng(0)
    topic = [[0, *rng.choice([10, 11, 12, 13], 3), 2] for _ in range(50)] + \
            [[0, *rng.choice([20, 21, 22, 23], 3), 2] for _ in range(50)]
    e = cooccurrence_embeddings(ppmi_matrix({"input_ids": topic}, 30), 2)
    cos = lambda a, b: e[a] @ e[b] / np.linalg.norm(e[a]) / np.linalg.norm(e[b])  # noqa: E731
    assert cos(10, 11) > 0.9 and cos(20, 21) > 0.9 and abs(cos(10, 20)) < 0.1


def test_masks_benchmark_times_every_recipe():
    from benchmarks.masks import main
    text, res = run_main(main, ["--tiny", "--repeats", "1"])
    rows = {f"{m}-{v}-base" for m in ("image", "audio", "text") for v in ("d2v1", "d2v2")}
    assert set(res["mask_speedup"]) == rows == set(res["masks_per_s"])
    assert all(v > 0 for v in res["masks_per_s"].values()) and "| image-d2v2-base | 32 | 196 |" in text


def test_text_control_unigram_baseline_matches_a_hand_count():
    from benchmarks.text_control import unigram_ce
    pre = {"input_ids": [[0, 5, 6, 2], [0, 5, 2]]}  # counts + 1 over a vocabulary of 8
    held = [({"input_ids": torch.tensor([[0, 5, 7, 2]])}, torch.tensor([[False, True, True, False]]))]
    counts = np.array([3, 1, 3, 1, 1, 3, 2, 1], float)  # ids 0..7: <s>×2, </s>×2, 5×2, 6×1, each +1
    want = -np.mean(np.log(counts[[5, 7]] / counts.sum()))
    assert unigram_ce(pre, held, 8) == pytest.approx(want)


def test_text_control_script_runs(demo_shards):
    from benchmarks.text_control import main
    data = os.path.dirname(demo_shards["text"])
    text, res = run_main(main, ["--data", data, "--steps", "2", "--every", "2", "--arms", "mlm_bert15,d2v1",
                                "--probe-rows", "120"])
    assert [c["step"] for c in res["curves"]["mlm_bert15"]] == [0, 2] and "mlm_ce" in res["curves"]["mlm_bert15"][0]
    # an untrained tied head predicts ~uniformly: cross-entropy ≈ ln(vocabulary)
    assert abs(res["curves"]["mlm_bert15"][0]["mlm_ce"] - np.log(res["vocab_size"])) < 0.3
    assert set(res["d2v_minus_mlm_topic"]) == {"0", "2"} and "| d2v1 | 2 |" in text


@pytest.mark.slow
def test_finetune_benchmark_with_another_encoder(demo_shards, image_encoder, tmp_path, monkeypatch):
    """benchmarks.finetune end to end at 2 steps: both inits, the classical baseline, and --encoders
    replacing RUNS' encoder (RUNS holds only the labeled data here). Its fine-tuning commands join
    the session's cluster."""
    from benchmarks.finetune import main
    from tests.servers import session_ray_address

    d, runs, enc = demo_shards, tmp_path / "runs", image_encoder
    (runs / "data").mkdir(parents=True)
    for s in ("train", "test"):
        os.symlink(d[f"image_{s}"], runs / "data" / f"image_{s}")
    monkeypatch.setenv("RAY_ADDRESS", session_ray_address())
    text, s = run_main(main, ["--runs", str(runs), "--output", str(tmp_path / "out"), "--modalities", "image",
                              "--fractions", "1.0", "--steps", "image=2", "--encoders", f"image={enc}/final"])
    row = s["results"]["image_1"]
    assert 0 <= row["data2vec"] <= 1 and 0 <= row["scratch"] <= 1 and row["classical"] > 0.5  # pixels on digits
    assert s["encoders"] == {"image": f"{enc}/final"} and set(s["data2vec_beats_classical"]) == {"image_1"}
    assert "| image | 100% | test accuracy |" in text
    assert json.load(open(tmp_path / "out" / "image-data2vec-1" / "config.json"))["init"] == f"{enc}/final"


def test_cpu_sampler_counts_a_busy_worker_and_an_idle_ray_process():
    """Two child processes named like Ray's: a 'RayTrainWorker' spinning one core and a sleeping
    'raylet'. Over the worker's second half the sampler sees ≈ 1 core in `worker`, ≈ 0 in `ray`."""
    import subprocess
    import sys

    from benchmarks.proc_cpu import CpuSampler

    if not os.path.isdir("/proc/self"):
        pytest.skip("reads /proc")
    spin = "import sys, time\nt = time.time()\nwhile time.time() - t < 3: pass"
    with CpuSampler(every=0.1) as s:
        idle = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(4)", "raylet"])
        subprocess.run([sys.executable, "-c", spin, "ray::RayTrainWorker"], check=True)
        idle.wait()
    cores = s.cores()
    assert 0.6 < cores["worker"] <= 1.05, cores
    # The session's own Ray cluster (a descendant too) is also in `ray`: check the idle child itself.
    seen = [(t, snap[idle.pid]) for t, snap in s.samples if idle.pid in snap]
    assert all(g == "ray" for _, (_, g, _) in seen)
    (t0, (c0, *_)), (t1, (c1, *_)) = seen[len(seen) // 2], seen[-1]
    assert (c1 - c0) / (t1 - t0) < 0.1, seen
    # the per-process view names the spinning worker's program and gives it the same ≈ 1 core
    name, used = next(iter(s.processes("worker").items()))  # the biggest first
    assert name.startswith("python") and 0.6 < used <= cores["worker"] + 1e-6, s.processes("worker")


def test_cpu_sampler_tail_is_the_end_of_the_workers_life():
    """A 'RayTrainWorker' that sleeps 2 s and then spins 2 s: over the last 40% of its life the
    sampler sees ≈ 1 core, over its whole life ≈ half of one."""
    import subprocess
    import sys

    from benchmarks.proc_cpu import CpuSampler

    if not os.path.isdir("/proc/self"):
        pytest.skip("reads /proc")
    late = "import time\ntime.sleep(2)\nt = time.time()\nwhile time.time() - t < 2: pass"
    with CpuSampler(every=0.1, tail=0.4) as s:
        subprocess.run([sys.executable, "-c", late, "ray::RayTrainWorker"], check=True)
    assert 0.75 < s.cores()["worker"] <= 1.05, s.cores()
    s.tail = 1.0
    assert 0.3 < s.cores()["worker"] < 0.7, s.cores()


@pytest.mark.slow
def test_preprocess_benchmark_runs_paired_repeats(demo_raw):
    """benchmarks.preprocess at a tiny size (its own local Ray, so a subprocess): both sides write
    the same rows (the script asserts it) and each ratio's median lies within its range."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-m", "benchmarks.preprocess", "--data", demo_raw, "--limit", "6",
                        "--repeat", "1", "--repeats", "2", "--image-size", "28"], cwd=root, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    for mod in ("image", "audio", "text"):
        lo, hi = res[f"{mod}_ratio_range"]
        assert 0 < lo <= res[f"{mod}_ratio"] <= hi, (mod, res)


def test_step_profile_times_parts_and_both_cnn_layouts(demo_shards):
    from benchmarks.step_profile import main
    data = os.path.dirname(demo_shards["audio"])
    text, r = run_main(main, ["--data", data, "--modality", "audio", "--clones", "2", "--steps", "1"])
    assert set(r["s_per_step"]) == {"2.0, 2 copies", "2.0, 2 copies, CNN as plain Conv1d", "1.0",
                                    "1.0, CNN as plain Conv1d"}
    assert all(v > 0 for v in r["s_per_step"].values()) and set(r["cnn_channels_last_speedup"]) == {"2.0, 2 copies", "1.0"}
    assert "decoder" in text and "rest" in text


def test_image_views_benchmark_rates_bytes_and_cores():
    """benchmarks.image_views on 4 photos, one round, FLOPs given: every view has a rate, stored
    images are far smaller than raw pixels, and cores per GPU = the GPU's rate / the view's."""
    from benchmarks.image_views import VIEWS, main

    threads = torch.get_num_threads()
    text, r = run_main(main, ["--photos", "4", "--rounds", "1", "--gflop-per-sample", "d2v2=400,d2v1=140,finetune=105"])
    assert torch.get_num_threads() == threads  # measured on one thread, then restored
    assert set(r["views"]) == set(VIEWS) and all(v > 0 for v in r["views"].values())
    assert r["raw_bytes"] == 150_528 and 0 < r["stored_bytes_range"][0] <= r["stored_bytes_per_image"] <= 40_000
    assert r["raw_over_stored"] > 3
    assert r["gpu_samples_per_s"] == round(0.40 * 989e12 / 400e9)
    for v, c in r["cores_per_gpu"].items():
        assert c == pytest.approx(r["gpu_samples_per_s"] / r["views"][v], rel=0.01), v
    assert set(r["cores_per_gpu_own_recipe"]) == {"d2v2", "d2v1", "finetune"}
    assert "cores/GPU" in text


@pytest.mark.slow
def test_scale_benchmark_runs(tmp_path):
    """benchmarks.scale at two tiny sizes (its own local Ray and moto's S3 server, so a subprocess):
    every timing of both sizes (the epoch boundary's parts included) is positive and the S3 listing
    covered every shard."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-m", "benchmarks.scale", "--rows", "2000,20000", "--s3-shards", "20",
                        "--s3-shard-rows", "600", "--repeats", "1", "--work", str(tmp_path)], cwd=root,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["rows"] == [2000, 20000] and res["s3_shards"] == 20 and res["s3_rows"] == 12000
    for key in ("list_s", "plan_epoch_s", "first_batch_s", "epoch_boundary_s", "resume_plan_s", "elastic_replan_s",
                "driver_peak_rss_mb", "read_task_peak_rss_mb"):
        assert len(res[key]) == 2 and all(v > 0 for v in res[key]), (key, res[key])
    parts = res["boundary_parts_s"]  # the epoch boundary's parts: order, plan + read units, dataset, first block
    assert set(parts) == {"order", "units", "dataset", "first block"}, parts
    assert all(len(v) == 2 and all(x > 0 for x in v) for v in parts.values()), parts
    assert res["s3_list_s"] > 0 and res["max_growth_10x"] > 0 and res["first_batch_cold_s"] > 0
    assert set(res["targets"]) == {"epoch_boundary_le_1s", "first_batch_le_30s", "growth_le_12x"}
    assert "epoch boundary" in r.stdout and "20k/2k" in r.stdout
    manifest = json.load(open(tmp_path / "text-20000" / "manifest.json"))
    assert manifest["modality"] == "text" and manifest["counts"]["written"] == 20000
