"""Linear-probe and kNN accuracy of a frozen pretrained encoder on labeled preprocessed shards.

    python -m jobs.evaluate --checkpoint RUN_DIR/final --train-data LABELED_DIR --test-data LABELED_DIR
    python -m jobs.evaluate --random-init --checkpoint RUN_DIR/final ...   (same architecture, fresh weights)
    python -m jobs.evaluate --classical --train-data ... --test-data ...   (pixels / MFCC / TF-IDF baseline)

Prints one JSON line last: {"probe_accuracy", "knn_accuracy", "n_train", "n_test", ...}; logs it to
the pretraining run in MLflow (RUN_DIR/mlflow_run_id) unless --no-mlflow.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from pipeline import storage
from pipeline.raycluster import print_result
from pipeline.config import ConfigError


def parse(argv=None):
    p = argparse.ArgumentParser(prog="python -m jobs.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=storage.path_arg, default=None, help="RUN_DIR/final of a pretraining run (path or URI)")
    p.add_argument("--train-data", type=storage.path_arg, required=True, help="labeled preprocessed folder for fitting the probe")
    p.add_argument("--test-data", type=storage.path_arg, required=True, help="labeled preprocessed folder for scoring it")
    p.add_argument("--random-init", action="store_true", help="probe the same architecture at random init")
    p.add_argument("--classical", action="store_true", help="raw-input baseline instead of an encoder")
    p.add_argument("--layers", default="-1", help="comma-separated block indices to average; -1 = final")
    p.add_argument("--teacher", action="store_true", help="probe the EMA teacher's encoder")
    p.add_argument("--tracking-uri", default=None, help="MLflow URI of the pretraining run")
    p.add_argument("--no-mlflow", action="store_true")
    a = p.parse_args(argv)
    for name in ("train_data", "test_data"):
        d = getattr(a, name)
        if not storage.is_file(storage.join(d, "manifest.json")):
            raise ConfigError(f"{name.replace('_', '-')}: {d!r} is not a preprocessed folder (no manifest.json)")
    config = None
    if not a.classical:
        if not a.checkpoint or not storage.is_file(storage.join(a.checkpoint, "model.safetensors")):
            raise ConfigError(f"checkpoint: {a.checkpoint!r} has no model.safetensors (pass RUN_DIR/final)")
        config = storage.read_json(storage.join(a.checkpoint, "config.json"))
    a.modality = check_compatible({"train-data": a.train_data, "test-data": a.test_data}, config)
    try:
        a.layers = tuple(int(x) for x in a.layers.split(","))
    except ValueError:
        raise ConfigError(f"layers: expected comma-separated integers, got {a.layers!r}") from None
    if config is not None:
        depth = config["model"]["encoder"]["depth"]
        bad = [i for i in a.layers if not -1 <= i < depth]
        if bad:
            raise ConfigError(f"layers: {bad} out of range for an encoder of depth {depth} (0..{depth - 1}, or -1)")
    return a


_TOKENIZER_FIX = "preprocess it with --tokenizer PRETRAINING_DATA/tokenizer.json"
# What to tell the user when labeled data was preprocessed with other data-derived front-end settings
# (the keys of pipeline.train.launch.frontend_from_manifest) than the checkpoint's.
_MISMATCH = {
    "image_size": "images are {have} px but the encoder takes {want} px; preprocess with --image-size {want}",
    "vocab_size": "tokenized with a {have}-token vocabulary but the encoder has {want}; " + _TOKENIZER_FIX,
    "mask_id": "tokenized with <mask> = {have} but the encoder's is {want}; " + _TOKENIZER_FIX,
}


def check_compatible(dirs: dict[str, str], config: dict | None) -> str:
    """Fail before any work when labeled folders ({"train-data": dir, "test-data": dir}) cannot be
    probed with this checkpoint's config (None = no encoder): mixed modalities, no labels, other
    data-derived front-end settings (image size, vocabulary), or text tokenized with another
    tokenizer than the pretraining data. Returns the modality."""
    from pipeline.train.launch import frontend_from_manifest, refuse_raw_pixels

    manifests = {name: storage.read_json(storage.join(d, "manifest.json")) for name, d in dirs.items()}
    modality = config["model"]["modality"] if config else next(iter(manifests.values()))["modality"]
    against = "the checkpoint is a {} encoder" if config else "the other split holds {} rows"
    for name, m in manifests.items():
        if m["modality"] != modality:
            raise ConfigError(f"{name}: holds {m['modality']} rows but {against.format(modality)}")
        refuse_raw_pixels(m, dirs[name])
        if not m.get("labels"):
            raise ConfigError(f"{name}: {dirs[name]!r} has no labels; preprocess a folder laid out as "
                              "DIR/<class>/<file> to get a label column")
        if config is None:
            continue
        fe = config["model"]["frontend"]
        for key, have in frontend_from_manifest(m).items():
            if have != fe.get(key, 4 if key == "mask_id" else None):  # configs before mask_id had <mask> = 4
                raise ConfigError(f"{name}: " + _MISMATCH[key].format(have=have, want=fe[key]))
        pretrained_on = storage.reattach(config.get("data", ""), *dirs.values())  # written with ***
        ours, theirs = (storage.join(d, "tokenizer.json") for d in (dirs[name], pretrained_on))
        if modality == "text" and config.get("data") and storage.is_file(ours) and storage.is_file(theirs) \
                and storage.read_bytes(ours) != storage.read_bytes(theirs):
            raise ConfigError(f"{name}: tokenized with another tokenizer than the pretraining data's "
                              f"({theirs}); {_TOKENIZER_FIX}")
    return modality


def evaluate(a) -> dict:
    from pipeline import probe
    modality = a.modality
    t0 = time.time()
    if a.classical:
        res = probe.classical_probe(a.train_data, a.test_data, modality)
        res["encoder"] = "classical"
    else:
        kw = dict(random_init=a.random_init, layers=a.layers, teacher=a.teacher)
        (xtr, ytr), (xte, yte) = probe.extract([a.train_data, a.test_data], a.checkpoint, modality, **kw)
        res = probe.fit_probes(xtr, ytr, xte, yte)
        res["encoder"] = "random-init" if a.random_init else ("teacher" if a.teacher else "pretrained")
    res.update(modality=modality, seconds=round(time.time() - t0, 1))
    return res


def log_to_mlflow(a, res: dict) -> None:
    run_dir = storage.parent(a.checkpoint)
    id_file = storage.join(run_dir, "mlflow_run_id")
    if a.no_mlflow or a.classical or not storage.is_file(id_file):
        return
    import mlflow
    from pipeline.train.tracking import default_tracking_uri
    uri = a.tracking_uri
    if uri is None:
        # Written with its credentials as ***: those of MLFLOW_TRACKING_URI for the same server, or
        # none (MLflow then reads MLFLOW_TRACKING_USERNAME / _PASSWORD from the environment).
        uri = storage.reattach(storage.read_json(storage.join(run_dir, "config.json")).get("tracking_uri") or "",
                               os.environ.get("MLFLOW_TRACKING_URI")) or default_tracking_uri(run_dir)
    if uri is None:
        return  # an object-store run with no tracking server named: nothing to log into
    mlflow.set_tracking_uri(uri)
    prefix = f"probe.{res['encoder']}."
    with mlflow.start_run(run_id=storage.read_text(*storage.resolve(id_file)).strip()):
        mlflow.log_metrics({prefix + k: res[k] for k in ("probe_accuracy", "knn_accuracy")})


def main(argv=None) -> int:
    try:
        a = parse(argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from pipeline.raycluster import init_ray
    init_ray()
    res = evaluate(a)
    if a.checkpoint:
        log_to_mlflow(a, res)
    print_result(res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
