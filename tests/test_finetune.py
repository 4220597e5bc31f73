"""Fine-tuning: heads, layer-wise LR decay, label fractions, CTC decoding, Hugging Face export with
equal logits, and jobs.finetune on real local Ray (2 workers) for every modality, resumable."""
import json
import os
import pathlib

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pipeline.model.finetune import FineTuneModel
from pipeline.train.config import TrainConfig
from pipeline.finetune.step import build_finetune_optimizer
from pipeline.finetune.tasks import Targets, build_vocab, fraction_indices, greedy_ctc
from tests.test_model import tiny

SMALL = ["--num-workers", "2", "--set", "train.batch_size=8", "--set", "train.log_every=2",
         "--set", "train.warmup_steps=2"]


def finetune(args):
    from jobs.finetune import main
    return main(args)


def last_json(capsys):
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_layer_decay_scales_each_depth():
    cfg = tiny("image", "d2v1")  # depth 3
    m = FineTuneModel(cfg, "classify", 3)
    opt = build_finetune_optimizer(m, TrainConfig(lr=1.0, weight_decay=0.05), layer_decay=0.5)
    scale = {}
    names = {id(p): n for n, p in m.named_parameters()}
    for g in opt.param_groups:
        for p in g["params"]:
            scale[names[id(p)]] = (g["lr_scale"], g["weight_decay"])
    # depth L = 3: front end 0.5^4, block 0 0.5^3, block 2 0.5^1, the head (and its norm) 1
    assert scale["frontend.proj.weight"] == (0.0625, 0.05)
    assert scale["encoder.blocks.0.fc1.weight"] == (0.125, 0.05)
    assert scale["encoder.blocks.2.fc1.bias"] == (0.5, 0.0)
    assert scale["head.weight"] == (1.0, 0.05) and scale["fc_norm.weight"] == (1.0, 0.0)
    assert scale["frontend.cls"][1] == 0.0


def test_frozen_feature_encoder_gets_no_gradient():
    m = FineTuneModel(tiny("audio", "d2v2"), "ctc", 12, freeze_feature_encoder=True, time_masks=True)
    logits, pad = m({"audio": torch.randn(2, 8000), "lengths": torch.tensor([8000, 6000])},
                    torch.zeros(2, 24, dtype=torch.bool))
    assert logits.shape == (2, 24, 12) and pad is not None and pad[1].sum() > 0
    logits.sum().backward()
    assert all(p.grad is None for p in m.frontend.cnn.parameters())
    assert m.frontend.feat_proj.weight.grad is not None and m.mask_emb.grad is not None


def test_frozen_cnn_in_chunks_equals_the_whole_batch(monkeypatch):
    """The frozen CNN runs a few clips at a time (bounded memory); each CNN layer normalizes within a
    clip, so the features are those of one pass over the whole batch."""
    import pipeline.model.finetune as ft

    m = FineTuneModel(tiny("audio", "d2v2"), "classify", 3, freeze_feature_encoder=True)
    audio = torch.randn(5, 8000)
    with torch.no_grad():
        whole = m.frontend.cnn(audio[:, None, :])
    monkeypatch.setattr(ft, "FROZEN_CNN_CHUNK_SAMPLES", 16_000)  # 2 clips of 8000 samples at a time
    assert ft.frozen_cnn_chunk(8000) == 2
    chunked = ft.frozen_cnn(m.frontend.cnn, audio)
    assert chunked.shape == whole.shape and not chunked.requires_grad
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-5)


def test_label_fraction_is_stratified_and_seeded():
    y = np.array(["a"] * 100 + ["b"] * 30 + ["c"] * 3)
    idx = fraction_indices(y, 0.1, seed=0, stratified=True)
    counts = {c: int((y[idx] == c).sum()) for c in "abc"}
    assert counts == {"a": 10, "b": 3, "c": 1}  # every class kept, at least one row
    assert np.array_equal(idx, fraction_indices(y, 0.1, seed=0, stratified=True))
    assert not np.array_equal(idx, fraction_indices(y, 0.1, seed=1, stratified=True))
    assert len(fraction_indices(y, 0.5, seed=0, stratified=False)) == 66


