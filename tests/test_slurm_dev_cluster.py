"""Real submitit jobs against a Slurm cluster (the single-node dev cluster: hpc/dev-cluster/start.sh).

Skipped when no cluster answers (see tests/fixtures_slurm.py).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import typing as tp

import cloudpickle
import pytest
import submitit

# The tests directory is not importable inside the job, so ship this module's functions by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

pytestmark = pytest.mark.slurm  # for `-m slurm` / `-m "not slurm"`; the fixture does the skipping

WAIT_S = 60


def _double_and_report(x: int) -> tp.Dict[str, tp.Any]:
    return {
        "value": 2 * x,
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "hostname": socket.gethostname(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
    }


def _sleep(seconds: float) -> str:
    time.sleep(seconds)
    return "woke up"


def _executor(folder, cluster, **params: tp.Any) -> submitit.AutoExecutor:
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
    executor.update_parameters(
        slurm_partition=cluster.partition,
        gpus_per_node=1,
        cpus_per_task=1,
        timeout_min=5,
        name="hpcseg-test",
        **params,
    )
    return executor


def _wait_until(predicate: tp.Callable[[], bool], what: str, timeout_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.2)


def _wait_done(job: submitit.Job, timeout_s: float = WAIT_S) -> None:
    # job.state is cached with back-off: force a fresh sacct call on every poll
    _wait_until(lambda: job.done(force_check=True), f"job {job.job_id} to finish", timeout_s)


def _sacct_state(job_id: str) -> str:
    out = subprocess.run(
        ["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State"],
        capture_output=True, text=True, timeout=10, check=True,
    ).stdout.strip()
    return out.splitlines()[0] if out else ""


def test_gpu_job_returns_result_and_sees_gpu(tmp_path, slurm_cluster):
    job = _executor(tmp_path, slurm_cluster).submit(_double_and_report, 21)
    _wait_done(job)
    result = job.result()
    assert result["value"] == 42
    assert result["cuda_visible_devices"] == "0"
    assert result["slurm_job_id"] == job.job_id
    assert result["hostname"].split(".")[0] == slurm_cluster.hostname


def test_sacct_reports_completed(tmp_path, slurm_cluster):
    job = _executor(tmp_path, slurm_cluster).submit(_double_and_report, 1)
    _wait_done(job)
    assert job.result()["value"] == 2
    # done() is already true once the result file exists; the accounting record can lag a moment
    _wait_until(lambda: _sacct_state(job.job_id) == "COMPLETED", "sacct to report COMPLETED", 15)
    assert job.get_info(mode="force")["State"] == "COMPLETED"
    assert job.state == "COMPLETED"


def test_cancelled_job_ends_cancelled(tmp_path, slurm_cluster):
    job = _executor(tmp_path, slurm_cluster).submit(_sleep, 300)
    _wait_until(lambda: job.get_info(mode="force").get("State") == "RUNNING",
                f"job {job.job_id} to start")
    job.cancel()
    _wait_done(job)
    assert job.state.startswith("CANCELLED")
    assert _sacct_state(job.job_id).startswith("CANCELLED")
    # result() of a job that never wrote a result waits _results_timeout_s (15 s) for the file first
    job._results_timeout_s = 0
    with pytest.raises(submitit.core.utils.UncompletedJobError):
        job.result()
