"""Fine-tune a pretrained encoder (or the same architecture from scratch) on labeled data, on Ray
Train (resumable: re-run the same command to continue).

    python -m jobs.finetune --task classify --modality {image,audio,text} --init RUN_DIR/final|HF_DIR|scratch \\
        --train-data LABELED --val-data LABELED --test-data LABELED --output FT_DIR \\
        [--preset demo|base] [--config FILE] [--set key=value ...] [--max-steps N] [--label-fraction F] \\
        [--num-workers N|MIN-MAX] [--use-gpu] [--tracking-uri URI] [--experiment NAME]
    python -m jobs.finetune --task ctc --modality audio ...   (clips with transcripts)

LABELED folders are jobs.preprocess outputs: a `label` column (DIR/<class>/<file>) for classify, a
`transcript` column for ctc (a .txt beside each clip, or transcripts.tsv/.jsonl). The best
checkpoint by --val-data (accuracy; CER for ctc) is kept; --test-data is scored once, at the end.
Writes FT_DIR/final/ (model.safetensors, config.json, metrics.json); export it with jobs.export_hf.
Prints a summary, then one JSON line: {"test_accuracy", "val_accuracy", "init", "label_fraction"}
(ctc: {"test_cer", "test_wer", "val_cer", …}).

Settings: pipeline/recipes.py::finetune_recipe per (modality, task, preset); --set train.lr=1e-4
finetune.layer_decay=0.75 finetune.patience=3 … (sections model:, train:, finetune:).
"""
from __future__ import annotations

import argparse
import sys
import time

from pipeline import storage
from pipeline.raycluster import print_result
from pipeline.config import ConfigError



def init_arg(text: str) -> str:
    """--init: `scratch`, or a path/URI (storage.path_arg)."""
    return text if text == "scratch" else storage.path_arg(text)


def parse(argv=None):
    p = argparse.ArgumentParser(prog="python -m jobs.finetune", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", required=True, choices=["classify", "ctc"])
    p.add_argument("--modality", required=True, help="image, audio or text")
    p.add_argument("--init", required=True, type=init_arg, help="RUN_DIR/final, a Hugging Face Data2Vec* folder, or scratch")
    p.add_argument("--train-data", type=storage.path_arg, required=True, help="labeled jobs.preprocess folder")
    p.add_argument("--val-data", type=storage.path_arg, required=True, help="labeled folder for model selection / early stopping")
    p.add_argument("--test-data", type=storage.path_arg, required=True, help="labeled folder, scored once at the end")
    p.add_argument("--output", type=storage.path_arg, required=True, help="FT_DIR: checkpoints, final/, mlflow.db")
    p.add_argument("--preset", default="demo", help="demo (minutes on a laptop), base or large")
    p.add_argument("--config", type=storage.path_arg, default=None, help="YAML with model:/train:/finetune: sections")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--stop-at-step", type=int, default=None, help="checkpoint at this step and exit")
    p.add_argument("--label-fraction", type=float, default=None,
                   help="train on this seeded, class-stratified fraction of the training labels")
    p.add_argument("--num-workers", default=None, metavar="N|MIN-MAX",
                   help="Ray Train workers (DDP ranks); MIN-MAX, e.g. 1-8, trains elastically")
    p.add_argument("--use-gpu", action="store_true")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--tracking-uri", default=None, help="MLflow URI (default: sqlite:///FT_DIR/mlflow.db)")
    p.add_argument("--experiment", default=None, help="MLflow experiment (default: data2vec-finetune)")
    p.add_argument("--allow-config-change", action="store_true")
    a = p.parse_args(argv)
    from pipeline.train.config import parse_sets, parse_workers

    sets = parse_sets(a.sets)
    for flag, key in (("max_steps", "train.max_steps"), ("stop_at_step", "train.stop_at_step"),
                      ("seed", "train.seed"),
                      ("label_fraction", "finetune.label_fraction")):
        if getattr(a, flag) is not None:
            sets[key] = getattr(a, flag)
    if a.num_workers is not None:
        sets.update(parse_workers(a.num_workers))
    if a.use_gpu:
        sets["train.use_gpu"] = True
    return a, sets


def main(argv=None) -> int:
    from pipeline.finetune import launch as fl

    try:
        a, sets = parse(argv)
        cfg = fl.build(a, sets)
        cfg, memory_line = fl.check(cfg, a.allow_config_change)
        m = fl.finished(cfg)  # a finished run is reported, not re-run: the test split is scored once
        chunks = fl.training_chunks(cfg) if m is None else None
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t0 = time.time()
    if m is not None:
        print(f"{cfg.output} has already finished: its saved result follows (wall_s counts this command only)")
    else:
        from pipeline.raycluster import init_ray
        from pipeline.train.launch import fit_error, local_cluster_cpus

        if memory_line:
            print(memory_line, flush=True)
        print(f"batch: {cfg.train.batch_line()}", flush=True)
        init_ray(num_cpus=local_cluster_cpus(cfg), dashboard=True)
        result, error = fit_error(lambda: fl.run_finetuning(cfg, chunks, tags={"memory": memory_line} if memory_line else None))
        if error:
            print(f"error: fine-tuning failed: {error}", file=sys.stderr)
            return 1
        m = fl.finished(cfg)
        if m is None:  # stopped at --stop-at-step
            print(f"stopped at step {(result.metrics or {}).get('step')}; re-run the same command to resume")
            print_result({"step": (result.metrics or {}).get("step"), "final": None})
            return 0
    keys = ["test_accuracy", "val_accuracy"] if cfg.finetune.task == "classify" else ["test_cer", "test_wer", "val_cer"]
    summary = {**{k: m.get(k) for k in keys}, "init": cfg.init, "label_fraction": cfg.finetune.label_fraction,
               "task": cfg.finetune.task, "modality": cfg.modality, "best_step": m.get("best_step"),
               "steps": m.get("steps"), "wall_s": round(time.time() - t0, 1), "final": storage.join(cfg.output, "final"),
               "tracking_uri": cfg.tracking_uri}
    from pipeline.train.tracking import ui_hint

    hint, summary["mlflow_ui"] = ui_hint(cfg.tracking_uri, cfg.experiment)
    print(f"done: {cfg.modality} {cfg.finetune.task} from {cfg.init}: " +
          ", ".join(f"{k} {summary[k]:.4f}" for k in keys) + f" (best step {m.get('best_step')} of {m.get('steps')})")
    print(hint)
    print_result(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