def test_ctc_vocabulary_targets_and_greedy_decoding():
    vocab = build_vocab(["Three one", "four  one"])
    assert vocab[:5] == ["<pad>", "<s>", "</s>", "<unk>", "|"] and vocab[5:] == sorted(set("threeonefour"))
    y = Targets("ctc", vocab)(np.array(["one four", "x"]))
    assert y["target_lengths"].tolist() == [8, 1] and y["targets"][-1] == 3  # unknown char → <unk>
    idx = {c: i for i, c in enumerate(vocab)}
    # frames: o o <blank> n e | | f <blank> f o u r  (+ 2 padded frames)
    path = [idx["o"], idx["o"], 0, idx["n"], idx["e"], 4, 4, idx["f"], 0, idx["f"], idx["o"], idx["u"], idx["r"], 5, 5]
    logits = torch.full((1, len(path), len(vocab)), -5.0)
    logits[0, torch.arange(len(path)), torch.tensor(path)] = 5.0
    assert greedy_ctc(logits, torch.tensor([13]), vocab) == ["one ffour"]


@pytest.mark.parametrize("modality,task,mode", [("image", "classify", "d2v1"), ("audio", "classify", "d2v2"),
                                                ("audio", "ctc", "d2v2"), ("text", "classify", "d2v2")])
def test_export_task_class_gives_equal_logits(tmp_path, modality, task, mode):
    from transformers import AutoConfig

    import transformers as tf
    from pipeline.export_hf import export_finetuned

    labels = build_vocab(["one two"]) if task == "ctc" else ["a", "b", "c"]
    torch.manual_seed(0)
    bn = task == "classify"  # feature_bn is folded into the first head Linear
    m = FineTuneModel(tiny(modality, mode), task, len(labels), time_masks=modality == "audio", feature_bn=bn).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        if bn:  # running statistics far from the identity, as after training
            m.feature_bn.running_mean.normal_(0, 2.0)
            m.feature_bn.running_var.uniform_(0.01, 4.0)
    export_finetuned(m, labels, str(tmp_path / "hf"))
    arch = AutoConfig.from_pretrained(str(tmp_path / "hf")).architectures[0]
    hf = getattr(tf, arch).from_pretrained(str(tmp_path / "hf")).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        if modality == "image":
            x = torch.randn(2, 3, 28, 28, generator=g)
            ours, theirs = m({"image": x}), hf(pixel_values=x).logits
        elif modality == "audio":
            x = torch.randn(2, 8000, generator=g)
            ours, theirs = m({"audio": x}), hf(input_values=x).logits
            ours = ours[0] if task == "ctc" else ours
        else:
            x = torch.randint(5, 300, (2, 20), generator=g)
            x[:, 0] = 0
            ours, theirs = m({"input_ids": x}), hf(input_ids=x).logits
    assert arch == {"image": "Data2VecVisionForImageClassification", "text": "Data2VecTextForSequenceClassification",
                    "audio": "Data2VecAudioForCTC" if task == "ctc" else "Data2VecAudioForSequenceClassification"}[modality]
    assert ours.shape == theirs.shape and (ours - theirs).abs().max().item() <= 1e-4
    if task == "ctc":
        from transformers import Wav2Vec2Processor
        proc = Wav2Vec2Processor.from_pretrained(str(tmp_path / "hf"))
        assert proc.tokenizer.convert_tokens_to_ids("o") == labels.index("o")
        assert proc.tokenizer.pad_token_id == 0  # the CTC blank


