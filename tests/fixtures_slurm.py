"""Pytest plugin: the ``slurm_cluster`` fixture for tests that need a real Slurm cluster.

Tests just request the fixture (no marker needed). Before any test uses a Slurm, the session checks that it is
one the tests may use: the Slurm that hpc/dev-cluster/start.sh started (hpc/dev-cluster/ours.sh decides, from the
state dir's pid file and the marker in the config it wrote), unless HPCSEG_TEST_USE_RUNNING_SLURM=1 lets them
use whichever Slurm answers; nothing is submitted to any other (on a login node, that would be the site's
production scheduler). Then that it is one the tests can use: the partition exists with a usable node, and a
trivial job submitted to it shows up in its accounting (``sacct -j``) within a few seconds (a Slurm whose
accounting does not know our jobs would fail every test that reads a job's state). When a check fails the tests
are skipped with one line saying why (and how to opt in, or a hint to start the single-node dev cluster: ``bash
hpc/dev-cluster/start.sh``); under CI (``CI`` set) they fail instead, since CI starts the dev cluster itself and
must not pass by skipping. docs/development-tests.md tells the user.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import time
import typing as tp
from pathlib import Path

import pytest

from hpcseg.errors import CommandError, run_command

PARTITION = "gpuv100"
_TIMEOUT_S = 10
#: how long accounting may take to know a job just submitted (the dev cluster: well under a second)
ACCOUNTING_WAIT_S = float(os.environ.get("HPCSEG_TEST_SACCT_WAIT_S", "10"))
# node states in which a job can start (sinfo %T, lower case; a trailing "*" means not responding)
_USABLE_STATES = {"idle", "mixed", "allocated", "completing"}
#: decides whether a running scheduler is the dev cluster that hpcseg's scripts started
OURS_SCRIPT = Path(__file__).resolve().parents[1] / "hpc" / "dev-cluster" / "ours.sh"
#: the variable that lets the tests submit to a running scheduler that hpcseg's scripts did not start
USE_RUNNING = {"slurm": "HPCSEG_TEST_USE_RUNNING_SLURM", "sge": "HPCSEG_TEST_USE_RUNNING_SGE"}
_START_SCRIPT = {"slurm": "start.sh", "sge": "sge-start.sh"}
_TITLE = {"slurm": "Slurm", "sge": "SGE"}


@dataclasses.dataclass(frozen=True)
class SlurmCluster:
    """What a test needs to know about the cluster it submits to."""

    partition: str
    hostname: str


def probe_command(cmd: tp.List[str]) -> str:
    """Run a scheduler command of a cluster probe with a short timeout; return stdout, raise RuntimeError with a
    reason (the probe's way of saying the cluster is not usable)."""
    try:
        return run_command(cmd, _TIMEOUT_S).stdout
    except CommandError as err:
        raise RuntimeError(str(err)) from None


def _set(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


def in_ci() -> bool:
    return _set("CI")


class NotOurs(RuntimeError):
    """A scheduler answers, but hpcseg's dev-cluster scripts did not start it: the tests submit nothing to it."""


def require_ours(kind: str) -> str:
    """Unless USE_RUNNING[kind] is set: raise NotOurs where the `kind` ("slurm", "sge") that the scheduler
    commands reach is not the dev cluster hpcseg's start script started, RuntimeError where none runs. Runs before
    any scheduler command of a probe. Returns what ours.sh said (or that the variable is set)."""
    if _set(USE_RUNNING[kind]):
        return f"{USE_RUNNING[kind]} is set: using the {kind} that answers"
    try:
        proc = subprocess.run(["bash", str(OURS_SCRIPT), kind], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{OURS_SCRIPT.name} {kind} did not answer within 30 s") from None
    said = (proc.stdout.strip() or proc.stderr.strip() or "no message").splitlines()[-1]
    if proc.returncode == 1:
        raise NotOurs(said)
    if proc.returncode != 0:
        raise RuntimeError(said)
    return said


def ours_sh(kind: str, env: tp.Mapping[str, str] | None = None) -> subprocess.CompletedProcess:
    """`hpc/dev-cluster/ours.sh KIND` in `env` (default: this environment without the opt-in variables)."""
    env = {k: v for k, v in os.environ.items() if k not in USE_RUNNING.values()} if env is None else dict(env)
    return subprocess.run(["bash", str(OURS_SCRIPT), kind], capture_output=True, text=True, timeout=30, env=env)


def usable(probe: tp.Callable[[], tp.Any], what: str, kind: str) -> tp.Any:
    """What `probe` finds (it raises RuntimeError saying why a cluster is not usable); else skips the calling test
    with one line saying why (and, for a scheduler hpcseg did not start, how to opt in), or fails it under CI,
    which starts the dev clusters."""
    try:
        return probe()
    except NotOurs as e:
        title = _TITLE[kind]
        reason = (f"not submitting to this machine's {title}: {e}; the tests submit only to a {title} that "
                  f"hpc/dev-cluster/{_START_SCRIPT[kind]} started (set {USE_RUNNING[kind]}=1 to use this one)")
        if in_ci():
            pytest.fail(f"CI needs {what}: {reason}", pytrace=False)
        pytest.skip(reason)
    except RuntimeError as e:
        if in_ci():
            pytest.fail(f"CI needs {what}, and it is not usable: {e}", pytrace=False)
        pytest.skip(f"{what} is not usable (start it with `bash hpc/dev-cluster/{_START_SCRIPT[kind]}`): {e}")


def _accounting_knows(job_id: str, wait_s: float) -> bool:
    deadline = time.monotonic() + wait_s
    while True:
        out = probe_command(["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "JobID"])
        if job_id in out.split():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.3)


def probe_slurm_cluster(partition: str = PARTITION, accounting_wait_s: float | None = None) -> SlurmCluster:
    """Return the cluster if it is ours (require_ours), a node of ``partition`` can run jobs and ``sacct`` knows a
    trivial job submitted to it within ``accounting_wait_s`` (default ACCOUNTING_WAIT_S); raise RuntimeError (or
    NotOurs) with the reason otherwise."""
    if accounting_wait_s is None:
        accounting_wait_s = ACCOUNTING_WAIT_S
    require_ours("slurm")  # before any Slurm command: the probe job is a job too
    # fails at once when no controller answers (sinfo would retry the connection for ~9 s)
    probe_command(["scontrol", "ping"])
    nodes = probe_command(["sinfo", "-h", "-N", "-p", partition, "-o", "%N %T"]).split()
    if not nodes:
        raise RuntimeError(f"partition {partition!r} does not exist or has no node")
    pairs = list(zip(nodes[::2], nodes[1::2]))
    usable = [name for name, state in pairs if state in _USABLE_STATES]
    if not usable:
        states = ", ".join(f"{name}: {state}" for name, state in pairs)
        raise RuntimeError(f"no usable node in partition {partition!r} ({states})")
    # the tests' jobs ask for one GPU: so does the probe, so that a Slurm without one is refused here
    out = probe_command(["sbatch", "--parsable", "-p", partition, "-J", "hpcseg-test-probe", "-t", "1", "-c", "1",
                         "--gpus-per-node=1", "-o", "/dev/null", "--wrap", "true"])
    job_id = out.strip().split(";")[0]
    if not job_id.isdigit():
        raise RuntimeError(f"sbatch printed no job id: {out.strip()[:200]!r}")
    try:
        # submitit reads job states with sacct: a Slurm whose accounting does not know our jobs is not usable
        if not _accounting_knows(job_id, accounting_wait_s):
            raise RuntimeError(f"sacct does not know job {job_id} {accounting_wait_s:g} s after its submission: "
                               "this Slurm's accounting is not the one its jobs are recorded in (a foreign Slurm?)")
    finally:
        try:
            run_command(["scancel", job_id], _TIMEOUT_S, check=False)
        except CommandError:
            pass  # the job ends by itself within its minute
    return SlurmCluster(partition=partition, hostname=usable[0])


def usable_slurm_cluster() -> SlurmCluster:
    """The probed cluster; skips the calling test when there is none, or fails it under CI."""
    return usable(probe_slurm_cluster, "the Slurm dev cluster", "slurm")


@pytest.fixture(scope="session")
def slurm_cluster() -> tp.Iterator[SlurmCluster]:
    """A Slurm cluster the tests can use (see the module's text), probed once per session."""
    yield usable_slurm_cluster()
