#!/usr/bin/env bash
# Whether the Slurm or SGE that the scheduler commands reach from here is the dev cluster that hpcseg's scripts
# (start.sh, sge-start.sh) started: the tests and run-tests.sh submit only to such a one.
#
#   bash hpc/dev-cluster/ours.sh slurm    # exit 0 and "ours: ..." on stdout; else why on stdout, and exit 1 where
#   bash hpc/dev-cluster/ours.sh sge      # another scheduler answers there, 3 where no dev cluster is set up or runs
#
# Slurm: the config the commands read ($SLURM_CONF, else /etc/slurm/slurm.conf) was written by start.sh, its
# SlurmctldPidFile lies in this state dir ($HPCSEG_DEV_CLUSTER_DIR), that pid file names a live slurmctld, no
# other slurmctld runs here, and (where ss can tell) that slurmctld is the one listening on the config's port.
# SGE: the cell the commands use ($SGE_ROOT/$SGE_CELL, else Debian's) is the one sge-start.sh configured (its
# marker file), its act_qmaster is this host, the pid file in $HPCSEG_DEV_SGE_DIR names a live sge_qmaster, and
# no other sge_qmaster runs here. Changes nothing.
set -uo pipefail
here=$(dirname "${BASH_SOURCE[0]}")

not_ours() { echo "$*"; exit 1; }
not_running() { echo "$*"; exit 3; }

# listener_pid PORT: the pid listening on PORT where ss can tell (root sees every process), else nothing
listener_pid() {
    ss -Hltnp "sport = :$1" 2>/dev/null | sed -n 's/.*users:(("[^"]*",pid=\([0-9]*\).*/\1/p' | head -n 1
}

case ${1:-} in
slurm)
    conf=${SLURM_CONF:-/etc/slurm/slurm.conf}
    source "$here/common.sh"
    others=$(foreign_pids slurmctld | tr '\n' ' ')
    [[ -z $others ]] \
        || not_ours "a slurmctld not started by start.sh with state in $STATE_DIR runs on this machine" \
            "(pid ${others% })"
    [[ -r $conf ]] || not_running "$conf does not exist: no dev cluster is set up (start.sh writes it)"
    head -n 1 "$conf" | grep -q '^# Written by hpcseg hpc/dev-cluster/start.sh' \
        || not_ours "$conf was not written by hpcseg's hpc/dev-cluster/start.sh: a Slurm of this machine or site"
    pidfile=$(sed -n 's/^SlurmctldPidFile=//p' "$conf" | tail -n 1)
    [[ $pidfile == "$RUN_DIR/slurmctld.pid" ]] \
        || not_ours "$conf is of a dev cluster with its state elsewhere ($pidfile), not in $STATE_DIR"
    pid=$(pid_of slurmctld) || not_running "no slurmctld started by start.sh runs ($pidfile names no live slurmctld)"
    port=$(sed -n 's/^SlurmctldPort=//p' "$conf" | tail -n 1)
    listener=$(listener_pid "${port:-6817}")
    [[ -z $listener || $listener == "$pid" ]] \
        || not_ours "port ${port:-6817} is served by pid $listener, not by the dev cluster's slurmctld (pid $pid)"
    echo "ours: slurmctld pid $pid, config $conf, state in $STATE_DIR"
    ;;
sge)
    # the cell the commands use, as Debian's wrapper finds it: the environment, /etc/default/gridengine, defaults
    client=$( (unset_root=${SGE_ROOT:-} unset_cell=${SGE_CELL:-}
               [[ -r /etc/default/gridengine ]] && . /etc/default/gridengine
               echo "${unset_root:-${SGE_ROOT:-/var/lib/gridengine}}/${unset_cell:-${SGE_CELL:-default}}") )
    source "$here/sge-common.sh"
    others=$(foreign_pids sge_qmaster | tr '\n' ' ')
    [[ -z $others ]] || not_ours "an sge_qmaster not started by sge-start.sh with state in $STATE_DIR runs on this" \
        "machine (pid ${others% })"
    [[ $client == "$SGE_ROOT/$SGE_CELL" ]] \
        || not_ours "the SGE commands use the cell $client, not the dev SGE's $SGE_ROOT/$SGE_CELL"
    [[ -d $SGE_COMMON ]] || not_running "no cell $SGE_ROOT/$SGE_CELL: no dev SGE is set up (sge-start.sh makes it)"
    [[ -e $SGE_MARKER ]] || not_ours "cell $SGE_ROOT/$SGE_CELL was not configured by hpcseg's sge-start.sh"
    master=$(cat "$SGE_COMMON/act_qmaster" 2>/dev/null)
    [[ $master == "$(hostname)" ]] || not_ours "cell $SGE_ROOT/$SGE_CELL names the qmaster '$master', not this host"
    pid=$(pid_of sge_qmaster) \
        || not_running "no sge_qmaster started by sge-start.sh runs ($RUN_DIR/sge_qmaster.pid names no live one)"
    echo "ours: sge_qmaster pid $pid, cell $SGE_ROOT/$SGE_CELL, state in $STATE_DIR"
    ;;
*)
    echo "usage: $0 slurm|sge" >&2
    exit 2
    ;;
esac