@pytest.mark.slow
@pytest.mark.parametrize("modality", ["image", "audio", "text"])
def test_finetune_each_modality_on_two_workers(demo_shards, tmp_path, capsys, modality):
    """Scratch init (the pretrained path is tested below); 2 workers with gradient accumulation
    from the reference batch (32 = 2 workers × 16 samples in micro-batches of 8). Text runs elastically
    (--num-workers 1-2), which on a cluster with room for both starts with 2."""
    d = demo_shards
    out = str(tmp_path / "ft")
    elastic = ["--num-workers", "1-2"] if modality == "text" else []
    assert finetune(["--task", "classify", "--modality", modality, "--init", "scratch", "--train-data",
                     d[f"{modality}_train"], "--val-data", d[f"{modality}_test"], "--test-data", d[f"{modality}_test"],
                     "--output", out, "--max-steps", "6", "--label-fraction", "0.5", *SMALL, *elastic,
                     "--set", "train.reference_batch=32", "--set", "train.eval_every=3"]) == 0
    out_text = capsys.readouterr().out
    assert "batch: effective batch 32 = 2 worker(s) × 16 samples, in 2 micro-batch(es) of 8" in out_text
    s = json.loads(out_text.strip().splitlines()[-1])
    assert set(s) >= {"test_accuracy", "val_accuracy", "init", "label_fraction"}
    assert s["init"] == "scratch" and s["label_fraction"] == 0.5 and 0 <= s["test_accuracy"] <= 1
    assert s["steps"] == 6 and s["best_step"] in (3, 6)
    sub = json.load(open(os.path.join(out, "subsets", "label-0.5-seed0", "manifest.json")))
    full = json.load(open(os.path.join(d[f"{modality}_train"], "manifest.json")))
    assert sub["counts"]["written"] == pytest.approx(full["counts"]["written"] / 2, abs=len(full["labels"]))
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri="sqlite:///" + os.path.join(out, "mlflow.db"))
    run = client.get_run(open(os.path.join(out, "mlflow_run_id")).read().strip())
    assert run.info.status == "FINISHED" and run.data.metrics["test_accuracy"] == s["test_accuracy"]
    assert run.data.tags["train.effective_batch"] == "32" and run.data.params["train.reference_batch"] == "32"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_accuracy")] == [3, 6]
    for key, value in (("world_size", 2), ("effective_batch", 32)):
        assert {m.value for m in client.get_metric_history(run.info.run_id, key)} == {value}


@pytest.mark.slow
def test_a_step_too_big_for_a_worker_runs_in_smaller_micro_batches(demo_shards, tmp_path, capsys):
    """Fit, don't refuse: audio from scratch (its CNN trains: the largest estimate) at 16 clips of
    up to 20 s per worker does not fit 4 GiB; the run goes on with the largest micro-batch that fits
    (train.micro_batch), the effective batch unchanged, and says so (console and MLflow) — unless
    the head standardizes over its micro-batch (finetune.feature_bn, the demo's classify recipe):
    that is refused before Ray starts, naming it."""
    d = demo_shards
    out = str(tmp_path / "ft")
    args = ["--task", "classify", "--modality", "audio", "--init", "scratch", "--train-data", d["audio_train"],
            "--val-data", d["audio_test"], "--test-data", d["audio_test"], "--output", out,
            "--max-steps", "2", "--num-workers", "2", "--set", "train.batch_size=16",
            "--set", "train.worker_memory_gb=4", "--set", "train.log_every=1"]
    assert finetune(args + ["--set", "finetune.feature_bn=true"]) == 2
    err = capsys.readouterr().err
    assert "finetune.feature_bn=false (its BatchNorm standardizes over a micro-batch of train.batch_size=16" in err
    assert finetune(args + ["--set", "finetune.feature_bn=false"]) == 0
    text = capsys.readouterr().out
    line = next(x for x in text.splitlines() if x.startswith("memory: "))
    assert line.startswith("memory: micro-batches of at most ") and "of 4.0" in line, line
    micro = int(line.split()[5])
    assert 1 <= micro < 16
    assert f"batch: effective batch 32 = 2 worker(s) × 16 samples, in {-(-16 // micro)} micro-batch(es)" in text
    assert json.loads(text.strip().splitlines()[-1])["steps"] == 2
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri="sqlite:///" + os.path.join(out, "mlflow.db"))
    run = client.get_run(open(os.path.join(out, "mlflow_run_id")).read().strip())
    assert run.data.tags["memory"] == line and run.data.params["train.micro_batch"] == str(micro)


