"""hpcseg doctor's node-side checks: each reads what a real node would give it (cgroup files, rlimits, the file
system, torch) and says what it found; one that breaks is a row, not a crash."""

import errno
import json
import os

import pytest

from hpcseg import doctor
from hpcseg.doctor import GB, SPOOL_MARKER, SPOOL_SEEN


def _cgroup_tree(tmp_path, v1_limit=None, v2_limit=None):
    root = tmp_path / "cgroup"
    lines = []
    if v2_limit is not None:
        job = root / "lsf" / "job.42"
        job.mkdir(parents=True)
        (job / "memory.max").write_text(f"{v2_limit}\n")
        (root / "lsf" / "memory.max").write_text("max\n")
        lines.append("0::/lsf/job.42")
    if v1_limit is not None:
        job = root / "memory" / "lsf" / "job.42"
        job.mkdir(parents=True)
        (job / "memory.limit_in_bytes").write_text(f"{v1_limit}\n")
        (root / "memory" / "memory.limit_in_bytes").write_text(f"{2**63 - 4096}\n")  # v1's "no limit"
        lines.append("7:memory:/lsf/job.42")
        lines.append("6:cpu,cpuacct:/lsf/job.42")
    proc = tmp_path / "proc_cgroup"
    proc.write_text("\n".join(lines) + "\n")
    return root, proc


def test_memory_limits_reads_cgroup_v1_and_v2_and_ignores_no_limit(tmp_path):
    root, proc = _cgroup_tree(tmp_path, v1_limit=16 * GB)
    assert doctor.memory_limits(root, proc)["cgroup v1"] == 16 * GB
    root, proc = _cgroup_tree(tmp_path / "b", v2_limit=8 * GB)
    limits = doctor.memory_limits(root, proc)
    assert limits["cgroup v2"] == 8 * GB and "cgroup v1" not in limits


def test_memory_check_verdicts():
    assert doctor.check_memory(16, {"cgroup v1": 16 * GB}).ok is True
    tight = doctor.check_memory(16, {"cgroup v2": 4 * GB})
    assert tight.ok is False and "4.0 GB" in tight.detail
    none = doctor.check_memory(16, {})
    assert none.ok is None and "memory asked" in none.detail


def test_versions_check_names_what_differs():
    same = doctor.check_versions(doctor.versions_here())
    assert same.ok is True
    other = {**doctor.versions_here(), "torch": "1.0.0"}
    row = doctor.check_versions(other)
    assert row.ok is False and "torch 1.0.0 there" in row.detail


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
    (tmp_path / SPOOL_SEEN).touch()
    expected = {"versions": doctor.versions_here(), "setup": ["source venv/bin/activate"], "mem_gb": 4,
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


def test_spooling_unseen_says_what_it_means(tmp_path):
    row = doctor.check_spooling(tmp_path, 0.2)
    assert row.ok is False and "bpeek" in row.detail
