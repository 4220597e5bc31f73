"""Ray Tune sweep of EMA decay, mask ratio and top-K (and lr if asked), judged on a probe.

    python -m jobs.sweep --modality M --data DIR --probe-train DIR --probe-test DIR \\
        --num-samples N [--max-concurrent K] [--search-space FILE.yaml] [--output SWEEP_DIR]

Each trial is a short pretraining run — a TorchTrainer built inside a Tune function (the way Ray
2.60's Train V2 composes with Tune) — split into `--rounds` rounds; after every round the frozen
encoder is probed (linear probe on the labeled splits) and the probe accuracy is reported to Tune.
ASHA stops weak trials after the first rounds. The objective is probe accuracy, never the loss
(it is not comparable across top-K or mask ratio). Re-running with the same --output resumes.

MLflow: one parent run per sweep, one nested child run per trial (its pretraining run, with the
probe curve); the parent gets the best config and a plot of probe accuracy vs each parameter.
The best config is printed as one JSON line last.

Search-space YAML: one entry per dotted config field, e.g.
    model.ema.decay: {choice: [0.99, 0.995, 0.999]}
    model.mask.prob: {uniform: [0.5, 0.85]}
    train.lr: {loguniform: [3.0e-4, 3.0e-3]}
    model.target.top_k: {randint: [1, 5]}      # upper bound exclusive
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from pipeline.config import ConfigError

DEFAULT_SPACE = {
    "model.ema.decay": {"choice": [0.99, 0.995, 0.999]},
    "model.mask.prob": {"uniform": [0.5, 0.85]},
    "model.target.top_k": {"choice": [1, 2, 3, 4]},
}


def tune_space(spec: dict):
    from ray import tune

    makers = {"choice": lambda v: tune.choice(v), "uniform": lambda v: tune.uniform(*v),
              "loguniform": lambda v: tune.loguniform(*v), "randint": lambda v: tune.randint(*v)}
    space = {}
    for key, dist in spec.items():
        if not isinstance(dist, dict) or len(dist) != 1 or next(iter(dist)) not in makers:
            raise ConfigError(f"search-space.{key}: expected one of {{choice|uniform|loguniform|randint: [...]}}")
        kind, vals = next(iter(dist.items()))
        space[key] = makers[kind](vals)
    return space


def trial(config: dict) -> None:
    """One Tune trial: pretraining in rounds (each round resumes the same run dir), probe after each."""
    import ray.tune
    from mlflow.tracking import MlflowClient

    from pipeline import probe
    from pipeline.train.config import resolve
    from pipeline.train.launch import frontend_from_manifest, read_manifest, run_pretraining

    s = config["_static"]
    params = {k: v for k, v in config.items() if k != "_static"}
    if "model.ema.decay" in params:  # keep the anneal monotone: end decay ≥ start decay
        params.setdefault("model.ema.end_decay", max(params["model.ema.decay"], 0.9999))
    trial_dir = os.path.join(s["output"], "trials", ray.tune.get_context().get_trial_id())
    total = s["rounds"] * s["steps_per_round"]
    start = ray.tune.get_checkpoint()  # Tune-level resume: rounds already done
    done_rounds = 0
    if start is not None:
        with start.as_directory() as d:
            done_rounds = json.load(open(os.path.join(d, "round.json")))["round"]
    for r in range(done_rounds + 1, s["rounds"] + 1):
        cfg = resolve(s["modality"], s["data"], trial_dir, s["preset"], s["config"],
                      {**s["sets"], **params, "train.max_steps": total, "train.stop_at_step": r * s["steps_per_round"],
                       "train.checkpoint_every": s["steps_per_round"]},
                      model_frontend=frontend_from_manifest(read_manifest(s["data"], s["modality"])),
                      tracking_uri=s["tracking_uri"], experiment=s["experiment"],
                      parent_run_id=s["parent_run_id"])
        result = run_pretraining(cfg)
        if result.error:
            raise RuntimeError(f"trial pretraining failed: {result.error}")
        final = os.path.join(trial_dir, "final") if r == s["rounds"] else _round_encoder(result, trial_dir, cfg)
        xtr, ytr = probe.extract(s["probe_train"], final, s["modality"], actors=1)
        xte, yte = probe.extract(s["probe_test"], final, s["modality"], actors=1)
        res = probe.fit_probes(xtr, ytr, xte, yte)
        run_id = open(os.path.join(trial_dir, "mlflow_run_id")).read().strip()
        client = MlflowClient(tracking_uri=s["tracking_uri"])
        step = r * s["steps_per_round"]
        client.log_metric(run_id, "probe_accuracy", res["probe_accuracy"], step=step)
        client.log_metric(run_id, "knn_accuracy", res["knn_accuracy"], step=step)
        import tempfile
        with tempfile.TemporaryDirectory() as d:
            json.dump({"round": r}, open(os.path.join(d, "round.json"), "w"))
            ray.tune.report({"probe_accuracy": res["probe_accuracy"], "knn_accuracy": res["knn_accuracy"],
                             "step": step, "mlflow_run_id": run_id},
                            checkpoint=ray.tune.Checkpoint.from_directory(d))


def _round_encoder(result, trial_dir: str, cfg) -> str:
    """The encoder at the run's latest checkpoint (an unfinished run), saved as a loadable final/ dir."""
    from pipeline.model.data2vec import Data2Vec
    from pipeline.train.checkpoint import load_state, save_final
    with result.checkpoint.as_directory() as d:
        state = load_state(d)
    model = Data2Vec(cfg.model)
    model.load_state_dict(state["model"])
    out = os.path.join(trial_dir, f"round_{state['step']}")
    save_final(out, model, cfg.to_dict())
    return out


