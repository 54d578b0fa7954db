#!/usr/bin/env bash
# Start a real single-node Slurm cluster (with accounting) on this machine, for hpcseg's tests.
#
#   bash hpc/dev-cluster/start.sh      # idempotent: installs, configures, starts, waits until usable
#   bash hpc/dev-cluster/stop.sh       # stops exactly the daemons this script started (by pid file)
#
# Daemons: munged (unless one already answers on its socket: that one is used, and left to whoever started
# it), a private mariadbd (127.0.0.1, port 3307 or the next free one, own datadir), slurmdbd, slurmctld, slurmd.
# Data, logs and pid files live in $HPCSEG_DEV_CLUSTER_DIR (default /tmp/hpcseg-dev-cluster).
# Configs are written to /etc/slurm so that plain sbatch/squeue/sacct work without env vars: so it refuses to
# start beside a Slurm daemon it did not start, or over a /etc/slurm/slurm.conf that hpcseg did not write (a note,
# exit 3: nothing started). If it fails, it stops the daemons it started (exit 1).
# Partitions: gpuv100 (default) and debug; two fake GPUs (gres gpu:2 backed by character devices).
# Meant for disposable dev/CI machines (Debian 12, root, no systemd). See docs/slurm-dev-cluster.md.
set -euo pipefail
source "$(dirname "$0")/common.sh"

WAIT_S=${HPCSEG_DEV_CLUSTER_WAIT_S:-60}
NODE_CPUS=${HPCSEG_DEV_CLUSTER_CPUS:-2}
CLUSTER_NAME=hpcseg-dev
ACCOUNT_NAME=hpcseg
DB_PORT_DEFAULT=3307
SLURM_ETC=/etc/slurm
# this script's own commands (sinfo, sacctmgr, scontrol) talk to the cluster it configures, whatever SLURM_CONF says
export SLURM_CONF=$SLURM_ETC/slurm.conf
HOST=$(hostname -s)

LOG_DIR=$STATE_DIR/log
# munged listens on its default socket so that every Slurm command (and sacctmgr) finds it
MUNGE_SOCKET=/run/munge/munge.socket.2
MYSQL_SOCKET=$RUN_DIR/mysqld.sock
DAEMONS=(munged mariadbd slurmdbd slurmctld slurmd)
STARTED=()  # daemons this run started: stopped again if it fails

t_start=$(date +%s.%N)

STOP_SCRIPT=$(dirname "$0")/stop.sh  # what die() runs on the daemons this run started

[[ $(id -u) -eq 0 ]] || die "must run as root (it installs packages and writes /etc/slurm)"

alive() { pid_of "$1" >/dev/null; }

# start_slurm_daemon NAME: start a Slurm daemon (it daemonises itself and writes its pid file) unless it runs,
# then wait for its pid file.
start_slurm_daemon() {
    local name=$1
    if ! alive "$name"; then
        log "starting $name"
        STARTED+=("$name")
        setsid "$name" </dev/null >>"$LOG_DIR/$name.log" 2>&1 || die "$name failed to start" "$LOG_DIR/$name.log"
    fi
    wait_for 30 "$name (pid file)" "$LOG_DIR/$name.log" alive "$name"
}

# ---------------------------------------------------------------------------------------------
# Already running?
# ---------------------------------------------------------------------------------------------
all_alive=1
for d in "${DAEMONS[@]}"; do alive "$d" || all_alive=0; done
if [[ $all_alive == 1 ]] && timeout 10 sinfo -h >/dev/null 2>&1; then
    echo "hpcseg dev cluster already running ($CLUSTER_NAME on $HOST, state in $STATE_DIR)"
    exit 0
fi

# ---------------------------------------------------------------------------------------------
# Another Slurm on this machine? Its daemons would hold the ports, and /etc/slurm is one for all.
# ---------------------------------------------------------------------------------------------
for d in slurmctld slurmd slurmdbd; do
    others=$(foreign_pids "$d" | tr '\n' ' ')
    if [[ -n $others ]]; then
        refuse "another Slurm runs on this machine ($d pid ${others% }, not started with state in $STATE_DIR): \
the dev cluster does not start beside it. The tests submit only to a Slurm this script started, so they skip the \
Slurm tests (HPCSEG_TEST_USE_RUNNING_SLURM=1 lets them submit to the running one)"
    fi
