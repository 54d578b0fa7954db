"""Real jobs through `hpcseg submit/status/collect/cancel/logs` on the local executor, the LSF emulator and the
single-node Slurm and SGE (skipped where no cluster answers). Models and data are tiny: a job is mostly imports."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

TERMINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT")


def _check_sums(dest: Path) -> list[str]:
    names = []
    for line in (dest / "SHA256SUMS").read_text().splitlines():
        sha, name = line.split("  ", 1)
        assert hashlib.sha256((dest / name).read_bytes()).hexdigest() == sha, name
        names.append(name)
    return names


def _metrics_epochs(run_dir: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("backend", ["local"], indirect=True)
def test_a_job_submitted_by_a_shell_that_ignores_interrupts_is_still_cancelled(backend, cli, tiny_data):
    """`hpcseg submit ... &` in a script: the shell ignores INT, and so would the job it starts; the local job starts
    with INT at its default, as a scheduler's job does, so `hpcseg cancel` (an INT to its controller) ends it."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        [(run_id, _)] = cli.submit(data=tiny_data, sets=["train.epochs=100000", "train.val_interval=1000"])
    finally:
        signal.signal(signal.SIGINT, previous)
    cli.wait(run_id, ("RUNNING",), timeout_s=90)
    code, out = cli("cancel", run_id)
    assert code == 0 and "cancelled" in out, out
    cli.wait(run_id, ("CANCELLED",), timeout_s=90)


def test_submit_status_collect_cancel_fail_sweep(backend, cli, tiny_data):
    # a job to cancel first (on Slurm's two cores it must get one of them), then the others at once
    [(long_id, _)] = cli.submit("--name", "long", data=tiny_data, sets=["train.epochs=100000", "train.val_interval=1000"])
    [(good_id, good_job)] = cli.submit("--name", "good", data=tiny_data, sets=["data.test_dir=test_data"])
    [(bad_id, _)] = cli.submit("--name", "bad", data=tiny_data / "bad_data")
    sweep = cli.submit("--name", "sweep", "--sweep", "optim.lr=1e-3,3e-4", "--max-parallel", "2", data=tiny_data)
    assert len(sweep) == 2

    # cancel: seen RUNNING, then CANCELLED
    cli.wait(long_id, ("RUNNING",), timeout_s=60)
    code, out = cli("cancel", long_id)
    assert code == 0 and "cancelled" in out, out
    cli.wait(long_id, ("CANCELLED",), timeout_s=60)

    # the good run completes; status shows its epochs and best Dice
    seen: set = set()
    row = cli.wait(good_id, ("COMPLETED",), timeout_s=90, seen=seen)
    assert seen <= {"PENDING", "RUNNING", "COMPLETED"}, seen
    assert (row["epoch"], row["epochs"], row["job_id"], row["executor"]) == (3, 3, good_job, backend)
    assert 0 <= row["best_dice"] <= 1 and row["best_epoch"] in (1, 2, 3)
    code, table = cli("status", "good")
    assert code == 0 and good_id in table and "COMPLETED" in table and "3/3" in table, table
    run_dir = cli.scratch / "good" / good_id
    assert (run_dir.stat().st_mode & 0o777) == 0o700
    record = json.loads((run_dir / "run.json").read_text())
    assert record["job_id"] == good_job and record["executor"] == backend and record["hpcseg_version"]
    assert (run_dir / "test" / "test_data" / "summary.json").exists()

    # collect: checksummed copy; a second collect copies nothing
    dest = cli.tmp / "collected"
    code, out = cli("collect", "good", "--dest", dest)
    assert code == 0, out
    names = _check_sums(dest / good_id)
    assert {"best.pt", "job.toml", "metrics.jsonl", "curves.png", "job-test/test_data/summary.json"} <= set(names)
    assert (dest / good_id / "curves.png").read_bytes()[:4] == b"\x89PNG"
    code, out = cli("collect", good_id, "--dest", dest)
    assert code == 0 and "0 files copied" in out, out
    # the collected model tests where it landed, with the Dice the job's own test found
    code, out = cli("test", dest / good_id, "--data", tiny_data / "test_data", "--out", cli.tmp / "retest")
    assert code == 0, out
    assert (json.loads((cli.tmp / "retest" / "summary.json").read_text())["dice_per_class"]
            == json.loads((run_dir / "test" / "test_data" / "summary.json").read_text())["dice_per_class"])

    # logs
    code, out = cli("logs", good_id)
    assert code == 0 and "COMPLETED" in out, out

    # the failing job: FAILED, its error in status and in `logs --err`
    row = cli.wait(bad_id, ("FAILED",), timeout_s=90)
    assert "bad_data" in (row["error"] or ""), row
    code, err = cli("logs", bad_id, "--err")
    assert code == 0 and "FAILED" in err and "bad_data" in err, err

    # the sweep: one array, both elements completed in their own folders, with their own lr
    for run_id, job_id in sweep:
        cli.wait(run_id, ("COMPLETED",), timeout_s=90)
    records = [json.loads((cli.scratch / "sweep" / r / "run.json").read_text()) for r, _ in sweep]
    assert [r["sweep"] for r in records] == [{"optim.lr": 1e-3}, {"optim.lr": 3e-4}]
    if backend != "local":  # the local executor has no arrays: one process per element
        assert len({r["array_job_id"] for r in records}) == 1
        assert records[0]["job_id"] != records[1]["job_id"]
    code, out = cli("collect", "sweep", "--top", "1", "--dest", dest)
    assert code == 0 and out.count("SHA256SUMS verified") == 1, out


