# Shared by sge-start.sh and sge-stop.sh: where the dev SGE keeps its state, and Debian's SGE layout.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

STATE_DIR=${HPCSEG_DEV_SGE_DIR:-/tmp/hpcseg-dev-sge}
RUN_DIR=$STATE_DIR/run
LOG_DIR=$STATE_DIR/log

log() { echo "[dev-sge] $*" >&2; }

# Debian's gridengine packages: one cell, spool under /var/spool/gridengine
export SGE_ROOT=/var/lib/gridengine SGE_CELL=default
SGE_COMMON=$SGE_ROOT/$SGE_CELL/common
SGE_SPOOL=/var/spool/gridengine
# the marker of a cell that this script configured (written beside SGE's own files)
SGE_MARKER=$SGE_COMMON/hpcseg-dev-sge
SGE_QUEUE=all.q
SGE_DAEMONS=(sge_qmaster sge_execd)
