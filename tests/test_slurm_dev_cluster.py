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
from fixtures_commands import fake_command
from fixtures_slurm import NotOurs, SlurmCluster, ours_sh, probe_slurm_cluster, usable_slurm_cluster

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
def fake_slurm(fake_commands, monkeypatch):
    """Fake scontrol/sinfo/sbatch/sacct/scancel first on PATH, answering like a real Slurm; `set(name, stdout)`
    changes what one prints; `calls` lists the commands run (one line each). The tests may use it
    (HPCSEG_TEST_USE_RUNNING_SLURM=1) unless a test takes that back."""
    for name, stdout in [("scontrol", "Slurmctld(primary) at vm is UP\n"), ("sinfo", "vm idle\n"),
                         ("sbatch", "4242\n"), ("sacct", "4242\n"), ("scancel", "")]:
        fake_commands.set(name, stdout)
    monkeypatch.setenv("HPCSEG_TEST_USE_RUNNING_SLURM", "1")
    return fake_commands


def _dev_cluster_files(tmp_path: Path, monkeypatch, pid: int | None, marker: bool = True) -> Path:
    """A state dir (HPCSEG_DEV_CLUSTER_DIR) whose pid file names `pid` (none where None), a config (SLURM_CONF)
    naming it, with start.sh's marker or without, and no other slurmctld on this machine or listener on its port
    (fake pgrep and ss), so that ours.sh decides on these files alone."""
    state = tmp_path / "state"
    (state / "run").mkdir(parents=True)
    if pid is not None:
        (state / "run" / "slurmctld.pid").write_text(f"{pid}\n")
    conf = tmp_path / "slurm.conf"
    conf.write_text(("# Written by hpcseg hpc/dev-cluster/start.sh - a single-node dev/test cluster.\n" if marker
                     else "# the site's Slurm\n") + f"ClusterName=prod\nSlurmctldPidFile={state}/run/slurmctld.pid\n")
    for name in ("pgrep", "ss"):
        fake_command(tmp_path / "bin", name, "exit 1")
    monkeypatch.setenv("HPCSEG_DEV_CLUSTER_DIR", str(state))
    monkeypatch.setenv("SLURM_CONF", str(conf))
    monkeypatch.delenv("HPCSEG_TEST_USE_RUNNING_SLURM", raising=False)
    monkeypatch.delenv("CI", raising=False)  # the tests set it where they test CI's answer (the suite runs under CI)
    return state


@pytest.mark.parametrize("marker, pid, reason", [
    (False, None, r"slurm\.conf was not written by hpcseg's hpc/dev-cluster/start\.sh"),
    (True, "mine", r"no slurmctld started by start\.sh runs \(.*/state/run/slurmctld\.pid names no live slurmctld\)"),
    (True, None, r"no slurmctld started by start\.sh runs"),
])
def test_a_slurm_that_hpcseg_did_not_start_gets_no_job_unless_the_user_opts_in(
        fake_slurm, tmp_path, monkeypatch, marker, pid, reason):
    """A Slurm that answers like a real one (the fakes) but is not the dev cluster of the state dir (a config
    of the site's, a pid file naming another process, none): the probe submits nothing, the tests skip with one
    line naming the variable that opts in, and with it set the same Slurm is used."""
    _dev_cluster_files(tmp_path, monkeypatch, os.getpid() if pid == "mine" else None, marker)
    with pytest.raises(RuntimeError, match=reason):
        probe_slurm_cluster("gpuv100", accounting_wait_s=0)
    assert not fake_slurm.calls.exists()  # not even scontrol ping: nothing reached that Slurm
    if not marker:  # a scheduler of someone else's: the skip says how to opt in
        with pytest.raises(pytest.skip.Exception) as skipped:
            usable_slurm_cluster()
        line = str(skipped.value)
        assert "\n" not in line and line.startswith("not submitting to this machine's Slurm: "), line
        assert "set HPCSEG_TEST_USE_RUNNING_SLURM=1 to use this one" in line, line
        monkeypatch.setenv("CI", "true")
        with pytest.raises(pytest.fail.Exception, match="CI needs the Slurm dev cluster: not submitting"):
            usable_slurm_cluster()
    assert not fake_slurm.calls.exists()
    monkeypatch.setenv("HPCSEG_TEST_USE_RUNNING_SLURM", "1")
    assert probe_slurm_cluster("gpuv100", accounting_wait_s=0) == SlurmCluster(partition="gpuv100", hostname="vm")
    assert [c.split()[0] for c in fake_slurm.calls.read_text().splitlines()] == \
        ["scontrol", "sinfo", "sbatch", "sacct", "scancel"]


