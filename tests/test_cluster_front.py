"""The cluster front end without running training: dry-run scripts, profile refusals, and status when the
scheduler has forgotten a job or its command fails or hangs."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from fixtures_cluster import JOB_FILE, TINY
from fixtures_commands import fake_command

REPO = Path(__file__).resolve().parents[1]


def _dry(cli, *args, data) -> tuple[int, str]:
    cmd = ["submit", JOB_FILE, "--data", data, "--dry-run", *args]
    return cli(*cmd)


def test_dry_run_lsf_script(cli, tiny_data):
    code, out = _dry(cli, "--profile", "dtu", "--queue", "gpuv100", "--scratch", cli.tmp / "work3", data=tiny_data)
    assert code == 0, out
    for line in ["#BSUB -q gpuv100", "#BSUB -n 4", '#BSUB -R "span[hosts=1]"', '#BSUB -R "rusage[mem=4GB]"',
                 '#BSUB -gpu "num=1:mode=exclusive_process"', "#BSUB -W 24:00", "#BSUB -wa USR2", "#BSUB -wt 5",
                 "module load python3/", "/bin/activate", "export SUBMITIT_EXECUTOR=lsf"]:
        assert line in out, (line, out)
    assert "module load cuda" not in out  # pip's torch brings its own CUDA libraries
    assert not (cli.tmp / "work3").exists()  # nothing written


def test_dry_run_lsf_sweep_is_one_array(cli, tiny_data):
    code, out = _dry(cli, "--profile", "dtu", "--queue", "gpua100", "--time", "02:00", "--sweep", "optim.lr=1e-3,3e-4",
                     "--sweep", "model.dropout=0,0.2", "--max-parallel", "2", data=tiny_data)
    assert code == 0, out
    assert out.count("#!/bin/bash") == 1 and out.count("# would submit run") == 4
    assert '#BSUB -J "exercise-improved[1-4]%2"' in out or "#BSUB -J exercise-improved[1-4]%2" in out, out
    assert "#BSUB -W 2:00" in out and "#BSUB -q gpua100" in out
    assert "%J_%I_0_log.out" in out


def test_dry_run_slurm_script(cli, tiny_data):
    code, out = _dry(cli, "--profile", "slurm", "--queue", "gpuv100", "--gpus", "2", "--cpus", "8", "--mem", "32",
                     "--time", "12:00", "--sweep", "train.seed=0,1,2", "--max-parallel", "2", data=tiny_data)
    assert code == 0, out
    # one training process per GPU, the job's 8 cores shared among them
    for line in ["#SBATCH --partition=gpuv100", "#SBATCH --gpus-per-node=2", "#SBATCH --ntasks-per-node=2",
                 "#SBATCH --nodes=1", "#SBATCH --cpus-per-task=4",
                 "#SBATCH --mem=32GB", "#SBATCH --time=720", "#SBATCH --array=0-2%2", "#SBATCH --signal=USR2@120",
                 "export SUBMITIT_EXECUTOR=slurm"]:
        assert line in out, (line, out)


def test_local_sweep_says_max_parallel_is_not_applied(cli, tiny_data):
    # the local executor starts one process per element (no job array): --max-parallel cannot hold any back
    code, out = _dry(cli, "--executor", "local", "--gpus", "0", "--sweep", "train.seed=0,1,2", "--max-parallel", "1",
                     data=tiny_data)
    assert code == 0, out
    assert "hpcseg: warning: --max-parallel 1: the local executor has no job arrays; all 3 runs start at once" in out
    assert out.count("# would submit run") == 3
    code, out = _dry(cli, "--executor", "local", "--gpus", "0", "--sweep", "train.seed=0,1,2", "--max-parallel", "3",
                     data=tiny_data)
    assert code == 0 and "warning" not in out, out


@pytest.mark.parametrize("args, message", [
    (["--profile", "dtu", "--queue", "gpuh100"], "--queue gpuh100: unknown queue for profile 'dtu'"),
    (["--profile", "dtu", "--queue", "gpuv100", "--time", "25:00"], "--time 25:00: above the 24:00 limit of queue gpuv100"),
    (["--profile", "dtu", "--gpus", "3"], "--gpus 3: queue gpuv100 has at most 2 GPUs"),
    (["--profile", "nosuch"], "--profile nosuch: unknown profile"),
    (["--time", "1:75"], "--time: '1:75' is not a walltime HH:MM"),
    (["--executor", "local", "--queue", "gpuv100"], "--queue gpuv100: the local executor has no queues"),
    (["--set", "train.epoch=3"], "unknown key 'train.epoch'"),
    (["--sweep", "optim.lr"], "--sweep optim.lr: expected KEY=V1,V2"),
    (["--sweep", "optim.lr=1e-3,-1"], "optim.lr: -1.0 is below the minimum"),
    (["--name", "a/b"], "--name 'a/b': an experiment name must be a plain folder name"),
    (["--max-parallel", "0"], "--max-parallel 0: must be at least 1"),
    (["--profile", "slurm", "--mem", "nan"], "--mem nan: must be a positive number of GB"),
    (["--profile", "dtu", "--mem", "inf"], "--mem inf: must be a positive number of GB"),
    (["--scratch", "/dev/null/runs", "--dry-run"], "scratch /dev/null/runs: cannot be created, /dev/null is not a folder"),
])
def test_refusals_before_submitting(cli, tiny_data, args, message):
    executor = [] if "--profile" in args or "--executor" in args else ["--executor", "local"]
    code, out = cli("submit", JOB_FILE, "--data", tiny_data, *executor, *args)
    assert code != 0
    lines = [ln for ln in out.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("hpcseg: error: ") and message in lines[0], out
    assert "Traceback" not in out
    assert not cli.scratch.exists()  # nothing half-written


def test_refuses_missing_data_and_bad_profile(cli, tiny_data, tmp_path):
    code, out = cli("submit", JOB_FILE, "--data", tmp_path / "nope", "--executor", "local")
    assert code != 0 and out.strip() == f"hpcseg: error: --data {tmp_path / 'nope'}: no such folder", out
    bad = tmp_path / "bad.toml"
    bad.write_text('executor = "pbs"\n')
    code, out = cli("submit", JOB_FILE, "--data", tiny_data, "--profile", bad)
    assert code != 0 and "executor: 'pbs' is not one of" in out and len(out.strip().splitlines()) == 1, out
    bad.write_text('[queues.q]\nmax_time = "forever"\n')
    code, out = cli("submit", JOB_FILE, "--data", tiny_data, "--profile", bad)
    assert code != 0 and "queues.q.max_time" in out, out
    for text, message in [('[defaults]\ngpus = "two"\n', "defaults.gpus: expected an integer, got 'two'"),
                          ('[defaults]\nmem_gb = "lots"\n', "defaults.mem_gb: expected a number, got 'lots'"),
                          ('queue = 3\n', "queue: expected a queue name, got 3"),
                          ('max_requeues = -1\n', "max_requeues: expected an integer of at least 0, got -1"),
                          ('signal_delay_s = -5\n', "signal_delay_s: expected an integer of at least 0, got -5"),
                          ('[defaults]\ncpus = 0\n', "defaults.cpus: expected an integer of at least 1, got 0"),
                          ('[defaults]\nmem_gb = nan\n', "defaults.mem_gb: expected a number of at least 0.001, got nan"),
                          ('[queues.q]\nmax_gpus = -1\n', "queues.q.max_gpus: expected an integer of at least 0, got -1"),
                          ('name = 3\n', "name: expected a string, got 3")]:
        bad.write_text(text)
        code, out = cli("submit", JOB_FILE, "--data", tiny_data, "--profile", bad, "--dry-run")
        assert code != 0 and out.strip() == f"hpcseg: error: {bad}: {message}", out
    assert not cli.scratch.exists()


def test_site_profiles_load():
    from hpcseg.cluster.profiles import load_profile

    dtu = load_profile(str(REPO / "hpc" / "dtu.toml"))
    assert dtu.executor == "lsf" and dtu.scratch == "/work3/$USER" and set(dtu.queues) == {"gpuv100", "gpua100"}
    assert all(q.max_time_min == 24 * 60 for q in dtu.queues.values())
    assert load_profile(str(REPO / "hpc" / "slurm.toml")).executor == "slurm"
    assert load_profile(str(REPO / "hpc" / "local.toml")).executor == "local"


# ---------------------------------------------------------------- status from files and a broken scheduler


def _fake_run(scratch: Path, run_id: str, executor: str, job_id: str, outcome: str | None = None,
              progress: dict | None = None) -> Path:
    run_dir = scratch / "exp" / run_id
    run_dir.mkdir(parents=True)
    record = {"run_id": run_id, "experiment": "exp", "executor": executor, "job_id": job_id, "epochs": 10,
              "submit_time": time.time() - 3600, "submitit_dir": str(run_dir / "submitit")}
    (run_dir / "run.json").write_text(json.dumps(record))
    if outcome:
        (run_dir / "outcome.json").write_text(json.dumps({"state": outcome, "error": "boom" if outcome == "FAILED" else None}))
    if progress:
        (run_dir / "progress.json").write_text(json.dumps(progress))
    return run_dir


@pytest.mark.parametrize("mode", ["fails", "hangs"])
def test_status_when_scheduler_fails_or_hangs(cli, tmp_path, monkeypatch, mode):
    """One bounded query per backend; where the command fails or hangs, runs with an outcome keep it and the
    others are UNKNOWN."""
    shims = tmp_path / "bin"
    body = "exit 1" if mode == "fails" else "exec sleep 30"
    for name in ("bjobs", "sacct", "squeue"):
        fake_command(shims, name, f'echo "$0 $*" >> {tmp_path}/calls.log\n{body}' if mode == "fails" else
              f'echo "$0 $*" >> {tmp_path}/calls.log\n{body}')
    monkeypatch.setenv("PATH", f"{shims}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("HPCSEG_SCHEDULER_TIMEOUT_S", "1")
    progress = {"epoch": 4, "epochs": 10, "best_dice": 0.5, "best_epoch": 4, "updated": time.time()}
    _fake_run(cli.scratch, "r-lsf-done", "lsf", "101", outcome="COMPLETED", progress=progress)
    _fake_run(cli.scratch, "r-lsf-run", "lsf", "102", progress=progress)
    _fake_run(cli.scratch, "r-lsf-run2", "lsf", "103")
    _fake_run(cli.scratch, "r-slurm-failed", "slurm", "201", outcome="FAILED")
    _fake_run(cli.scratch, "r-slurm-run", "slurm", "202_1")
    started = time.time()
    rows = {r["run_id"]: r for r in cli.status()}
    elapsed = time.time() - started
    assert rows["r-lsf-done"]["state"] == "COMPLETED"
    assert rows["r-lsf-run"]["state"] == "UNKNOWN" and rows["r-lsf-run"]["epoch"] == 4
    assert rows["r-lsf-run2"]["state"] == "UNKNOWN"
    assert rows["r-slurm-failed"]["state"] == "FAILED" and rows["r-slurm-failed"]["error"] == "boom"
    assert rows["r-slurm-run"]["state"] == "UNKNOWN"
    calls = (tmp_path / "calls.log").read_text().splitlines()
    assert sum("bjobs" in c for c in calls) == 1  # one query for both unfinished LSF runs
    assert sum("sacct" in c for c in calls) == 1 and sum("squeue" in c for c in calls) == 1
    assert elapsed < 10
    code, out = cli("status")
    assert code == 0 and "UNKNOWN" in out and "hpcseg: warning: LSF: bjobs" in out, out


def test_status_squeue_fallback(cli, tmp_path, monkeypatch):
    """Without sacct (accounting off) Slurm states come from squeue; a job squeue no longer lists gets its
    state from its files."""
    shims = tmp_path / "bin"
    fake_command(shims, "sacct", 'echo "sacct: error: Slurm accounting storage is disabled" >&2; exit 1')
    fake_command(shims, "squeue", 'printf "301|RUNNING\\n302_0|PENDING\\n302_1|RUNNING\\n999|RUNNING\\n"')
    monkeypatch.setenv("PATH", f"{shims}{os.pathsep}{os.environ['PATH']}")
    _fake_run(cli.scratch, "a", "slurm", "301")
    _fake_run(cli.scratch, "b", "slurm", "302_0")
    _fake_run(cli.scratch, "c", "slurm", "302_1")
    _fake_run(cli.scratch, "d", "slurm", "303", outcome="COMPLETED")
    _fake_run(cli.scratch, "e", "slurm", "304")
    rows = {r["run_id"]: r["state"] for r in cli.status()}
    assert rows == {"a": "RUNNING", "b": "PENDING", "c": "RUNNING", "d": "COMPLETED", "e": "UNKNOWN"}


def test_lsf_forgotten_job_keeps_its_state(cli, tiny_data, lsf_emulator):
    """bjobs forgets finished jobs after CLEAN_PERIOD: status then reads the run's own files."""
    [(run_id, job_id)] = cli.submit("--executor", "lsf", "--queue", "gpuv100", "--gpus", "0", "--cpus", "1",
                                    "--mem", "1", data=tiny_data, sets=["train.epochs=1"])
    lsf_emulator.wait_for(job_id, timeout_s=60)
    before = cli.status(run_id)[0]
    lsf_emulator.forget(job_id)
    after = cli.status(run_id)[0]
    assert before["state"] == after["state"] == "COMPLETED"
    assert after["epoch"] == after["epochs"] == 1
    # a forgotten job whose run wrote nothing (killed hard) is UNKNOWN, not invented
    (cli.scratch / "exercise-improved" / run_id / "outcome.json").unlink()
    (cli.scratch / "exercise-improved" / run_id / "submitit" / f"{job_id}_0_result.pkl").unlink()
    assert cli.status(run_id)[0]["state"] == "FAILED"  # the batch script's exit code file says it ended
    (cli.scratch / "exercise-improved" / run_id / "submitit" / f"{job_id}_exitcode").unlink()
    assert cli.status(run_id)[0]["state"] == "UNKNOWN"
    assert TINY  # the tiny model is used by cli.submit