def plot(df, keys: list[str], path: str) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2), squeeze=False)
    for ax, k in zip(axes[0], keys):
        ax.scatter(df[f"config/{k}"], df["probe_accuracy"])
        ax.set_xlabel(k)
        ax.set_ylabel("probe accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.sweep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modality", required=True)
    p.add_argument("--data", required=True, help="preprocessed pretraining data")
    p.add_argument("--probe-train", required=True, help="labeled preprocessed data to fit the probe")
    p.add_argument("--probe-test", required=True, help="labeled preprocessed data to score it")
    p.add_argument("--num-samples", type=int, required=True, help="number of trials")
    p.add_argument("--max-concurrent", type=int, default=None, help="default: what the cluster's CPUs allow")
    p.add_argument("--search-space", default=None, help="YAML file (see above); default: EMA decay, mask ratio, top-K")
    p.add_argument("--output", default="runs/sweep", help="sweep folder (trials, Tune state, mlflow.db)")
    p.add_argument("--preset", default="demo")
    p.add_argument("--config", default=None, help="YAML config applied to every trial")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--rounds", type=int, default=2, help="probe/report points per trial (ASHA rungs)")
    p.add_argument("--steps-per-round", type=int, default=100)
    p.add_argument("--tracking-uri", default=None, help="default: sqlite:///SWEEP_DIR/mlflow.db")
    p.add_argument("--experiment", default="data2vec-sweep")
    a = p.parse_args(argv)
    try:
        from pipeline.train.config import load_yaml, parse_sets, resolve
        from pipeline.train.launch import frontend_from_manifest, read_manifest
        spec = DEFAULT_SPACE
        if a.search_space:
            if not os.path.isfile(a.search_space):
                raise ConfigError(f"search-space: {a.search_space!r} does not exist")
            spec = load_yaml(open(a.search_space).read())
        if a.num_samples < 1 or a.rounds < 1 or a.steps_per_round < 1:
            raise ConfigError("num-samples, rounds and steps-per-round must be >= 1")
        sets = parse_sets(a.sets)
        for d in (a.probe_train, a.probe_test):
            read_manifest(d, a.modality)
        # Validate one trial's config now (with the first value of each parameter), before Ray starts.
        probe_values = {k: (v.get("choice") or v.get("uniform") or v.get("loguniform") or v.get("randint"))[0]
                        for k, v in spec.items()}
        resolve(a.modality, a.data, os.path.join(a.output, "check"), a.preset, a.config, {**sets, **probe_values},
                model_frontend=frontend_from_manifest(read_manifest(a.data, a.modality)))
        space = tune_space(spec)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    import mlflow
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from pipeline.raycluster import init_ray
    out = os.path.abspath(a.output)
    os.makedirs(out, exist_ok=True)
    uri = a.tracking_uri or "sqlite:///" + os.path.join(out, "mlflow.db")
    per_trial = 1 + 1 + 1  # trial driver + one training worker + its Ray Data feed
    init_ray(num_cpus=max(os.cpu_count() or 1, per_trial * (a.max_concurrent or 1)), dashboard=True)
    cpus = int(ray.cluster_resources().get("CPU", 1))
    # Never more trials than the cluster can feed: each holds a driver CPU and a worker CPU, and
    # its Ray Data tasks need a free one — a sweep that takes every CPU starves its input and hangs.
    fit = max(1, cpus // per_trial)
    concurrent = min(a.max_concurrent or fit, fit)
    if a.max_concurrent and a.max_concurrent > fit:
        print(f"sweep: --max-concurrent {a.max_concurrent} lowered to {fit} ({cpus} CPUs, {per_trial} per trial)")

    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(a.experiment)
    parent_file = os.path.join(out, "mlflow_parent_run_id")
    parent_id = open(parent_file).read().strip() if os.path.exists(parent_file) else None
    parent = mlflow.start_run(run_id=parent_id, run_name=None if parent_id else f"sweep-{a.modality}")
    if not parent_id:
        open(parent_file, "w").write(parent.info.run_id)
        mlflow.log_params({"modality": a.modality, "num_samples": a.num_samples, "rounds": a.rounds,
                           "steps_per_round": a.steps_per_round, "search_space": json.dumps(spec),
                           "preset": a.preset, "sets": json.dumps(sets)})
    static = {"modality": a.modality, "data": os.path.abspath(a.data), "probe_train": os.path.abspath(a.probe_train),
              "probe_test": os.path.abspath(a.probe_test), "output": out, "preset": a.preset,
              "config": a.config, "sets": sets, "rounds": a.rounds, "steps_per_round": a.steps_per_round,
              "tracking_uri": uri, "experiment": a.experiment, "parent_run_id": parent.info.run_id}
    t0 = time.time()
    tune_dir = os.path.join(out, "tune")
    trainable = tune.with_resources(trial, {"CPU": 1})
    if tune.Tuner.can_restore(os.path.join(tune_dir, "sweep")):
        tuner = tune.Tuner.restore(os.path.join(tune_dir, "sweep"), trainable=trainable,
                                   resume_unfinished=True, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable, param_space={**space, "_static": static},
            tune_config=tune.TuneConfig(
                metric="probe_accuracy", mode="max", num_samples=a.num_samples, max_concurrent_trials=concurrent,
                scheduler=ASHAScheduler(max_t=a.rounds, grace_period=1, reduction_factor=2)),
            run_config=tune.RunConfig(name="sweep", storage_path=tune_dir))
    grid = tuner.fit()
    df = grid.get_dataframe(filter_metric="probe_accuracy", filter_mode="max")
    best = grid.get_best_result(metric="probe_accuracy", mode="max")
    best_params = {k: v for k, v in best.config.items() if k != "_static"}
    keys = list(spec)
    mlflow.log_dict(best_params, "best_config.json")
    mlflow.log_metric("best_probe_accuracy", best.metrics["probe_accuracy"])
    mlflow.set_tags({f"best.{k}": v for k, v in best_params.items()})
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        mlflow.log_artifact(plot(df, keys, os.path.join(d, "probe_vs_params.png")))
    mlflow.end_run()
    print(df[[f"config/{k}" for k in keys] + ["probe_accuracy", "training_iteration"]].to_string())
    print(f"{len(df)} trials, {grid.num_errors} errors, {time.time() - t0:.0f} s; MLflow: {uri}")
    print(json.dumps({"best_config": best_params, "probe_accuracy": best.metrics["probe_accuracy"],
                      "mlflow_parent_run_id": parent.info.run_id}))
    return 0 if grid.num_errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
