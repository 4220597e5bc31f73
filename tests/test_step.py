"""The one training step (pipeline/train/step.py): DDP + gradient accumulation, the health check
agreed by every rank, bf16 autocast and torch.compile on CPU."""
import dataclasses
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipeline.model.data2vec import Data2Vec
from pipeline.model.objective import NonFiniteLoss
from pipeline.train.batches import collate, sample_rngs, step_rng
from pipeline.train.config import resolve
from pipeline.train.step import build_optimizer, train_step

B = 4  # samples per micro-batch


def _cfg():
    """Demo image 2.0, made deterministic across batch layouts: no decoder noise, no dropout, and
    no CLS term (the reference's CLS loss is summed over each micro-batch's samples, so its weight
    grows with the micro-batch size by design: 2 × 2 micro-batches of B ≠ 1 batch of 4·B there)."""
    return resolve("image", "d", "o", "demo", None, {"train.lr": 1e-3, "train.warmup_steps": 1,
                                                     "model.decoder.mask_noise_std": 0.0,
                                                     "model.decoder.cls_loss": 0.0})


def _micro_batches(cfg, n: int, seed: int = 0):
    """n micro-batches of B images with their masks (numpy-made, as the data path makes them)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        imgs = rng.integers(0, 255, (B, 28 * 28 * 3), dtype=np.uint8)  # the read tasks' views
        out.append(collate({"image": imgs}, cfg.model, step_rng(0, 0, 0, i), 16000, 64))
    return out


def _cat(micro):
    """Micro-batches → one batch with the same samples and masks (mask rows follow their samples)."""
    return ({"image": torch.cat([x["image"] for x, _ in micro])}, torch.cat([m for _, m in micro]))


def _ddp_worker(rank, world, init_file, result_file, steps):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    cfg = dataclasses.replace(_cfg(), train=dataclasses.replace(_cfg().train, grad_accum=2))
    torch.manual_seed(0)
    model = Data2Vec(cfg.model)
    net = torch.nn.parallel.DistributedDataParallel(model)
    opt = build_optimizer(model, cfg.train)
    for step in range(steps):
        micro = _micro_batches(cfg, 4, seed=step)  # the global batch: 4 micro-batches of B
        mine = micro[rank * 2: rank * 2 + 2]  # rank r: micro-batches 2r, 2r+1 (grad_accum 2)
        train_step(model, net, opt, mine, step, cfg.train, rank=rank, world=world)
        assert all(p.grad is None for p in model.student_parameters())  # nothing leaks into the next step
    if rank == 0:
        torch.save(model.state_dict(), result_file)
    dist.destroy_process_group()


def test_two_ranks_with_accumulation_equal_one_rank_with_the_whole_batch(tmp_path):
    """2 DDP ranks (gloo) × grad_accum 2 × B give the same weights as 1 process with batch 4·B
    (same samples, same masks), within float tolerance — and entering no_sync() twice is gone."""
    steps = 3
    result = str(tmp_path / "ddp.pt")
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), result, steps), nprocs=2, join=True)
    cfg = _cfg()
    torch.manual_seed(0)
    model = Data2Vec(cfg.model)
    opt = build_optimizer(model, cfg.train)
    for step in range(steps):
        train_step(model, model, opt, [_cat(_micro_batches(cfg, 4, seed=step))], step, cfg.train)
    ddp = torch.load(result, weights_only=True)
    ref = model.state_dict()
    moved = 0
    for k, v in ref.items():
        torch.testing.assert_close(ddp[k], v, rtol=1e-4, atol=1e-5, msg=k)
        moved += k.startswith("encoder.") and not torch.equal(v, ref[k.replace("encoder.", "teacher_encoder.", 1)])
    assert moved  # training did move the student away from the teacher


def _nan_worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    cfg = _cfg()
    torch.manual_seed(0)
    model = Data2Vec(cfg.model)
    net = torch.nn.parallel.DistributedDataParallel(model)
    opt = build_optimizer(model, cfg.train)
    micro = _micro_batches(cfg, 1, seed=rank)
    try:
        train_step(model, net, opt, micro, 0, cfg.train, rank=rank, world=world, poison=rank == 1)
        msg = "no error"
    except NonFiniteLoss as e:
        msg = str(e)
    with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
        f.write(msg)
    # Leave without running C++ destructors: the DDP reducer was prepared for a backward that the
    # error skipped, and tearing it down beside gloo's threads aborted a rank once in CI
    # ("terminate called without an active exception") after both files had been written.
    os._exit(0)


def test_a_nan_on_one_rank_stops_every_rank_with_that_error(tmp_path):
    """Only rank 1's loss is NaN: both ranks raise NonFiniteLoss naming rank 1 (no rank is left
    waiting in an all-reduce until the collective timeout)."""
    mp.spawn(_nan_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True, )
    for rank in (0, 1):
        msg = open(tmp_path / f"rank{rank}.txt").read()
        assert "loss is nan at step 0 (on rank 1)" in msg, (rank, msg)


def test_bf16_autocast_step_on_cpu_stays_close_to_fp32():
    cfg = _cfg()
    losses = {}
    for name, ctx in (("fp32", None), ("bf16", lambda: torch.autocast("cpu", dtype=torch.bfloat16))):
        torch.manual_seed(0)
        model = Data2Vec(cfg.model)
        opt = build_optimizer(model, cfg.train)
        kw = {"autocast": ctx} if ctx else {}
        losses[name] = [train_step(model, model, opt, [_cat(_micro_batches(cfg, 2, seed=s))], s, cfg.train,
                                   **kw)["loss"] for s in range(4)]
    assert all(np.isfinite(losses["bf16"]))
    np.testing.assert_allclose(losses["bf16"], losses["fp32"], rtol=0.05)


@pytest.mark.slow
def test_compiled_step_matches_eager_and_compiles_once():
    """train.compile: a few steps of the compiled model give the eager losses (tolerance) and
    no step after the second compiles a new graph (masks hide a fixed count: static shapes)."""
    from torch._dynamo.utils import counters

    cfg = _cfg()
    batches = [_cat(_micro_batches(cfg, 1, seed=s)) for s in range(5)]
    losses = {}
    for compiled in (False, True):
        torch.manual_seed(0)
        model = Data2Vec(cfg.model)
        if compiled:
            torch._dynamo.reset()
            counters.clear()
            model.compile_modules()
        opt = build_optimizer(model, cfg.train)
        losses[compiled], graphs = [], []
        for s, b in enumerate(batches):
            losses[compiled].append(train_step(model, model, opt, [b], s, cfg.train)["loss"])
            graphs.append(counters["stats"]["unique_graphs"])
    np.testing.assert_allclose(losses[True], losses[False], rtol=1e-3, atol=1e-4)
    assert graphs[0] > 0 and graphs[-1] == graphs[1], graphs


def test_fused_adamw_steps_like_the_for_each_kernels():
    """Pretraining's and fine-tuning's optimizer is torch's fused AdamW: five steps of it move every
    weight as the default (for-each) AdamW does, to float rounding, weight decay groups included."""
    from pipeline.train.config import TrainConfig
    from pipeline.train.step import adamw

    torch.manual_seed(0)
    t = TrainConfig(lr=1e-2, weight_decay=0.05)
    make = lambda: [torch.nn.Parameter(torch.randn(8, 16)), torch.nn.Parameter(torch.randn(16))]  # noqa: E731
    fused, ref = make(), make()
    for a, b in zip(fused, ref):
        b.data.copy_(a.data)
    opt = adamw([{"params": fused[:1], "weight_decay": t.weight_decay}, {"params": fused[1:], "weight_decay": 0.0}], t)
    ref_opt = torch.optim.AdamW([{"params": ref[:1], "weight_decay": t.weight_decay},
                                 {"params": ref[1:], "weight_decay": 0.0}], lr=t.lr, betas=t.betas, eps=t.eps,
                                foreach=True)
    assert opt.defaults["fused"] is True and ref_opt.defaults["fused"] in (None, False)
    start = [p.detach().clone() for p in fused]
    for _ in range(5):
        g = [torch.randn_like(p) for p in fused]
        for o, ps in ((opt, fused), (ref_opt, ref)):
            for p, gi in zip(ps, g):
                p.grad = gi.clone()
            o.step()
    for a, b, a0 in zip(fused, ref, start):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        assert (a - a0).abs().min() > 1e-5  # every weight moved


def _rows(modality: str, n: int, rng) -> dict:
    """n samples of unequal length (audio 0.3–1 s, text 6–30 tokens) or n images, as numpy columns."""
    if modality == "audio":
        return {"audio": np.array([rng.standard_normal(int(rng.integers(4800, 16000))).astype(np.float32)
                                   for _ in range(n)], dtype=object)}
    if modality == "text":
        return {"input_ids": np.array([np.concatenate([[0], rng.integers(5, 300, int(rng.integers(4, 28))), [2]])
                                       for _ in range(n)], dtype=object)}
    return {"image": rng.integers(0, 255, (n, 28 * 28 * 3), dtype=np.uint8)}


@pytest.mark.parametrize("modality,mode", [("audio", "d2v2"), ("audio", "d2v1"), ("text", "d2v2"), ("text", "d2v1"),
                                           ("image", "d2v2")])
def test_any_cut_of_a_step_into_micro_batches_gives_the_same_update(modality, mode):
    """The loss is summed over loss positions and divided by the step's count (fairseq's
    sample_size), masks and crops are drawn per sample, padding never reaches a real step (decoder
    included) and the image 2.0 CLS term keeps its weight: 2 steps of 6 samples of unequal length
    cut as [6], [4, 2], [3, 3], [1 × 6] end in the same weights. In float64, so what is left is
    rounding (1e-12); in float32 the same cuts differ by ~1e-7 relative in a gradient, which AdamW
    turns into ~1e-6 on parameters whose gradient is near zero (a LayerNorm bias starting at 0)."""
    over = {"train.lr": 1e-3, "train.warmup_steps": 1, "model.mode": mode, "train.batch_size": 6,
            "train.audio_batching": "pad"}
    if mode == "d2v2":
        over["model.decoder.mask_noise_std"] = 0.0  # drawn from the process's RNG, not per sample
    fe = {"vocab_size": 300} if modality == "text" else ({"image_size": 28} if modality == "image" else {})
    cfg = resolve(modality, "d", "o", "demo", None, over, model_frontend=fe)
    if modality == "image":
        assert cfg.model.decoder.cls_loss > 0
    rows = _rows(modality, 12, np.random.default_rng(1))
    results = []
    for cut in ([6], [4, 2], [3, 3], [1] * 6):
        torch.manual_seed(0)
        model = Data2Vec(cfg.model).double()
        opt = build_optimizer(model, cfg.train)
        for step in range(2):
            micro, a = [], step * 6
            for n in cut:
                batch = {k: v[a: a + n] for k, v in rows.items()}
                x, m = collate(batch, cfg.model, sample_rngs(0, step, range(a, a + n)),
                               cfg.train.audio_max_samples, 64, "pad")
                micro.append(({k: v.double() if v.is_floating_point() else v for k, v in x.items()}, m))
                a += n
            train_step(model, model, opt, micro, step, cfg.train)
        results.append({k: v.clone() for k, v in model.state_dict().items()})
    for other in results[1:]:
        for k, v in results[0].items():
            if v.is_floating_point():
                assert float((other[k] - v).norm()) <= 1e-12 * max(float(v.norm()), 1e-3), k
    torch.manual_seed(0)
    init = Data2Vec(cfg.model).double().state_dict()
    assert any(not torch.equal(init[k], v) for k, v in results[0].items() if k.startswith("encoder."))  # it trained
