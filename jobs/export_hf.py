"""Export RUN_DIR/final as a Hugging Face `transformers` model directory.

    python -m jobs.export_hf --checkpoint RUN_DIR/final --output DIR [--teacher]

audio → Data2VecAudioModel, text → Data2VecTextModel (+ tokenizer), image (data2vec 1.0, pre-LN)
→ Data2VecVisionModel. A jobs.finetune FT_DIR/final exports as its task class:
Data2VecVisionForImageClassification, Data2VecAudioForSequenceClassification, Data2VecAudioForCTC
(+ vocab.json / processor), Data2VecTextForSequenceClassification. Refuses, with the reason, where the architecture does not map exactly.
--checkpoint and --output may be paths or URIs (s3://, gs://, file://): the folder is written
locally first, then copied. Then: `transformers.AutoModel.from_pretrained(DIR)`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

from pipeline import storage


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.export_hf", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=storage.path_arg, required=True, help="RUN_DIR/final (pretraining) or FT_DIR/final (fine-tuning)")
    p.add_argument("--output", type=storage.path_arg, required=True)
    p.add_argument("--teacher", action="store_true", help="export the EMA teacher's encoder")
    a = p.parse_args(argv)
    if not storage.is_file(storage.join(a.checkpoint, "model.safetensors")):
        print(f"error: checkpoint: {a.checkpoint!r} has no model.safetensors (pass RUN_DIR/final)", file=sys.stderr)
        return 2
    from pipeline.export_hf import NotRepresentable, export, export_finetuned
    from pipeline.train.checkpoint import load_final, load_finetuned
    cfg = storage.read_json(storage.join(a.checkpoint, "config.json"))
    task = cfg.get("finetune", {}).get("task")
    data = cfg.get("train_data") or cfg.get("data")
    with tempfile.TemporaryDirectory() as tmp:
        tok = None
        if cfg["modality"] == "text":  # the data's tokenizer, as a local file for transformers
            tok = os.path.join(tmp, "tokenizer.json")
            with open(tok, "wb") as f:
                f.write(storage.read_bytes(storage.join(storage.reattach(data, a.checkpoint), "tokenizer.json")))
        local = storage.local_path(a.output) or os.path.join(tmp, "export")
        try:
            if task:  # a jobs.finetune FT_DIR/final
                model, ft = load_finetuned(a.checkpoint)
                hf = export_finetuned(model, ft.labels, local, tok)
            else:
                model, _ = load_final(a.checkpoint, teacher=a.teacher)
                hf = export(model, local, tok)
        except NotRepresentable as e:
            print(f"error: cannot export {cfg['modality']} ({cfg['model']['mode']}): {e}", file=sys.stderr)
            return 2
        if storage.local_path(a.output) is None:
            import pyarrow.fs as pafs

            fs, root = storage.resolve(a.output)
            fs.create_dir(root, recursive=True)
            pafs.copy_files(local, root, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    print(json.dumps({"exported": a.output, "modality": cfg["modality"], "task": task,
                      "class": type(hf).__name__}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
