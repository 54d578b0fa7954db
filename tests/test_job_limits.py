"""What a batch job can see of its limits and its node: its memory limit (request, cgroup v1/v2, rlimits), its cores,
its local TMPDIR for spilled slices, a file system that cannot fsync a directory, and the Python that submitted it."""

from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from hpcseg import atomic, batches, memlimit, versions
from hpcseg.jobcpus import job_cpus

GiB = 2**30


def _proc(root: Path, cgroup: str, mountinfo: str, rss_kb: int = 1024) -> None:
    (root / "proc/self").mkdir(parents=True)
    (root / "proc/self/cgroup").write_text(cgroup)
    (root / "proc/self/mountinfo").write_text(mountinfo)
    (root / "proc/self/status").write_text(f"Name:\tpython\nVmSize:\t{4 * rss_kb} kB\nVmRSS:\t{rss_kb} kB\n")


def test_cgroup_v1_limit_of_the_jobs_own_cgroup_and_those_above(tmp_path):
    """LSF 10.1 on RHEL 7/8: the memory controller of cgroup v1, the job's cgroup below LSF's."""
    _proc(tmp_path, "9:cpuset:/lsf/job\n4:memory:/lsf/cluster/job.123\n1:name=systemd:/x\n",
          "30 23 0:28 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n"
          "33 30 0:31 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n"
          "34 30 0:32 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset\n")
    top = tmp_path / "sys/fs/cgroup/memory"
    job, lsf_level = top / "lsf/cluster/job.123", top / "lsf/cluster"
    job.mkdir(parents=True)
    (top / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # the root: no limit
    (lsf_level / "memory.limit_in_bytes").write_text(f"{64 * GiB}\n")
    (lsf_level / "memory.usage_in_bytes").write_text(f"{40 * GiB}\n")
    (job / "memory.limit_in_bytes").write_text(f"{16 * GiB}\n")
    (job / "memory.usage_in_bytes").write_text(f"{1 * GiB}\n")
    limit = memlimit.cgroup(tmp_path)
    assert (limit.limit, limit.used, limit.room) == (16 * GiB, GiB, 15 * GiB)
    assert "cgroup v1" in limit.source and limit.source.endswith("job.123/memory.limit_in_bytes")
    (lsf_level / "memory.usage_in_bytes").write_text(f"{60 * GiB}\n")  # the level above has less room left
    assert memlimit.cgroup(tmp_path).room == 4 * GiB


def test_cgroup_v2_limit_and_a_namespace_that_shows_the_job_at_the_top(tmp_path):
    _proc(tmp_path, "0::/\n", "40 23 0:40 /lsf/job.7 /sys/fs/cgroup rw,relatime - cgroup2 cgroup2 rw\n")
    top = tmp_path / "sys/fs/cgroup"
    top.mkdir(parents=True)
    (top / "memory.max").write_text(f"{8 * GiB}\n")
    (top / "memory.current").write_text(f"{2 * GiB}\n")
    assert memlimit.cgroup(tmp_path).room == 6 * GiB
    (top / "memory.max").write_text("max\n")
    assert memlimit.cgroup(tmp_path) is None


def test_the_jobs_request_counts_where_no_cgroup_or_rlimit_shows_the_limit(tmp_path):
    """LSF's own process monitoring (LSB_JOB_MEMLIMIT=y) kills above -M with nothing to read: the request is it."""
    _proc(tmp_path, "0::/\n", "", rss_kb=GiB // 1024)
    env = {memlimit.ENV: "16"}
    [asked] = [x for x in memlimit.limits(env, tmp_path) if x.source.startswith("the job's request")]
    assert (asked.limit, asked.room) == (16_000_000_000, 16_000_000_000 - GiB)
    assert memlimit.room({memlimit.ENV: "nonsense"}, tmp_path) == memlimit.room({}, tmp_path)


def test_rlimits_rss_and_as_are_read_in_a_job_that_has_them(tmp_path):
    code = ("import resource, json; from hpcseg import memlimit; "
            "resource.setrlimit(resource.RLIMIT_RSS, (3 * 2**30, resource.RLIM_INFINITY)); "
            "resource.setrlimit(resource.RLIMIT_AS, (64 * 2**30, resource.RLIM_INFINITY)); "
            "print(json.dumps([(x.source, x.limit) for x in memlimit.rlimits(memlimit.Path('/'))]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60).stdout
    assert json.loads(out) == [["RLIMIT_RSS", 3 * GiB], ["RLIMIT_AS", 64 * GiB]]


def test_the_smallest_limit_wins_and_bounds_the_host_memory_for_data(monkeypatch):
    monkeypatch.setenv(memlimit.ENV, "0.5")  # far below this machine's free memory
    assert batches.host_memory_available() <= 0.5e9
    assert memlimit.tightest().source.startswith("the job's request")
    monkeypatch.delenv(memlimit.ENV)
    assert batches.host_memory_available() > 0.5e9 or memlimit.tightest() is not None


def test_the_job_runner_passes_the_request_on_to_the_training_processes(monkeypatch):
    from hpcseg.cluster.jobrunner import export_memory_request

    monkeypatch.setenv(memlimit.ENV, "64")  # inherited from the submitting shell (restored after the test)
    export_memory_request(16.0)
    assert os.environ[memlimit.ENV] == "16"  # the job's own request wins
    export_memory_request(None)  # a run submitted without a request keeps what it has
    assert os.environ[memlimit.ENV] == "16"


# ---------------------------------------------------------------- cores


def test_job_cpus_from_each_schedulers_slots():
    cores = len(os.sched_getaffinity(0))
    assert job_cpus({}) is None
    assert job_cpus({"LSB_DJOB_NUMPROC": "1", "LSB_MAX_NUM_PROCESSORS": "8"}) == 1
    assert job_cpus({"LSB_MAX_NUM_PROCESSORS": "1"}) == 1
    assert job_cpus({"NSLOTS": "1"}) == 1
    assert job_cpus({"SLURM_CPUS_PER_TASK": "1", "LSB_DJOB_NUMPROC": "4"}) == 1  # a Slurm task is one rank
    assert job_cpus({"LSB_DJOB_NUMPROC": "2"}, processes=2) == max(1, min(2, cores) // 2)
    assert job_cpus({"LSB_DJOB_NUMPROC": "64"}) == cores  # never more than this process may run on
    assert job_cpus({"LSB_DJOB_NUMPROC": "junk", "NSLOTS": "1"}) == 1


# ---------------------------------------------------------------- spilled slices on the local disk


def test_spilled_slices_go_to_the_jobs_tmpdir_where_they_fit(tmp_path):
    run_dir, local = tmp_path / "scratch" / "exp" / "run1", tmp_path / "local"
    local.mkdir()
    assert batches.slices_home(run_dir, 10**6, {"TMPDIR": str(local)}) == local / "hpcseg-run1"
    assert batches.slices_home(run_dir, 10**18, {"TMPDIR": str(local)}) == run_dir  # does not fit
    assert batches.slices_home(run_dir, 10**6, {}) == run_dir
    assert batches.slices_home(run_dir, 10**6, {"TMPDIR": str(tmp_path / "missing")}) == run_dir


def test_training_spills_to_tmpdir_and_leaves_nothing_there(tiny_data, tmp_path, monkeypatch):
    from fixtures_cluster import JOB_FILE, TINY
    from hpcseg.jobfile import load_job
    from hpcseg.train import train

    local = tmp_path / "local"
    local.mkdir()
    monkeypatch.setenv("TMPDIR", str(local))
    job = load_job(JOB_FILE, [*TINY, "train.epochs=1", "data.device_memory_gb=1e-9", "data.host_memory_gb=1e-9"])
    lines = []
    train(job, tiny_data / "training_data", tiny_data / "validation_data", tmp_path / "run", log=lines.append,
          progress=False)
    placed = next(line for line in lines if line.startswith("data:"))
    assert f"memory-mapped .npy files in {local / 'hpcseg-run' / '.slices' / 'rank0'}" in placed, placed
    assert list(local.iterdir()) == [] and not (tmp_path / "run" / ".slices").exists()


# ---------------------------------------------------------------- fsync of a directory


def test_a_directory_fsync_refused_after_the_rename_does_not_fail_the_write(tmp_path, monkeypatch):
    """Some parallel and FUSE file systems answer EINVAL to fsync of a directory; the file's own fsync still counts."""
    real_fsync = os.fsync

    def fsync(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_fsync(fd)

    monkeypatch.setattr(atomic.os, "fsync", fsync)
    atomic.atomic_write_text(tmp_path / "best.json", "{}\n", "checkpoint")
    assert (tmp_path / "best.json").read_text() == "{}\n"
    assert [p.name for p in tmp_path.iterdir()] == ["best.json"]

    def failing(fd):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(atomic.os, "fsync", failing)  # a real write failure still fails, in one line
    with pytest.raises(atomic.WriteError, match="input/output error"):
        atomic.atomic_write_text(tmp_path / "last.json", "{}\n", "checkpoint")


# ---------------------------------------------------------------- the submitting and the job's Python


def test_versions_compare_in_one_line():
    here = versions.here()
    assert set(here) == {"python", "hpcseg", "submitit", "torch", "pickle_protocol"}
    level, line = versions.compare(here)
    assert level == "info" and line.startswith("versions: python ") and line.endswith("(as submitted)")
    patched = {**here, "torch": here["torch"].split("+")[0].rsplit(".", 1)[0] + ".99"}
    assert versions.compare(patched)[0] == "info"  # a patch release differs: fine
    level, line = versions.compare({**here, "python": "3.9.18"})
    assert level == "warning" and "versions differ (python)" in line and "python 3.9.18" in line
    level, line = versions.compare({**here, "pickle_protocol": here["pickle_protocol"] + 1})
    assert level == "error" and "protocol" in line
    assert versions.compare(None)[0] == "unknown"


def test_the_job_runner_says_where_the_versions_differ(tmp_path, capsys):
    from hpcseg.cluster.jobrunner import report_versions

    (tmp_path / "run.json").write_text(json.dumps({"versions": {**versions.here(), "submitit": "1.2.0"}}))
    report_versions(tmp_path)
    err = capsys.readouterr().err
    assert err.startswith("hpcseg: warning: versions differ (submitit): submitted with") and err.count("\n") == 1
