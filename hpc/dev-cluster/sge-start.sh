#!/usr/bin/env bash
# Start a real single-node Son of Grid Engine (SGE 8.1.9, Debian's gridengine packages) on this machine, for
# hpcseg's tests.
#
#   bash hpc/dev-cluster/sge-start.sh      # idempotent: installs, configures, starts, waits until a job runs
#   bash hpc/dev-cluster/sge-stop.sh       # stops exactly the daemons this script started (by pid file)
#
# Daemons: sge_qmaster and sge_execd (SGE_ROOT=/var/lib/gridengine, cell "default", spool /var/spool/gridengine:
# Debian's layout, so plain qsub/qstat/qacct work without env vars beyond SGE_ROOT). Pid files and logs live in
# $HPCSEG_DEV_SGE_DIR (default /tmp/hpcseg-dev-sge). It refuses to start beside SGE daemons it did not start, or
# over a cell that another host's qmaster or another admin configured (a note, exit 3: nothing started); if it
# fails, it stops what it started (exit 1).
# Cluster: queue all.q on this host (one slot per CPU, parallel environment smp, notify 60 s), a per-job
# consumable "gpu" resource (two fake GPUs), scheduling every second, accounting flushed at once (qacct knows a job as soon
# as it ends), and jobs of root allowed (min_uid 0): meant for disposable dev/CI machines (Debian 12, root,
# no systemd).
set -euo pipefail
source "$(dirname "$0")/sge-common.sh"

WAIT_S=${HPCSEG_DEV_SGE_WAIT_S:-60}
NODE_CPUS=${HPCSEG_DEV_SGE_CPUS:-$(nproc)}
# two, so that a job of two GPUs (one training process each) runs here too
NODE_GPUS=${HPCSEG_DEV_SGE_GPUS:-2}
STARTED=()  # daemons this run started: stopped again if it fails

t_start=$(date +%s.%N)

STOP_SCRIPT=$(dirname "$0")/sge-stop.sh  # what die() runs on the daemons this run started

[[ $(id -u) -eq 0 ]] || die "must run as root (it installs packages and starts SGE's daemons)"

alive() { pid_of "$1" >/dev/null; }

QMASTER_MESSAGES=$SGE_SPOOL/qmaster/messages

# a trivial job that reaches accounting: what the tests need of a usable SGE
probe_job() {
    local out job_id deadline
    out=$(timeout 10 qsub -terse -b y -q "$SGE_QUEUE" -o /dev/null -j y -N hpcseg-probe true 2>&1) \
        || { log "qsub of the probe job failed: $out"; return 1; }
    job_id=${out%%.*}
    deadline=$(( $(date +%s) + WAIT_S ))
    until timeout 10 qacct -j "$job_id" >/dev/null 2>&1; do
        if (( $(date +%s) >= deadline )); then
            log "probe job $job_id not in qacct after ${WAIT_S}s; qstat says:"
            timeout 10 qstat -j "$job_id" >&2 2>&1 || true
            timeout 10 qdel "$job_id" >/dev/null 2>&1 || true
            return 1
        fi
        sleep 0.2
    done
}

# ---------------------------------------------------------------------------------------------
# Already running?
# ---------------------------------------------------------------------------------------------
if alive sge_qmaster && alive sge_execd && timeout 10 qstat >/dev/null 2>&1; then
    echo "hpcseg dev SGE already running (queue $SGE_QUEUE on $(hostname), state in $STATE_DIR)"
    exit 0
fi

# ---------------------------------------------------------------------------------------------
# Another SGE on this machine? Its daemons hold the ports, and the cell is one for all.
# ---------------------------------------------------------------------------------------------
for d in "${SGE_DAEMONS[@]}"; do
    others=$(foreign_pids "$d" | tr '\n' ' ')
    if [[ -n $others ]]; then
        refuse "another SGE runs on this machine ($d pid ${others% }, not started with state in $STATE_DIR): the \
dev SGE does not start beside it. The tests submit only to an SGE this script started, so they skip the SGE tests \
(HPCSEG_TEST_USE_RUNNING_SGE=1 lets them submit to the running one)"
    fi
done

