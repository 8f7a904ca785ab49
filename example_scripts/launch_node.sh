#!/usr/bin/env bash
# Start this node's ranks of a multi-node job: one process per GPU, pipelines of PP stages
# replicated DP times. The per-family scripts (finetune_<family>.sh) set the defaults.
#
#   NODE_RANK=<0..NODES-1> MASTER=<node 0 address> MODEL=<sharded model> DATA=<tasks> \
#       bash example_scripts/launch_node.sh [extra dist_clm_train.py flags...]
#
# Ranks are laid out with pipelines contiguous: node 0 holds ranks 0..GPUS_PER_NODE-1, node 1 the
# next ones, and so on. SIGTERM or SIGUSR1 (a preemption notice) is passed on to this node's
# ranks, which commit a checkpoint of their step and exit 0; Ctrl-C does the same, and a second
# Ctrl-C stops them at once.
set -euo pipefail
cd "$(dirname "$0")/.."

: "${NODE_RANK:?set NODE_RANK to the index of this node}"
: "${MASTER:?set MASTER to the address of node 0}"
: "${MODEL:?set MODEL to a folder written by convert/from_hf.py}"
: "${DATA:?set DATA to the --task-name list, e.g. a.jsonl:0.8,b.jsonl.zst:0.2}"
CKPT=${CKPT:-model_checkpoints/$(basename "$MODEL")-ft}
PORT=${PORT:-7033}
NET_IF=${NET_IF:-eth0}                          # the interface that reaches the other nodes
PP=${PP:-8}
DP=${DP:-1}
WORLD=$((PP * DP))
GPUS_PER_NODE=${GPUS_PER_NODE:-$((WORLD < 8 ? WORLD : 8))}
if ((WORLD % GPUS_PER_NODE)); then
    echo "launch_node.sh: PP x DP = $WORLD ranks do not fill nodes of GPUS_PER_NODE=$GPUS_PER_NODE" >&2
    exit 2
fi
if ((NODE_RANK >= WORLD / GPUS_PER_NODE)); then
    echo "launch_node.sh: NODE_RANK=$NODE_RANK but the job has only $((WORLD / GPUS_PER_NODE)) nodes" >&2
    exit 2
fi
SEQ=${SEQ:-2048}
LR=${LR:-1e-5}

export GLOO_SOCKET_IFNAME=$NET_IF NCCL_SOCKET_IFNAME=$NET_IF

pids=()
ctrl_c=0
on_ctrl_c() { # background ranks of a script ignore SIGINT: they hear Ctrl-C as a notice
    if ((ctrl_c)); then
        kill -s KILL "${pids[@]}" 2>/dev/null
        exit 130
    fi
    ctrl_c=1
    kill -s TERM "${pids[@]}" 2>/dev/null
}
trap on_ctrl_c INT
trap 'kill -s TERM "${pids[@]}" 2>/dev/null' TERM
trap 'kill -s USR1 "${pids[@]}" 2>/dev/null' USR1
for ((gpu = 0; gpu < GPUS_PER_NODE; gpu++)); do
    rank=$((NODE_RANK * GPUS_PER_NODE + gpu))
    python dist_clm_train.py --rank "$rank" --cuda-id "$gpu" \
        --model-name "$MODEL" --tokenizer-name "$MODEL" --task-name "$DATA" \
        --dist-url "tcp://$MASTER:$PORT" --net-interface "$NET_IF" \
        --world-size "$WORLD" --pipeline-group-size "$PP" --data-group-size "$DP" \
        --seq-length "$SEQ" --batch-size 32 --micro-batch-size 1 --gradient-accumulate-step 1 \
        --lr "$LR" --warmup-steps 10 --total-steps 2000 --fp16 \
        --checkpoint-path "$CKPT" --checkpoint-steps 100 --load-checkpoint true "$@" &
    pids+=($!)
done
status=0
for pid in "${pids[@]}"; do
    while :; do
        code=0
        wait "$pid" || code=$?
        kill -0 "$pid" 2>/dev/null || break # else a notice interrupted the wait: the rank still runs
    done
    ((code == 0)) || status=$code
done
((ctrl_c && status == 0)) && status=130
exit $status
