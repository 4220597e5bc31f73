#!/usr/bin/env bash
# On a GPU machine (≥ 2 GPUs for the 2-worker run): install, prepare the demo data, preprocess it
# and run benchmarks/gpu_check.py (2-worker NCCL + bf16 + torch.compile pretraining per modality,
# samples/s and MFU). Usage: bash benchmarks/gpu_check.sh [STEPS] [WORKERS]
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${1:-300}; WORKERS=${2:-2}
[ -x .venv/bin/python ] || bash setup.sh
PY=.venv/bin/python
W=/tmp/gpu_check_data
$PY -m jobs.prepare_demo --output $W/raw --image-limit 5000
for spec in "image train --image-size 224" "audio train" "text pretrain"; do
  set -- $spec; mod=$1; split=$2; shift 2
  out=$W/pre/${mod}_${split}
  [ -f $out/manifest.json ] || $PY -m jobs.preprocess --modality $mod --input $W/raw/$mod/$split --output $out "$@"
done
$PY benchmarks/gpu_check.py --data $W/pre --steps $STEPS --workers $WORKERS
