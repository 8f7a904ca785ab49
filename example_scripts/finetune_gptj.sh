#!/usr/bin/env bash
# Fine-tune GPT-J-6B over several nodes (see launch_node.sh for every setting).
#
#   python convert/from_hf.py --model-name EleutherAI/gpt-j-6b --save-dir pretrained/gpt-j-6b
#   NODE_RANK=0 MASTER=<node 0 address> DATA=chat.jsonl:0.7,code.jsonl.zst:0.3 \
#       bash example_scripts/finetune_gptj.sh          # and NODE_RANK=1, 2, ... on the other nodes
set -euo pipefail
export MODEL=${MODEL:-pretrained/gpt-j-6b} PP=${PP:-4} SEQ=${SEQ:-2048}
exec bash "$(dirname "$0")/launch_node.sh" "$@"
