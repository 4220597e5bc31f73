"""`finetune_loop_per_worker`: what each Ray Train worker runs to fine-tune. Same conventions as
pretraining (worker.py): seeded resumable stream of batches (stream.py), DDP, grad_accum groups,
bf16 autocast on GPU, checkpoint via ray.train.report every N steps, MLflow on rank 0.

    init (--init checkpoint or seeded scratch) → stream → collate (targets, audio time masks) →
    finetune_step (step.py) → every train.eval_every steps rank 0 scores --val-data, keeps the best
    weights and decides early stopping (broadcast to every rank) → at the end rank 0 loads the best
    weights, scores --test-data once, writes FT_DIR/final (model.safetensors, config.json,
    metrics.json)
"""
from __future__ import annotations

import json
import os
import tempfile
import time

import torch

from pipeline import storage
from pipeline.model.finetune import FineTuneModel
from pipeline.train.batches import COLUMNS, Ahead, step_rng
from pipeline.train.checkpoint import load_state, save_final, save_state
from pipeline.train.config import FineTuneConfig
from pipeline.train.curves import read_rows
from pipeline.train.step import autocast_for, build_finetune_optimizer, finetune_step
from pipeline.train.stream import Chunk, RankStream, list_chunks
from pipeline.train.tasks import Targets, collate, evaluate, target_column
from pipeline.train.tracking import MLflowSink, NullSink, git_commit
from pipeline.train.worker import _cpu_copy, _load, worker_context


def build_model(cfg: FineTuneConfig, notes: dict | None = None) -> FineTuneModel:
    """The fine-tuning model at its starting point: seeded random init, then the --init weights by
    the model's name table (FineTuneModel.init_table). `notes` receives {weight: why} for what the
    checkpoint gives that is not used and what starts fresh."""
    f = cfg.finetune
    torch.manual_seed(cfg.train.seed)  # identical initial weights (head, scratch) on every rank
    model = FineTuneModel.for_task(cfg.model, f, len(cfg.labels))
    if cfg.init != "scratch":
        from pipeline.init_weights import read_init

        try:
            report = model.load_pretrained(read_init(cfg.init).state)
        except ValueError as e:
            raise ValueError(f"init: {cfg.init!r}: {e}") from None
        if notes is not None:
            notes.update(report)
    return model


def init_lines(notes: dict) -> list[str]:
    """{weight: why} → one line per reason, its weights named (prefixes shortened)."""
    by_why: dict[str, list[str]] = {}
    for name, why in notes.items():
        by_why.setdefault(why, []).append(name)
    return [f"init: {why}: {', '.join(sorted(names)[:6])}{' …' if len(names) > 6 else ''}"
            for why, names in sorted(by_why.items())]


def score(metrics: dict, task: str) -> float:
    """Higher is better: accuracy, or −CER."""
    return metrics["accuracy"] if task == "classify" else -metrics["cer"]


def _rows(data: str, modality: str, task: str) -> dict:
    cols = COLUMNS[modality] + [target_column(task)]
    chunks = list_chunks(data, cols)
    rows = read_rows(chunks, cols, sum(c.rows for c in chunks))
    col = rows[target_column(task)]
    keep = [i for i, v in enumerate(col) if v is not None and str(v).strip()]
    return {c: v[keep] for c, v in rows.items()}


