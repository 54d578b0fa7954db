#!/usr/bin/env bash
# Sets up and runs hpcseg's tests from a fresh clone: a virtual environment in .venv (CPU torch 2.13.0),
# the single-node Slurm dev cluster and the single-node SGE (installed and started by hpc/dev-cluster/start.sh and
# sge-start.sh, each stopped again at the end if this script started it), then pytest. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -m venv .venv
.venv/bin/pip install --quiet --upgrade pip
.venv/bin/pip install --quiet torch==2.13.0 -e '.[test]'

# start_or_use KIND TITLE START_SCRIPT: use the dev cluster of KIND (slurm, sge; TITLE in messages) that
# hpcseg's START_SCRIPT started earlier (ours.sh decides), else start it (then it is stopped at the end). Another
# scheduler of that kind on this machine is a note, not a failure: the tests submit nothing to it and skip its
# tests, unless the user opted in (HPCSEG_TEST_USE_RUNNING_SLURM/SGE=1). Under CI (a machine of its own) every
# cluster test must run, so a dev cluster that does not start fails the run. Prints 1 where this script started
# it, else 0.
start_or_use() {
    local kind=$1 title=$2 script=$3 var rc=0 said
    var=HPCSEG_TEST_USE_RUNNING_${kind^^}
    if said=$(bash hpc/dev-cluster/ours.sh "$kind"); then
        echo "note: the $title dev cluster already runs, started earlier by hpc/dev-cluster/$script: using it," \
            "and leaving it running ($said)" >&2
        echo 0
        return
    fi
    bash hpc/dev-cluster/"$script" >&2 || rc=$?
    if ((rc == 0)); then
        echo 1
        return
    fi
    if [[ -n ${CI:-} ]]; then
        echo "the $title dev cluster did not start (hpc/dev-cluster/$script exited $rc), and CI needs it" >&2
        return 1
    fi
    if ((rc == 3)) && [[ -n ${!var:-} && ${!var} != 0 ]]; then
        echo "note: $var is set: the $title tests submit to the $title that runs on this machine" >&2
    elif ((rc == 3)); then
        echo "note: the $title tests are skipped: they submit only to a $title that hpc/dev-cluster/$script" \
            "started (set $var=1 to run them on the one that runs here)" >&2
    else
        echo "warning: the $title dev cluster did not start (hpc/dev-cluster/$script exited $rc): the $title tests" \
            "are skipped" >&2
    fi
    echo 0
}

stop_cluster=$(start_or_use slurm Slurm start.sh)
stop_sge=$(start_or_use sge SGE sge-start.sh) || {
    [[ $stop_cluster == 1 ]] && bash hpc/dev-cluster/stop.sh
    exit 1
}
# stop what this script started, and only that
stop_started() {
    [[ $stop_cluster == 1 ]] && bash hpc/dev-cluster/stop.sh
    [[ $stop_sge == 1 ]] && bash hpc/dev-cluster/sge-stop.sh
    return 0
}
trap stop_started EXIT

.venv/bin/python -m pytest "$@"
