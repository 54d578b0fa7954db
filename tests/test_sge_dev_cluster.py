"""The check that decides whether the SGE tests use an SGE (tests/fixtures_sge.py), against fake SGE commands, and
the dev SGE's start script beside an SGE it did not start."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from fixtures_cluster import SubmittedJobs
from fixtures_commands import fake_command
from fixtures_sge import SgeCluster, probe_sge_cluster, usable_sge_cluster
from fixtures_slurm import ours_sh

QSTAT_F = """queuename                      qtype resv/used/tot. load_avg arch          states
---------------------------------------------------------------------------------
all.q@vm                       BIP   0/0/2          0.42     lx-amd64
"""


@pytest.fixture
def fake_sge(fake_commands, monkeypatch):
    """Fake qstat/qsub/qacct/qdel/qconf first on PATH, answering like a real SGE; `set(name, stdout, rc)` changes
    one; `calls` lists the commands run (one line each). The tests may use it (HPCSEG_TEST_USE_RUNNING_SGE=1)
    unless a test takes that back."""
    for name, stdout in [("qstat", QSTAT_F), ("qsub", "4242\n"), ("qacct", "jobnumber 4242\n"), ("qdel", ""),
                         ("qconf", "")]:
        fake_commands.set(name, stdout)
    monkeypatch.setenv("HPCSEG_TEST_USE_RUNNING_SGE", "1")
    return fake_commands


@pytest.mark.parametrize("case", ["another cell", "no qmaster of the state dir"])
def test_an_sge_that_hpcseg_did_not_start_gets_no_job_unless_the_user_opts_in(fake_sge, tmp_path, monkeypatch, case):
    """An SGE that answers like a real one (the fakes) but is not the dev SGE: the cell the commands use is
    another (a site's SGE_ROOT), or the state dir's pid file names no sge_qmaster. The probe submits nothing, the
    tests skip with one line naming the variable that opts in; with it set the same SGE is used."""
    monkeypatch.delenv("HPCSEG_TEST_USE_RUNNING_SGE")
    monkeypatch.delenv("CI", raising=False)  # the answer outside CI is a skip (the suite itself may run under CI)
    fake_command(tmp_path / "bin", "pgrep", "exit 1")  # no other sge_qmaster: ours.sh decides on the files alone
    state = tmp_path / "state"
    (state / "run").mkdir(parents=True)
    monkeypatch.setenv("HPCSEG_DEV_SGE_DIR", str(state))
    if case == "another cell":
        monkeypatch.setenv("SGE_ROOT", str(tmp_path / "site-sge"))
        reason = rf"^the SGE commands use the cell {tmp_path}/site-sge/default, not the dev SGE's"
    else:
        (state / "run" / "sge_qmaster.pid").write_text(f"{os.getpid()}\n")  # alive, but not an sge_qmaster
        reason = r"no sge_qmaster started by sge-start\.sh runs|no cell .*: no dev SGE is set up"
    with pytest.raises(RuntimeError, match=reason):
        probe_sge_cluster("all.q", accounting_wait_s=0)
    assert not fake_sge.calls.exists()  # not even qstat: nothing reached that SGE
    if case == "another cell":
        with pytest.raises(pytest.skip.Exception) as skipped:
            usable_sge_cluster()
        line = str(skipped.value)
        assert "\n" not in line and line.startswith("not submitting to this machine's SGE: "), line
        assert "set HPCSEG_TEST_USE_RUNNING_SGE=1 to use this one" in line, line
    monkeypatch.setenv("HPCSEG_TEST_USE_RUNNING_SGE", "1")
    assert probe_sge_cluster("all.q", accounting_wait_s=0) == SgeCluster(queue="all.q", hostname="vm")
    assert "qsub" in fake_sge.calls.read_text()


@pytest.mark.skipif(os.geteuid() != 0, reason="a process named sge_qmaster beside the dev SGE's is root's test")
def test_an_sge_qmaster_beside_the_one_of_the_state_dir_is_not_ours(tmp_path):
    fake = tmp_path / "sge_qmaster"
    shutil.copy("/bin/sleep", fake)
    with subprocess.Popen([str(fake), "60"]) as other:
        try:
            proc = ours_sh("sge", {**os.environ, "HPCSEG_DEV_SGE_DIR": str(tmp_path / "state")})
        finally:
            other.kill()
    assert proc.returncode == 1, proc
    assert "an sge_qmaster not started by sge-start.sh" in proc.stdout and str(other.pid) in proc.stdout, proc


def test_the_dev_sge_that_sge_start_sh_started_is_ours(sge_cluster):
    """What CI runs on: run-tests.sh starts the dev SGE, and the tests take it as theirs."""
    pid = Path(os.environ.get("HPCSEG_DEV_SGE_DIR", "/tmp/hpcseg-dev-sge")) / "run" / "sge_qmaster.pid"
    proc = ours_sh("sge")
    assert proc.returncode == 0 and proc.stdout.startswith(f"ours: sge_qmaster pid {pid.read_text().strip()},"), proc



def test_an_sge_whose_accounting_knows_the_probe_job_is_used(fake_sge):
    assert probe_sge_cluster("all.q", accounting_wait_s=0) == SgeCluster(queue="all.q", hostname="vm")
    assert "qacct -j 4242" in fake_sge.calls.read_text().splitlines()


def test_an_sge_whose_accounting_never_knows_the_job_is_not_used(fake_sge):
    fake_sge.set("qacct", "error: job id 4242 not found\n", rc=1)
    with pytest.raises(RuntimeError, match=r"^qacct does not know job 4242 0\.5 s after its submission"):
        probe_sge_cluster("all.q", accounting_wait_s=0.5)
    assert fake_sge.calls.read_text().splitlines()[-1] == "qdel 4242"  # the probe job is not left behind


def test_an_sge_whose_queue_is_in_alarm_or_missing_is_not_used(fake_sge):
    fake_sge.set("qstat", QSTAT_F.replace("lx-amd64", "lx-amd64      au"))
    with pytest.raises(RuntimeError, match=r"^queue 'all.q' has no usable instance \(\['all.q@vm BIP 0/0/2 0.42 "
                                           r"lx-amd64 au'\]\)$"):
        probe_sge_cluster("all.q", accounting_wait_s=0)
    fake_sge.set("qstat", "")
    with pytest.raises(RuntimeError, match=r"^queue 'all.q' has no usable instance \(none\)$"):
        probe_sge_cluster("all.q", accounting_wait_s=0)
    assert not [c for c in fake_sge.calls.read_text().splitlines() if c.startswith("qsub")]


@pytest.mark.parametrize("ci", ["", "true"])
def test_an_unusable_sge_skips_the_tests_but_fails_them_under_ci(fake_sge, monkeypatch, ci):
    fake_sge.set("qacct", "", rc=1)
    monkeypatch.setenv("CI", ci)
    monkeypatch.setattr("fixtures_sge.ACCOUNTING_WAIT_S", 0)
    outcome = pytest.fail.Exception if ci else pytest.skip.Exception
    with pytest.raises(outcome, match="qacct does not know job 4242"):
        usable_sge_cluster()


def test_an_sge_job_is_ended_with_qdel_when_the_test_ends(fake_sge):
    jobs = SubmittedJobs()
    jobs.record("qdel", "4242")
    jobs.end_all()
    assert fake_sge.calls.read_text().splitlines() == ["qdel 4242"]


DEV_CLUSTER = Path(__file__).resolve().parents[1] / "hpc" / "dev-cluster"


@pytest.mark.skipif(os.geteuid() != 0, reason="sge-start.sh runs as root")
def test_start_refuses_to_run_beside_an_sge_it_did_not_start_and_starts_nothing(tmp_path):
    fake = tmp_path / "sge_qmaster"  # a process named sge_qmaster that no pid file of this state dir names
    shutil.copy("/bin/sleep", fake)
    state_dir = tmp_path / "state"
    with subprocess.Popen([str(fake), "60"]) as other:
        try:
            proc = subprocess.run(["bash", str(DEV_CLUSTER / "sge-start.sh")], capture_output=True, text=True,
                                  timeout=60, env={**os.environ, "HPCSEG_DEV_SGE_DIR": str(state_dir)})
        finally:
            other.kill()
    assert proc.returncode == 3, proc.stderr  # a choice, not a failure: a note, and nothing started
    assert "note: another SGE runs on this machine (sge_qmaster pid" in proc.stderr and str(other.pid) in proc.stderr
    assert "ERROR" not in proc.stderr and "HPCSEG_TEST_USE_RUNNING_SGE=1" in proc.stderr, proc.stderr
    assert not (state_dir / "run").exists()  # nothing started, no state written