@pytest.mark.skipif(os.geteuid() != 0, reason="a process named slurmctld beside the dev cluster's is root's test")
def test_a_slurmctld_beside_the_one_of_the_state_dir_is_not_ours(shims, tmp_path, monkeypatch):
    """The config and pid file are the dev cluster's, but another slurmctld runs here: not ours."""
    fake = tmp_path / "slurmctld"
    shutil.copy("/bin/sleep", fake)
    with subprocess.Popen([str(fake), "60"]) as other, subprocess.Popen([str(fake), "60"]) as ours:
        try:
            state = _dev_cluster_files(tmp_path, monkeypatch, ours.pid)
            (tmp_path / "bin" / "pgrep").unlink()  # the real pgrep: it finds both (and any dev cluster's)
            with pytest.raises(NotOurs, match=rf"a slurmctld not started by start\.sh with state in {state} runs "
                                              rf"on this machine \(pid .*{other.pid}"):
                probe_slurm_cluster("gpuv100", accounting_wait_s=0)
            # alone with ours: ours (the fake ss sees no listener of another pid on the port)
            fake_command(tmp_path / "bin", "pgrep", f"echo {ours.pid}")
            out = ours_sh("slurm", os.environ)
            assert out.returncode == 0 and out.stdout.startswith(f"ours: slurmctld pid {ours.pid}"), out
        finally:
            other.kill()
            ours.kill()


@pytest.mark.slurm
def test_the_dev_cluster_that_start_sh_started_is_ours(slurm_cluster):
    """What CI runs on: run-tests.sh starts the dev cluster, and the tests take it as theirs."""
    pid = (Path(os.environ.get("HPCSEG_DEV_CLUSTER_DIR", "/tmp/hpcseg-dev-cluster")) / "run" / "slurmctld.pid")
    proc = ours_sh("slurm")
    assert proc.returncode == 0 and proc.stdout.startswith(f"ours: slurmctld pid {pid.read_text().strip()},"), proc


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
    assert proc.returncode == 3, proc.stderr  # a choice, not a failure: a note, and nothing started
    assert "note: another Slurm runs on this machine (slurmctld pid" in proc.stderr and str(other.pid) in proc.stderr
    assert "ERROR" not in proc.stderr and "HPCSEG_TEST_USE_RUNNING_SLURM=1" in proc.stderr, proc.stderr
    assert not (state_dir / "run").exists()  # nothing started, no state written


@pytest.mark.skipif(os.geteuid() != 0, reason="start.sh runs as root")
@pytest.mark.parametrize("env, rc, last", [
    ({}, 0, "note: the Slurm tests are skipped: they submit only to a Slurm that hpc/dev-cluster/start.sh started "
            "(set HPCSEG_TEST_USE_RUNNING_SLURM=1 to run them on the one that runs here)"),
    ({"HPCSEG_TEST_USE_RUNNING_SLURM": "1"}, 0,
     "note: HPCSEG_TEST_USE_RUNNING_SLURM is set: the Slurm tests submit to the Slurm that runs on this machine"),
    ({"CI": "true"}, 1, "the Slurm dev cluster did not start (hpc/dev-cluster/start.sh exited 3), and CI needs it"),
])
def test_run_tests_beside_another_slurm_notes_it_and_starts_nothing_but_ci_fails(tmp_path, env, rc, last):
    """What hpc/run-tests.sh does for Slurm (hpc/dev-cluster/use-or-start.sh) beside a Slurm it did not start:
    notes, no ERROR, prints 0 (nothing to stop at the end); under CI it fails."""
    fake = tmp_path / "slurmctld"
    shutil.copy("/bin/sleep", fake)
    state_dir = tmp_path / "state"
    with subprocess.Popen([str(fake), "60"]) as other:
        try:
            proc = subprocess.run(["bash", str(DEV_CLUSTER / "use-or-start.sh"), "slurm"], capture_output=True,
                                  text=True, timeout=60,
                                  env={**{k: v for k, v in os.environ.items() if k != "CI"},  # CI: as the case says
                                       "HPCSEG_DEV_CLUSTER_DIR": str(state_dir), **env})
        finally:
            other.kill()
    assert proc.returncode == rc and proc.stdout == ("0\n" if rc == 0 else ""), proc
    assert "[dev-cluster] note: another Slurm runs on this machine" in proc.stderr and "ERROR" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == last, proc.stderr
    assert not (state_dir / "run").exists()


@pytest.mark.slurm
def test_run_tests_uses_the_dev_cluster_that_runs_and_leaves_it_running(slurm_cluster):
    env = {k: v for k, v in os.environ.items() if k != "HPCSEG_TEST_USE_RUNNING_SLURM"}
    proc = subprocess.run(["bash", str(DEV_CLUSTER / "use-or-start.sh"), "slurm"], capture_output=True, text=True,
                          timeout=120, env=env)
    assert proc.returncode == 0 and proc.stdout == "0\n", proc  # 0: not this run's to stop
    assert "note: the Slurm dev cluster already runs, started earlier by hpc/dev-cluster/start.sh" in proc.stderr
