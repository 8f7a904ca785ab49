#!/usr/bin/env bash
# Fine-tune Mixtral (or Qwen3-MoE) over several nodes (see launch_node.sh for every setting). All
# experts of a layer sit on its stage: a Mixtral-8x7B layer is ~1.4 G parameters (22 GB with
# gradients and AdamW state in fp32), so give it many stages or LoRA (finetune_lora.sh). Hub
# configs leave the routers' load-balancing loss off (as HF trains them by default); pass
# --moe-aux-loss-coef 0.02 (Mixtral's pretraining weight) to keep the experts balanced.
#
#   python convert/from_hf.py --model-name mistralai/Mixtral-8x7B-Instruct-v0.1 --save-dir pretrained/Mixtral-8x7B
#   python -m pipeline.check --model-name pretrained/Mixtral-8x7B               # needs ~2 copies in RAM
#   NODE_RANK=0 MASTER=<node 0 address> DATA=qa.jsonl \
#       bash example_scripts/finetune_mixtral.sh          # and NODE_RANK=1, 2, ... on the other nodes
set -euo pipefail
export MODEL=${MODEL:-pretrained/Mixtral-8x7B} PP=${PP:-16} SEQ=${SEQ:-4096}
exec bash "$(dirname "$0")/launch_node.sh" "$@"