# ---------------------------------------------------------------- damaged run files


def test_status_lists_runs_whose_files_are_damaged(cli):
    """Jobs write run.json, progress.json, outcome.json and attempts.jsonl on a shared folder: a damaged one shows
    its run as damaged and never stops the listing of the others."""
    progress = {"epoch": 4, "epochs": 10, "best_dice": 0.5, "best_epoch": 4, "updated": time.time()}
    _fake_run(cli.scratch, "good", "local", "999999", outcome="COMPLETED", progress=progress)
    (_fake_run(cli.scratch, "record-torn", "local", "1", outcome="COMPLETED") / "run.json").write_text('{"run_id": "rec')
    (_fake_run(cli.scratch, "record-types", "local", "1") / "run.json").write_text(
        json.dumps({"run_id": "record-types", "executor": "local", "job_id": 12, "submitit_dir": 7, "submit_time": "x"}))
    (_fake_run(cli.scratch, "progress-empty", "local", "1") / "progress.json").write_text("")
    _fake_run(cli.scratch, "progress-types", "local", "1",
              progress={"epoch": "two", "epochs": 10, "best_dice": "0.5", "best_epoch": 2, "updated": "now"})
    (_fake_run(cli.scratch, "outcome-types", "local", "1") / "outcome.json").write_text('{"state": ["x"], "error": 3}')
    (_fake_run(cli.scratch, "attempts-odd", "local", "1") / "attempts.jsonl").write_text('3\n"start"\n{"ev')
    code, out = cli("status")
    assert code == 0 and "Traceback" not in out, out
    damaged = {"record-torn": "run.json: not a JSON object", "record-types": "run.json: job_id = 12 has the wrong type",
               "progress-empty": "progress.json: not a JSON object",
               "progress-types": "progress.json: best_dice = \"0.5\" has the wrong type",
               "outcome-types": "outcome.json: state = [\"x\"] has the wrong type"}
    for run_id, problem in damaged.items():
        assert f"{run_id}: damaged: {problem}" in out, out
    rows = {r["run_id"]: r for r in cli.status()}
    assert set(rows) == {"good", "attempts-odd", *damaged}
    assert rows["good"]["state"] == "COMPLETED" and rows["good"]["best_dice"] == 0.5 and rows["good"]["damage"] == []
    assert rows["record-torn"]["state"] == "COMPLETED" and rows["record-torn"]["damage"]
    assert rows["progress-types"]["epoch"] is None and rows["progress-types"]["best_epoch"] == 2
    assert rows["attempts-odd"]["state"] == "FAILED" and rows["attempts-odd"]["damage"] == []


