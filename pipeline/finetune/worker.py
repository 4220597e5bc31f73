"""`finetune_loop_per_worker`: what each Ray Train worker runs to fine-tune. The step loop (seeded
resumable stream, batches ahead, the step's share in micro-batches, metric windows, logging, checkpoints via
ray.train.report, epochs) is loop.py's, shared with pretraining; this file holds what fine-tuning
adds:

    init (--init checkpoint or seeded scratch) → stream → collate (targets, audio time masks) →
    finetune_step (step.py) → every train.eval_every steps rank 0 scores --val-data, keeps the best
    weights and decides early stopping (broadcast to every rank) → at the end rank 0 loads the best
    weights, scores --test-data once, writes FT_DIR/final (model.safetensors, config.json,
    metrics.json)
"""
from __future__ import annotations

import tempfile

import torch

from pipeline import storage
from pipeline.augment import view_of
from pipeline.model.finetune import FineTuneModel
from pipeline.train.checkpoint import save_final
from pipeline.train.config import FineTuneConfig
from pipeline.train.loop import POSITION, Task, copy_to_local, cpu_copy, restore, run_steps, worker_context
from pipeline.train.step import autocast_for
from pipeline.finetune.step import build_finetune_optimizer, finetune_step
from pipeline.train.stream import COLUMNS, list_chunks, read_rows, warm_up
from pipeline.finetune.tasks import Targets, collate, evaluate, target_column
from pipeline.train.tracking import MLflowSink, NullSink, git_commit


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
    """{weight: why} → one line per reason, naming up to six of its weights."""
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
    import ray.train.torch

    cfg = FineTuneConfig.from_dict(config["run"])  # config["run"] stays what is logged and saved
    rank, world, device, _ = worker_context(cfg.train.use_gpu, config.get("log_level", "INFO"))
    warm_up(config["chunks"], COLUMNS[cfg.modality], view_of(cfg))  # Ray Data's start overlaps the build
    t, f = cfg.train, cfg.finetune

    notes: dict = {}
    model = build_model(cfg, notes).to(device)
    opt = build_finetune_optimizer(model, t, f.layer_decay)
    pos = {**POSITION, "best_score": float("-inf"), "best_step": 0, "bad_evals": 0, "stopped_early": False}
    state = restore(model, opt, pos, device)
    net = ray.train.torch.prepare_model(model, move_to_device=False) if world > 1 else model

    sink = NullSink()
    if rank == 0:
        out_fs, out_root = storage.resolve(cfg.output)
        out_fs.create_dir(out_root, recursive=True)
        init_name = "scratch" if cfg.init == "scratch" else "pretrained"
        sink = MLflowSink(cfg.tracking_uri, cfg.experiment, cfg.output,
                          f"{cfg.modality}-{f.task}-{init_name}-{f.label_fraction:g}", config["run"],
                          parent_run_id=cfg.parent_run_id)
        sink.set_tags({"train.effective_batch": cfg.train.effective_batch, "train.lr": cfg.train.lr,
                       "git_commit": git_commit(), "modality": cfg.modality, "task": f.task, "init": cfg.init,
                       "label_fraction": f.label_fraction, "ray.num_workers": world, "device": str(device)})
        sink.set_tags(config.get("tags") or {})
        if state is None and notes:
            lines = init_lines(notes)
            print("\n".join(lines), flush=True)
            sink.set_tags({"init.weights": "\n".join(lines)[:5000]})  # what the checkpoint gave, what starts fresh
    try:
        task = FineTuning(cfg, model, net, opt, rank, world, device, sink, best=(state or {}).get("best_model"))
        run_steps(task, model=model, opt=opt, pos=pos, t=t, rank=rank, world=world, chunks=config["chunks"],
                  sink=sink, config=config["run"], resumed=state is not None)
        if rank == 0 and (pos["step"] >= t.max_steps or pos["stopped_early"]):
            _finish(cfg, model, task.best, pos, task.targets, device, task.autocast, sink, config["run"])
    except BaseException:
        sink.close("FAILED")  # the MLflow run of a failed worker says so (a restart reopens it)
        raise
    sink.close()


