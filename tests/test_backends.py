"""A scheduler is one place: a fifth backend, added as a newcomer would (one module and one entry in
backends.BACKENDS, nothing else), is seen by --executor, auto-detection, profiles, run records, submit's dry run,
status, cancel and the job runner's job-id lookup."""

from __future__ import annotations

import stat
import sys
import types

import pytest

from fixtures_cluster import JOB_FILE
from test_cluster_front import _fake_run

from hpcseg.cluster import backends
from hpcseg.cluster.runs import my_user


class FakeScheduler:
    """What the fake scheduler knows (job id -> (state, owner)) and every call the backend made to it."""

    def __init__(self) -> None:
        self.jobs: dict[str, tuple[str, str]] = {}
        self.calls: list[tuple[str, list[str]]] = []


def _fake_module(scheduler: FakeScheduler) -> types.ModuleType:
    """The backend module a newcomer writes (here without a real scheduler behind it)."""
    module = types.ModuleType("hpcseg_test_fake_backend")

    def build_executor(plan, folder, dry_run=False):
        raise AssertionError("a dry run asks for job_script only")

    def job_script(plan, folder, n_elements):
        return f"#!/bin/sh\n# fakesub -N {plan.experiment} -warn {plan.signal_delay_s} -array {n_elements} {folder}\n"

    def query_states(runs, timeout_s):
        scheduler.calls.append(("query", [r.job_id for r in runs]))
        return {r.job_id: scheduler.jobs[r.job_id][0] for r in runs if r.job_id in scheduler.jobs}, []

    def job_owners(runs, timeout_s):
        scheduler.calls.append(("owners", [r.job_id for r in runs]))
        return {r.job_id: scheduler.jobs[r.job_id][1] for r in runs if r.job_id in scheduler.jobs}

    def cancel(runs, timeout_s):
        scheduler.calls.append(("cancel", [r.job_id for r in runs]))
        for r in runs:
            scheduler.jobs[r.job_id] = ("CANCELLED", scheduler.jobs[r.job_id][1])

    def job_id_from_env(environ):
        return environ.get("FAKE_JOB_ID") or None

    for function in (build_executor, job_script, query_states, job_owners, cancel, job_id_from_env):
        setattr(module, function.__name__, function)
    return module


@pytest.fixture
def fake(monkeypatch, tmp_path) -> FakeScheduler:
    """The fifth backend registered: its module importable, its entry in the table, its command on PATH."""
    scheduler = FakeScheduler()
    monkeypatch.setitem(sys.modules, "hpcseg_test_fake_backend", _fake_module(scheduler))
    monkeypatch.setitem(backends.BACKENDS, "fake", backends.Backend(
        name="fake", title="Fake", module="hpcseg_test_fake_backend", detect="fakesub",
        job_id_vars=("FAKE_JOB_ID",), job_id_syntax=r"f\d+", signal_delay_s=42))
    shims = tmp_path / "fakebin"
    shims.mkdir()
    (shims / "fakesub").write_text("#!/bin/sh\nexit 0\n")
    (shims / "fakesub").chmod(stat.S_IRWXU)
    monkeypatch.setenv("PATH", str(shims))  # only the fake's command: bsub/sbatch of this machine are not seen
    return scheduler


def test_submit_sees_a_new_backend(cli, tiny_data, fake):
    # --executor accepts it, and its warning-signal default and job script are its own
    code, out = cli("submit", JOB_FILE, "--data", tiny_data, "--dry-run", "--executor", "fake",
                    "--sweep", "train.seed=0,1")
    assert code == 0, out
    assert "-warn 42 -array 2" in out and out.count("# would submit run") == 2 and "(fake)" in out, out
    # auto-detection finds its command on PATH
    code, out = cli("submit", JOB_FILE, "--data", tiny_data, "--dry-run")
    assert code == 0 and "(fake)" in out, out
    # an executor that is in no table entry is refused, naming the table's
    code, out = cli("submit", JOB_FILE, "--data", tiny_data, "--dry-run", "--executor", "pbs")
    assert code == 2 and "'pbs' is not one of 'auto', 'lsf', 'slurm', 'sge', 'local', 'fake'" in out, out


