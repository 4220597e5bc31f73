"""The whole product on one machine, end to end, in about ten minutes on 2 CPU cores.

    python -m jobs.demo [--data demo_data] [--output runs/demo] [--modalities image,audio,text]

1. prepares real demo files if missing (MNIST-5k digits, spoken digits, fortunes),
2. preprocesses them with Ray Data (train/test splits, the text tokenizer trained on the corpus),
3. pretrains a small data2vec 2.0 encoder per modality with Ray Train, logged to MLflow with its
   learning curves (validation loss; online kNN / linear probe),
4. probes each encoder (linear probe on frozen features) against the same network at random init
   and against the classical raw-input baseline (pixels / MFCC statistics / TF-IDF + logistic regression),
   and logs the results into that modality's run,
5. writes a parent "demo" run (the summary table as Markdown/CSV, a bar chart; its description on
   the run's Overview tab is the table and the chart's link, kept current as each modality ends or
   fails; each modality's run describes what it trained and its probe result), prints the table and
   how to open the MLflow UI.
With --ctc (about 5 more minutes), the pretrained audio encoder is then fine-tuned with CTC on
spoken digit strings ("three one four") and scored on voices it never heard (CER, WER).
Re-running skips finished steps (preprocessed folders, finished runs).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from pipeline import demo, storage
from pipeline.demo import CTC_STEPS, DEMO_STEPS


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=storage.path_arg, default="demo_data", help="raw demo files (prepared here if missing)")
    p.add_argument("--output", type=storage.path_arg, default="runs/demo", help="preprocessed data, runs and mlflow.db")
    p.add_argument("--modalities", default="image,audio,text")
    p.add_argument("--steps-scale", type=float, default=1.0, help="multiply every pretraining budget")
    p.add_argument("--mode", default="d2v2", help="d2v2 (default, learns fast) or d2v1")
    p.add_argument("--ctc", action="store_true", help="then fine-tune the audio encoder for speech recognition")
    p.add_argument("--ctc-steps", type=int, default=CTC_STEPS)
    a = p.parse_args(argv)
    mods = [m for m in a.modalities.split(",") if m]
    if a.ctc and "audio" not in mods:
        print("error: --ctc fine-tunes the demo's audio encoder: keep audio in --modalities", file=sys.stderr)
        return 2
    if set(mods) - set(DEMO_STEPS) or a.mode not in ("d2v1", "d2v2") or a.steps_scale <= 0:
        print("error: --modalities must be a subset of image,audio,text; --mode d2v1|d2v2; --steps-scale > 0",
              file=sys.stderr)
        return 2
    t_start = time.time()
    wanted = mods + (["ctc"] if a.ctc else [])  # --ctc's spoken digit strings
    missing = [m for m in wanted if not os.path.isdir(os.path.join(a.data, m))]
    if missing:
        from jobs.prepare_demo import main as prepare
        prepare(["--output", a.data, "--modalities", ",".join(missing)])

    from pipeline.raycluster import init_ray

    os.makedirs(a.output, exist_ok=True)
    import logging

    # The store's one-time set-up lines ("Creating initial MLflow database tables…") are not the story.
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
    # One local cluster for everything: the demo's single training worker + 2 CPUs for Ray Data.
    init_ray(num_cpus=max(os.cpu_count() or 1, 3), dashboard=True)
    uri = "sqlite:///" + os.path.abspath(os.path.join(a.output, "mlflow.db"))
    parent_id = demo.parent_run(uri, a.output)
    try:
        code = demo.run_demo(a, mods, uri, parent_id, t_start)
    except BaseException:
        demo.end_parent(uri, parent_id, "FAILED")
        raise
    if code:
        demo.end_parent(uri, parent_id, "FAILED")
    return code


if __name__ == "__main__":
    sys.exit(main())
