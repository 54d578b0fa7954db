"""hpcseg's commands against the LSF emulator where it acts as a real LSF site does: a job killed by LSF for its
memory shows FAILED with the reason (a cancel stays CANCELLED), and `logs` shows a running job's spooled output."""

from __future__ import annotations

import json
import select
import subprocess
import sys
import time

import pytest

LSF = ["--executor", "lsf", "--queue", "gpuv100", "--gpus", "0", "--cpus", "1"]


@pytest.mark.slow
def test_a_job_lsf_kills_for_its_memory_is_failed_with_the_limit(lsf_emulator, cli, tiny_data):
    """0.1 GB is less than Python with torch takes: LSF's per-job limit sends SIGINT, exit code 130 as a cancel's."""
    cli.extra_submit = [*LSF, "--mem", "0.1"]
    [(run_id, job_id)] = cli.submit(data=tiny_data)
    row = cli.wait(run_id, ("FAILED", "CANCELLED", "COMPLETED"), timeout_s=120)
    assert lsf_emulator.element(job_id)["exit_code"] == 130
    assert row["state"] == "FAILED", row
    assert row["error"].startswith("killed by LSF: memory limit (0.1 GB)"), row
    code, table = cli("status", run_id)
    assert code == 0 and "killed by LSF: memory limit (0.1 GB)" in table, table
    lsf_emulator.forget(job_id)  # after CLEAN_PERIOD: LSF's job report at the end of the log still says why
    row = cli.status(run_id)[0]
    assert row["state"] == "FAILED" and row["error"].startswith("killed by LSF: memory limit (0.1 GB)"), row
    record = json.loads(next(cli.scratch.glob(f"*/{run_id}/run.json")).read_text())
    assert record["versions"]["python"] == ".".join(map(str, sys.version_info[:3]))


@pytest.mark.slow
def test_logs_of_a_running_job_whose_output_lsf_spools_come_through_bpeek(lsf_emulator, cli, tiny_data, monkeypatch):
    monkeypatch.setenv("LSF_EMU_STDOUT_DIRECT", "n")
    cli.extra_submit = [*LSF, "--mem", "4"]
    [(run_id, job_id)] = cli.submit(data=tiny_data, sets=["train.epochs=100000", "train.val_interval=1000"])
    cli.wait(run_id, ("RUNNING",), timeout_s=90)
    deadline, out = time.time() + 90, ""
    while "hpcseg job runner: memory limit:" not in out and time.time() < deadline:
        code, out = cli("logs", run_id)
        time.sleep(0.5)
    assert code == 0 and "hpcseg job runner: starting" in out and "(as submitted)" in out, out
    assert "showing bpeek" in out  # the note (on stderr) says where the lines come from
    assert "hpcseg job runner: memory limit: 4 GB" in out and "HPCSEG_JOB_MEM_GB=4" in out, out
    code, out = cli("logs", run_id, "--err")
    assert code == 2 and "the scheduler spools the job's output until it ends" in out, out
    follower = subprocess.Popen([sys.executable, "-m", "hpcseg", "logs", run_id, "--follow"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    try:
        ready, _, _ = select.select([follower.stdout], [], [], 90)
        assert ready, "logs --follow printed nothing while the job ran"
        first = follower.stdout.readline()
        assert "Starting with JobEnvironment" in first or first.startswith("hpcseg job runner"), first
        assert cli.status(run_id)[0]["state"] == "RUNNING"
    finally:
        code, out = cli("cancel", run_id)
        assert code == 0, out
        rest, _ = follower.communicate(timeout=120)  # bpeek -f ends with the job, and so does logs --follow
    assert "Exited with exit code" in rest  # the rest of the log once LSF copied it, with LSF's job report
    cli.wait(run_id, ("CANCELLED",), timeout_s=60)
