#!/usr/bin/env bash
# Fine-tune a GPT-NeoX model (e.g. Pythia, RedPajama-INCITE) over several nodes:
# one process per GPU, pipelines of PP stages replicated DP times.
#
# On every node run:   NODE_RANK=<0..NODES-1> bash example_scripts/finetune_gptneox.sh
#
# Ranks are laid out with pipelines contiguous: node 0 holds ranks 0..GPUS_PER_NODE-1, node 1 the
# next ones, and so on. MASTER is the address of node 0 that every node can reach.
set -euo pipefail
cd "$(dirname "$0")/.."

MODEL=${MODEL:-pretrained/pythia-1.4b}          # convert/from_hf.py --save-dir output
DATA=${DATA:-data/instructions.jsonl:0.8,data/chat.jsonl:0.2}
CKPT=${CKPT:-model_checkpoints/pythia-1.4b-ft}
MASTER=${MASTER:?set MASTER to the address of node 0}
PORT=${PORT:-7033}
NET_IF=${NET_IF:-eth0}                          # the interface that reaches the other nodes
NODE_RANK=${NODE_RANK:?set NODE_RANK to this node's index}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
PP=${PP:-8}
DP=${DP:-2}

export GLOO_SOCKET_IFNAME=$NET_IF NCCL_SOCKET_IFNAME=$NET_IF

pids=()
trap 'kill "${pids[@]}" 2>/dev/null' INT TERM
for ((gpu = 0; gpu < GPUS_PER_NODE; gpu++)); do
    rank=$((NODE_RANK * GPUS_PER_NODE + gpu))
    python dist_clm_train.py --rank "$rank" --cuda-id "$gpu" \
        --model-name "$MODEL" --tokenizer-name "$MODEL" --task-name "$DATA" \
        --dist-url "tcp://$MASTER:$PORT" --net-interface "$NET_IF" \
        --world-size $((PP * DP)) --pipeline-group-size "$PP" --data-group-size "$DP" \
        --seq-length 2048 --batch-size 32 --micro-batch-size 1 --gradient-accumulate-step 1 \
        --lr 1e-5 --warmup-steps 10 --total-steps 2000 \
        --checkpoint-path "$CKPT" --checkpoint-steps 100 --load-checkpoint true &
    pids+=($!)
done
wait
