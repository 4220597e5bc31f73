"""Ray Tune sweep of EMA decay, mask ratio and top-K (and lr if asked), judged on a probe's
validation split; the chosen configuration's test accuracy is measured once, at the end.

    python -m jobs.sweep --modality M --data DIR --probe-train DIR --probe-test DIR [--probe-val DIR] \\
        --num-samples N [--max-concurrent K] [--search-space FILE.yaml] [--output SWEEP_DIR] \\
        [--num-workers W] [--use-gpu]

Each trial is a short pretraining run — a TorchTrainer built inside a Tune function (the way Ray
2.60's Train V2 composes with Tune) — split into `--rounds` rounds; after every round the frozen
encoder is probed: a linear probe fitted on --probe-train and scored on --probe-val (default: a
seeded, class-stratified 25% of --probe-train held out of the fit), reported to Tune as
`val_probe_accuracy`. ASHA stops weak trials after the first rounds. The objective is never the
loss (not comparable across top-K or mask ratio) and never the test split: --probe-test is scored
once, for the chosen configuration (the probe refitted on all of --probe-train).

Resources: each trial holds a driver CPU plus its Train workers (--num-workers × cpus_per_worker
CPUs, a GPU each with --use-gpu) and leaves a CPU for their Ray Data feed; concurrency follows.

MLflow: one parent run per sweep, one nested child run per trial (its pretraining run, with the
probe curve); the parent gets the best config, the test accuracy and a plot of validation
accuracy vs each parameter. Without --tracking-uri the sweep starts an `mlflow server` on this
machine's loopback over SWEEP_DIR/mlflow.db, so concurrent trials never write one SQLite file
themselves. The best config is printed as one JSON line last.

Search-space YAML: one entry per dotted config field, e.g.
    model.ema.decay: {choice: [0.99, 0.995, 0.999]}
    model.mask.prob: {uniform: [0.5, 0.85]}
    train.lr: {loguniform: [3.0e-4, 3.0e-3]}
    model.target.top_k: {randint: [1, 5]}      # upper bound exclusive
"""
from __future__ import annotations

import argparse
import os
import sys

