#!/usr/bin/env bash
# Fine-tune Gemma 2 (or Gemma / Gemma 3 text) over several nodes (see launch_node.sh for every
# setting). Gemma 2 runs eager attention, as HF does for its soft-capping: attention scores are
# held per head at seq x seq, so keep SEQ modest or raise PP. Check the conversion first:
#
#   python convert/from_hf.py --model-name google/gemma-2-9b-it --save-dir pretrained/gemma-2-9b-it
#   python -m pipeline.check --model-name pretrained/gemma-2-9b-it             # exits 1 if it differs
#   NODE_RANK=0 MASTER=<node 0 address> DATA=qa.jsonl \
#       bash example_scripts/finetune_gemma2.sh          # and NODE_RANK=1, 2, ... on the other nodes
set -euo pipefail
export MODEL=${MODEL:-pretrained/gemma-2-9b-it} PP=${PP:-6} SEQ=${SEQ:-2048}
exec bash "$(dirname "$0")/launch_node.sh" "$@"
