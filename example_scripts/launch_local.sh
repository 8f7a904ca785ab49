#!/usr/bin/env bash
# Start N ranks of dist_clm_train.py on this machine with one line:
#
#   bash example_scripts/launch_local.sh 4 --pipeline-group-size 2 --data-group-size 2 <flags...>
#
# Each rank gets --rank r. The failure of any one rank stops the others (its exit code is
# returned), so no rank is left waiting for a peer that is gone. SIGTERM or SIGUSR1 to this
# script is a preemption notice: passed on to every rank, which commit a checkpoint of the step
# they are in and exit 0 (within --preempt-grace); the script waits for them. Ctrl-C does the
# same (the script then exits 130); a second Ctrl-C stops every rank at once.
set -uo pipefail

if [[ $# -lt 1 || ! $1 =~ ^[0-9]+$ ]]; then
    echo "usage: $0 NUM_RANKS [dist_clm_train.py flags...]" >&2
    exit 2
fi
num_ranks=$1
shift
here="$(cd "$(dirname "$0")/.." && pwd)"

pids=()
interrupted=0
send_all() {
    interrupted=1
    for pid in "${pids[@]}"; do kill -s "$1" "$pid" 2>/dev/null; done
}
ctrl_c=0
on_ctrl_c() {
    if ((ctrl_c)); then
        send_all KILL
        exit 130
    fi
    ctrl_c=1
    echo "launch_local.sh: every rank stops after its step with a checkpoint; Ctrl-C again stops them now" >&2
    send_all TERM
}
# background ranks of a script ignore SIGINT, so Ctrl-C reaches them through this trap alone
trap on_ctrl_c INT
trap 'send_all TERM' TERM
trap 'send_all USR1' USR1

for ((rank = 0; rank < num_ranks; rank++)); do
    python "$here/dist_clm_train.py" --rank "$rank" "$@" &
    pids+=($!)
done

status=0
left=$num_ranks
while ((left > 0)); do
    interrupted=0
    wait -n
    code=$?
    ((interrupted)) && continue # a notice passed on, not a rank's exit: wait on
    ((left--))
    if [[ $code -ne 0 ]]; then
        echo "launch_local.sh: a rank exited with code $code; stopping the others" >&2
        send_all TERM
        status=$code
        break
    fi
done
until wait; do :; done # every rank, however many notices arrive meanwhile
((ctrl_c && status == 0)) && status=130
exit $status