def test_collect_refuses_a_destination_behind_a_file(cli):
    _fake_run(cli.scratch, "done", "local", "1", outcome="COMPLETED")
    a_file = cli.tmp / "file"
    a_file.write_text("x")
    for dest, message in [(a_file, f"{a_file}: exists and is not a folder"),
                          (a_file / "sub", f"{a_file / 'sub'}: cannot be created, {a_file} is not a folder")]:
        code, out = cli("collect", "--dest", dest)
        assert code != 0 and out.strip() == f"hpcseg: error: --dest {message}", out
    assert a_file.read_text() == "x"


def test_collect_goes_on_past_a_damaged_run(cli):
    """A run whose files cannot be copied or drawn is named in one line, leaves nothing in the destination, and
    the other runs are still collected."""

    def finished(run_id: str) -> Path:
        run_dir = _fake_run(cli.scratch, run_id, "local", "1", outcome="COMPLETED")
        (run_dir / "checkpoints").mkdir()
        (run_dir / "checkpoints" / "best.pt").write_bytes(b"weights")
        (run_dir / "job.toml").write_text('name = "exp"\n')
        (run_dir / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "train_loss": 0.5, "val_mean_dice": 0.4,
                                                           "val_dice": {"csf": 0.4}}) + "\n")
        return run_dir

    finished("a-good")
    best_dir = finished("b-best-is-a-folder") / "checkpoints" / "best.pt"
    best_dir.unlink()
    best_dir.mkdir()
    (finished("c-metrics-types") / "metrics.jsonl").write_text(
        json.dumps({"epoch": 1, "train_loss": 0.5, "val_mean_dice": 0.4, "val_dice": [0.4]}) + "\n"
        + json.dumps({"epoch": "2", "train_loss": "x"}) + "\n" + '{"epoch": 3, "tr')
    (finished("d-metrics-binary") / "metrics.jsonl").write_bytes(b"\xff\xfe\x00garbage\n")
    dest = cli.tmp / "collected"
    code, out = cli("collect", "--dest", dest)
    assert code != 0 and "Traceback" not in out, out
    assert [line for line in out.splitlines() if line.startswith("hpcseg: error:")] == [f"hpcseg: error: {best_dir}: not a regular file; not copied"]
    assert sorted(p.name for p in dest.iterdir()) == ["a-good", "c-metrics-types", "d-metrics-binary"]
    for run_id in ("a-good", "c-metrics-types", "d-metrics-binary"):
        assert f"{run_id}: 5 files copied, SHA256SUMS verified" in out, out


