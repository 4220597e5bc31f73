"""GPU check: 2-worker NCCL + bf16 + torch.compile pretraining of each modality through the real
job (`jobs.pretrain --use-gpu --compile`), then samples/s and MFU (model FLOPs/s ÷ the GPU's
measured bf16 matmul rate). Needs ≥ 1 GPU per worker; run by benchmarks/gpu_check.sh.

    python benchmarks/gpu_check.py --data DEMO_PREPROCESSED_ROOT [--steps 300] [--workers 2] [--preset base]

Prints a table and one JSON line last.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def flops_per_sample(cfg, device) -> float:
    """Model FLOPs of one training step per sample (forward + backward + teacher), counted on one batch."""
    from benchmarks.flops import counter
    from benchmarks.harness import Trainer, load_rows

    trainer = Trainer(cfg, load_rows(cfg.data, cfg.modality), device=device)  # bf16 autocast on CUDA, as a worker
    inputs, mask = trainer.next_inputs()
    with counter() as fc:
        trainer.train_step(inputs, mask)
    return fc.get_total_flops() / cfg.train.batch_size


def main(argv=None) -> int:
    import torch

    from benchmarks.flops import matmul_peak
    from pipeline.train.config import resolve
    from pipeline.train.launch import frontend_from_manifest, read_manifest

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="folder with image_train/, audio_train/, text_pretrain/")
    p.add_argument("--output", default="/tmp/gpu_check")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--preset", default="base")
    p.add_argument("--modalities", default="image,audio,text")
    a = p.parse_args(argv)
    device = torch.device("cuda")
    peak = matmul_peak(device)
    rows = []
    for mod in a.modalities.split(","):
        data = os.path.join(a.data, {"text": "text_pretrain"}.get(mod, f"{mod}_train"))
        out = os.path.join(a.output, mod)
        cmd = [sys.executable, "-m", "jobs.pretrain", "--modality", mod, "--data", data, "--output", out,
               "--preset", a.preset, "--max-steps", str(a.steps), "--num-workers", str(a.workers), "--use-gpu",
               "--compile", "--set", "train.log_every=50", "--set", f"train.checkpoint_every={a.steps}",
               "--set", "train.warmup_steps=50", "--set", "train.reference_batch=null"]  # one micro-batch per step
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if r.returncode:
            rows.append({"modality": mod, "error": (r.stderr or r.stdout)[-500:]})
            continue
        summary = json.loads(r.stdout.strip().splitlines()[-1])
        cfg = resolve(mod, data, out, a.preset, None, {},
                      model_frontend=frontend_from_manifest(read_manifest(data, mod)))
        fps = flops_per_sample(cfg, device)
        sps = summary["samples_per_s"]
        rows.append({"modality": mod, "samples_per_s": round(sps, 1), "tflops_per_s": round(fps * sps / 1e12, 1),
                     "mfu": round(fps * sps / (peak * a.workers), 3), "data_wait": summary["data_wait_fraction"]})
    print(f"bf16 matmul peak per GPU: {peak / 1e12:.0f} TFLOP/s; {a.workers} workers, preset {a.preset}")
    print(f"{'modality':<9} {'samples/s':>10} {'TFLOP/s':>8} {'MFU':>6} {'data wait':>9}")
    for r in rows:
        if "error" in r:
            print(f"{r['modality']:<9} failed: {r['error']}")
        else:
            print(f"{r['modality']:<9} {r['samples_per_s']:>10} {r['tflops_per_s']:>8} {r['mfu']:>6.1%} "
                  f"{r['data_wait']:>9.1%}")
    print(json.dumps({"peak_tflops": round(peak / 1e12, 1), "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
