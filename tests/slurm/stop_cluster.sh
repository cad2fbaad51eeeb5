#!/usr/bin/env bash
# Stop the one-node SLURM cluster started by tests/slurm/start_cluster.sh (slurmd and
# slurmctld, found by pid file or by their exact command line with our slurm.conf; munged is left
# running as other tools may use it). Safe to run twice.
set -uo pipefail

STATE_DIR="${GPT2_SLURM_DIR:-/tmp/gpt2-slurm}"

stop() {  # stop <name> <pidfile>
    local pid
    for pid in $( { [ -s "$2" ] && cat "$2"; pgrep -x -f "$1 -f $STATE_DIR/slurm.conf"; } | sort -u); do
        kill -0 "$pid" 2>/dev/null || continue
        echo "stop_cluster.sh: stopping $1 (pid $pid)"
        kill "$pid"
        for _ in $(seq 40); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.25
        done
        kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
    done
    rm -f "$2"
}

stop slurmd "$STATE_DIR/slurmd.pid"
stop slurmctld "$STATE_DIR/slurmctld.pid"
exit 0