def test_every_job_a_test_submitted_is_ended_when_the_test_ends(backend, cli, tiny_data, submitted_jobs):
    """What runs after every test, passed or failed (fixtures_cluster.submitted_jobs): a job that would train
    for hours is ended, whatever the scheduler says of it."""
    [(run_id, _)] = cli.submit("--name", "forever", data=tiny_data,
                               sets=["train.epochs=100000", "train.val_interval=1000"])
    cli.wait(run_id, ("RUNNING",), timeout_s=60)
    submitted_jobs.end_all()
    row = cli.wait(run_id, TERMINAL, timeout_s=60)
    assert row["state"] != "COMPLETED" and (row["epoch"] or 0) < 100000, row


def _send_warning(backend: str, run_dir: Path, job_id: str) -> None:
    """Send the job the warning signal (USR2) as its scheduler does before the time limit or on preemption."""
    if backend == "slurm":
        subprocess.run(["scancel", "--signal=USR2", job_id], check=True, timeout=10)
    elif backend == "lsf":
        subprocess.run(["bkill", "-s", "USR2", job_id], check=True, timeout=10)
    elif backend == "sge":  # what SGE does at the soft walltime limit s_rt: USR1 to the job's process group
        starts = [json.loads(x) for x in (run_dir / "attempts.jsonl").read_text().splitlines()]
        os.killpg(os.getpgid([a for a in starts if a["event"] == "start"][-1]["pid"]), signal.SIGUSR1)
    else:  # the local executor's controller signals the training process itself
        starts = [json.loads(x) for x in (run_dir / "attempts.jsonl").read_text().splitlines()]
        os.kill([a for a in starts if a["event"] == "start"][-1]["pid"], signal.SIGUSR2)


def test_warning_signal_requeues_and_resumes(backend, cli, tiny_data):
    """On the scheduler's warning signal the job saves, requeues itself, and the next attempt resumes from
    checkpoints/last.pt, ending with exactly the asked number of epochs (the signal is sent once the job has
    trained a few epochs, so the test does not race a clock on a busy machine)."""
    epochs = 60
    [(run_id, job_id)] = cli.submit("--time", "00:30", "--name", "requeue", data=tiny_data,
                                    sets=[f"train.epochs={epochs}", "train.val_interval=20"])
    run_dir = cli.scratch / "requeue" / run_id
    cli.wait(run_id, ("RUNNING",), timeout_s=60, until=lambda r: (r["epoch"] or 0) >= 3)
    _send_warning(backend, run_dir, job_id)
    row = cli.wait(run_id, TERMINAL, timeout_s=90)
    attempts = [json.loads(x) for x in (run_dir / "attempts.jsonl").read_text().splitlines()]
    starts = [a for a in attempts if a["event"] == "start"]
    assert row["state"] == "COMPLETED", (row, attempts)
    assert len(starts) == 2 and starts[-1]["resume"] and not starts[0]["resume"], attempts
    assert starts[0]["job_id"] == starts[1]["job_id"] == job_id  # requeued under the same job id
    assert row["epoch"] == epochs
    assert _metrics_epochs(run_dir) == list(range(1, epochs + 1))


