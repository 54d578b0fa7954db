# Shared by the dev clusters' start and stop scripts (Slurm: start.sh, stop.sh; SGE: sge-*.sh through sge-common.sh):
# where the dev Slurm keeps its state, how a daemon is recognised, started, waited for and stopped.
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

# port_in_use PORT: whether something accepts connections on 127.0.0.1:PORT.
port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# port_user PORT: "name (pid N)" of the process listening on PORT where ss can tell, else "unknown".
port_user() {
    local users
    users=$(ss -Hltnp "sport = :$1" 2>/dev/null | sed -n 's/.*users:((\"\([^\"]*\)\",pid=\([0-9]*\).*/\1 (pid \2)/p' | head -n 1)
    echo "${users:-unknown}"
}

# free_port FIRST: the first port from FIRST on (up to FIRST+99) that nothing listens on.
free_port() {
    local port
    for ((port = $1; port < $1 + 100; port++)); do
        port_in_use "$port" || { echo "$port"; return 0; }
    done
    return 1
}

# foreign_pids NAME: pids of running processes called NAME other than the one this state dir recorded.
foreign_pids() {
    local ours pid
    ours=$(pid_of "$1") || ours=
    for pid in $(pgrep -x "$1"); do
        [[ $pid == "$ours" ]] || echo "$pid"
    done
}

# die MESSAGE [LOGFILE...]: print the message and the tail of each log given, stop the daemons this run started
# ($STARTED, with the script $STOP_SCRIPT), exit 1.
die() {
    local msg=$1; shift
    log "ERROR: $msg"
    local f
    for f in "$@"; do
        if [[ -s $f ]]; then
            echo "----- last lines of $f -----" >&2
            tail -n 25 "$f" >&2
        fi
    done
    if ((${#STARTED[@]})); then
        log "stopping what this run started: ${STARTED[*]}"
        bash "$STOP_SCRIPT" "${STARTED[@]}" >&2 || true
    fi
    exit 1
}

# refuse MESSAGE: a choice, not a failure (another scheduler runs here): say so as a note, start nothing,
# exit 3 (run-tests.sh then leaves the tests of that scheduler to skip).
refuse() {
    log "note: $1"
    exit 3
}

# wait_for SECONDS DESCRIPTION LOGFILE CMD...: poll CMD every 0.1 s until it succeeds, else die naming the log.
wait_for() {
    local secs=$1 what=$2 logf=$3; shift 3
    local deadline=$(( $(date +%s) + secs ))
    until "$@" >/dev/null 2>&1; do
        if (( $(date +%s) >= deadline )); then
            die "timed out after ${secs}s waiting for $what" "$logf"
        fi
        sleep 0.1
    done
}

# stop_daemons WAIT_S NAME...: TERM each daemon whose pid file this state dir holds (never one found by name), KILL
# it after WAIT_S, remove its pid file; prints how many were running.
stop_daemons() {
    local wait_s=$1 name pid deadline stopped=0; shift
    for name in "$@"; do
        if pid=$(pid_of "$name"); then
            log "stopping $name (pid $pid)"
            kill -TERM "$pid" 2>/dev/null || true
            deadline=$(( $(date +%s) + wait_s ))
            while [[ -d /proc/$pid ]] && [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$name" ]]; do
                if (( $(date +%s) >= deadline )); then
                    log "$name (pid $pid) still running after ${wait_s}s; sending SIGKILL"
                    kill -KILL "$pid" 2>/dev/null || true
                    sleep 0.5
                    break
                fi
                sleep 0.1
            done
            stopped=$((stopped + 1))
        fi
        rm -f "$RUN_DIR/$name.pid"
    done
    echo "$stopped"
}