done
if [[ -f $SLURM_ETC/slurm.conf ]] && ! grep -q '^# Written by hpcseg hpc/dev-cluster/start.sh' "$SLURM_ETC/slurm.conf"; then
    refuse "$SLURM_ETC/slurm.conf was not written by hpcseg (a Slurm of this machine?): not overwriting it, and \
the tests skip the Slurm tests (HPCSEG_TEST_USE_RUNNING_SLURM=1 lets them submit to that Slurm)"
fi

# ---------------------------------------------------------------------------------------------
# (a) Packages
# ---------------------------------------------------------------------------------------------
need_pkgs=()
for p in munge slurmctld slurmd slurm-client slurmdbd mariadb-server; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || need_pkgs+=("$p")
done
if ((${#need_pkgs[@]})); then
    log "installing packages: ${need_pkgs[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends \
        munge slurmctld slurmd slurm-client slurmdbd mariadb-server >/dev/null
fi
# The Debian packages may have started nothing (no systemd, policy-rc.d) - we start everything below.

# ---------------------------------------------------------------------------------------------
# (b) State dir and configs
# ---------------------------------------------------------------------------------------------
mkdir -p "$STATE_DIR" "$RUN_DIR" "$LOG_DIR" "$STATE_DIR/munge" "$STATE_DIR/slurmctld" \
    "$STATE_DIR/slurmd" "$STATE_DIR/mysql" "$SLURM_ETC" /etc/munge "$(dirname "$MUNGE_SOCKET")"
chmod 755 "$STATE_DIR" "$RUN_DIR"
chmod 700 "$STATE_DIR/munge" "$STATE_DIR/mysql"

# munge key (kept if present, so a restart and any other munge client keep working)
if [[ ! -s /etc/munge/munge.key ]]; then
    log "creating munge key"
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
chmod 700 /etc/munge
chmod 400 /etc/munge/munge.key

# accounting DB password: random, created once, readable only by root
if [[ ! -s $STATE_DIR/db-password ]]; then
    (umask 077; head -c 18 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' >"$STATE_DIR/db-password")
fi
DB_PASS=$(cat "$STATE_DIR/db-password")

real_mem_mb=$(awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo)

# the fake GPUs: character devices (a regular file, or no File=, leaves the node drained); two, so that a job of
# one training process per GPU (submit --gpus 2) runs here
GPU_DEVS=()
for i in 0 1; do
    dev=$STATE_DIR/fake-gpu$i
    if [[ ! -c $dev ]]; then
        rm -f "$dev"
        mknod "$dev" c 1 3 2>/dev/null || break
    fi
    GPU_DEVS+=("$dev")
done
[[ ${#GPU_DEVS[@]} -gt 0 ]] || GPU_DEVS=(/dev/null)

write_if_changed() {
    # write_if_changed FILE MODE: stdin -> FILE, only touching it when the content differs.
    local file=$1 mode=$2 tmp
    tmp=$(mktemp "$file.XXXXXX")
    cat >"$tmp"
    chmod "$mode" "$tmp"
    if [[ -f $file ]] && cmp -s "$tmp" "$file"; then
        rm -f "$tmp"
        chmod "$mode" "$file"
    else
        mv -f "$tmp" "$file"
    fi
}

write_if_changed "$SLURM_ETC/slurm.conf" 644 <<EOF
# Written by hpcseg hpc/dev-cluster/start.sh - a single-node dev/test cluster. Do not use in production.
ClusterName=$CLUSTER_NAME
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# a requeued job is otherwise held 120 s
AuthInfo=cred_expire=10
MpiDefault=none
SwitchType=switch/none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
MailProg=/bin/true

StateSaveLocation=$STATE_DIR/slurmctld
SlurmdSpoolDir=$STATE_DIR/slurmd
SlurmctldPidFile=$RUN_DIR/slurmctld.pid
SlurmdPidFile=$RUN_DIR/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info

# fast scheduling and fast requeue
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0,sched_interval=2,bf_interval=5
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=512
KillWait=5
MinJobAge=300
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30

AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStorageTRES=gres/gpu
JobCompType=jobcomp/none

GresTypes=gpu
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$NODE_CPUS RealMemory=$real_mem_mb Gres=gpu:${#GPU_DEVS[@]} State=UNKNOWN
PartitionName=gpuv100 Nodes=ALL Default=YES MaxTime=INFINITE State=UP
PartitionName=debug Nodes=ALL Default=NO MaxTime=INFINITE State=UP
EOF

write_if_changed "$SLURM_ETC/gres.conf" 644 <<EOF
# Written by hpcseg hpc/dev-cluster/start.sh: fake GPUs (character devices), no autodetection.
AutoDetect=off
$(for dev in "${GPU_DEVS[@]}"; do echo "NodeName=$HOST Name=gpu File=$dev"; done)
EOF

# MariaDB's port: the one our running mariadbd has, else 3307 or the next free one (another may hold 3307)
if pid=$(pid_of mariadbd); then
    DB_PORT=$(tr '\0' '\n' <"/proc/$pid/cmdline" | sed -n 's/^--port=//p')
else
    DB_PORT=$(free_port "$DB_PORT_DEFAULT") || die "no free port for MariaDB in $DB_PORT_DEFAULT..$((DB_PORT_DEFAULT + 99))"
    if [[ $DB_PORT != "$DB_PORT_DEFAULT" ]]; then
        log "port $DB_PORT_DEFAULT is taken by $(port_user "$DB_PORT_DEFAULT"), not by this dev cluster: MariaDB uses $DB_PORT"
    fi
fi
write_if_changed "$SLURM_ETC/slurmdbd.conf" 600 <<EOF
# Written by hpcseg hpc/dev-cluster/start.sh (mode 600: it holds the DB password).
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
SlurmUser=root
PidFile=$RUN_DIR/slurmdbd.pid
LogFile=$LOG_DIR/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
EOF

# ---------------------------------------------------------------------------------------------
# (c) Daemons
# ---------------------------------------------------------------------------------------------

# daemons started by an earlier run that died leave pid files behind
for d in "${DAEMONS[@]}"; do
    alive "$d" || rm -f "$RUN_DIR/$d.pid"
done

# munged: default socket, key in /etc/munge; one that already answers there is used, not doubled
munge_answers() { munge -S "$MUNGE_SOCKET" -n | unmunge -S "$MUNGE_SOCKET"; }
if ! alive munged && munge_answers >/dev/null 2>&1; then
    log "using the munged already answering on $MUNGE_SOCKET (not started here: stop.sh leaves it running)"
elif ! alive munged; then
    log "starting munged"
    STARTED+=(munged)
    # (munged itself replaces a stale socket, and refuses to start if another munged owns it)
    munged --key-file=/etc/munge/munge.key --socket="$MUNGE_SOCKET" \
        --pid-file="$RUN_DIR/munged.pid" --log-file="$LOG_DIR/munged.log" \
        --seed-file="$STATE_DIR/munge/munged.seed" --force \
        </dev/null >>"$LOG_DIR/munged.log" 2>&1 \
        || die "munged failed to start" "$LOG_DIR/munged.log"
fi
wait_for 10 "munged" "$LOG_DIR/munged.log" munge_answers

# private MariaDB
mysql_cmd() { mariadb --no-defaults --protocol=socket -S "$MYSQL_SOCKET" -uroot "$@"; }
if ! alive mariadbd; then
    if [[ ! -d $STATE_DIR/mysql/mysql ]]; then
        log "initialising MariaDB datadir"
        mariadb-install-db --no-defaults --datadir="$STATE_DIR/mysql" --user=root \
            --auth-root-authentication-method=socket --skip-test-db \
            >"$LOG_DIR/mariadb-install.log" 2>&1 \
            || die "mariadb-install-db failed" "$LOG_DIR/mariadb-install.log"
    fi
    log "starting mariadbd on 127.0.0.1:$DB_PORT"
    STARTED+=(mariadbd)
    rm -f "$MYSQL_SOCKET"
    setsid mariadbd --no-defaults --user=root --datadir="$STATE_DIR/mysql" \
        --port=$DB_PORT --bind-address=127.0.0.1 --socket="$MYSQL_SOCKET" \
        --pid-file="$RUN_DIR/mariadbd.pid" --log-error="$LOG_DIR/mariadb.log" \
        --innodb-buffer-pool-size=64M --innodb-lock-wait-timeout=900 --skip-log-bin --skip-name-resolve \
        </dev/null >>"$LOG_DIR/mariadb.log" 2>&1 &
    disown || true
fi
wait_for 30 "mariadbd" "$LOG_DIR/mariadb.log" mysql_cmd -e 'SELECT 1'
mysql_cmd <<EOF || die "could not create the accounting database/user" "$LOG_DIR/mariadb.log"
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
ALTER USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
GRANT ALL PRIVILEGES ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
EOF

start_slurm_daemon slurmdbd
wait_for 30 "slurmdbd to answer" "$LOG_DIR/slurmdbd.log" timeout 5 sacctmgr -n show cluster

# (d) cluster and account in the accounting DB (before slurmctld, so it registers at once)
if [[ -z $(sacctmgr -n -P show cluster "$CLUSTER_NAME" format=cluster 2>/dev/null) ]]; then
    log "registering cluster $CLUSTER_NAME"
    sacctmgr -i add cluster "$CLUSTER_NAME" >/dev/null \
        || die "sacctmgr add cluster failed" "$LOG_DIR/slurmdbd.log"
fi
if [[ -z $(sacctmgr -n -P show account "$ACCOUNT_NAME" format=account 2>/dev/null) ]]; then
    log "registering account $ACCOUNT_NAME"
    sacctmgr -i add account "$ACCOUNT_NAME" Cluster="$CLUSTER_NAME" \
        Description="hpcseg dev" Organization=hpcseg >/dev/null \
        || die "sacctmgr add account failed" "$LOG_DIR/slurmdbd.log"
fi
for u in root ${SUDO_USER:-}; do
    if [[ -z $(sacctmgr -n -P show assoc cluster="$CLUSTER_NAME" account="$ACCOUNT_NAME" user="$u" format=user 2>/dev/null) ]]; then
        sacctmgr -i add user "$u" Account="$ACCOUNT_NAME" Cluster="$CLUSTER_NAME" >/dev/null || true
    fi
done

start_slurm_daemon slurmctld
wait_for 30 "slurmctld to answer" "$LOG_DIR/slurmctld.log" timeout 5 scontrol ping

# slurmd
slurmd_started_at=0
alive slurmd || slurmd_started_at=$(date +%s)
start_slurm_daemon slurmd

# ---------------------------------------------------------------------------------------------
# (e) Wait until the node has registered and is usable, and sacct answers
# ---------------------------------------------------------------------------------------------
node_ready() {
    local info state started
    info=$(timeout 5 scontrol -o show node "$HOST" 2>/dev/null) || return 1
    state=$(sed -n 's/.* State=\([^ ]*\).*/\1/p' <<<"$info")
    # slurmctld may report the node from its saved state before this slurmd has registered
    if (( slurmd_started_at > 0 )); then
        started=$(sed -n 's/.* SlurmdStartTime=\([^ ]*\).*/\1/p' <<<"$info")
        started=$(date -d "$started" +%s 2>/dev/null || echo 0)
        (( started >= slurmd_started_at - 1 )) || return 1
    fi
    case $state in
        *NOT_RESPONDING* | *POWER* ) return 1 ;;
        *DRAIN* | DOWN*)
            log "node $HOST is $state; resuming it"
            timeout 5 scontrol update nodename="$HOST" state=resume >/dev/null 2>&1 || true
            return 1 ;;
        IDLE* | MIXED* | ALLOCATED* | COMPLETING*) return 0 ;;
        *) return 1 ;;
    esac
}
deadline=$(( $(date +%s) + WAIT_S ))
until node_ready; do
    if (( $(date +%s) >= deadline )); then
        timeout 5 scontrol show node "$HOST" >&2 || true
        die "node $HOST did not become idle within ${WAIT_S}s" \
            "$LOG_DIR/slurmd.log" "$LOG_DIR/slurmctld.log"
    fi
    sleep 0.2
done
wait_for "$WAIT_S" "sacct to answer" "$LOG_DIR/slurmdbd.log" timeout 5 sacct -n -X -S now-1minutes

# ---------------------------------------------------------------------------------------------
# (f) Ready
# ---------------------------------------------------------------------------------------------
elapsed=$(awk -v a="$t_start" -v b="$(date +%s.%N)" 'BEGIN {printf "%.1f", b - a}')
echo "hpcseg dev cluster ready in ${elapsed}s: $CLUSTER_NAME on $HOST, partitions gpuv100 (default) and debug, ${#GPU_DEVS[@]} fake GPUs; state in $STATE_DIR"
