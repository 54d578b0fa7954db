"""hpcseg doctor's node-side checks: each reads what a real node would give it (cgroup files, rlimits, the file
system, torch) and says what it found; one that breaks is a row, not a crash."""

import errno
import json
import os

import pytest

from hpcseg import doctor, versions
from hpcseg.doctor import SPOOL_MARKER, SPOOL_SEEN
from hpcseg.memlimit import GB, Limit


def test_memory_check_verdicts():
    assert doctor.check_memory(16, [Limit("cgroup v1", int(16 * GB), 0)]).ok is True
    tight = doctor.check_memory(16, [Limit("cgroup v2", int(4 * GB), 0), Limit("RLIMIT_AS", int(64 * GB), 0)])
    assert tight.ok is False and "4.0 GB" in tight.detail and "RLIMIT_AS 64.0 GB" in tight.value
    none = doctor.check_memory(16, [])
    assert none.ok is None and "memory asked" in none.detail


def test_the_memory_check_reads_what_the_node_enforces(monkeypatch):
    """A real rlimit in this process is a limit the check sees (cgroups are memlimit's tests')."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (int(64 * GB), hard))
    try:
        row = doctor.check_memory(16)
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    assert "RLIMIT_AS 64.0 GB" in row.value and row.ok is True


def test_versions_check_names_what_differs():
    same = doctor.check_versions(versions.here())
    assert same.ok is True
    row = doctor.check_versions({**versions.here(), "torch": "1.0.0"})
    assert row.ok is False and "torch" in row.detail and "1.0.0" in row.detail


def test_scratch_check_syncs_renames_and_leaves_nothing(tmp_path):
    row = doctor.check_scratch(tmp_path)
    assert row.ok is True and "rename atomic" in row.value
    assert list(tmp_path.iterdir()) == []


def test_scratch_check_goes_on_where_a_folder_fsync_is_refused(tmp_path, monkeypatch):
    real = os.fsync

    def fsync(fd):
        if os.path.isdir(f"/proc/self/fd/{fd}"):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd)

    monkeypatch.setattr(doctor.os, "fsync", fsync)
    row = doctor.check_scratch(tmp_path)
    assert row.ok is True and "EINVAL" in row.detail


def test_a_check_that_breaks_is_a_row():
    def broken():
        raise RuntimeError("no\nsuch thing")

    row = doctor._guarded("x", broken)
    assert row.ok is False and row.detail == "RuntimeError: no such thing"


def test_tmpdir_check_reports_the_jobs_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    row = doctor.check_tmpdir()
    assert row.ok is True and row.value.startswith(str(tmp_path)) and row.detail == "$TMPDIR"


@pytest.mark.slow
def test_every_check_runs_on_this_machine(tmp_path, capsys):
    (tmp_path / SPOOL_SEEN).write_text("log\n")
    expected = {"versions": versions.here(), "setup": ["source venv/bin/activate"], "mem_gb": 4,
                "ranks": 2, "spool_wait_s": 1}
    rows = doctor.run_checks(expected, tmp_path)
    out = capsys.readouterr().out
    assert out.splitlines()[0] == SPOOL_MARKER
    by_name = {row.check: row for row in rows}
    assert set(by_name) == {"log while running", "set-up lines", "python and packages", "memory limit", "TMPDIR",
                            "scratch file system", "CUDA", "training step", "all-reduce"}
    assert by_name["training step"].ok is True and "loss" in by_name["training step"].detail
    assert by_name["all-reduce"].ok is True and by_name["all-reduce"].value.startswith("gloo, 2 ranks")
    assert by_name["log while running"].ok is True
    assert all(row.ok is not False for row in rows), [r for r in rows if r.ok is False]
    json.dumps(doctor.rows_to_json(rows))


def test_spooling_says_where_the_submitting_side_saw_the_log(tmp_path):
    row = doctor.check_spooling(tmp_path, 0.2)
    assert row.ok is False and "only once it ends" in row.detail
    (tmp_path / SPOOL_SEEN).write_text("peek\n")
    row = doctor.check_spooling(tmp_path, 0.2)
    assert row.ok is None and row.value == "spooled until the job ends" and "bpeek" in row.detail
    (tmp_path / SPOOL_SEEN).write_text("log\n")
    assert doctor.check_spooling(tmp_path, 0.2).ok is True
