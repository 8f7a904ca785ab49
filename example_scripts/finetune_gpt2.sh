#!/usr/bin/env bash
# Fine-tune GPT-2 over several nodes (see launch_node.sh for every setting).
#
#   python convert/from_hf.py --model-name openai-community/gpt2-xl --save-dir pretrained/gpt2-xl
#   NODE_RANK=0 MASTER=<node 0 address> DATA=chat.jsonl:0.7,code.jsonl.zst:0.3 \
#       bash example_scripts/finetune_gpt2.sh          # and NODE_RANK=1, 2, ... on the other nodes
set -euo pipefail
export MODEL=${MODEL:-pretrained/gpt2-xl} PP=${PP:-2} SEQ=${SEQ:-1024}
exec bash "$(dirname "$0")/launch_node.sh" "$@"
