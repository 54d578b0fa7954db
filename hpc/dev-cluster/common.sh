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