class FineTuning(Task):
    """The supervised step (step.finetune_step), and every train.eval_every steps rank 0's score
    on --val-data: the best weights so far are kept (and checkpointed), early stopping is decided
    on rank 0 and broadcast to every rank."""

    def __init__(self, cfg: FineTuneConfig, model, net, opt, rank: int, world: int, device, sink, best=None):
        t, f = cfg.train, cfg.finetune
        self.cfg, self.t, self.f, self.model, self.net, self.opt = cfg, t, f, model, net, opt
        self.rank, self.world, self.device, self.sink = rank, world, device, sink
        self.columns = COLUMNS[cfg.modality] + [target_column(f.task)]
        self.view = view_of(cfg)
        self.targets = Targets(f.task, cfg.labels)
        self.autocast = autocast_for(device)
        self.every = t.eval_every or max(1, t.max_steps // 5)
        self.best = best  # the best weights so far (CPU copy)
        self.val_rows = _rows(cfg.val_data, cfg.modality, f.task) if rank == 0 else None

    def collate(self, batch, rng):
        f = self.f
        return collate(batch, self.cfg.modality, self.cfg.model, self.targets, rng, self.t, f.mask_time_prob,
                       f.mask_time_length)

    def step(self, step, micro, pos):
        d = self.device
        micro = [({k: v.to(d) for k, v in x.items()}, {k: v.to(d) for k, v in y.items()},
                  None if m is None else m.to(d)) for x, y, m in micro]
        return finetune_step(self.model, self.net, self.opt, micro, step, self.t, self.f, autocast=self.autocast,
                             world=self.world)

    def after_step(self, step, pos):
        if not (step % self.every == 0 or step == self.t.max_steps):
            return
        import torch.distributed as dist

        stop_now = torch.zeros(1, device=self.device)
        if self.rank == 0:
            v = evaluate(self.model, self.val_rows, self.targets, self.device, self.t.batch_size, self.autocast)
            s = score(v, self.f.task)
            if s > pos["best_score"]:
                pos.update(best_score=s, best_step=step, bad_evals=0)
                self.best = cpu_copy(self.model.state_dict())
            else:
                pos["bad_evals"] += 1
            stop_now[0] = float(self.f.patience > 0 and pos["bad_evals"] >= self.f.patience)
            self.sink.log_metrics({f"val_{k}": x for k, x in v.items() if k != "examples"}, step)
            print(f"eval step {step}: " + " ".join(f"val_{k} {x:.4f}" for k, x in v.items() if k != "examples")
                  + (f" e.g. {v['examples']}" if "examples" in v else ""), flush=True)
        if self.world > 1:
            dist.broadcast(stop_now, 0)
        pos["stopped_early"] = bool(stop_now.item())

    def stopped(self, pos):
        return pos["stopped_early"]

    def checkpoint_extra(self, saved):
        return {"best_model": self.best} if self.best is not None else {}


def _finish(cfg: FineTuneConfig, model, best, pos, targets, device, autocast, sink, saved: dict) -> None:
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
    save_final(final, model, saved)
    fs, root = storage.resolve(final)
    storage.write_json(fs, f"{root}/metrics.json", metrics)
    logged = {("best_" + k if k.startswith("val_") else k): float(v) for k, v in metrics.items()
              if isinstance(v, (int, float))}  # val_* stays the curve; the chosen point is best_val_*
    # After the last checkpoint: held values at this step would be dropped as already committed.
    sink.log_event(logged, pos["step"])
    with tempfile.TemporaryDirectory() as tmp:
        for local in copy_to_local(fs, root, ("config.json", "model.safetensors", "metrics.json"), tmp):
            sink.log_artifact(local, "final")
    print("test: " + " ".join(f"{k} {v:.4f}" for k, v in test.items()), flush=True)