from pipeline import storage
from pipeline.config import ConfigError
from pipeline.sweep import DEFAULT_SPACE, run_sweep, tune_space


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.sweep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modality", required=True)
    p.add_argument("--data", type=storage.path_arg, required=True, help="preprocessed pretraining data")
    p.add_argument("--probe-train", type=storage.path_arg, required=True, help="labeled preprocessed data to fit the probe")
    p.add_argument("--probe-val", type=storage.path_arg, default=None,
                   help="labeled preprocessed data the trials are judged on (default: 25%% of --probe-train)")
    p.add_argument("--probe-test", type=storage.path_arg, required=True, help="labeled preprocessed data scored once, for the best config")
    p.add_argument("--num-samples", type=int, required=True, help="number of trials")
    p.add_argument("--max-concurrent", type=int, default=None, help="default: what the cluster's CPUs allow")
    p.add_argument("--search-space", type=storage.path_arg, default=None, help="YAML file (see above); default: EMA decay, mask ratio, top-K")
    p.add_argument("--output", type=storage.path_arg, default="runs/sweep", help="sweep folder (trials, Tune state, mlflow.db)")
    p.add_argument("--preset", default="demo")
    p.add_argument("--config", type=storage.path_arg, default=None, help="YAML config applied to every trial")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--rounds", type=int, default=2, help="probe/report points per trial (ASHA rungs)")
    p.add_argument("--steps-per-round", type=int, default=100)
    p.add_argument("--num-workers", type=int, default=None, help="Train workers per trial (train.num_workers)")
    p.add_argument("--use-gpu", action="store_true", help="one GPU per Train worker")
    p.add_argument("--tracking-uri", default=None,
                   help="default: an mlflow server on loopback over SWEEP_DIR/mlflow.db, for the sweep's duration")
    p.add_argument("--experiment", default="data2vec-sweep")
    a = p.parse_args(argv)
    try:
        from pipeline.train.config import load_yaml, parse_sets, resolve
        from pipeline.train.launch import frontend_from_manifest, read_manifest
        spec = DEFAULT_SPACE
        if a.search_space:
            if not storage.is_file(a.search_space):
                raise ConfigError(f"search-space: {storage.shown(a.search_space)!r} does not exist")
            spec = load_yaml(storage.read_text(*storage.resolve(a.search_space)))
        if a.num_samples < 1 or a.rounds < 1 or a.steps_per_round < 1:
            raise ConfigError("num-samples, rounds and steps-per-round must be >= 1")
        sets = parse_sets(a.sets)
        if a.num_workers is not None:
            sets["train.num_workers"] = a.num_workers
        if a.use_gpu:
            sets["train.use_gpu"] = True
        for d in (a.probe_train, a.probe_val, a.probe_test):
            if d:
                read_manifest(d, a.modality)
        # Validate one trial's config now (with the first value of each parameter), before Ray starts.
        probe_values = {k: (v.get("choice") or v.get("uniform") or v.get("loguniform") or v.get("randint"))[0]
                        for k, v in spec.items()}
        check = resolve(a.modality, a.data, storage.join(a.output, "check"), a.preset, a.config,
                        {**sets, **probe_values}, model_frontend=frontend_from_manifest(read_manifest(a.data, a.modality)))
        tune_space(spec)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    import ray

    from pipeline.raycluster import init_ray
    from pipeline.train.tracking import LocalTrackingServer

    out = storage.canonical(a.output)
    out_fs, out_root = storage.resolve(out)
    out_fs.create_dir(out_root, recursive=True)
    tw = check.train
    per_trial = {"CPU": 1 + tw.num_workers * tw.cpus_per_worker + 1, "GPU": tw.num_workers if tw.use_gpu else 0}
    init_ray(num_cpus=max(os.cpu_count() or 1, per_trial["CPU"] * (a.max_concurrent or 1)), dashboard=True)
    have = ray.cluster_resources()
    # Never more trials than the cluster can hold: each holds its driver's CPU and its workers'
    # CPUs/GPUs, and its Ray Data tasks need a free CPU — a sweep that takes every CPU starves its
    # input and hangs.
    fit = min(int(have.get(k, 0)) // n for k, n in per_trial.items() if n)
    if fit < 1:
        print(f"error: train.num_workers: one trial needs {per_trial} but the cluster has "
              f"{ {k: have.get(k, 0) for k in per_trial} }", file=sys.stderr)
        return 2
    concurrent = min(a.max_concurrent or fit, fit)
    if a.max_concurrent and a.max_concurrent > fit:
        print(f"sweep: --max-concurrent {a.max_concurrent} lowered to {fit} ({have.get('CPU')} CPUs, "
              f"{have.get('GPU', 0)} GPUs; a trial holds {per_trial})")
    if a.tracking_uri:
        return run_sweep(a, spec, sets, out, a.tracking_uri, concurrent, per_trial, browse=a.tracking_uri)
    if storage.local_path(out) is None:
        print("error: tracking_uri: an object-store --output needs --tracking-uri (an MLflow server); the "
              "sweep's own server keeps its SQLite store in a local --output only", file=sys.stderr)
        return 2
    if sum(1 for n in ray.nodes() if n["Alive"]) > 1:
        print("error: tracking_uri: on a multi-node cluster pass --tracking-uri (an MLflow server every node "
              "reaches); the sweep's own server listens on this machine's loopback only", file=sys.stderr)
        return 2
    with LocalTrackingServer(out) as uri:  # SWEEP_DIR/mlflow.db behind one server process
        # Artifacts go straight to SWEEP_DIR/mlartifacts (absolute; every trial runs on this
        # machine), so the store stays browsable with `mlflow ui` after the server is gone.
        return run_sweep(a, spec, sets, out, uri, concurrent, per_trial,
                         browse=f"sqlite:///{out}/mlflow.db", artifact_location=f"file://{out}/mlartifacts")


if __name__ == "__main__":
    sys.exit(main())