@pytest.mark.slow
def test_finetune_from_pretrained_resumes_bit_identical(demo_shards, image_encoder, tmp_path, capsys):
    d, run = demo_shards, image_encoder
    base = ["--task", "classify", "--modality", "image", "--init", os.path.join(run, "final"), "--train-data",
            d["image_train"], "--val-data", d["image_test"], "--test-data", d["image_test"], "--max-steps", "8",
            "--set", "train.checkpoint_every=4", "--set", "train.eval_every=4", *SMALL]
    a, b = str(tmp_path / "straight"), str(tmp_path / "split")
    assert finetune([*base, "--output", a]) == 0
    sa = last_json(capsys)
    assert finetune([*base, "--output", b, "--stop-at-step", "4"]) == 0
    assert not os.path.exists(os.path.join(b, "final"))
    assert finetune([*base, "--output", b, "--set", "train.lr=1e-2"]) == 2  # a changed schedule is refused
    assert "train.lr" in capsys.readouterr().err
    assert finetune([*base, "--output", b]) == 0
    sb = last_json(capsys)
    wa, wb = (load_file(os.path.join(x, "final", "model.safetensors")) for x in (a, b))
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    assert wa["feature_bn.running_mean"].abs().sum() > 0  # the demo's image head: its statistics resume too
    assert sa["test_accuracy"] == sb["test_accuracy"] and sa["best_step"] == sb["best_step"]
    assert finetune([*base, "--output", a]) == 0  # finished: its saved result, the test split is not re-scored
    out = capsys.readouterr().out
    assert "has already finished" in out and json.loads(out.strip().splitlines()[-1])["test_accuracy"] == sa["test_accuracy"]
    # the encoder started from the pretrained weights (not a fresh init)
    pre = load_file(os.path.join(run, "final", "model.safetensors"))
    from pipeline.finetune.worker import build_model
    from pipeline.train.checkpoint import load_finetuned
    _, cfg = load_finetuned(os.path.join(a, "final"))
    start = build_model(cfg).state_dict()
    assert torch.equal(start["encoder.blocks.0.fc1.weight"], pre["encoder.blocks.0.fc1.weight"])


def test_finetune_config_errors_before_ray(demo_shards, tmp_path, capsys):
    d = demo_shards
    base = ["--modality", "image", "--train-data", d["image_train"], "--val-data", d["image_test"],
            "--test-data", d["image_test"], "--output", str(tmp_path / "o")]
    assert finetune(["--task", "ctc", "--init", "scratch", *base]) == 2
    assert "ctc needs --modality audio" in capsys.readouterr().err
    assert finetune(["--task", "classify", "--init", str(tmp_path / "nope"), *base]) == 2
    assert "init: " in capsys.readouterr().err
    assert finetune(["--task", "classify", "--init", "scratch", *base, "--label-fraction", "0"]) == 2
    assert "finetune.label_fraction" in capsys.readouterr().err
    assert finetune(["--task", "classify", "--init", "scratch", *base, "--set", "finetune.nope=1"]) == 2
    assert "finetune.nope" in capsys.readouterr().err
    assert finetune(["--task", "classify", "--init", "scratch", *base, "--set", "finetune.mask_time_prob=0.2"]) == 2
    assert "finetune.mask_time_prob: applies to audio only" in capsys.readouterr().err
    assert finetune(["--task", "classify", "--init", "scratch", *base, "--set", "train.batch_size=1"]) == 2
    assert "finetune.feature_bn: standardizes over the batch" in capsys.readouterr().err
    assert finetune(["--task", "classify", "--init", "scratch", *base, "--set", "labels=[a, b]"]) == 2
    assert "labels: set by the command line" in capsys.readouterr().err
    assert finetune(["--task", "classify", "--init", "scratch", *base, "--set", "model.frontend.image_size=32"]) == 2
    assert "model.frontend.image_size: 32 in the config but the data" in capsys.readouterr().err
    # 1% of the labels (≥ 1 row per class: 10 rows) cannot fill one step of 32 on 2 workers
    assert finetune(["--task", "classify", "--init", "scratch", *base, "--label-fraction", "0.01",
                     "--num-workers", "2"]) == 2
    assert "fewer than one step's effective batch" in capsys.readouterr().err
    assert finetune(["--task", "classify", "--init", "scratch", *base, "--set", "train.worker_memory_gb=0.5"]) == 2
    assert capsys.readouterr().err.startswith("error: train.batch_size: a step needs about")
    assert finetune(["--task", "classify", "--init", "scratch", "--modality", "image", "--train-data",
                     d["image_train"], "--val-data", d["audio_test"], "--test-data", d["image_test"],
                     "--output", str(tmp_path / "o")]) == 2
    assert "modality" in capsys.readouterr().err


