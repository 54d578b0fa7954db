#!/usr/bin/env bash
# Sets up and runs hpcseg's tests from a fresh clone: a virtual environment in .venv (CPU torch 2.13.0),
# the single-node Slurm dev cluster and the single-node SGE (installed and started by hpc/dev-cluster/start.sh and
# sge-start.sh, unless hpcseg's scripts started them earlier, see hpc/dev-cluster/use-or-start.sh; each stopped again
# at the end if this script started it), then pytest. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -m venv .venv
.venv/bin/pip install --quiet --upgrade pip
.venv/bin/pip install --quiet torch==2.13.0 -e '.[test]'
# headless Chromium for the report's browser test (tests/test_report.py)
command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium) >/dev/null 2>&1 || true

# --- SSH tests (tests/fixtures_ssh.py starts its own sshd on a loopback port): the OpenSSH server and rsync
if [[ ! -x /usr/sbin/sshd ]] || ! command -v rsync >/dev/null || ! command -v ssh >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssh-server openssh-client rsync \
        >/dev/null
fi
# --- end of the SSH tests' block

stop_cluster=$(bash hpc/dev-cluster/use-or-start.sh slurm)
stop_sge=$(bash hpc/dev-cluster/use-or-start.sh sge) || {
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
