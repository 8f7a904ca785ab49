#!/usr/bin/env bash
# Fine-tune GPT-NeoX (Pythia, RedPajama-INCITE) over several nodes (see launch_node.sh for every setting).
#
#   python convert/from_hf.py --model-name EleutherAI/gpt-neox-20b --save-dir pretrained/gpt-neox-20b
#   NODE_RANK=0 MASTER=<node 0 address> DATA=chat.jsonl:0.7,code.jsonl.zst:0.3 \
#       bash example_scripts/finetune_gptneox.sh          # and NODE_RANK=1, 2, ... on the other nodes
set -euo pipefail
export MODEL=${MODEL:-pretrained/gpt-neox-20b} PP=${PP:-8} SEQ=${SEQ:-2048}
exec bash "$(dirname "$0")/launch_node.sh" "$@"
