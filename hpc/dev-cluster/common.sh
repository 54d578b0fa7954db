# Shared by start.sh and stop.sh: where the dev cluster keeps its state, and how a daemon is recognised.
STATE_DIR=${HPCSEG_DEV_CLUSTER_DIR:-/tmp/hpcseg-dev-cluster}
RUN_DIR=$STATE_DIR/run

log() { echo "[dev-cluster] $*" >&2; }

# pid_of NAME: print the pid recorded for daemon NAME if that process is alive and really is NAME.
pid_of() {
    local name=$1 pidfile=$RUN_DIR/$1.pid pid comm
    [[ -r $pidfile ]] || return 1
    pid=$(tr -dc '0-9' <"$pidfile")
    [[ -n $pid ]] || return 1
    comm=$(cat "/proc/$pid/comm" 2>/dev/null) || return 1
    [[ $comm == "$name" ]] || return 1
    echo "$pid"
}
