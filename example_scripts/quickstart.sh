#!/usr/bin/env bash
# The whole workflow on one CPU machine, offline, in about a minute and a half (2 cores):
#   1. build a tiny GPT-NeoX and its tokenizer (random weights, no hub)
#   2. convert it to a layer-sharded checkpoint
#   3. fine-tune it on the bundled jsonl with 4 local ranks: 2 pipeline stages x 2 replicas, Gloo
#   4. convert the result back to Hugging Face format, show the loss and a short generation
# Every run writes into a new folder under quickstart_run/, so nothing earlier is overwritten.
set -euo pipefail
cd "$(dirname "$0")/.."

export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
out="quickstart_run/$(date +%Y%m%d-%H%M%S)"
data=example_scripts/data/tiny.jsonl
port=$(python -c 'from comm.rendezvous import free_port; print(free_port())')

python convert/tiny_model.py --save-dir "$out/tiny-hf" --corpus "$data" --num-layers 4
python convert/from_hf.py --model-name "$out/tiny-hf" --save-dir "$out/tiny-shards"

bash example_scripts/launch_local.sh 4 \
    --model-name "$out/tiny-shards" --task-name "$data" \
    --pipeline-group-size 2 --data-group-size 2 --dist-url "tcp://127.0.0.1:$port" \
    --seq-length 128 --batch-size 4 --micro-batch-size 2 \
    --lr 5e-3 --warmup-steps 10 --total-steps 300 --log-interval 25 \
    --checkpoint-path "$out/checkpoints" --checkpoint-steps 100

python convert/to_hf.py --ckpt-path "$out/checkpoints" --save-path "$out/tiny-finetuned"
python example_scripts/show_result.py --model "$out/tiny-finetuned" --metrics "$out/checkpoints/metrics.jsonl"
python -m observability.plot --metrics "$out/checkpoints/metrics.jsonl" --out "$out/loss.png"
