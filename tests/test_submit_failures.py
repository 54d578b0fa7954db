"""A submission that fails leaves nothing behind (no scratch, no run folder); one that is interrupted while it waits
says that the job goes on and how to follow or end it."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from fixtures_cluster import JOB_FILE, REPO, TINY


def _site_profile(tmp: Path, scratch: str) -> Path:
    """hpc/dtu.toml with its scratch moved under `scratch` (a fresh root instead of /work3)."""
    text = (REPO / "hpc" / "dtu.toml").read_text().replace('scratch = "/work3/$USER"', f'scratch = "{scratch}"')
    assert f'scratch = "{scratch}"' in text
    path = tmp / "dtu-here.toml"
    path.write_text(text)
    return path


def test_a_refused_lsf_submit_leaves_no_scratch_behind(cli, tiny_data, lsf_emulator, monkeypatch):
    """The emulated LSF refuses the queue: the scratch the profile names (and its parents) and the run folder that
    submit had created are gone again, and a scratch that existed before keeps its runs."""
    monkeypatch.delenv("HPCSEG_SCRATCH")
    monkeypatch.setenv("USER", "s123456")
    monkeypatch.setenv("LSF_EMU_QUEUES", "hpc")  # gpuv100 unknown: bsub says "No such queue"
    root = cli.tmp / "fresh"
    profile = _site_profile(cli.tmp, f"{root}/work3/$USER")
    code, out = cli("submit", REPO / "jobs" / "gpu.toml", "--data", tiny_data, "--profile", profile)
    assert code == 2 and out.splitlines() == ["hpcseg: error: bsub exited 255: gpuv100: No such queue. Job not "
                                              "submitted."], out
    assert lsf_emulator.calls("bsub"), "bsub was not asked: the failure is not the scheduler's"
    assert not root.exists(), sorted(root.rglob("*"))
    # an existing scratch: its other runs stay, and so does the scratch
    theirs = root / "work3" / "s123456" / "improved-gpu" / "20260101-000000-abcd"
    theirs.mkdir(parents=True)
    code, out = cli("submit", REPO / "jobs" / "gpu.toml", "--data", tiny_data, "--profile", profile)
    assert code == 2, out
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == [
        Path("work3"), Path("work3/s123456"), Path("work3/s123456/improved-gpu"), theirs.relative_to(root)]


def test_a_refused_sweep_leaves_no_array_folder_behind(cli, tiny_data, lsf_emulator, monkeypatch):
    monkeypatch.setenv("LSF_EMU_QUEUES", "hpc")
    scratch = cli.tmp / "new" / "scratch"
    code, out = cli("submit", JOB_FILE, "--data", tiny_data, "--executor", "lsf", "--queue", "gpuv100",
                    "--scratch", scratch, "--sweep", "train.seed=0,1")
    assert code == 2 and "No such queue" in out, out
    assert not (cli.tmp / "new").exists()


def test_ctrl_c_in_submit_wait_says_the_job_goes_on(cli, tiny_data):
    """SIGINT to `submit --wait` (its process group, as a terminal's Ctrl-C): it exits 130 naming the run and the
    status and cancel commands, and the job, in its own session, still runs until it is cancelled."""
    args = [sys.executable, "-u", "-m", "hpcseg", "submit", JOB_FILE, "--data", tiny_data, "--executor", "local",
            "--gpus", "0", "--cpus", "1", "--mem", "1", "--wait"]
    for item in [*TINY, "train.epochs=100000"]:
        args += ["--set", item]
    proc = subprocess.Popen([str(a) for a in args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    run_id = job_id = None
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            found = re.match(r"submitted run (\S+)\s+job (\S+)", line)
            if found:
                run_id, job_id = found.groups()
            if line.startswith("waiting: "):
                break
        assert run_id, "".join(lines)
        os.killpg(proc.pid, signal.SIGINT)
        rest = proc.stdout.read()
        assert proc.wait(timeout=60) == 130, "".join(lines) + rest
        program = f"{sys.executable} -m hpcseg"
        assert [line for line in rest.splitlines() if not line.startswith("waiting: ")] == [
            f"hpcseg: interrupted; stopped waiting, run {run_id} (job {job_id}) still runs",
            f"  follow it:  {program} status {run_id}",
            f"  end it:     {program} cancel {run_id}"], rest
        assert "Aborted!" not in rest
        time.sleep(1)
        assert cli.status(run_id)[0]["state"] in ("PENDING", "RUNNING")
        code, out = cli("cancel", run_id)
        assert code == 0 and f"{run_id}: cancelled job {job_id} (local)" in out, out
        cli.wait(run_id, ("CANCELLED",), timeout_s=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        if job_id and cli.status(run_id)[0]["state"] not in ("CANCELLED", "FAILED", "COMPLETED"):
            os.killpg(int(job_id), signal.SIGKILL)  # the local job leads its own process group