def finetune_loop_per_worker(config: dict) -> None:
    import ray.train
    import ray.train.torch
    import torch.distributed as dist
    from ray.train import Checkpoint

    cfg = FineTuneConfig.from_dict(config["run"])
    t, f = cfg.train, cfg.finetune
    rank, world, device, _ = worker_context(t.use_gpu)

    notes: dict = {}
    model = build_model(cfg, notes).to(device)
    opt = build_finetune_optimizer(model, t, f.layer_decay)
    pos = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "best_score": float("-inf"), "best_step": 0, "bad_evals": 0,
           "stopped_early": False}
    best = None  # the best weights so far (CPU copy), kept in checkpoints too
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = load_state(d)
        _load(model, opt, state, device)
        best = state.get("best_model")
        pos.update({k: state[k] for k in pos if k in state})
    net = ray.train.torch.prepare_model(model, move_to_device=False) if world > 1 else model

    sink = NullSink()
    targets = Targets(f.task, cfg.labels)
    if rank == 0:
        out_fs, out_root = storage.resolve(cfg.output)
        out_fs.create_dir(out_root, recursive=True)
        init_name = "scratch" if cfg.init == "scratch" else "pretrained"
        sink = MLflowSink(cfg.tracking_uri, cfg.experiment, cfg.output,
                          f"{cfg.modality}-{f.task}-{init_name}-{f.label_fraction:g}", cfg.to_dict(),
                          parent_run_id=cfg.parent_run_id)
        sink.set_tags({"train.effective_batch": cfg.train.effective_batch, "train.peak_lr": cfg.train.peak_lr,
                       "git_commit": git_commit(), "modality": cfg.modality, "task": f.task, "init": cfg.init,
                       "label_fraction": f.label_fraction, "ray.num_workers": world, "device": str(device)})
        val_rows = _rows(cfg.val_data, cfg.modality, f.task)
        if ckpt is None:
            for line in init_lines(notes):
                print(line, flush=True)
        if ckpt is not None:
            print(f"[rank 0] resumed from step {pos['step']} (epoch {pos['epoch']}, batch {pos['batch_in_epoch']})",
                  flush=True)
    autocast = autocast_for(device)
    stream = RankStream([Chunk(**c) for c in config["chunks"]], COLUMNS[cfg.modality] + [target_column(f.task)],
                        t.batch_size, t.shuffle_buffer, t.seed, rank, world)
    steps_per_epoch = stream.batches_per_epoch() // t.grad_accum
    if steps_per_epoch == 0:
        raise RuntimeError(f"worker {rank} gets no full step per epoch: lower train.batch_size ({t.batch_size}) "
                           f"× grad_accum ({t.grad_accum}) or use fewer workers ({world})")
    every = t.eval_every or max(1, t.max_steps // 5)
    stop = t.stop_at_step or t.max_steps
    window = {"loss": 0.0, "n": 0, "wait": 0.0, "t0": time.perf_counter(), "samples": 0, "eval": 0.0}
    t_start, start_step = time.perf_counter(), pos["step"]

    groups = stream.groups(pos["epoch"], pos["batch_in_epoch"], t.grad_accum)
    # The next steps' batches (+ time masks), collated in the background across epochs (batches.Ahead).
    ahead = Ahead(lambda step: [collate(nb, cfg.modality, cfg.model, targets, step_rng(t.seed, rank, step, i), t,
                                        f.mask_time_prob, f.mask_time_length) for i, nb in enumerate(next(groups))],
                  pos["step"], stop)
    while pos["step"] < stop and not pos["stopped_early"]:
        t_wait = time.perf_counter()
        while pos["batch_in_epoch"] < steps_per_epoch and pos["step"] < stop and not pos["stopped_early"]:
            step, micro = ahead.get()
            assert step == pos["step"], (step, pos["step"])
            torch.manual_seed(t.seed * 1_000_003 + rank * 10_007 + step * 31)  # dropout, drop-path
            micro = [({k: v.to(device) for k, v in x.items()}, {k: v.to(device) for k, v in y.items()},
                      None if m is None else m.to(device)) for x, y, m in micro]
            window["wait"] += time.perf_counter() - t_wait
            m = finetune_step(model, net, opt, micro, step, t, f, autocast=autocast, world=world)
            pos["step"] += 1
            pos["batch_in_epoch"] += 1
            step = pos["step"]
            window["loss"] += m["loss"]
            window["n"] += 1
            window["samples"] += t.batch_size * t.grad_accum * world
            if step % every == 0 or step == t.max_steps:
                t_eval = time.perf_counter()
                stop_now = torch.zeros(1, device=device)
                if rank == 0:
                    v = evaluate(model, val_rows, targets, device, t.batch_size, autocast)
                    s = score(v, f.task)
                    if s > pos["best_score"]:
                        pos.update(best_score=s, best_step=step, bad_evals=0)
                        best = _cpu_copy(model.state_dict())
                    else:
                        pos["bad_evals"] += 1
                    stop_now[0] = float(f.patience > 0 and pos["bad_evals"] >= f.patience)
                    sink.log_metrics({f"val_{k}": x for k, x in v.items() if k != "examples"}, step)
                    print(f"eval step {step}: " + " ".join(f"val_{k} {x:.4f}" for k, x in v.items() if k != "examples")
                          + (f" e.g. {v['examples']}" if "examples" in v else ""), flush=True)
                if world > 1:
                    dist.broadcast(stop_now, 0)
                pos["stopped_early"] = bool(stop_now.item())
                window["eval"] += time.perf_counter() - t_eval
            if step % t.log_every == 0 or step == stop or pos["stopped_early"]:
                now = time.perf_counter()
                dt = now - window["t0"] - window["eval"]
                metrics = {"loss": window["loss"] / max(window["n"], 1), "lr": m["lr"],
                           "samples_per_s": window["samples"] / dt, "data_wait_fraction": window["wait"] / dt,
                           "epoch": pos["epoch"]}
                sink.log_metrics(metrics, step)
                if rank == 0:
                    eta = (now - t_start) / max(step - start_step, 1) * (stop - step)
                    print(f"step {step}/{t.max_steps} loss {metrics['loss']:.4f} lr {m['lr']:.2e} "
                          f"{metrics['samples_per_s']:.1f} samples/s ETA {eta:.0f}s", flush=True)
                window = {"loss": 0.0, "n": 0, "wait": 0.0, "t0": time.perf_counter(), "samples": 0, "eval": 0.0}
            if step % t.checkpoint_every == 0 or step == stop or pos["stopped_early"]:
                saved = dict(pos)
                if saved["batch_in_epoch"] == steps_per_epoch:
                    saved.update(epoch=pos["epoch"] + 1, batch_in_epoch=0)
                _report(ray.train, Checkpoint, rank, model, opt, saved, cfg, best)
            t_wait = time.perf_counter()
        if pos["batch_in_epoch"] >= steps_per_epoch:
            pos.update(epoch=pos["epoch"] + 1, batch_in_epoch=0)
    ahead.close()
    if rank == 0 and (pos["step"] >= t.max_steps or pos["stopped_early"]):
        _finish(cfg, model, best, pos, targets, device, autocast, sink)
    if rank == 0:
        sink.close()


def _finish(cfg: FineTuneConfig, model, best, pos, targets, device, autocast, sink) -> None:
    """Rank 0: the best weights (by validation) → one test evaluation → FT_DIR/final."""
    if best is not None:
        model.load_state_dict(best)
    test = evaluate(model, _rows(cfg.test_data, cfg.modality, cfg.finetune.task), targets, device,
                    cfg.train.batch_size, autocast)
    test.pop("examples", None)
    f = cfg.finetune
    val_key = "val_accuracy" if f.task == "classify" else "val_cer"
    best_val = pos["best_score"] if f.task == "classify" else -pos["best_score"]
    metrics = {**{f"test_{k}": v for k, v in test.items()}, val_key: best_val, "best_step": pos["best_step"],
               "steps": pos["step"], "stopped_early": pos["stopped_early"], "init": cfg.init,
               "label_fraction": f.label_fraction, "task": f.task, "modality": cfg.modality}
    final = storage.join(cfg.output, "final")
    save_final(final, model, cfg.to_dict())
    fs, root = storage.resolve(final)
    storage.write_text(fs, f"{root}/metrics.json", json.dumps(metrics, indent=2) + "\n")
    logged = {("best_" + k if k.startswith("val_") else k): float(v) for k, v in metrics.items()
              if isinstance(v, (int, float))}  # val_* stays the curve; the chosen point is best_val_*
    sink.log_metrics(logged, pos["step"])
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("config.json", "model.safetensors", "metrics.json"):
            local = os.path.join(tmp, name)
            with fs.open_input_stream(f"{root}/{name}") as src, open(local, "wb") as dst:
                dst.write(src.read())
            sink.log_artifact(local, "final")
    print("test: " + " ".join(f"{k} {v:.4f}" for k, v in test.items()), flush=True)


def _report(train, Checkpoint, rank, model, opt, pos, cfg, best):
    """Every rank reports (a barrier); rank 0 attaches the checkpoint (with the best weights)."""
    metrics = {"step": pos["step"]}
    if rank != 0:
        train.report(metrics, checkpoint=None)
        return
    with tempfile.TemporaryDirectory() as tmp:
        extra = {"best_model": best} if best is not None else {}
        save_state(tmp, model=model, optimizer=opt, config=cfg.to_dict(), **pos, **extra)
        train.report(metrics, checkpoint=Checkpoint.from_directory(tmp))
