"""Training state ↔ a checkpoint directory, and the final encoder as safetensors + JSON. No Ray.

Checkpoint dir: state.pt (model incl. teacher, optimizer, and where to resume: step, epoch,
batch-in-epoch, LR scale and rollbacks) and config.json. Everything loads with torch.load(weights_only=True): no pickled code.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile

import torch

STATE = "state.pt"


def save_state(path: str, *, model, optimizer, config: dict, **position) -> None:
    """`position`: step, epoch, step_in_epoch and the task's own fields (loop.py) — where to resume."""
    from pipeline import storage

    os.makedirs(path, exist_ok=True)
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), **position}
    tmp = os.path.join(path, STATE + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, os.path.join(path, STATE))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(storage.redact(config), f, indent=2, sort_keys=True)


def load_state(path: str) -> dict:
    return torch.load(os.path.join(path, STATE), map_location="cpu", weights_only=True)


def save_final(path: str, model, config: dict) -> None:
    """RUN_DIR/final/ (a path or URI): model.safetensors with the whole model — student front end,
    encoder and 1.0 head / 2.0 decoder, and the teacher's own parts (`teacher_encoder.`,
    `teacher_frontend.`) — everything needed to continue training, and config.json. Written to a
    temp folder, then moved into place (copied through pyarrow.fs for object stores)."""
    import pyarrow.fs as pafs
    from safetensors.torch import save_file

    from pipeline import storage

    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    local = storage.local_path(path)
    tmp = (local.rstrip("/") + ".tmp") if local else None
    with tempfile.TemporaryDirectory() as scratch:
        tmp = tmp or os.path.join(scratch, "final")
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(storage.redact(config), f, indent=2, sort_keys=True)
        if local:
            shutil.rmtree(local, ignore_errors=True)
            os.replace(tmp, local)
        else:
            fs, root = storage.resolve(path)
            fs.create_dir(root, recursive=True)
            pafs.copy_files(tmp, root, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def load_final(path: str, teacher: bool = False):
    """RUN_DIR/final → (Data2Vec with the saved weights, run config dict). `teacher=True` puts the
    teacher's weights into the student's slots — its encoder and, where the teacher owns them
    (EMAConfig.ema_local / ema_context), its front-end parts — for probing or exporting the teacher.
    Older final/ folders (front end + encoders only) load too."""
    from safetensors.torch import load

    from pipeline import storage
    from pipeline.model.config import ModelConfig
    from pipeline.model.data2vec import Data2Vec

    fs, root = storage.resolve(path)
    config = json.loads(storage.read_text(fs, f"{root}/config.json"))
    model = Data2Vec(ModelConfig.from_dict(config["model"]))
    with fs.open_input_stream(f"{root}/model.safetensors") as f:
        tensors = load(f.read())
    if teacher:
        for prefix in ("teacher_encoder.", "teacher_frontend."):
            tensors.update({k[len("teacher_"):]: v for k, v in tensors.items() if k.startswith(prefix)})
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    bad = [k for k in missing if k.startswith(("frontend.", "encoder."))]
    if bad or unexpected:
        raise ValueError(f"{path}: checkpoint does not match its config (missing {bad[:3]}, unexpected {unexpected[:3]})")
    return model.eval(), config


def load_finetuned(path: str):
    """FT_DIR/final → (FineTuneModel with the saved weights, eval mode; its FineTuneConfig)."""
    from safetensors.torch import load

    from pipeline import storage
    from pipeline.model.finetune import FineTuneModel
    from pipeline.train.config import FineTuneConfig

    fs, root = storage.resolve(path)
    cfg = FineTuneConfig.from_dict(json.loads(storage.read_text(fs, f"{root}/config.json")))
    model = FineTuneModel.for_task(cfg.model, cfg.finetune, len(cfg.labels))
    with fs.open_input_stream(f"{root}/model.safetensors") as fh:
        model.load_finetuned(load(fh.read()))
    return model.eval(), cfg
