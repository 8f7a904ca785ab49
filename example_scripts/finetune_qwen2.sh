#!/usr/bin/env bash
# Fine-tune Qwen2.5 (or Qwen3, Mistral, Phi-3, OLMo 2: any LLaMA-layout family) over several nodes
# (see launch_node.sh for every setting). Check the converted model against HF's before renting GPUs:
#
#   python convert/from_hf.py --model-name Qwen/Qwen2.5-7B-Instruct --save-dir pretrained/Qwen2.5-7B-Instruct
#   python -m pipeline.check --model-name pretrained/Qwen2.5-7B-Instruct       # exits 1 if it differs
#   NODE_RANK=0 MASTER=<node 0 address> DATA=qa.jsonl:0.7,code.jsonl.zst:0.3 \
#       bash example_scripts/finetune_qwen2.sh          # and NODE_RANK=1, 2, ... on the other nodes
set -euo pipefail
export MODEL=${MODEL:-pretrained/Qwen2.5-7B-Instruct} PP=${PP:-4} SEQ=${SEQ:-4096}
exec bash "$(dirname "$0")/launch_node.sh" "$@"
