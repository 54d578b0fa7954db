#!/usr/bin/env bash
# Use the dev cluster of KIND (slurm, sge) that hpcseg's start script (start.sh, sge-start.sh) started earlier
# (ours.sh decides), else start it; prints 1 where this run started it (the caller stops it at the end), else 0.
#
#   stop=$(bash hpc/dev-cluster/use-or-start.sh slurm)     # what hpc/run-tests.sh does, for slurm and sge
#
# Another scheduler of that kind on this machine is a note, not a failure: the tests submit nothing to it and skip
# its tests, unless the user opted in (HPCSEG_TEST_USE_RUNNING_SLURM/SGE=1). Under CI (a machine of its own)
# every cluster test must run, so a dev cluster that does not start fails (exit 1). Messages go to stderr.
set -uo pipefail
cd "$(dirname "$0")/../.."

kind=${1:-}
case $kind in
    slurm) title=Slurm script=start.sh ;;
    sge) title=SGE script=sge-start.sh ;;
    *) echo "usage: $0 slurm|sge" >&2; exit 2 ;;
esac
var=HPCSEG_TEST_USE_RUNNING_${kind^^}
rc=0
if said=$(bash hpc/dev-cluster/ours.sh "$kind"); then
    echo "note: the $title dev cluster already runs, started earlier by hpc/dev-cluster/$script: using it," \
        "and leaving it running ($said)" >&2
    bash hpc/dev-cluster/"$script" >&2 || rc=$?  # idempotent: starts again a daemon of it that died
    started=0
else
    bash hpc/dev-cluster/"$script" >&2 || rc=$?
    started=1
fi
if ((rc == 0)); then
    echo "$started"
    exit 0
fi
if [[ -n ${CI:-} ]]; then
    echo "the $title dev cluster did not start (hpc/dev-cluster/$script exited $rc), and CI needs it" >&2
    exit 1
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
