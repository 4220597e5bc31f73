"""Driver side of pretraining: check the data and the validation/probe folders, list the data's
chunks, run the TorchTrainer with pretraining's worker loop (worker.py). Paths may be local
folders or URIs (pyarrow.fs)."""
from __future__ import annotations


from pipeline import storage
from pipeline.config import ConfigError
from pipeline.pretrain.worker import train_loop_per_worker
from pipeline.train.config import RunConfig
from pipeline.train.launch import fit, read_manifest
from pipeline.train.stream import CHUNK_ROWS, COLUMNS, list_chunks, pack_chunks, split_chunks
from pipeline.train.tracking import prepare_experiment


def data_chunks(cfg: RunConfig) -> tuple[list, list]:
    """(training chunks, validation chunks): the validation chunks are --val-data's, or a seeded
    train.val_fraction of the data's own chunks (held out of training)."""
    cols = COLUMNS[cfg.modality]
    chunks = list_chunks(cfg.data, cols)
    if cfg.val_data:
        return chunks, list_chunks(cfg.val_data, cols)
    if cfg.train.val_fraction <= 0:
        return chunks, []
    return split_chunks(chunks, cfg.train.val_fraction, cfg.train.seed)


def check_data(cfg: RunConfig) -> None:
    """The validation and probe folders exist, hold this modality, and leave training data (before
    Ray starts)."""
    for key in ("val_data", "probe_train", "probe_test"):
        if getattr(cfg, key):
            m = read_manifest(getattr(cfg, key), cfg.modality)
            if key != "val_data" and not m.get("labels"):
                raise ConfigError(f"{key}: {getattr(cfg, key)!r} holds no labeled rows")
    if bool(cfg.probe_train) != bool(cfg.probe_test):
        raise ConfigError("probe_train: --probe-train and --probe-test go together")
    if cfg.train.val_fraction > 0 and cfg.val_data:
        raise ConfigError("train.val_fraction: set it or --val-data, not both")
    if cfg.train.val_fraction > 0:
        n = len(list_chunks(cfg.data, COLUMNS[cfg.modality]))
        if n < 2:
            raise ConfigError(f"train.val_fraction: {cfg.data!r} has {n} chunk(s) of {CHUNK_ROWS} rows; "
                              f"nothing can be held out — pass --val-data")


def run_pretraining(cfg: RunConfig, fault: dict | None = None, tags: dict | None = None):
    """Run (or resume) the pretraining described by `cfg` on the connected Ray cluster; `tags`
    go onto its MLflow run (e.g. the memory pre-flight's choice)."""
    import dataclasses

    fs, out = storage.resolve(cfg.output)
    fs.create_dir(out, recursive=True)
    storage.write_json(fs, f"{out}/config.json", cfg.to_dict(), sort_keys=True)
    if cfg.tracking_uri:
        prepare_experiment(cfg.tracking_uri, cfg.experiment)  # absolute artifact location, chosen here
    # Each worker streams its own seeded share of these chunks with Ray Data (stream.py): only
    # Parquet metadata is read here.
    chunks, val_chunks = data_chunks(cfg)
    return fit(train_loop_per_worker, "pretrain", cfg.train, cfg.output,
               {"run": cfg.to_dict(), "fault": fault, "tags": tags or {}, "chunks": pack_chunks(chunks),
                "val_chunks": [dataclasses.asdict(c) for c in val_chunks]})
