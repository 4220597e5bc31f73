"""A Ray Tune sweep of pretraining settings judged on a probe's validation split: the trial (a
pretraining run in rounds, each followed by the validation probe), the Tune run under one MLflow
parent run, and the choice of the best trial, whose test accuracy is measured once. The command
and its options: jobs/sweep.py."""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time

from pipeline import storage
from pipeline.config import ConfigError
from pipeline.raycluster import print_result

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


METRIC = "val_probe_accuracy"  # what Tune and ASHA rank trials by


def trial(config: dict, tracking_uri: str, static: dict | None = None) -> None:
    """One Tune trial: pretraining in rounds (each round resumes the same run dir), probe after each.
    `static`: the sweep's paths and settings, passed beside the search space (Tune writes the space
    into its state files; paths may carry URI credentials)."""
    import ray.tune
    from mlflow.tracking import MlflowClient

    from pipeline.train.config import resolve
    from pipeline.train.launch import fit_error, frontend_from_manifest, read_manifest
    from pipeline.pretrain.launch import run_pretraining

    storage.guard_console()
    s = static or config["_static"]  # "_static": sweeps started before it moved out of the space
    params = {k: v for k, v in config.items() if k != "_static"}
    if "model.ema.decay" in params:  # keep the anneal monotone: end decay ≥ start decay
        params.setdefault("model.ema.end_decay", max(params["model.ema.decay"], 0.9999))
    trial_dir = storage.join(s["output"], "trials", ray.tune.get_context().get_trial_id())
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
                      tracking_uri=tracking_uri, experiment=s["experiment"],
                      parent_run_id=s["parent_run_id"])
        result, error = fit_error(lambda: run_pretraining(cfg))
        if error:
            raise RuntimeError(f"trial pretraining failed: {error}")
        final = storage.join(trial_dir, "final") if r == s["rounds"] else round_encoder(result, trial_dir, cfg)
        res = validation_probe(s, final)
        run_id = storage.read_text(*storage.resolve(storage.join(trial_dir, "mlflow_run_id"))).strip()
        client = MlflowClient(tracking_uri=tracking_uri)
        step = r * s["steps_per_round"]
        client.log_metric(run_id, "val_probe_accuracy", res["probe_accuracy"], step=step)
        client.log_metric(run_id, "val_knn_accuracy", res["knn_accuracy"], step=step)
        with tempfile.TemporaryDirectory() as d:
            json.dump({"round": r}, open(os.path.join(d, "round.json"), "w"))
            ray.tune.report({"val_probe_accuracy": res["probe_accuracy"], "val_knn_accuracy": res["knn_accuracy"],
                             "step": step, "mlflow_run_id": run_id, "final": storage.shown(final)},
                            checkpoint=ray.tune.Checkpoint.from_directory(d))


VAL_FRACTION = 0.25  # of --probe-train, held out of the probe's fit when no --probe-val is given


def validation_probe(s: dict, final: str) -> dict:
    """The encoder's probe accuracy on the validation split (never the test split)."""
    from pipeline import probe

    if s["probe_val"]:
        (x, y), (xv, yv) = probe.extract([s["probe_train"], s["probe_val"]], final, s["modality"], actors=1)
        return probe.fit_probes(x, y, xv, yv)
    [(x, y)] = probe.extract([s["probe_train"]], final, s["modality"], actors=1)
    fit, val = probe.stratified_split(y, VAL_FRACTION, seed=0)
    return probe.fit_probes(x[fit], y[fit], x[val], y[val])


def round_encoder(result, trial_dir: str, cfg) -> str:
    """The encoder at the run's latest checkpoint (an unfinished run), saved as a loadable final/ dir."""
    from pipeline.model.data2vec import Data2Vec
    from pipeline.train.checkpoint import load_state, save_final
    with result.checkpoint.as_directory() as d:
        state = load_state(d)
    model = Data2Vec(cfg.model)
    model.load_state_dict(state["model"])
    out = storage.join(trial_dir, f"round_{state['step']}")
    save_final(out, model, cfg.to_dict())
    return out


