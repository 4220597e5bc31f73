"""Training state ↔ a checkpoint directory, and the final encoder as safetensors + JSON. No Ray.

Checkpoint dir: state.pt (model incl. teacher, optimizer, step, epoch, batch-in-epoch) and
config.json. Everything loads with torch.load(weights_only=True): no pickled code.
"""
from __future__ import annotations

import json
import os
import shutil

import torch

STATE = "state.pt"


def save_state(path: str, *, model, optimizer, step: int, epoch: int, batch_in_epoch: int,
               config: dict) -> None:
    os.makedirs(path, exist_ok=True)
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch}
    tmp = os.path.join(path, STATE + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, os.path.join(path, STATE))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)


def load_state(path: str) -> dict:
    return torch.load(os.path.join(path, STATE), map_location="cpu", weights_only=True)


def save_final(path: str, model, config: dict) -> None:
    """RUN_DIR/final/: model.safetensors (student encoder + front end, and the teacher encoder
    under `teacher_encoder.`) and config.json — written to a temp folder, then renamed."""
    from safetensors.torch import save_file

    tmp = path.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    keep = ("frontend.", "encoder.", "teacher_encoder.")
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if k.startswith(keep)}
    save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


def load_final(path: str, teacher: bool = False):
    """RUN_DIR/final → (Data2Vec with the saved weights, run config dict). `teacher=True` loads
    the teacher's encoder into the student encoder slot (for probing the teacher)."""
    from safetensors.torch import load_file

    from pipeline.model.config import ModelConfig
    from pipeline.model.data2vec import Data2Vec

    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    model = Data2Vec(ModelConfig.from_dict(config["model"]))
    tensors = load_file(os.path.join(path, "model.safetensors"))
    if teacher:
        tensors.update({k[len("teacher_"):]: v for k, v in tensors.items() if k.startswith("teacher_encoder.")})
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    bad = [k for k in missing if k.startswith(("frontend.", "encoder."))]
    if bad or unexpected:
        raise ValueError(f"{path}: checkpoint does not match its config (missing {bad[:3]}, unexpected {unexpected[:3]})")
    return model.eval(), config
