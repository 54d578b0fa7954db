"""Pytest plugin: the ``sge_cluster`` fixture for tests that need a real (Son of) Grid Engine.

Before any test uses an SGE, the session checks that it may (the SGE that hpc/dev-cluster/sge-start.sh started,
see fixtures_slurm.require_ours; HPCSEG_TEST_USE_RUNNING_SGE=1 lets the tests use any SGE that answers) and that
it can: the queue has an instance that is not in an
alarm, error, disabled or unknown state, and a trivial job submitted to it shows up in its accounting
(``qacct -j``) within a few seconds (hpcseg reads a finished job's state there once qstat has forgotten it).
When the check fails the tests are skipped with the reason and a hint to start the single-node dev SGE
(``bash hpc/dev-cluster/sge-start.sh``); under CI (``CI`` set) they fail instead.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
import typing as tp

import pytest

from fixtures_slurm import probe_command, require_ours, usable
from hpcseg.errors import CommandError, run_command

QUEUE = "all.q"
_TIMEOUT_S = 10
#: how long accounting may take to know a finished job (the dev SGE flushes it at once)
ACCOUNTING_WAIT_S = float(os.environ.get("HPCSEG_TEST_QACCT_WAIT_S", "15"))


@dataclasses.dataclass(frozen=True)
class SgeCluster:
    queue: str
    hostname: str


def probe_sge_cluster(queue: str = QUEUE, accounting_wait_s: float | None = None) -> SgeCluster:
    """The cluster if an instance of ``queue`` can run jobs and qacct knows a trivial job submitted to it; raise
    RuntimeError (NotOurs where hpcseg's scripts did not start it) with the reason otherwise."""
    wait_s = ACCOUNTING_WAIT_S if accounting_wait_s is None else accounting_wait_s
    require_ours("sge")  # before any SGE command: the probe job is a job too
    if shutil.which("qsub") is None or shutil.which("qconf") is None:
        raise RuntimeError("no qsub/qconf on PATH")
    # columns: queuename qtype resv/used/tot. load_avg arch [states]
    lines = [ln.split() for ln in probe_command(["qstat", "-f", "-q", queue]).splitlines()
             if ln.startswith(f"{queue}@")]
    usable = [f[0].split("@", 1)[1] for f in lines if len(f) == 5]
    if not usable:
        raise RuntimeError(f"queue {queue!r} has no usable instance ({[' '.join(f) for f in lines] or 'none'})")
    out = probe_command(["qsub", "-terse", "-b", "y", "-q", queue, "-N", "hpcseg-test-probe", "-o", "/dev/null",
                         "-j", "y", "true"]).strip()
    if not out.isdigit():
        raise RuntimeError(f"qsub printed no job id: {out[:200]!r}")
    deadline = time.monotonic() + wait_s
    while True:
        try:
            run_command(["qacct", "-j", out], _TIMEOUT_S)
            break
        except CommandError:
            if time.monotonic() > deadline:
                run_command(["qdel", out], _TIMEOUT_S, check=False)
                raise RuntimeError(f"qacct does not know job {out} {wait_s:g} s after its submission: the job did "
                                   "not run, or this SGE's accounting is off") from None
            time.sleep(0.3)
    return SgeCluster(queue=queue, hostname=usable[0])


def usable_sge_cluster() -> SgeCluster:
    """The probed cluster; skips the calling test when there is none, or fails it under CI."""
    return usable(probe_sge_cluster, "the dev SGE", "sge")


@pytest.fixture(scope="session")
def sge_cluster() -> tp.Iterator[SgeCluster]:
    """An SGE the tests can use (see the module's text), probed once per session."""
    yield usable_sge_cluster()
