#!/usr/bin/env bash
# Stop the single-node dev Slurm cluster started by hpc/dev-cluster/start.sh.
#
#   bash hpc/dev-cluster/stop.sh [DAEMON...]    # default: all of them, after cancelling the cluster's jobs
#
# Only the daemons recorded in the state dir's pid files are signalled (never by name; a munged that start.sh
# found running and used has none, and is left alone); a pid file whose process is gone, or is no longer that
# daemon, is just removed. Jobs still on the cluster are cancelled first, so that none outlives it (their
# processes belong to slurmd's job steps, which stopping slurmd leaves running). Harmless when nothing runs.
# Data (accounting DB, slurmctld state, logs) stays in the state dir for the next start.
set -uo pipefail

source "$(dirname "$0")/common.sh"
# squeue/scancel below ask the dev cluster (start.sh's config), never a Slurm that SLURM_CONF may name
export SLURM_CONF=/etc/slurm/slurm.conf
STOP_WAIT_S=${HPCSEG_DEV_CLUSTER_STOP_WAIT_S:-20}

# reverse start order: compute nodes first, the database and munge last
names=(slurmd slurmctld slurmdbd mariadbd munged)
(($#)) && names=("$@")

# every job on this cluster was submitted to it: cancel them while its controller still answers
if [[ " ${names[*]} " == *" slurmd "* ]] && pid_of slurmctld >/dev/null; then
    jobs=$(timeout 10 squeue -h -o %A 2>/dev/null | tr '\n' ' ')
    if [[ -n ${jobs// } ]]; then
        log "cancelling the jobs still on the cluster: $jobs"
        timeout 10 scancel $jobs 2>/dev/null || true
        deadline=$(( $(date +%s) + STOP_WAIT_S ))
        while [[ -n $(timeout 10 squeue -h -o %A 2>/dev/null) ]] && (( $(date +%s) < deadline )); do
            sleep 0.2
        done
    fi
fi

stopped=$(stop_daemons "$STOP_WAIT_S" "${names[@]}")

if (( stopped )); then
    echo "hpcseg dev cluster stopped ($stopped daemons; data kept in $STATE_DIR)"
else
    echo "hpcseg dev cluster was not running (nothing to stop in $STATE_DIR)"
fi
