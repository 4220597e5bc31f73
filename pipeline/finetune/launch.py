"""Driver side of fine-tuning: read and check the labeled folders, fix the architecture (from
--init or the preset), build the class list or CTC vocabulary, write the label-fraction subset,
then run `finetune_loop_per_worker` on Ray Train. Everything that can be wrong fails here, before
Ray starts, naming the flag or field."""
from __future__ import annotations

import dataclasses
import json

from pipeline import storage
from pipeline.config import ConfigError
from pipeline.model.config import ModelConfig
from pipeline.recipes import recipe
from pipeline.finetune.tasks import build_vocab, target_column, write_fraction
from pipeline.train.config import FineTuneConfig, resolve_finetune
from pipeline.train.launch import check_resume, fit, frontend_from_manifest, read_manifest
from pipeline.train.stream import COLUMNS, list_chunks, pack_chunks

SPLITS = {"train_data": "--train-data", "val_data": "--val-data", "test_data": "--test-data"}


def column_values(data: str, column: str) -> list:
    """One column of every row of a preprocessed folder (Parquet, read on the driver)."""
    import pyarrow.dataset as pads

    fs, root = storage.resolve(data)
    ds = pads.dataset(f"{root}/shards", filesystem=fs, format="parquet")
    if column not in ds.schema.names:
        return []
    return ds.to_table(columns=[column]).column(0).to_pylist()


def targets_of(manifests: dict, task: str, modality: str, paths: dict) -> list[str]:
    """The class names (classify) or the character vocabulary (ctc), checked on every split."""
    if task == "ctc":
        if modality != "audio":
            raise ConfigError(f"task: ctc needs --modality audio, got {modality}")
        texts = {}
        for key, flag in SPLITS.items():
            texts[key] = [t for t in column_values(paths[key], "transcript") if t and str(t).strip()]
            if not texts[key]:
                raise ConfigError(f"{flag.lstrip('-').replace('-', '_')}: {paths[key]!r} holds no transcripts "
                                  f"(a .txt beside each clip, or transcripts.tsv/.jsonl; see jobs.preprocess)")
        return build_vocab(texts["train_data"])
    labels = manifests["train_data"].get("labels") or []
    if len(labels) < 2:
        raise ConfigError(f"train_data: {paths['train_data']!r} needs labeled rows of at least 2 classes "
                          f"(DIR/<class>/<file>), has {labels}")
    for key in ("val_data", "test_data"):
        extra = sorted(set(manifests[key].get("labels") or []) - set(labels))
        if not manifests[key].get("labels"):
            raise ConfigError(f"{key}: {paths[key]!r} holds no labeled rows")
        if extra:
            raise ConfigError(f"{key}: classes {extra[:5]} do not occur in --train-data")
    return labels


def architecture(modality: str, init: str, mode: str, preset: str, frontend: dict) -> ModelConfig:
    """The model to fine-tune: the --init checkpoint's architecture, or the preset's for scratch."""
    base = recipe(modality, mode, preset, **frontend).model
    if init == "scratch":
        return base
    # Pretraining targets play no part in fine-tuning: top-K 1 fits a checkpoint of any depth.
    base = dataclasses.replace(base, target=dataclasses.replace(base.target, top_k=1))
    from pipeline.init_weights import NotRepresentable, init_model_config, read_init

    try:
        ck = read_init(init)
        if ck.modality != modality:
            raise ConfigError(f"init: {init!r} holds a {ck.modality} model, not {modality}")
        model = init_model_config(base, ck)
    except (NotRepresentable, ValueError, FileNotFoundError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"init: {init!r} cannot be used: {e}") from None
    for k, v in frontend.items():
        if getattr(model.frontend, k) != v:
            raise ConfigError(f"init: {init!r} was trained with {k}={getattr(model.frontend, k)} but the data has {v}")
    return model


