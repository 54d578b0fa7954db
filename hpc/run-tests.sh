#!/usr/bin/env bash
# Sets up and runs hpcseg's tests from a fresh clone: a virtual environment in .venv (CPU torch 2.13.0),
# the single-node Slurm dev cluster and the single-node SGE (installed and started by hpc/dev-cluster/start.sh and
# sge-start.sh, each stopped again at the end if this script started it), then pytest. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -m venv .venv
.venv/bin/pip install --quiet --upgrade pip
.venv/bin/pip install --quiet torch==2.13.0 -e '.[test]'

stop_cluster=0
if [[ -f ${HPCSEG_DEV_CLUSTER_DIR:-/tmp/hpcseg-dev-cluster}/run/slurmctld.pid ]] && scontrol ping >/dev/null 2>&1; then
    echo "Slurm dev cluster already running: using it"
elif bash hpc/dev-cluster/start.sh; then
    stop_cluster=1
elif [[ -n ${CI:-} ]]; then
    echo "the Slurm dev cluster did not start, and CI needs it" >&2
    exit 1
else
    echo "the Slurm dev cluster did not start: the Slurm tests use a Slurm only where a job submitted to it shows up" \
        "in its accounting (sacct), and are skipped otherwise"
fi

stop_sge=0
if [[ -f ${HPCSEG_DEV_SGE_DIR:-/tmp/hpcseg-dev-sge}/run/sge_qmaster.pid ]] && qstat >/dev/null 2>&1; then
    echo "dev SGE already running: using it"
elif bash hpc/dev-cluster/sge-start.sh; then
    stop_sge=1
elif [[ -n ${CI:-} ]]; then
    echo "the dev SGE did not start, and CI needs it" >&2
    [[ $stop_cluster == 1 ]] && bash hpc/dev-cluster/stop.sh
    exit 1
else
    echo "the dev SGE did not start: the SGE tests use an SGE only where a job submitted to it shows up in qacct," \
        "and are skipped otherwise"
fi
trap '[[ $stop_cluster == 1 ]] && bash hpc/dev-cluster/stop.sh; [[ $stop_sge == 1 ]] && bash hpc/dev-cluster/sge-stop.sh' EXIT

.venv/bin/python -m pytest "$@"
