#!/usr/bin/env bash
# GPU smoke check: trains the quickstart's model on this machine's GPUs over Gloo and NCCL, in
# fp32, bf16, fp16 and LoRA, and compares each run's loss per step with a reference run; one line
# per case, non-zero exit if any failed. Cases and tolerances: tests/gpu_smoke.py.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
exec python -m tests.gpu_smoke "$@"
