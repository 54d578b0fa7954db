"""The check that decides whether the SGE tests use an SGE (tests/fixtures_sge.py), against fake SGE commands, and
the dev SGE's start script beside an SGE it did not start."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from fixtures_cluster import SubmittedJobs
from fixtures_sge import SgeCluster, probe_sge_cluster, usable_sge_cluster

QSTAT_F = """queuename                      qtype resv/used/tot. load_avg arch          states
---------------------------------------------------------------------------------
all.q@vm                       BIP   0/0/2          0.42     lx-amd64
"""


@pytest.fixture
def fake_sge(fake_commands):
    """Fake qstat/qsub/qacct/qdel/qconf first on PATH; `set(name, stdout, rc)` changes one; `calls` lists the
    commands run (one line each)."""
    for name, stdout in [("qstat", QSTAT_F), ("qsub", "4242\n"), ("qacct", "jobnumber 4242\n"), ("qdel", ""),
                         ("qconf", "")]:
        fake_commands.set(name, stdout)
    return fake_commands


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
    assert proc.returncode == 1, proc.stderr
    assert "another SGE runs on this machine (sge_qmaster pid" in proc.stderr and str(other.pid) in proc.stderr
    assert "skip the SGE tests otherwise" in proc.stderr
    assert not (state_dir / "run").exists()  # nothing started, no state written