# ---------------------------------------------------------------------------------------------
# (a) Packages: preseeded so that the postinst creates cell "default" without asking
# ---------------------------------------------------------------------------------------------
HOST=$(hostname)
need_pkgs=()
for p in gridengine-master gridengine-exec gridengine-client; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || need_pkgs+=("$p")
done
if ((${#need_pkgs[@]})); then
    log "installing packages: ${need_pkgs[*]}"
    debconf-set-selections <<EOF
gridengine-common shared/gridengineconfig boolean true
gridengine-common shared/gridenginecell string $SGE_CELL
gridengine-common shared/gridenginemaster string $HOST
gridengine-master shared/gridengineconfig boolean true
gridengine-master shared/gridenginecell string $SGE_CELL
gridengine-master shared/gridenginemaster string $HOST
EOF
    export DEBIAN_FRONTEND=noninteractive
    # the packages' init scripts must start nothing (this script starts, records and stops the daemons): where no
    # policy-rc.d forbids it already, one does for the install
    policy=/usr/sbin/policy-rc.d
    made_policy=0
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\n# hpcseg sge-start.sh, while it installs gridengine: start no daemon\nexit 101\n' >"$policy"
        chmod 755 "$policy"
        made_policy=1
    fi
    apt-get update -qq >/dev/null
    apt_rc=0
    apt-get install -y -qq --no-install-recommends gridengine-master gridengine-exec gridengine-client \
        >"$STATE_DIR.apt.log" 2>&1 || apt_rc=$?
    [[ $made_policy == 1 ]] && rm -f "$policy"
    ((apt_rc == 0)) || die "apt-get install of the gridengine packages failed" "$STATE_DIR.apt.log"
    rm -f "$STATE_DIR.apt.log"
fi

mkdir -p "$STATE_DIR" "$RUN_DIR" "$LOG_DIR" "$STATE_DIR/conf"
chmod 755 "$STATE_DIR" "$RUN_DIR"

# A cell configured by someone else (another master host, or not by this script after its first start)
if [[ -s $SGE_COMMON/act_qmaster && ! -e $SGE_MARKER ]] && [[ $(cat "$SGE_COMMON/act_qmaster") != "$HOST" ]]; then
    refuse "$SGE_COMMON/act_qmaster names the qmaster $(cat "$SGE_COMMON/act_qmaster"), not this host: not \
reconfiguring another SGE's cell, and the tests skip the SGE tests (HPCSEG_TEST_USE_RUNNING_SGE=1 lets them \
submit to it)"
fi

# The cell and its spool: the postinst creates them (init_cluster); a package installed without it did not
if [[ ! -e $SGE_SPOOL/spooldb/sge ]]; then
    log "initialising cell $SGE_CELL (init_cluster)"
    mkdir -p "$SGE_SPOOL/qmaster/job_scripts" "$SGE_SPOOL/spooldb" "$SGE_COMMON"
    chown -R sgeadmin:sgeadmin "$SGE_SPOOL/qmaster" "$SGE_SPOOL/spooldb" "$SGE_ROOT/$SGE_CELL"
    [[ -e $SGE_COMMON/bootstrap ]] || install -m0644 -o sgeadmin -g sgeadmin \
        /usr/share/gridengine/default-bootstrap "$SGE_COMMON/bootstrap"
    su -s /bin/sh -c "/usr/share/gridengine/scripts/init_cluster $SGE_ROOT $SGE_CELL $SGE_SPOOL/spooldb sgeadmin" \
        sgeadmin >"$LOG_DIR/init_cluster.log" 2>&1 || die "init_cluster failed" "$LOG_DIR/init_cluster.log"
fi
echo "$HOST" >"$SGE_COMMON/act_qmaster"
chown sgeadmin:sgeadmin "$SGE_COMMON/act_qmaster"

# Host names: SGE refuses a client whose address resolves to another name than the one it calls itself
# (here 127.0.0.1 -> "localhost" while the host is "vm"); an alias makes them one host.
if ! getent hosts "$HOST" >/dev/null; then
    log "$HOST does not resolve: adding it to /etc/hosts (127.0.1.1)"
    echo "127.0.1.1 $HOST  # added by hpcseg hpc/dev-cluster/sge-start.sh" >>/etc/hosts
fi
rm -f "$SGE_COMMON/host_aliases"  # SGE's resolver below applies it: look without
sge_name=$(/usr/lib/gridengine/gethostname -aname)
host_ip=$(getent hosts "$HOST" | awk '{print $1; exit}')
reverse_name=$(/usr/lib/gridengine/gethostbyaddr -aname "$host_ip" 2>/dev/null || echo "$sge_name")
if [[ $reverse_name != "$sge_name" ]]; then
    echo "$sge_name $reverse_name" >"$SGE_COMMON/host_aliases"
fi
echo "# Written by hpcseg hpc/dev-cluster/sge-start.sh: this cell is a single-node dev/test SGE" >"$SGE_MARKER"

# ---------------------------------------------------------------------------------------------
# (b) qmaster
# ---------------------------------------------------------------------------------------------
for d in "${SGE_DAEMONS[@]}"; do
    alive "$d" || rm -f "$RUN_DIR/$d.pid"
done

# start_sge_daemon NAME PIDFILE_GLOB: SGE's daemons fork themselves and write their own pid file; record it here.
start_sge_daemon() {
    local name=$1 own_pidfile=$2
    if alive "$name"; then
        return 0
    fi
    log "starting $name"
    STARTED+=("$name")
    rm -f $own_pidfile
    setsid "/usr/sbin/$name" </dev/null >>"$LOG_DIR/$name.log" 2>&1 || die "$name failed to start" "$LOG_DIR/$name.log"
    wait_for 30 "$name (pid file)" "$LOG_DIR/$name.log" compgen -G "$own_pidfile"
    cat $own_pidfile | tr -dc '0-9' >"$RUN_DIR/$name.pid"
    wait_for 10 "$name to run" "$LOG_DIR/$name.log" alive "$name"
}

start_sge_daemon sge_qmaster "$SGE_SPOOL/qmaster/qmaster.pid"
wait_for 30 "sge_qmaster to answer" "$QMASTER_MESSAGES" timeout 5 qconf -sh

# ---------------------------------------------------------------------------------------------
# (c) Configuration (qconf from files: every step replaces the whole object, so reruns converge)
# ---------------------------------------------------------------------------------------------
CONF=$STATE_DIR/conf
qconf_q() { timeout 20 qconf "$@" >>"$LOG_DIR/qconf.log" 2>&1 || die "qconf $* failed" "$LOG_DIR/qconf.log"; }

qconf -sh 2>/dev/null | grep -qx "$sge_name" || qconf_q -ah "$sge_name"
qconf -ss 2>/dev/null | grep -qx "$sge_name" || qconf_q -as "$sge_name"

# global: root may run jobs, accounting written as a job ends, fast load reports
timeout 20 qconf -sconf global >"$CONF/global.orig" || die "qconf -sconf global failed" "$QMASTER_MESSAGES"
sed -e '/^#global:/d' \
    -e 's/^min_uid .*/min_uid                      0/' \
    -e 's/^min_gid .*/min_gid                      0/' \
    -e 's/^load_report_time .*/load_report_time             00:00:05/' \
    "$CONF/global.orig" | awk '
        /^reporting_params/ { print "reporting_params             accounting=true reporting=false flush_time=00:00:01 joblog=false sharelog=00:00:00 accounting_flush_time=00:00:00"; skip = /\\$/; next }
        skip { skip = /\\$/; next }
        { print }' >"$CONF/global"
(cd "$CONF" && qconf_q -Mconf global)

# scheduler: a decision every second, and at once on submission and on a job's end
timeout 20 qconf -ssconf >"$CONF/sched.orig" || die "qconf -ssconf failed" "$QMASTER_MESSAGES"
sed -e 's/^schedule_interval .*/schedule_interval                 0:0:1/' \
    -e 's/^flush_submit_sec .*/flush_submit_sec                  1/' \
    -e 's/^flush_finish_sec .*/flush_finish_sec                  1/' \
    "$CONF/sched.orig" >"$CONF/sched"
qconf_q -Msconf "$CONF/sched"

# a GPU count consumed per job, not per slot as "YES" would (-pe smp 4 -l gpu=1 would take 4); the fake GPU:
# nothing checks a device
GPU_COMPLEX="gpu                 gpu        INT       <=    YES         JOB        0        0"
timeout 20 qconf -sc >"$CONF/complexes" || die "qconf -sc failed" "$QMASTER_MESSAGES"
if ! grep -qx "$GPU_COMPLEX" "$CONF/complexes"; then
    { grep -v '^gpu ' "$CONF/complexes"; echo "$GPU_COMPLEX"; } >"$CONF/complexes.new"
    qconf_q -Mc "$CONF/complexes.new"
fi

# the parallel environment for several cores on one host
sed -e 's/^# .*//' /usr/share/gridengine/util/resources/pe/smp | grep -v '^$' >"$CONF/smp.pe"
if qconf -sp smp >/dev/null 2>&1; then qconf_q -Mp "$CONF/smp.pe"; else qconf_q -Ap "$CONF/smp.pe"; fi

cat >"$CONF/exechost" <<EOF
hostname              $sge_name
load_scaling          NONE
complex_values        gpu=$NODE_GPUS
user_lists            NONE
xuser_lists           NONE
projects              NONE
xprojects             NONE
usage_scaling         NONE
report_variables      NONE
EOF
if qconf -se "$sge_name" >/dev/null 2>&1; then qconf_q -Me "$CONF/exechost"; else qconf_q -Ae "$CONF/exechost"; fi

# the queue: every CPU a slot, no load threshold (a busy 2-core machine would block it), bash as the shell
timeout 20 qconf -sq >"$CONF/queue.template" || die "qconf -sq failed" "$QMASTER_MESSAGES"
sed -e "s/^qname .*/qname                 $SGE_QUEUE/" \
    -e "s/^hostlist .*/hostlist              $sge_name/" \
    -e "s/^slots .*/slots                 $NODE_CPUS/" \
    -e 's/^pe_list .*/pe_list               smp/' \
    -e 's/^load_thresholds .*/load_thresholds       NONE/' \
    -e 's|^shell .*|shell                 /bin/bash|' \
    -e 's/^shell_start_mode .*/shell_start_mode      unix_behavior/' \
    -e 's/^notify .*/notify                00:00:60/' \
    "$CONF/queue.template" >"$CONF/queue"
if qconf -sq "$SGE_QUEUE" >/dev/null 2>&1; then qconf_q -Mq "$CONF/queue"; else qconf_q -Aq "$CONF/queue"; fi

# ---------------------------------------------------------------------------------------------
# (d) execd, and a job through the whole way
# ---------------------------------------------------------------------------------------------
mkdir -p "$SGE_SPOOL/execd"
chown sgeadmin:sgeadmin "$SGE_SPOOL/execd"
# (execd names its spool folder after the name its address resolves to, which may be the alias)
start_sge_daemon sge_execd "$SGE_SPOOL/execd/*/execd.pid"

queue_ready() {
    # the queue instance reports load and is in no alarm/unknown/disabled/error state
    local states
    states=$(timeout 5 qstat -f -q "$SGE_QUEUE@$sge_name" 2>/dev/null | awk -v q="$SGE_QUEUE@$sge_name" '$1 == q {print $6}')
    [[ -n $(timeout 5 qstat -f -q "$SGE_QUEUE@$sge_name" 2>/dev/null | awk -v q="$SGE_QUEUE@$sge_name" '$1 == q') ]] || return 1
    [[ -z $states ]] && [[ $(timeout 5 qhost -h "$sge_name" | awk -v h="$sge_name" '$1 == h {print $7}') != "-" ]]
}
deadline=$(( $(date +%s) + WAIT_S ))
until queue_ready; do
    if (( $(date +%s) >= deadline )); then
        timeout 5 qstat -f >&2 || true
        die "queue $SGE_QUEUE@$sge_name did not become usable within ${WAIT_S}s" \
            "$(compgen -G "$SGE_SPOOL/execd/*/messages" | head -n 1)" "$QMASTER_MESSAGES"
    fi
    # an error state left by an earlier failed job would block the queue
    timeout 5 qmod -c "$SGE_QUEUE@$sge_name" >/dev/null 2>&1 || true
    sleep 0.5
done
probe_job || die "a probe job did not reach qacct" "$(compgen -G "$SGE_SPOOL/execd/*/messages" | head -n 1)" "$QMASTER_MESSAGES"

elapsed=$(awk -v a="$t_start" -v b="$(date +%s.%N)" 'BEGIN {printf "%.1f", b - a}')
echo "hpcseg dev SGE ready in ${elapsed}s: queue $SGE_QUEUE on $sge_name ($NODE_CPUS slots, pe smp, $NODE_GPUS fake gpus);" \
    "SGE_ROOT=$SGE_ROOT SGE_CELL=$SGE_CELL; state in $STATE_DIR"
