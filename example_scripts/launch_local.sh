#!/usr/bin/env bash
# Start N ranks of dist_clm_train.py on this machine with one line:
#
#   bash example_scripts/launch_local.sh 4 --pipeline-group-size 2 --data-group-size 2 <flags...>
#
# Each rank gets --rank r. Ctrl-C stops them all, and so does the failure of any one rank
# (its exit code is returned), so no rank is left waiting for a peer that is gone.
set -uo pipefail

if [[ $# -lt 1 || ! $1 =~ ^[0-9]+$ ]]; then
    echo "usage: $0 NUM_RANKS [dist_clm_train.py flags...]" >&2
    exit 2
fi
num_ranks=$1
shift
here="$(cd "$(dirname "$0")/.." && pwd)"

pids=()
stop_all() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null; done
}
trap 'stop_all; exit 130' INT TERM

for ((rank = 0; rank < num_ranks; rank++)); do
    python "$here/dist_clm_train.py" --rank "$rank" "$@" &
    pids+=($!)
done

status=0
for ((left = num_ranks; left > 0; left--)); do
    wait -n
    code=$?
    if [[ $code -ne 0 ]]; then
        echo "launch_local.sh: a rank exited with code $code; stopping the others" >&2
        stop_all
        status=$code
        break
    fi
done
wait
exit $status