def plot(df, keys: list[str], path: str) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2), squeeze=False)
    for ax, k in zip(axes[0], keys):
        ax.scatter(df[f"config/{k}"], df[METRIC])
        ax.set_xlabel(k)
        ax.set_ylabel("validation probe accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def run_sweep(a, spec: dict, sets: dict, out: str, uri: str, concurrent: int, per_trial: dict, browse: str,
              artifact_location: str | None = None) -> int:
    """The Tune run of a sweep (or its resume) under one MLflow parent run → the exit code. `a`: the
    sweep command's arguments (jobs.sweep); `browse`: the tracking URI users browse afterwards (the
    store itself when `uri` is the sweep's own server)."""
    import mlflow
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from pipeline.train.tracking import prepare_experiment

    space = tune_space(spec)
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(experiment_id=prepare_experiment(uri, a.experiment, artifact_location))
    parent_file = storage.join(out, "mlflow_parent_run_id")
    parent_id = storage.read_text(*storage.resolve(parent_file)).strip() if storage.is_file(parent_file) else None
    parent = mlflow.start_run(run_id=parent_id, run_name=None if parent_id else f"sweep-{a.modality}")
    if not parent_id:
        storage.write_text(*storage.resolve(parent_file), parent.info.run_id)
        mlflow.log_params(storage.redact({"modality": a.modality, "num_samples": a.num_samples, "rounds": a.rounds,
                           "steps_per_round": a.steps_per_round, "search_space": json.dumps(spec),
                           "preset": a.preset, "sets": json.dumps(sets), "trial_resources": json.dumps(per_trial),
                           "max_concurrent_trials": concurrent}))
    static = {"modality": a.modality, "data": storage.canonical(a.data), "probe_train": storage.canonical(a.probe_train),
              "probe_val": storage.canonical(a.probe_val) if a.probe_val else None, "output": out,
              "preset": a.preset, "config": a.config, "sets": sets, "rounds": a.rounds,
              "steps_per_round": a.steps_per_round, "experiment": a.experiment, "parent_run_id": parent.info.run_id}
    t0 = time.time()
    tune_fs, tune_dir = storage.resolve(storage.join(out, "tune"))
    # The tracking URI is a parameter, not part of the (restored) search space: a resumed sweep's
    # server listens on another port.
    trainable = tune.with_resources(tune.with_parameters(trial, tracking_uri=uri, static=static), {"CPU": 1})
    if tune.Tuner.can_restore(f"{tune_dir}/sweep", storage_filesystem=tune_fs):
        tuner = tune.Tuner.restore(f"{tune_dir}/sweep", trainable=trainable, resume_unfinished=True,
                                   resume_errored=True, storage_filesystem=tune_fs)
    else:
        tuner = tune.Tuner(
            trainable, param_space=space,
            tune_config=tune.TuneConfig(
                metric=METRIC, mode="max", num_samples=a.num_samples, max_concurrent_trials=concurrent,
                scheduler=ASHAScheduler(max_t=a.rounds, grace_period=1, reduction_factor=2)),
            run_config=tune.RunConfig(name="sweep", storage_path=tune_dir, storage_filesystem=tune_fs))
    try:
        return choose(a, spec, tuner.fit(), t0, browse, parent.info.run_id)
    except BaseException:
        mlflow.end_run(status="FAILED")
        raise


def choose(a, spec: dict, grid, t0: float, browse: str, parent_id: str) -> int:
    """The best trial by the validation probe → its test accuracy, once; the parent run ends
    FINISHED, or FAILED (exit code 1) when a trial failed — each failure's error printed."""
    import mlflow

    from pipeline import probe
    from pipeline.train.launch import error_line
    from pipeline.train.tracking import ui_hint

    hint, url = ui_hint(browse, a.experiment)

    for e in grid.errors:
        print(f"error: a trial failed: {error_line(e)}", file=sys.stderr)
    if not any(METRIC in (r.metrics or {}) for r in grid):
        print(f"error: no trial finished a round ({grid.num_errors} failed)\n{hint}", file=sys.stderr)
        mlflow.end_run(status="FAILED")
        return 1
    df = grid.get_dataframe(filter_metric=METRIC, filter_mode="max")
    best = grid.get_best_result(metric=METRIC, mode="max")
    best_params = {k: v for k, v in best.config.items() if k != "_static"}
    # The test split, once: the chosen configuration's final encoder, its probe fitted on all of
    # --probe-train.
    (xtr, ytr), (xte, yte) = probe.extract([a.probe_train, a.probe_test], storage.reattach(best.metrics["final"], a.output),
                                               a.modality)
    test = probe.fit_probes(xtr, ytr, xte, yte)
    keys = list(spec)
    mlflow.log_dict(best_params, "best_config.json")
    mlflow.log_metrics({"best_val_probe_accuracy": best.metrics[METRIC],
                        "test_probe_accuracy": test["probe_accuracy"], "test_knn_accuracy": test["knn_accuracy"]})
    mlflow.set_tags({f"best.{k}": v for k, v in best_params.items()})
    with tempfile.TemporaryDirectory() as d:
        mlflow.log_artifact(plot(df, keys, os.path.join(d, "val_probe_vs_params.png")))
    mlflow.end_run(status="FAILED" if grid.num_errors else "FINISHED")
    print(df[[f"config/{k}" for k in keys] + [METRIC, "training_iteration"]].to_string())
    print(f"{len(df)} trials, {grid.num_errors} errors, {time.time() - t0:.0f} s; chosen on the validation split "
          f"({best.metrics[METRIC]:.3f}); its test accuracy {test['probe_accuracy']:.3f}\n{hint}")
    print_result({"best_config": best_params, "val_probe_accuracy": best.metrics[METRIC],
                  "test_probe_accuracy": test["probe_accuracy"], "mlflow_parent_run_id": parent_id, "mlflow_ui": url})
    return 0 if grid.num_errors == 0 else 1