def _starts(run_dir: Path) -> list[dict]:
    lines = (run_dir / "attempts.jsonl").read_text().splitlines() if (run_dir / "attempts.jsonl").exists() else []
    return [a for a in map(json.loads, lines) if a["event"] == "start"]


def _progress_epoch(run_dir: Path) -> int:
    try:
        return json.loads((run_dir / "progress.json").read_text())["epoch"]
    except (OSError, ValueError, KeyError):  # not written yet (or being replaced)
        return 0


def _poll(predicate, what: str, timeout_s: float = 120):
    """Poll fast (the job trains on meanwhile); the timeout only stops a hang, it is not what is tested."""
    deadline = time.monotonic() + timeout_s
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"no {what} after {timeout_s} s"
        time.sleep(0.02)
    return value


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["local", "lsf"])
def test_repeated_warnings_requeue_and_resume_to_exactly_the_asked_epochs(kind, cli, tiny_data, tmp_path, request):
    """Warned again and again (as by a walltime shorter than the training, or repeated preemption), the job saves,
    requeues itself each time, and its attempts together train exactly the asked epochs, each resuming where the
    last stopped. The warnings are counted, not timed: each comes once the attempt has trained an epoch, while the
    training process is stopped (SIGSTOP), so it lands before the last epoch however fast or slow the machine.
    (Slurm takes ~11 s per requeue: its one-warning test is test_warning_signal_requeues_and_resumes; LSF's run-limit
    warning itself is tested in test_lsf_plugin.)"""
    warnings, epochs = 3, 30
    if kind == "lsf":
        request.getfixturevalue("lsf_emulator")
    profile = tmp_path / "requeue.toml"
    profile.write_text(f'executor = "{kind}"\nmax_requeues = {warnings}\n')
    queue = ["--queue", "gpuv100"] if kind == "lsf" else []
    [(run_id, job_id)] = cli.submit("--profile", profile, *queue, "--time", "10:00", "--gpus", "0", "--cpus", "1",
                                    "--mem", "1", "--name", "requeue", data=tiny_data,
                                    sets=[f"train.epochs={epochs}", "train.val_interval=1000"])
    run_dir = cli.scratch / "requeue" / run_id
    warned_at = []  # the epoch each attempt had reached when it was warned
    for attempt in range(warnings):
        pid = _poll(lambda: len(_starts(run_dir)) > attempt and _starts(run_dir)[attempt]["pid"], f"attempt {attempt}")
        # a warning outside a training step requeues at once, from the last checkpoint: so the first one waits
        # for checkpoints/last.pt, without which the run starts over
        _poll(lambda: (run_dir / "checkpoints" / "last.pt").exists()
              and _progress_epoch(run_dir) > (warned_at[-1] if warned_at else 0), f"an epoch in attempt {attempt}")
        os.kill(pid, signal.SIGSTOP)
        try:
            warned_at.append(_progress_epoch(run_dir))
            assert warned_at[-1] < epochs, warned_at
            _send_warning(kind, run_dir, job_id)
        finally:
            os.kill(pid, signal.SIGCONT)
    row = cli.wait(run_id, TERMINAL, timeout_s=420)
    starts = _starts(run_dir)
    assert row["state"] == "COMPLETED", (row, starts)
    assert len(starts) == warnings + 1, starts  # one requeue per warning, no more
    assert not starts[0]["resume"] and all(a["resume"] for a in starts[1:]), starts
    assert {a["job_id"] for a in starts} == {job_id}  # requeued under the same job id
    assert warned_at == sorted(set(warned_at)), warned_at  # each attempt trained on from where the last stopped
    assert row["epoch"] == epochs
    assert _metrics_epochs(run_dir) == list(range(1, epochs + 1))  # no epoch lost or trained twice