def test_a_damaged_list_of_remembered_scratch_folders_is_only_a_convenience(cli, monkeypatch):
    monkeypatch.delenv("HPCSEG_SCRATCH")
    remembered = cli.tmp / "state" / "hpcseg" / "scratch_dirs"
    remembered.parent.mkdir(parents=True)
    remembered.write_bytes(b"\xff\xfe\x00 not text\n")
    code, out = cli("status")
    assert code == 0 and out.startswith("no runs under"), out


def test_logs_and_cancel_name_what_is_wrong_with_a_run(cli):
    log_is_folder = _fake_run(cli.scratch, "log-is-folder", "local", "1")
    (log_is_folder / "submitit" / "1_0_log.out").mkdir(parents=True)
    code, out = cli("logs", "log-is-folder")
    assert code == 2 and out.strip() == f"hpcseg: error: {log_is_folder / 'submitit' / '1_0_log.out'}: not a regular file; not read", out
    (_fake_run(cli.scratch, "torn", "local", "1") / "run.json").write_text('{"run_id": "to')
    code, out = cli("logs", "torn")
    assert code != 0 and out.strip() == ("hpcseg: error: torn: no job id recorded (damaged: run.json: not a JSON object "
                                         "(empty, half-written or corrupt))"), out
    code, out = cli("cancel", "torn")
    assert out.strip() == ("torn: no job id recorded, nothing to cancel (damaged: run.json: not a JSON object "
                           "(empty, half-written or corrupt))"), out


def test_cancel_refuses_a_run_of_an_executor_it_does_not_know(cli):
    run_dir = _fake_run(cli.scratch, "from-pbs", "pbs", "4711")
    code, out = cli("cancel", "from-pbs")
    assert code == 2 and out.strip() == ("hpcseg: error: from-pbs: not cancelled: its run.json names executor 'pbs', "
                                         "which hpcseg does not know (job id 4711)"), out
    assert not (run_dir / "cancelled.json").exists()


def test_status_watch_ends_when_every_run_has_ended_or_is_damaged(cli, monkeypatch):
    monkeypatch.setenv("HPCSEG_POLL_S", "0.01")
    _fake_run(cli.scratch, "done", "local", "1", outcome="COMPLETED")
    (_fake_run(cli.scratch, "torn", "local", "2") / "run.json").write_text('{"run_id": "to')
    code, out = cli("status", "--watch")
    assert code == 0 and "done" in out and "torn: damaged: run.json" in out, out
