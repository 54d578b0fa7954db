"""Pytest plugin: the ``slurm_cluster`` fixture for tests that need a real Slurm cluster.

Tests just request the fixture (no marker needed); when no usable cluster answers, they are skipped
with a hint to start the single-node dev cluster (``bash hpc/dev-cluster/start.sh``).
"""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import typing as tp

import pytest

PARTITION = "gpuv100"
_TIMEOUT_S = 10
# node states in which a job can start (sinfo %T, lower case; a trailing "*" means not responding)
_USABLE_STATES = {"idle", "mixed", "allocated", "completing"}


@dataclasses.dataclass(frozen=True)
class SlurmCluster:
    """What a test needs to know about the cluster it submits to."""

    partition: str
    hostname: str


def _run(cmd: tp.List[str]) -> str:
    """Run a Slurm command with a short timeout; return stdout, raise RuntimeError with a reason."""
    if shutil.which(cmd[0]) is None:
        raise RuntimeError(f"{cmd[0]} not found on PATH")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"`{' '.join(cmd)}` did not answer within {_TIMEOUT_S}s") from None
    if proc.returncode != 0:
        err = proc.stderr.strip().splitlines()[-1:] or proc.stdout.strip().splitlines()[:1]
        raise RuntimeError(f"`{' '.join(cmd)}` exited {proc.returncode}: {''.join(err)}")
    return proc.stdout


def probe_slurm_cluster(partition: str = PARTITION) -> SlurmCluster:
    """Return the cluster if ``sinfo`` and ``sacct`` answer and a node of ``partition`` can run
    jobs; raise RuntimeError with the reason otherwise."""
    # fails at once when no controller answers (sinfo would retry the connection for ~9 s)
    _run(["scontrol", "ping"])
    nodes = _run(["sinfo", "-h", "-N", "-p", partition, "-o", "%N %T"]).split()
    if not nodes:
        raise RuntimeError(f"partition {partition!r} does not exist or has no node")
    pairs = list(zip(nodes[::2], nodes[1::2]))
    usable = [name for name, state in pairs if state in _USABLE_STATES]
    if not usable:
        states = ", ".join(f"{name}: {state}" for name, state in pairs)
        raise RuntimeError(f"no usable node in partition {partition!r} ({states})")
    # submitit reads job states with sacct: without accounting, jobs never count as done
    _run(["sacct", "-n", "-X", "-S", "now-1minutes", "-o", "JobID"])
    return SlurmCluster(partition=partition, hostname=usable[0])


@pytest.fixture(scope="session")
def slurm_cluster() -> tp.Iterator[SlurmCluster]:
    """A Slurm cluster that answers ``sinfo`` and ``sacct``; skips the test when there is none."""
    try:
        cluster = probe_slurm_cluster()
    except RuntimeError as e:
        pytest.skip(f"no Slurm cluster: start one with `bash hpc/dev-cluster/start.sh` ({e})")
    yield cluster