def build(args, sets: dict) -> FineTuneConfig:
    """argparse namespace (jobs.finetune) + parsed --set overrides → the validated config."""
    paths = {k: getattr(args, k) for k in SPLITS}
    manifests = {k: read_manifest(p, args.modality) for k, p in paths.items()}
    frontend = frontend_from_manifest(manifests["train_data"])
    for key in ("val_data", "test_data"):
        if frontend_from_manifest(manifests[key]) != frontend:
            raise ConfigError(f"{key}: preprocessed with other settings ({frontend_from_manifest(manifests[key])}) "
                              f"than --train-data ({frontend}); preprocess it the same way (e.g. --tokenizer)")
    if args.init != "scratch" and not storage.exists(*storage.resolve(args.init)):
        raise ConfigError(f"init: {args.init!r} does not exist (pass RUN_DIR/final, a Hugging Face folder or scratch)")
    model = architecture(args.modality, args.init, sets.pop("model.mode", "d2v2"), args.preset, frontend)
    labels = targets_of(manifests, args.task, args.modality, paths)
    cfg = resolve_finetune(modality=args.modality, task=args.task, init=args.init, model=model, labels=labels,
                           preset_name=args.preset, config_file=args.config, overrides=sets,
                           tracking_uri=args.tracking_uri, experiment=args.experiment, output=args.output,
                           parent_run_id=getattr(args, "parent_run_id", None), **paths)
    for k, v in frontend.items():  # the data fixes these, for any init
        if getattr(cfg.model.frontend, k) != v:
            raise ConfigError(f"model.frontend.{k}: {getattr(cfg.model.frontend, k)} in the config but the data in "
                              f"{args.train_data!r} has {v}; drop it from the config (it comes from the data)")
    if args.init != "scratch":  # --set may tune dropout, not the checkpoint's shapes
        for part in ("encoder", "frontend"):
            ours, theirs = getattr(cfg.model, part), getattr(model, part)
            for k in (x.name for x in dataclasses.fields(ours)):
                if k not in ("dropout", "attn_dropout") and getattr(ours, k) != getattr(theirs, k):
                    raise ConfigError(f"model.{part}.{k}: {getattr(ours, k)} differs from the --init "
                                      f"checkpoint's {getattr(theirs, k)}")
    return cfg


def training_data(cfg: FineTuneConfig) -> str:
    """--train-data, or its seeded label-fraction subset (written once under FT_DIR/subsets); rows
    without a label or transcript are left out the same way."""
    f = cfg.finetune
    col = target_column(f.task)
    values = column_values(cfg.train_data, col)
    if f.label_fraction >= 1 and all(v is not None and str(v).strip() for v in values):
        return cfg.train_data
    sub = storage.join(cfg.output, f"subsets/{col}-{f.label_fraction:g}-seed{cfg.train.seed}")
    fs, root = storage.resolve(sub)
    if not storage.exists(fs, f"{root}/manifest.json"):
        m = write_fraction(cfg.train_data, sub, col, f.label_fraction, cfg.train.seed, stratified=f.task == "classify")
        print(f"label fraction {f.label_fraction:g}: {m['counts']['written']} of {m['subset_of']['rows_with_target']} "
              f"labeled rows → {sub}", flush=True)
    return sub


def training_chunks(cfg: FineTuneConfig) -> list:
    """The chunks the workers stream (label-fraction subset included), checked to hold at least one
    full step (the effective batch) per epoch (before Ray starts)."""
    t = cfg.train
    chunks = list_chunks(training_data(cfg), COLUMNS[cfg.modality] + [target_column(cfg.finetune.task)])
    rows = sum(c.rows for c in chunks)
    if rows < t.effective_batch:
        raise ConfigError(f"train.batch_size: {rows} training rows (label fraction {cfg.finetune.label_fraction:g}) "
                          f"are fewer than one step's effective batch {t.effective_batch} ({t.batch_line()}); "
                          f"lower train.batch_size (or train.reference_batch) or use more labels")
    return chunks


def finished(cfg: FineTuneConfig) -> dict | None:
    """FT_DIR/final/metrics.json of a run that already finished (the test split is scored once)."""
    fs, root = storage.resolve(cfg.output)
    path = f"{root}/final/metrics.json"
    return json.loads(storage.read_text(fs, path)) if storage.exists(fs, path) else None


def run_finetuning(cfg: FineTuneConfig, chunks: list | None = None, tags: dict | None = None):
    """Run (or resume) the fine-tuning described by `cfg` on the connected Ray cluster."""
    from pipeline.finetune.worker import finetune_loop_per_worker
    from pipeline.train.tracking import prepare_experiment

    chunks = training_chunks(cfg) if chunks is None else chunks
    fs, out = storage.resolve(cfg.output)
    fs.create_dir(out, recursive=True)
    storage.write_json(fs, f"{out}/config.json", cfg.to_dict(), sort_keys=True)
    if cfg.tracking_uri:
        prepare_experiment(cfg.tracking_uri, cfg.experiment)
    return fit(finetune_loop_per_worker, "finetune", cfg.train, cfg.output,
               {"run": cfg.to_dict(), "chunks": pack_chunks(chunks), "tags": tags or {}})


def check(cfg: FineTuneConfig, allow_change: bool = False) -> tuple[FineTuneConfig, str | None]:
    """Before Ray starts: a step must fit in a worker (else smaller micro-batches, the same
    effective batch: memory.fit_memory) and a resume must not change the schedule. Returns the
    config to run and the memory line to print (None when the recipe's batch fits)."""
    from pipeline.train.memory import fit_memory

    cfg, line = fit_memory(cfg)
    check_resume(cfg, allow_change, name="finetune")
    return cfg, line