def test_profiles_accept_a_new_backend(fake, tmp_path):
    from hpcseg.cluster.profiles import load_profile
    from hpcseg.errors import ClusterError

    path = tmp_path / "site.toml"
    path.write_text('executor = "fake"\n')
    assert load_profile(str(path)).executor == "fake"
    path.write_text('executor = "pbs"\n')
    with pytest.raises(ClusterError, match="'pbs' is not one of auto, lsf, slurm, sge, local, fake"):
        load_profile(str(path))


def test_status_cancel_and_logs_see_a_new_backend(cli, fake):
    fake.jobs = {"f1": ("RUNNING", my_user()), "f2": ("PENDING", my_user()), "f3": ("RUNNING", "someone-else")}
    for run_id, job_id in (("mine-1", "f1"), ("mine-2", "f2"), ("theirs", "f3")):
        _fake_run(cli.scratch, run_id, "fake", job_id)
    _fake_run(cli.scratch, "bad-id", "fake", "123")  # not the fake's syntax: dropped as damage
    rows = {r["run_id"]: r for r in cli.status()}
    assert {k: v["state"] for k, v in rows.items()} == {"mine-1": "RUNNING", "mine-2": "PENDING",
                                                          "theirs": "RUNNING", "bad-id": "UNKNOWN"}
    assert rows["bad-id"]["job_id"] is None and "is not a fake job id" in rows["bad-id"]["damage"][0]
    assert fake.calls == [("query", ["f1", "f2", "f3"])]  # one query for all its runs
    fake.calls.clear()
    code, out = cli("cancel", "mine-1", "theirs")
    assert code == 2, out
    assert "mine-1: cancelled job f1 (fake)" in out
    assert "theirs: not cancelled: job f3 is not confirmed as yours" in out and "fake says it is someone-else's" in out
    assert ("cancel", ["f1"]) in fake.calls
    assert {r["run_id"]: r["state"] for r in cli.status("mine-1", "theirs")} == {"mine-1": "CANCELLED",
                                                                                "theirs": "RUNNING"}
    # logs --follow reads the run's log until the fake says the job has ended
    log = cli.scratch / "exp" / "mine-2" / "submitit" / "f2_0_log.out"
    log.parent.mkdir()
    log.write_text("epoch 1/3\n")
    fake.jobs["f2"] = ("COMPLETED", my_user())
    code, out = cli("logs", "mine-2", "--follow")
    assert code == 0 and out == "epoch 1/3\n", out
    assert ("query", ["f2"]) in fake.calls


def test_job_runner_finds_a_new_backends_job_id(fake, monkeypatch):
    from hpcseg.cluster import jobrunner

    for var in (v for b in backends.BACKENDS.values() for v in b.job_id_vars):
        monkeypatch.delenv(var, raising=False)
    assert jobrunner.job_id_here() is None
    monkeypatch.setenv("FAKE_JOB_ID", "f77")
    assert jobrunner.job_id_here() == "f77"


def test_every_backend_module_has_the_backend_functions():
    """What backends.py's docstring promises a newcomer: each real backend module offers the same six
    functions (so the table is all the cluster commands need)."""
    names = ("build_executor", "job_script", "query_states", "job_owners", "cancel", "job_id_from_env")
    for backend in backends.BACKENDS.values():
        module = backend.impl()
        missing = [name for name in names if not callable(getattr(module, name, None))]
        assert not missing, (backend.name, missing)
    assert backends.get("nosuch") is None


@pytest.mark.parametrize("environ, expected", [
    ({"SLURM_JOB_ID": "12"}, "12"),
    ({"SLURM_JOB_ID": "12", "SLURM_ARRAY_JOB_ID": "10", "SLURM_ARRAY_TASK_ID": "2"}, "10_2"),
    ({"LSB_JOBID": "31", "LSB_JOBINDEX": "0"}, "31"),
    ({"LSB_JOBID": "31", "LSB_JOBINDEX": "4"}, "31[4]"),
    ({"SUBMITIT_LOCAL_JOB_ID": "4242"}, "4242"),
    ({"HOME": "/root"}, None),
])
def test_job_id_of_each_backend(environ, expected):
    assert backends.job_id_here(environ) == expected
