"""Real submitit jobs against a Slurm cluster (the single-node dev cluster: hpc/dev-cluster/start.sh), skipped when
no usable cluster answers, and the check that decides it (tests/fixtures_slurm.py) against fake Slurm commands.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import typing as tp
from pathlib import Path

import cloudpickle
import pytest
import submitit

from fixtures_cluster import SubmittedJobs
from fixtures_slurm import SlurmCluster, probe_slurm_cluster, usable_slurm_cluster

# The tests directory is not importable inside the job, so ship this module's functions by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

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


@pytest.mark.slurm  # for `-m slurm` / `-m "not slurm"`; the fixture does the skipping
def test_gpu_job_returns_result_and_sees_gpu(tmp_path, slurm_cluster):
    job = _executor(tmp_path, slurm_cluster).submit(_double_and_report, 21)
    _wait_done(job)
    result = job.result()
    assert result["value"] == 42
    assert result["cuda_visible_devices"] == "0"
    assert result["slurm_job_id"] == job.job_id
    assert result["hostname"].split(".")[0] == slurm_cluster.hostname


@pytest.mark.slurm  # for `-m slurm` / `-m "not slurm"`; the fixture does the skipping
def test_sacct_reports_completed(tmp_path, slurm_cluster):
    job = _executor(tmp_path, slurm_cluster).submit(_double_and_report, 1)
    _wait_done(job)
    assert job.result()["value"] == 2
    # done() is already true once the result file exists; the accounting record can lag a moment
    _wait_until(lambda: _sacct_state(job.job_id) == "COMPLETED", "sacct to report COMPLETED", 15)
    assert job.get_info(mode="force")["State"] == "COMPLETED"
    assert job.state == "COMPLETED"


@pytest.mark.slurm  # for `-m slurm` / `-m "not slurm"`; the fixture does the skipping
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


# ---------------------------------------------------------------- the check before a Slurm is used


@pytest.fixture
def fake_slurm(fake_commands):
    """Fake scontrol/sinfo/sbatch/sacct/scancel first on PATH; `set(name, stdout)` changes what one prints;
    `calls` lists the commands run (one line each)."""
    for name, stdout in [("scontrol", "Slurmctld(primary) at vm is UP\n"), ("sinfo", "vm idle\n"),
                         ("sbatch", "4242\n"), ("sacct", "4242\n"), ("scancel", "")]:
        fake_commands.set(name, stdout)
    return fake_commands


def test_a_slurm_whose_accounting_knows_the_probe_job_is_used(fake_slurm):
    assert probe_slurm_cluster("gpuv100", accounting_wait_s=0) == SlurmCluster(partition="gpuv100", hostname="vm")
    assert "scancel 4242" in fake_slurm.calls.read_text().splitlines()


def test_a_slurm_whose_accounting_does_not_know_our_jobs_is_not_used(fake_slurm):
    fake_slurm.set("sacct", "")  # a foreign Slurm: sbatch takes the job, its accounting never hears of it
    with pytest.raises(RuntimeError, match=r"^sacct does not know job 4242 0\.5 s after its submission"):
        probe_slurm_cluster("gpuv100", accounting_wait_s=0.5)
    calls = fake_slurm.calls.read_text().splitlines()
    assert calls[-1] == "scancel 4242", calls  # the probe job is not left behind


def test_a_slurm_without_the_partition_or_a_usable_node_is_not_used(fake_slurm):
    fake_slurm.set("sinfo", "")
    with pytest.raises(RuntimeError, match=r"^partition 'gpuv100' does not exist or has no node$"):
        probe_slurm_cluster("gpuv100", accounting_wait_s=0)
    fake_slurm.set("sinfo", "vm drained\n")
    with pytest.raises(RuntimeError, match=r"^no usable node in partition 'gpuv100' \(vm: drained\)$"):
        probe_slurm_cluster("gpuv100", accounting_wait_s=0)
    assert not [c for c in fake_slurm.calls.read_text().splitlines() if c.startswith("sbatch")]


@pytest.mark.parametrize("ci", ["", "true"])
def test_an_unusable_slurm_skips_the_tests_but_fails_them_under_ci(fake_slurm, monkeypatch, ci):
    fake_slurm.set("sacct", "")
    monkeypatch.setenv("CI", ci)
    monkeypatch.setattr("fixtures_slurm.ACCOUNTING_WAIT_S", 0)
    outcome = pytest.fail.Exception if ci else pytest.skip.Exception
    with pytest.raises(outcome, match="sacct does not know job 4242"):
        usable_slurm_cluster()


def test_a_job_is_cancelled_only_through_the_scheduler_it_was_submitted_to(fake_slurm, tmp_path):
    jobs = SubmittedJobs()
    jobs.record("scancel", "4242")
    jobs.end_all()
    assert fake_slurm.calls.read_text().splitlines() == ["scancel 4242"]
    # a fake sbatch beside no scancel: the real scancel must not cancel the id the fake made up
    (tmp_path / "bin" / "scancel").unlink()
    jobs.record("scancel", "4243")
    assert jobs.cancel_argvs == []


# ---------------------------------------------------------------- the dev cluster's scripts beside another Slurm

DEV_CLUSTER = Path(__file__).resolve().parents[1] / "hpc" / "dev-cluster"


def _common(snippet: str, state_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", f"source {DEV_CLUSTER / 'common.sh'}; {snippet}"], capture_output=True,
                          text=True, timeout=30, env={**os.environ, "HPCSEG_DEV_CLUSTER_DIR": str(state_dir)})


def test_the_dev_cluster_takes_the_next_free_port_when_its_port_is_taken(tmp_path):
    with socket.socket() as listener:  # another program's server on the port the dev cluster would want
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        taken = listener.getsockname()[1]
        picked = int(_common(f"free_port {taken}", tmp_path).stdout)
        assert picked > taken
        # names the program where ss can tell (root), so the log says who holds the port
        user = _common(f"port_user {taken}", tmp_path).stdout.strip()
        assert user.endswith(f" (pid {os.getpid()})") if os.geteuid() == 0 else user, user


@pytest.mark.skipif(os.geteuid() != 0, reason="start.sh runs as root")
def test_start_refuses_to_run_beside_a_slurm_it_did_not_start_and_starts_nothing(tmp_path):
    fake = tmp_path / "slurmctld"  # a process named slurmctld that no pid file of this state dir names
    shutil.copy("/bin/sleep", fake)
    state_dir = tmp_path / "state"
    with subprocess.Popen([str(fake), "60"]) as other:
        try:
            proc = subprocess.run(["bash", str(DEV_CLUSTER / "start.sh")], capture_output=True, text=True, timeout=60,
                                  env={**os.environ, "HPCSEG_DEV_CLUSTER_DIR": str(state_dir)})
        finally:
            other.kill()
    assert proc.returncode == 1, proc.stderr
    assert "another Slurm runs on this machine (slurmctld pid" in proc.stderr and str(other.pid) in proc.stderr
    assert "skip the Slurm tests otherwise" in proc.stderr
    assert not (state_dir / "run").exists()  # nothing started, no state written
