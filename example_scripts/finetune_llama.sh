#!/usr/bin/env bash
# Fine-tune a LLaMA-family model over several nodes (see launch_node.sh for every setting).
#
#   python convert/from_hf.py --model-name meta-llama/Llama-2-7b-hf --save-dir pretrained/Llama-2-7b-hf
#   NODE_RANK=0 MASTER=<node 0 address> DATA=chat.jsonl:0.7,code.jsonl.zst:0.3 \
#       bash example_scripts/finetune_llama.sh          # and NODE_RANK=1, 2, ... on the other nodes
set -euo pipefail
export MODEL=${MODEL:-pretrained/Llama-2-7b-hf} PP=${PP:-4} SEQ=${SEQ:-4096}
exec bash "$(dirname "$0")/launch_node.sh" "$@"