@pytest.mark.slow
def test_pretrain_and_finetune_from_a_hugging_face_folder(demo_shards, tmp_path, capsys):
    """A Hugging Face Data2VecAudioModel folder (built from a config: nothing downloaded) → a few
    steps of continued pretraining and of fine-tuning, on 2 workers."""
    from jobs.pretrain import main as pretrain
    from pipeline.init_weights import read_init
    from tests.test_init_weights import _hf_model
    hf_dir = str(tmp_path / "hf")
    _hf_model("audio").save_pretrained(hf_dir)
    d, run = demo_shards, str(tmp_path / "pre")
    assert pretrain(["--modality", "audio", "--data", d["audio"], "--output", run, "--init", hf_dir,
                     "--max-steps", "2", "--set", "model.target.top_k=2", *SMALL]) == 0  # the checkpoint has 2 blocks
    w = load_file(os.path.join(run, "final", "model.safetensors"))
    init = read_init(hf_dir).state
    k = "encoder.blocks.1.fc1.weight"
    assert w[k].shape == init[k].shape == (96, 48)  # the checkpoint's architecture, not the preset's
    # the teacher started as the imported student: after 2 EMA steps (decay 0.999) it is still there
    assert (w[f"teacher_{k}"] - init[k]).abs().max() < 1e-3 and not torch.equal(w[k], init[k])
    ft = str(tmp_path / "ft")
    assert finetune(["--task", "classify", "--modality", "audio", "--init", hf_dir, "--train-data", d["audio_train"],
                     "--val-data", d["audio_test"], "--test-data", d["audio_test"], "--output", ft,
                     "--max-steps", "2", *SMALL]) == 0
    s = last_json(capsys)
    assert s["init"] == hf_dir and s["steps"] == 2


@pytest.mark.slow
def test_pre_ln_image_encoders_finetune_on_two_workers(demo_shards, tmp_path, capsys):
    """The pre-LN image encoders — data2vec 1.0's, and every Hugging Face Data2VecVisionModel — on 2
    DDP workers: the head pools before the encoder's final norm, which therefore must not exist
    (DDP fails at the second step on a weight without a gradient). The log names it as not used."""
    from pipeline.recipes import preset
    from pipeline.train.checkpoint import save_final
    from tests.test_export_hf import _perturbed
    from tests.test_init_weights import _hf_model
    d = demo_shards
    run = str(tmp_path / "pre")  # a 1.0 image checkpoint on the demo digits' grid (28 px, 4-px patches)
    cfg = preset("image", "demo", "d2v1", image_size=28)
    save_final(os.path.join(run, "final"), _perturbed(cfg), {"model": cfg.to_dict(), "modality": "image"})
    hf_dir = str(tmp_path / "hf")
    _hf_model("image").save_pretrained(hf_dir)  # 28-px images, 4-px patches: the demo data's grid
    capsys.readouterr()
    for init in (os.path.join(run, "final"), hf_dir):
        out = str(tmp_path / f"ft-{os.path.basename(init)}")
        assert finetune(["--task", "classify", "--modality", "image", "--init", init, "--train-data", d["image_train"],
                         "--val-data", d["image_test"], "--test-data", d["image_test"], "--output", out,
                         "--max-steps", "3", "--set", "train.eval_every=3", *SMALL]) == 0, init
        assert last_json(capsys)["steps"] == 3
        from mlflow.tracking import MlflowClient
        client = MlflowClient(tracking_uri="sqlite:///" + os.path.join(out, "mlflow.db"))
        tags = client.get_run(open(os.path.join(out, "mlflow_run_id")).read().strip()).data.tags
        assert "init: not used: the pre-LN encoder's final LayerNorm" in tags["init.weights"]
        assert "encoder.norm.weight" in tags["init.weights"]
        assert "encoder.norm.weight" not in load_file(os.path.join(out, "final", "model.safetensors"))


