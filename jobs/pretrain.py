"""data2vec pretraining on Ray Train (resumable: re-run the same command to continue).

    python -m jobs.pretrain --modality {image,audio,text} --data PREPROCESSED_DIR --output RUN_DIR \\
        [--preset {demo,base,large}] [--config FILE.yaml] [--set key=value ...] [--max-steps N] \\
        [--stop-at-step K] [--num-workers N|MIN-MAX] [--use-gpu] [--compile] [--tracking-uri URI] [--experiment NAME] \\
        [--val-data DIR] [--probe-train DIR --probe-test DIR] [--init RUN_DIR/final|HF_DIR] [--print-config]
        [--allow-config-change]

--init continues pretraining from a checkpoint — our RUN_DIR/final or a Hugging Face
Data2VecVisionModel / Data2VecAudioModel / Data2VecTextModel folder (e.g. a downloaded
facebook/data2vec-* snapshot): its architecture replaces the preset's, the teacher starts as a copy
of the imported student; the rest (masking, targets, EMA, optimisation) is the recipe's. For text,
preprocess with `jobs.preprocess --tokenizer HF_DIR` so the ids match the checkpoint's embeddings.

--print-config prints the resolved run config as YAML (a valid --config file) and exits before Ray
starts; --data is then optional (without it, data-derived settings keep the recipe's defaults).

Learning curves (MLflow, every train.eval_every steps and at step 0): `val_loss` on --val-data (or on
a held-out train.val_fraction of --data) at fixed masks; `probe.knn_accuracy` and
`probe.linear_accuracy` of the student's features, fitted on --probe-train and scored on --probe-test.

Examples of --set: train.lr=5e-4 model.mode=d2v1 model.mask.prob=0.7 model.ema.decay=0.9995
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from pipeline import storage
from pipeline.raycluster import print_result
from pipeline.config import ConfigError


def build_config(argv=None):
    from pipeline.train.config import parse_sets, parse_workers, resolve
    from pipeline.train.launch import frontend_from_manifest, read_manifest
    p = argparse.ArgumentParser(prog="python -m jobs.pretrain", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modality", required=True, help="image, audio or text")
    p.add_argument("--data", type=storage.path_arg, help="output folder of jobs.preprocess (shards/ + manifest.json); a path or URI")
    p.add_argument("--output", type=storage.path_arg, help="run folder: checkpoints, final/ model, mlflow.db; a path or URI")
    p.add_argument("--preset", default="demo", help="demo (minutes on a laptop), base or large (the paper's)")
    p.add_argument("--config", type=storage.path_arg, default=None, help="YAML file with `model:` and `train:` sections")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config field, e.g. train.lr=5e-4 (repeatable)")
    p.add_argument("--max-steps", type=int, default=None, help="total optimizer steps of the run")
    p.add_argument("--stop-at-step", type=int, default=None, help="checkpoint at this step and exit")
    p.add_argument("--num-workers", default=None, metavar="N|MIN-MAX",
                   help="Ray Train workers (DDP ranks); MIN-MAX, e.g. 1-8, trains elastically")
    p.add_argument("--use-gpu", action="store_true", help="one GPU per worker, NCCL + bf16 autocast")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (train.compile)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    p.add_argument("--allow-config-change", action="store_true",
                   help="resume even though the schedule-relevant config differs from the checkpoint's")
    p.add_argument("--val-data", type=storage.path_arg, default=None, help="preprocessed folder for the validation-loss curve")
    p.add_argument("--probe-train", type=storage.path_arg, default=None, help="labeled preprocessed folder: online probe's training rows")
    p.add_argument("--probe-test", type=storage.path_arg, default=None, help="labeled preprocessed folder: online probe's test rows")
    p.add_argument("--init", type=storage.path_arg, default=None, help="start from RUN_DIR/final or a Hugging Face Data2Vec*Model folder")
    p.add_argument("--tracking-uri", default=None, help="MLflow URI (default: sqlite:///RUN_DIR/mlflow.db)")
    p.add_argument("--experiment", default=None, help="MLflow experiment name (default: data2vec)")
    a = p.parse_args(argv)
    if not a.print_config and not (a.data and a.output):
        p.error("--data and --output are required (unless --print-config)")
    sets = parse_sets(a.sets)
    for flag, key in (("max_steps", "train.max_steps"), ("stop_at_step", "train.stop_at_step"),
                      ("seed", "train.seed")):
        if getattr(a, flag) is not None:
            sets[key] = getattr(a, flag)
    if a.num_workers is not None:
        sets.update(parse_workers(a.num_workers))
    if a.use_gpu:
        sets["train.use_gpu"] = True
    if a.compile:
        sets["train.compile"] = True
    frontend = frontend_from_manifest(read_manifest(a.data, a.modality)) if a.data else {}
    cfg = resolve(a.modality, a.data or "", a.output or "", a.preset, a.config, sets, model_frontend=frontend,
                  tracking_uri=a.tracking_uri, experiment=a.experiment, val_data=a.val_data,
                  probe_train=a.probe_train, probe_test=a.probe_test, init=a.init)
    if cfg.init:  # the checkpoint fixes the architecture (widths, depth, front end)
        import dataclasses

        from pipeline.init_weights import NotRepresentable, init_model_config, read_init
        try:
            cfg = dataclasses.replace(cfg, model=init_model_config(cfg.model, read_init(cfg.init)))
        except (NotRepresentable, ValueError, FileNotFoundError) as e:
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(f"init: {a.init!r} cannot be used: {e}") from None
    for k, v in frontend.items():  # a --config/--set value may not contradict the data
        if getattr(cfg.model.frontend, k) != v:
            where = f"the --init checkpoint ({a.init})" if a.init else "the config"
            raise ConfigError(f"model.frontend.{k}: {getattr(cfg.model.frontend, k)} in {where} but the data "
                              f"in {a.data!r} has {v}" + (f"; preprocess it with --tokenizer {a.init}" if a.init else
                                                          "; drop it from the config (it comes from the data)"))
    if not a.print_config and cfg.tracking_uri is None:  # resolve() defaults it for local folders
        raise ConfigError(f"tracking_uri: --output {cfg.output!r} is not a local folder; pass --tracking-uri "
                          f"(an MLflow server, or sqlite:///LOCAL/mlflow.db)")
    return cfg, a


def main(argv=None) -> int:
    from pipeline.train.config import to_yaml
    from pipeline.pretrain.launch import check_data
    from pipeline.train.launch import check_resume
    from pipeline.train.memory import fit_memory

    try:
        cfg, args = build_config(argv)
        if args.print_config:
            print(to_yaml(cfg), end="")
            return 0
        check_data(cfg)
        cfg, memory_line = fit_memory(cfg)  # before the resume check: a resume fits the same way
        check_resume(cfg, args.allow_config_change)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if memory_line:
        print(memory_line, flush=True)
    from pipeline.raycluster import init_ray
    from pipeline.train.launch import fit_error, local_cluster_cpus
    from pipeline.pretrain.launch import run_pretraining

    fault = {}  # test-only fault injection
    if os.environ.get("D2V_FAIL_AT_STEP"):  # one worker process dies once at this step
        fault = {"step": int(os.environ["D2V_FAIL_AT_STEP"]),
                 "marker": os.path.join(os.path.abspath(cfg.output), ".fault_injected")}
    if os.environ.get("D2V_NAN_AT_STEP"):  # "STEP:RANK[:TIMES]": that rank's loss turns NaN at STEP
        at, r, times = ([int(x) for x in os.environ["D2V_NAN_AT_STEP"].split(":")] + [None, None])[:3]
        fault.update(nan_at_step=at, rank=r or 0, times=times or 1)
    print(f"batch: {cfg.train.batch_line()}", flush=True)
    init_ray(num_cpus=local_cluster_cpus(cfg), dashboard=True)
    t0 = time.time()
    result, error = fit_error(lambda: run_pretraining(cfg, fault, tags={"memory": memory_line} if memory_line else None))
    if error:
        print(f"error: training failed: {error}", file=sys.stderr)
        return 1
    m = result.metrics or {}
    uri = cfg.tracking_uri
    summary = {"modality": cfg.modality, "mode": cfg.model.mode, "step": m.get("step"),
               "loss": m.get("loss"), "samples_per_s": m.get("run_samples_per_s"),
               "data_wait_fraction": m.get("run_data_wait_fraction"), "wall_s": round(time.time() - t0, 1),
               "final": storage.join(cfg.output, "final") if m.get("step") == cfg.train.max_steps else None,
               "tracking_uri": uri}
    from pipeline.train.tracking import ui_hint

    hint, summary["mlflow_ui"] = ui_hint(uri, cfg.experiment)
    print(f"done: {cfg.modality} step {summary['step']}/{cfg.train.max_steps}\n{hint}")
    print_result(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
