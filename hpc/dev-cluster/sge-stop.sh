#!/usr/bin/env bash
# Stop the single-node dev SGE started by hpc/dev-cluster/sge-start.sh.
#
#   bash hpc/dev-cluster/sge-stop.sh [DAEMON...]    # default: both, after deleting the jobs left on it
#
# Only the daemons recorded in the state dir's pid files are signalled (never by name); a pid file whose process
# is gone, or is no longer that daemon, is just removed. Jobs still on the cluster are deleted first (qdel), so
# that none outlives it: a job's sge_shepherd keeps running when sge_execd stops. Harmless when nothing runs.
# The cell's configuration and spool stay for the next start.
set -uo pipefail

source "$(dirname "$0")/sge-common.sh"
STOP_WAIT_S=${HPCSEG_DEV_SGE_STOP_WAIT_S:-20}

names=(sge_execd sge_qmaster)
(($#)) && names=("$@")

# every job on this cluster was submitted to it: delete them while the qmaster still answers
if [[ " ${names[*]} " == *" sge_execd "* ]] && pid_of sge_qmaster >/dev/null && pid_of sge_execd >/dev/null; then
    jobs=$(timeout 10 qstat -u '*' 2>/dev/null | awk 'NR > 2 {print $1}' | sort -u | tr '\n' ' ')
    if [[ -n ${jobs// } ]]; then
        log "deleting the jobs still on the cluster: $jobs"
        timeout 10 qdel -f $jobs >/dev/null 2>&1 || true
        deadline=$(( $(date +%s) + STOP_WAIT_S ))
        while [[ -n $(timeout 10 qstat -u '*' 2>/dev/null) ]] && (( $(date +%s) < deadline )); do
            sleep 0.2
        done
    fi
fi

stopped=$(stop_daemons "$STOP_WAIT_S" "${names[@]}")

if (( stopped )); then
    echo "hpcseg dev SGE stopped ($stopped daemons; configuration kept in $SGE_ROOT/$SGE_CELL)"
else
    echo "hpcseg dev SGE was not running (nothing to stop in $STATE_DIR)"
fi
