"""Export RUN_DIR/final as a Hugging Face `transformers` model directory.

    python -m jobs.export_hf --checkpoint RUN_DIR/final --output DIR [--teacher]

audio → Data2VecAudioModel, text → Data2VecTextModel (+ tokenizer), image (data2vec 1.0, pre-LN)
→ Data2VecVisionModel. Refuses, with the reason, where the architecture does not map exactly.
Then: `transformers.AutoModel.from_pretrained(DIR)`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.export_hf", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="RUN_DIR/final")
    p.add_argument("--output", required=True)
    p.add_argument("--teacher", action="store_true", help="export the EMA teacher's encoder")
    a = p.parse_args(argv)
    if not os.path.isfile(os.path.join(a.checkpoint, "model.safetensors")):
        print(f"error: checkpoint: {a.checkpoint!r} has no model.safetensors (pass RUN_DIR/final)", file=sys.stderr)
        return 2
    from pipeline.export_hf import NotRepresentable, export
    from pipeline.train.checkpoint import load_final
    model, cfg = load_final(a.checkpoint, teacher=a.teacher)
    tok = None
    if cfg["modality"] == "text":
        manifest = json.load(open(os.path.join(cfg["data"], "manifest.json")))
        tok = manifest["settings"]["tokenizer"]
    try:
        export(model, a.output, tok)
    except NotRepresentable as e:
        print(f"error: cannot export {cfg['modality']} ({cfg['model']['mode']}): {e}", file=sys.stderr)
        return 2
    print(json.dumps({"exported": a.output, "modality": cfg["modality"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
