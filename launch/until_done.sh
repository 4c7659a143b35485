#!/usr/bin/env bash
# Run a training command again while it exits 75 ("preempted: resume me"), so a job whose ranks were
# signalled (SIGTERM or SIGUSR1: they save the step reached and exit 75) continues by itself. Give the
# command --resume: it continues from `latest`, or starts fresh when there is no checkpoint yet, so the
# same command serves every run.
#
#   launch/until_done.sh deepspeed --num_gpus 8 launch/train.py --config configs/distilbiobert.yaml --resume
#   NODE_RANK=0 launch/until_done.sh launch/node.sh -- --config configs/distilbiobert.yaml --resume
#
# Signalled itself (TERM or USR1: the machine is going away), it passes SIGUSR1 to the ranks below it,
# waits for them to save, and exits 75 for whatever started it (0 if the job had just finished), instead
# of starting again. The command runs with TERM and USR1 ignored, so DeepSpeed's runner waits for its
# ranks instead of exiting at once; its launcher still takes TERM and passes it to the ranks.
# BIODISTILL_MAX_RESTARTS (default 100) bounds the runs.
set -uo pipefail
(($#)) || { echo "usage: launch/until_done.sh COMMAND [ARGS...]" >&2; exit 2; }
max="${BIODISTILL_MAX_RESTARTS:-100}"
signalled=0
child=""

descendants() {
    local pid
    for pid in $(pgrep -P "$1"); do echo "$pid"; descendants "$pid"; done
}
forward() {
    signalled=1
    # The launcher chain ignores USR1 (started below with it ignored); the ranks save and exit 75.
    [[ -n "$child" ]] && kill -USR1 $(descendants "$child") 2>/dev/null
}
trap forward TERM USR1

for ((run = 1; ; run++)); do
    (trap '' USR1 TERM; exec "$@") &
    child=$!
    while :; do  # a trapped signal ends `wait` early: wait again until the command itself has ended
        wait "$child"
        status=$?
        kill -0 "$child" 2>/dev/null || break
    done
    child=""
    if ((signalled)); then
        exit $((status == 0 || status == 2 ? status : 75))  # the launcher's own code says nothing here
    fi
    if ((status != 75)); then
        exit "$status"
    fi
    if ((run >= max)); then
        echo "biodistill: preempted $run times (BIODISTILL_MAX_RESTARTS=$max): not starting again" >&2
        exit 75
    fi
    echo "biodistill: run $run was preempted (exit 75): starting again with the same command" >&2
done