@pytest.fixture(scope="module")
def ctc_shards(ray_local, tmp_path_factory):
    """Spoken digit strings (jobs.prepare_demo's CTC data, held-out voices in val/test), preprocessed."""
    from jobs.prepare_demo import prepare_ctc
    from pipeline.config import PreprocessConfig
    from pipeline.ingest import run
    root = tmp_path_factory.mktemp("ctc")
    prepare_ctc(str(root / "raw"), train=600, val=40, test=60)
    out = {}
    for s in ("train", "val", "test"):
        out[s] = str(root / s)
        m = run(PreprocessConfig(modality="audio", input=str(root / "raw" / "ctc" / s), output=out[s]))
        assert m["counts"]["transcripts"] == m["counts"]["written"] > 0
    return out


@pytest.mark.slow
def test_ctc_learns_digit_strings(ctc_shards, tmp_path, capsys):
    """The demo CTC recipe, from scratch, 1 worker: the loss falls and held-out voices' CER drops well
    below 1 (all blanks = CER 1) within a short run; the export is a working Data2VecAudioForCTC.
    The CNN stays frozen (as with a pretrained init) to keep the test short: even a random CNN's
    features are enough to learn the digit strings."""
    c, out = ctc_shards, str(tmp_path / "ft dir")  # named as a file:// URI (…/ft%20dir), as a user may
    assert finetune(["--task", "ctc", "--modality", "audio", "--init", "scratch", "--train-data", c["train"],
                     "--val-data", c["val"], "--test-data", c["test"], "--output", pathlib.Path(out).as_uri(),
                     "--max-steps", "300",
                     "--set", "train.eval_every=100", "--set", "finetune.freeze_feature_encoder=true"]) == 0
    s = last_json(capsys)
    assert set(s) >= {"test_cer", "test_wer", "init", "label_fraction"}
    assert s["test_cer"] < 0.8, s
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri="sqlite:///" + os.path.join(out, "mlflow.db"))
    run_id = open(os.path.join(out, "mlflow_run_id")).read().strip()
    loss = [m.value for m in client.get_metric_history(run_id, "loss")]
    assert np.mean(loss[-5:]) < 0.6 * np.mean(loss[:5])
    cer = [m.value for m in client.get_metric_history(run_id, "val_cer")]
    assert len(cer) == 3 and cer[-1] < 0.8
    from jobs.export_hf import main as export
    hf = tmp_path / "hf model"
    assert export(["--checkpoint", pathlib.Path(out, "final").as_uri(), "--output", hf.as_uri()]) == 0
    from transformers import Data2VecAudioForCTC, Wav2Vec2Processor
    assert isinstance(Data2VecAudioForCTC.from_pretrained(str(hf)), Data2VecAudioForCTC)
    assert Wav2Vec2Processor.from_pretrained(str(hf)).tokenizer.pad_token_id == 0
    assert not [p for p in tmp_path.rglob("*") if "%20" in p.name]


def test_feature_bn_is_refused_for_ctc():
    from pipeline.config import ConfigError
    from pipeline.train.config import TaskConfig
    with pytest.raises(ConfigError, match=r"^finetune\.feature_bn: applies to classify only"):
        TaskConfig(task="ctc", feature_bn=True)
    with pytest.raises(ValueError, match="classify only"):
        FineTuneModel(tiny("audio", "d2v2"), "ctc", 5, feature_bn=True)


@pytest.mark.parametrize("mode", ["d2v1", "d2v2"])
def test_image_head_owns_the_final_norm_so_every_weight_gets_a_gradient(tmp_path, mode):
    """DDP needs a gradient for every trainable weight at every step: a pre-LN (1.0) image
    encoder's own final LayerNorm, which the pooling head skips, must not exist at all; the
    checkpoint's copy is reported as not used."""
    from pipeline.init_weights import read_init
    from pipeline.train.checkpoint import save_final
    from tests.test_export_hf import _perturbed
    from tests.test_model import batch_for
    cfg = tiny("image", mode)
    m = FineTuneModel(cfg, "classify", 3)
    assert m.encoder.norm is None and hasattr(m, "fc_norm")
    m(batch_for("image")).logsumexp(-1).sum().backward()
    assert [n for n, p in m.named_parameters() if p.requires_grad and p.grad is None] == []
    save_final(str(tmp_path / "final"), _perturbed(cfg), {"model": cfg.to_dict(), "modality": "image"})
    report = m.load_pretrained(read_init(str(tmp_path / "final")).state)
    if mode == "d2v1":  # pre-LN: its final norm and its mask embedding are named as not used
        assert report["encoder.norm.weight"].startswith("not used: the pre-LN encoder's final LayerNorm")
        assert report["mask_emb"].startswith("not used")
    assert report["fc_norm.weight"] == report["head.weight"] == "fresh: the task head"


