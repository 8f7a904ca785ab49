#!/usr/bin/env bash
# LoRA fine-tuning of any family over several nodes (see launch_node.sh for every setting):
# every base weight stays frozen, the adapters train, and replicas exchange only the adapters'
# gradients, so a slow link between sites carries a fraction of full fine-tuning's traffic.
#
#   python convert/from_hf.py --model-name meta-llama/Llama-2-7b-hf --save-dir pretrained/Llama-2-7b-hf
#   NODE_RANK=0 MASTER=<node 0 address> MODEL=pretrained/Llama-2-7b-hf DATA=chat.jsonl \
#       bash example_scripts/finetune_lora.sh          # and NODE_RANK=1, 2, ... on the other nodes
#   python convert/to_hf.py --ckpt-path model_checkpoints/Llama-2-7b-hf-lora \
#       --save-path llama-lora --lora-export adapter   # or merged: a plain HF model
set -euo pipefail
export CKPT=${CKPT:-model_checkpoints/$(basename "${MODEL:?set MODEL}")-lora} LR=${LR:-2e-4} PP=${PP:-4} DP=${DP:-2}
exec bash "$(dirname "$0")/launch_node.sh" \
    --lora-rank "${LORA_RANK:-16}" --lora-alpha "${LORA_ALPHA:-32}" --lora-dropout 0.05 "$@"