def test_pretrained_mask_embedding_reaches_audio_finetuning(tmp_path):
    """fairseq and Hugging Face fill time-masked frames with the pretrained mask embedding: ours
    (1.0 audio final/) and Hugging Face's masked_spec_embed both arrive in FineTuneModel.mask_emb;
    a 2.0 checkpoint has none and the report says the embedding starts fresh."""
    from pipeline.init_weights import init_model_config, read_init
    from pipeline.train.checkpoint import save_final
    from tests.test_export_hf import _perturbed
    from tests.test_init_weights import _hf_model
    cfg = tiny("audio", "d2v1")
    pre = _perturbed(cfg)
    save_final(str(tmp_path / "ours"), pre, {"model": cfg.to_dict(), "modality": "audio"})
    m = FineTuneModel(cfg, "classify", 3, time_masks=True)
    report = m.load_pretrained(read_init(str(tmp_path / "ours")).state)
    assert torch.equal(m.mask_emb, pre.mask_emb) and "mask_emb" not in report
    assert torch.equal(m.encoder.blocks[1].fc1.weight, pre.encoder.blocks[1].fc1.weight)

    hf = _hf_model("audio", mask_time_prob=0.05)  # HF creates masked_spec_embed only with its time masks on
    hf.save_pretrained(str(tmp_path / "hf"))
    init = read_init(str(tmp_path / "hf"))
    m = FineTuneModel(init_model_config(tiny("audio", "d2v2"), init), "ctc", 8, time_masks=True)
    m.load_pretrained(init.state)
    assert torch.equal(m.mask_emb, hf.masked_spec_embed)

    cfg2 = tiny("audio", "d2v2")
    save_final(str(tmp_path / "v2"), _perturbed(cfg2), {"model": cfg2.to_dict(), "modality": "audio"})
    m = FineTuneModel(cfg2, "classify", 3, time_masks=True)
    assert m.load_pretrained(read_init(str(tmp_path / "v2")).state)["mask_emb"] == "fresh: the checkpoint has none"


def test_label_fraction_subset_is_written_in_full_row_groups(tmp_path):
    """A 10% subset of 64-row groups must not become 6-row groups (10× the read tasks per epoch)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.config import ROW_GROUP_ROWS as BY_MODALITY
    from pipeline.finetune.tasks import write_fraction
    ROW_GROUP_ROWS = BY_MODALITY["image"]
    src = tmp_path / "src"
    (src / "shards").mkdir(parents=True)
    n = 40 * ROW_GROUP_ROWS
    for part in range(2):  # two shards: the buffer carries rows across files
        rows = range(part * n // 2, (part + 1) * n // 2)
        t = pa.table({"id": list(rows), "label": [f"c{i % 5}" for i in rows]})
        pq.write_table(t, src / "shards" / f"part-{part}.parquet", row_group_size=ROW_GROUP_ROWS)
    (src / "manifest.json").write_text(json.dumps({"modality": "image", "counts": {"written": n}, "labels": []}))
    m = write_fraction(str(src), str(tmp_path / "dst"), "label", 0.1, seed=3, stratified=True,
                       rest=str(tmp_path / "rest"))
    picked = pq.ParquetFile(tmp_path / "dst" / "shards" / "part-0.parquet")
    rest = pq.ParquetFile(tmp_path / "rest" / "shards" / "part-0.parquet")
    for f in (picked, rest):
        sizes = [f.metadata.row_group(g).num_rows for g in range(f.num_row_groups)]
        assert all(s == ROW_GROUP_ROWS for s in sizes[:-1]) and 0 < sizes[-1] <= ROW_GROUP_ROWS, sizes
    ids = picked.read().column("id").to_pylist() + rest.read().column("id").to_pylist()
    assert sorted(ids) == list(range(n)) and m["counts"]["written"] == picked.metadata.num_rows
    assert abs(picked.metadata.num_rows - n // 10) <= 5  # per class: round(10% of its rows)
