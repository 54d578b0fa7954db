"""A scratch folder may be shared with other users: what they put there must not steer hpcseg. Files are read
only when they are regular files of this user of bounded size (never through a link), ids and paths read from a
run folder are checked against the folder, collect writes only inside --dest, cancel cancels only this user's
jobs. Also: what the scheduler prints (any byte), and where the results are shown."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest

from fixtures_commands import fake_command

from hpcseg.cluster import runs as runs_module
from hpcseg.cluster.runs import my_user


def _run(scratch: Path, folder: str, executor: str = "local", job_id: str = "1", experiment: str = "exp",
         **record) -> Path:
    """A finished-looking run folder with a best checkpoint, job, metrics and the given record fields."""
    run_dir = scratch / experiment / folder
    (run_dir / "checkpoints").mkdir(parents=True)
    base = {"run_id": folder, "experiment": experiment, "executor": executor, "job_id": job_id, "epochs": 1,
            "submit_time": time.time() - 3600, "submitit_dir": str(run_dir / "submitit")}
    (run_dir / "run.json").write_text(json.dumps({**base, **record}))
    (run_dir / "checkpoints" / "best.pt").write_bytes(b"weights")
    (run_dir / "job.toml").write_text('name = "exp"\n')
    (run_dir / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "train_loss": 0.5, "val_mean_dice": 0.4,
                                                       "val_dice": {"csf": 0.4}}) + "\n")
    return run_dir


def _calls(tmp_path: Path) -> list[str]:
    log = tmp_path / "calls.log"
    return log.read_text().splitlines() if log.exists() else []


def _files_under(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


# ---------------------------------------------------------------- collect writes only inside --dest


@pytest.mark.parametrize("planted", ["../../escaped", "ABSOLUTE"])
def test_a_run_id_read_from_run_json_never_leads_collect_outside_dest(cli, planted):
    planted = str(cli.tmp / "absolute-escape") if planted == "ABSOLUTE" else planted
    run_dir = _run(cli.scratch, "honest-folder", run_id=planted)
    outside_before = _files_under(cli.tmp)
    dest = cli.tmp / "out" / "collected"
    code, out = cli("collect", "--dest", dest)
    assert code == 0, out
    assert (dest / "honest-folder" / "best.pt").read_bytes() == b"weights"
    new = _files_under(cli.tmp) - outside_before
    assert all(name == "out" or name.startswith("out/") for name in new), new
    [row] = cli.status()
    assert row["run_id"] == "honest-folder" and row["path"] == str(run_dir)
    assert any("run_id" in d and "is not its folder's name" in d for d in row["damage"]), row


def test_a_planted_manifest_and_links_in_dest_never_remove_or_write_files_elsewhere(cli):
    _run(cli.scratch, "r1")
    elsewhere = cli.tmp / "elsewhere"
    (elsewhere / "x").mkdir(parents=True)
    for name in ("precious.txt", "summary.json", "best.pt"):
        (elsewhere / name).write_text("keep me")
    (elsewhere / "x" / "summary.json").write_text("keep me")
    dest = cli.tmp / "collected"
    run_dest = dest / "r1"
    run_dest.mkdir(parents=True)
    os.symlink(elsewhere, run_dest / "job-test")  # a link where collect keeps the job's test outputs
    os.symlink(elsewhere / "best.pt", run_dest / "run.json")  # a file name collect writes, linked elsewhere
    planted = {name: {"sha256": "0" * 64, "source": [1, 2, 3]} for name in
               ["../../elsewhere/precious.txt", str(elsewhere / "precious.txt"), "job-test/x/summary.json",
                "test/../../../elsewhere/summary.json"]}
    (run_dest / ".collect.json").write_text(json.dumps(planted))
    code, out = cli("collect", "--dest", dest)
    assert code == 0, out
    assert sorted(p.read_text() for p in elsewhere.rglob("*") if p.is_file()) == ["keep me"] * 4, out
    assert not (run_dest / "run.json").is_symlink() and json.loads((run_dest / "run.json").read_text())["run_id"] == "r1"
    manifest = json.loads((run_dest / ".collect.json").read_text())
    assert set(manifest) == {"best.pt", "job.toml", "metrics.jsonl", "run.json", "curves.png"}
    # once the run has a test to bring, the link where it would go is refused, not followed
    _job_test(cli.scratch / "exp" / "r1")
    code, out = cli("collect", "--dest", dest)
    assert code == 2 and f"hpcseg: error: {run_dest / 'job-test'}: a symbolic link (not followed); collect writes " \
                         "only into folders of its own" in out, out
    assert sorted(p.read_text() for p in elsewhere.rglob("*") if p.is_file()) == ["keep me"] * 4, out


def test_collect_refuses_a_run_destination_that_is_a_link(cli):
    _run(cli.scratch, "r1")
    elsewhere = cli.tmp / "elsewhere"
    elsewhere.mkdir()
    dest = cli.tmp / "collected"
    dest.mkdir()
    os.symlink(elsewhere, dest / "r1")
    code, out = cli("collect", "--dest", dest)
    assert code == 2 and out.strip() == f"hpcseg: error: {dest / 'r1'}: a symbolic link (not followed); collect " \
                                        "writes only into folders of its own", out
    assert list(elsewhere.iterdir()) == []


# ---------------------------------------------------------------- files that are not plain records


def _status_in_thread(cli) -> tuple[int, str]:
    """`status --json`, failing the test instead of hanging it where a read blocks."""
    result = {}
    worker = threading.Thread(target=lambda: result.update(out=cli("status", "--json")), daemon=True)
    worker.start()
    worker.join(120)
    assert not worker.is_alive(), "hpcseg status hung"
    return result["out"]


def test_a_fifo_a_device_link_or_a_huge_file_as_run_json_is_damage_not_a_hang(cli):
    fifo = _run(cli.scratch, "fifo") / "run.json"
    fifo.unlink()
    os.mkfifo(fifo)
    zero = _run(cli.scratch, "zero") / "run.json"
    zero.unlink()
    os.symlink("/dev/zero", zero)
    huge = _run(cli.scratch, "huge")
    (huge / "progress.json").write_text('{"epoch": 1, "pad": "' + "x" * (2 << 20) + '"}')
    linked = _run(cli.scratch, "linked")
    (linked / "outcome.json").symlink_to(cli.tmp / "forged-outcome.json")
    (cli.tmp / "forged-outcome.json").write_text('{"state": "COMPLETED"}')
    code, out = _status_in_thread(cli)
    assert code == 0, out
    rows = {r["run_id"]: r for r in json.loads(out[out.index("["):])}
    assert rows["fifo"]["damage"] == ["run.json: not a regular file, not read"]
    assert rows["zero"]["damage"] == ["run.json: a symbolic link (not followed), not read"]
    assert rows["huge"]["damage"] == [f"progress.json: larger than {1 << 20} bytes, not read"]
    assert rows["linked"]["damage"] == ["outcome.json: a symbolic link (not followed), not read"]
    assert rows["linked"]["state"] != "COMPLETED"


def test_folders_and_files_of_another_user_are_listed_as_damaged_and_never_acted_on(cli, shims, tmp_path,
                                                                                    monkeypatch):
    fake_command(shims, "scancel", f'echo "scancel $*" >> {tmp_path}/calls.log')
    run_dir = _run(cli.scratch, "theirs", "slurm", "4242")
    monkeypatch.setattr(runs_module, "my_uid", lambda: os.geteuid() + 4711)  # everything here is another's
    code, out = _status_in_thread(cli)
    assert code == 0, out
    [row] = json.loads(out[out.index("["):])
    assert row["state"] == "UNKNOWN" and row["job_id"] is None
    assert row["damage"] == [f"experiment folder {run_dir.parent}: owned by another user (uid {os.geteuid()}); "
                             "not read"], row
    code, out = cli("cancel", "exp")
    assert code == 2 and out.strip() == f"hpcseg: error: theirs: not cancelled: {row['damage'][0]}", out
    code, out = cli("collect", "--dest", cli.tmp / "collected")
    assert code == 2 and f"hpcseg: error: theirs: not collected: {row['damage'][0]}" in out, out
    assert not (cli.tmp / "collected" / "theirs").exists()
    code, out = cli("logs", "theirs")
    assert code == 2 and out.strip() == f"hpcseg: error: theirs: {row['damage'][0]}", out
    assert _calls(tmp_path) == []


@pytest.mark.parametrize("field, value, problem", [
    ("job_id", "1; rm -rf ~", "is not a slurm job id"),
    ("job_id", "123[4]", "is not a slurm job id"),
    ("submitit_dir", "/somewhere/else/submitit", "is neither the run's submitit folder nor its sweep's"),
    ("submitit_dir", "/x/exp/.arrays/other-sweep", "is neither the run's submitit folder nor its sweep's"),
    ("experiment", "../other", "is not its folder's name 'exp'"),
])
def test_ids_and_paths_in_run_json_must_belong_to_the_run_folder(cli, field, value, problem):
    record_file = _run(cli.scratch, "r1", "slurm", "123") / "run.json"
    record_file.write_text(json.dumps({**json.loads(record_file.read_text()), field: value}))
    [row] = cli.status()
    assert f"run.json: {field} = {json.dumps(value)} {problem}; not used" in row["damage"], row
    if field == "job_id":
        assert row["job_id"] is None


def test_array_logs_are_found_in_the_sweeps_folder_wherever_the_scratch_was_mounted(cli):
    """A sweep's submitit files are in <experiment>/.arrays/<sweep id>/ (named <array id>_<index>_0_log.*):
    logs finds them from the run folder, also when run.json was written under another path of the scratch."""
    sweep = "20260101-120000-abcd"
    arrays = cli.scratch / "exp" / ".arrays" / sweep
    arrays.mkdir(parents=True)
    for index in (0, 1):
        run_dir = _run(cli.scratch, f"{sweep}-{index}", "slurm", f"77_{index}",
                       submitit_dir=f"/mnt/old-mount/exp/.arrays/{sweep}")
        os.symlink(os.path.relpath(arrays, run_dir), run_dir / "submitit")
        (arrays / f"77_{index}_0_log.out").write_text(f"element {index} says hello\n")
        (arrays / f"77_{index}_0_log.err").write_text(f"element {index} warns\n")
    code, out = cli("logs", f"{sweep}-1")
    assert code == 0 and out == "element 1 says hello\n", out
    code, out = cli("logs", f"{sweep}-0", "--err")
    assert code == 0 and out == "element 0 warns\n", out


# ---------------------------------------------------------------- cancel only this user's jobs


def test_cancel_cancels_only_jobs_the_scheduler_says_are_this_users(cli, shims, tmp_path):
    me = my_user()
    log = f'echo "$(basename $0) $*" >> {tmp_path}/calls.log'
    # sacct answers the state query and the owner query; 501 is this user's job, 502 another user's
    fake_command(shims, "sacct", f'''{log}
if [[ "$*" == *User* ]]; then printf '501|{me}\\n502|mallory\\n'; else printf '501|RUNNING\\n502|RUNNING\\n503|RUNNING\\n'; fi''')
    fake_command(shims, "scancel", log)
    _run(cli.scratch, "mine", "slurm", "501")
    _run(cli.scratch, "planted", "slurm", "502")
    _run(cli.scratch, "unlisted", "slurm", "503")
    code, out = cli("cancel", "exp")
    assert code == 2, out
    assert "mine: cancelled job 501 (slurm)" in out
    assert f"hpcseg: error: planted: not cancelled: job 502 is not confirmed as yours ({me}): slurm says it is " \
           "mallory's" in out
    assert f"hpcseg: error: unlisted: not cancelled: job 503 is not confirmed as yours ({me}): slurm does not " \
           "list it" in out
    assert [c for c in _calls(tmp_path) if c.startswith("scancel")] == ["scancel 501"]
    assert not (cli.scratch / "exp" / "planted" / "cancelled.json").exists()


def test_cancel_on_lsf_checks_the_owner_and_says_bkill_once(cli, shims, tmp_path):
    me = my_user()
    log = f'echo "$(basename $0) $*" >> {tmp_path}/calls.log'
    fake_command(shims, "bjobs", f'''{log}
if [[ "$*" == *user* ]]; then printf '601,{me}\\n602,mallory\\n'; else printf '601,0,RUN,-\\n602,0,RUN,-\\n'; fi''')
    fake_command(shims, "bkill", f'{log}\necho "Job <601>: Permission denied by the queue" >&2; exit 255')
    _run(cli.scratch, "mine", "lsf", "601")
    _run(cli.scratch, "planted", "lsf", "602")
    code, out = cli("cancel", "exp")
    assert code == 2 and "Traceback" not in out, out
    assert [c for c in _calls(tmp_path) if c.startswith("bkill")] == ["bkill 601"]
    assert out.count("bkill") == 1 and "Permission denied" in out, out


def test_cancel_refuses_when_the_scheduler_cannot_say_whose_a_job_is(cli, shims, tmp_path):
    fake_command(shims, "sacct", 'echo "sacct: error: slurmdbd down" >&2; exit 1')
    fake_command(shims, "squeue", 'echo "squeue: error: controller down" >&2; exit 1')
    fake_command(shims, "scancel", f'echo "scancel $*" >> {tmp_path}/calls.log')
    _run(cli.scratch, "mine", "slurm", "501")
    code, out = cli("cancel", "mine")
    assert code == 2 and "Traceback" not in out, out
    assert out.startswith("hpcseg: error: mine: not cancelled: job 501 is not confirmed as yours") \
        and "the scheduler could not say whose it is (sacct exited 1: sacct: error: slurmdbd down" in out, out
    assert _calls(tmp_path) == []


def test_cancel_does_not_signal_a_local_pid_that_is_not_this_runs_job(cli):
    stranger = subprocess.Popen(["sleep", "60"])
    try:
        _run(cli.scratch, "local-run", "local", str(stranger.pid))
        code, out = cli("cancel", "local-run")
        assert code == 0 and "local-run: already FAILED" in out, out
        assert stranger.poll() is None  # still running: not this run's process
    finally:
        stranger.kill()
        stranger.wait()


# ---------------------------------------------------------------- the scheduler's answers


def test_a_scheduler_printing_any_byte_is_read_and_a_failed_query_is_in_the_json(cli, shims, tmp_path):
    me = my_user()
    fake_command(shims, "sacct", f'''if [[ "$*" == *User* ]]; then printf '501|{me}\\n'; else printf '501|RUNNING\\n\\xff\\xfe odd\\n'; fi''')
    fake_command(shims, "scancel", "true")
    _run(cli.scratch, "r1", "slurm", "501")
    [row] = cli.status()
    assert row["state"] == "RUNNING" and row["scheduler_error"] is None, row
    code, out = cli("status")
    assert code == 0 and "RUNNING" in out, out
    code, out = cli("cancel", "r1")
    assert code == 0 and "r1: cancelled job 501 (slurm)" in out, out
    # a failing scheduler: each affected run says so in the JSON
    fake_command(shims, "sacct", "printf 'sacct: \\xff broken\\n' >&2; exit 1")
    fake_command(shims, "squeue", "printf 'squeue: down\\n' >&2; exit 1")
    (cli.scratch / "exp" / "r1" / "cancelled.json").unlink()
    [row] = cli.status()
    assert row["state"] == "UNKNOWN" and row["scheduler_error"].startswith("sacct exited 1: sacct: \ufffd broken; "
                                                                           "squeue exited 1: squeue: down"), row


@pytest.mark.parametrize("code, state", [("143", "CANCELLED"), ("130", "CANCELLED"), ("1", "FAILED")])
def test_a_job_lsf_has_forgotten_gets_its_state_from_its_exit_code_file(cli, shims, code, state):
    fake_command(shims, "bjobs", 'echo "Job <701> is not found" >&2; exit 255')
    run_dir = _run(cli.scratch, "killed", "lsf", "701")
    (run_dir / "submitit").mkdir()
    (run_dir / "submitit" / "701_exitcode").write_text(code + "\n")
    [row] = cli.status()
    assert row["state"] == state, row
    assert row["error"] == f"the job exited with code {code} without writing its outcome (see hpcseg logs --err killed)"


# ---------------------------------------------------------------- results where the user looks


def _job_test(run_dir: Path, name: str = "test_data") -> Path:
    test = run_dir / "test" / name
    (test / "png").mkdir(parents=True)
    summary = {"slices": 2, "dice_per_class": {"csf": 0.5, "grey matter": 0.625, "white matter": 0.75},
               "mean_dice": 0.625, "mean_dice_per_slice": 0.6}
    (test / "summary.json").write_text(json.dumps(summary))
    (test / "per_slice.csv").write_text("slice,csf\ns0,0.5\n")
    for i in range(2):
        (test / "png" / f"s{i}.png").write_bytes(b"\x89PNG fake")
    (test / "predictions").mkdir()
    (test / "predictions" / "s0.npy").write_bytes(b"big")
    return test


def test_collect_brings_the_jobs_test_apart_from_a_local_test_and_prints_its_dice(cli):
    run_dir = _run(cli.scratch, "r1", experiment="lr $5 and $$")  # '$' starts matplotlib's mathtext
    _job_test(run_dir)
    scans = _job_test(run_dir, "scans")  # a test of 3D scans has no per-slice mean
    (scans / "summary.json").write_text(json.dumps({"scans": 1, "dice_per_class": {"csf": float("nan")},
                                                    "mean_dice": 0.25}))
    (_job_test(run_dir, "torn") / "summary.json").write_text('{"dice_per_class": {"csf": "high"}}')
    dest = cli.tmp / "collected"
    code, out = cli("collect", "--dest", dest)
    assert code == 0 and "Traceback" not in out, out
    job_test = dest / "r1" / "job-test" / "test_data"
    assert {p.name for p in job_test.iterdir()} == {"summary.json", "per_slice.csv", "png"}
    assert sorted(p.name for p in (job_test / "png").iterdir()) == ["s0.png", "s1.png"]
    assert (dest / "r1" / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert "grey matter     0.6250" in out and "mean            0.6250" in out, out
    assert f"overlays (2 PNGs): {job_test / 'png'}" in out, out
    assert "test on scans:\ntissue            Dice\ncsf                nan\nmean            0.2500\n" in out, out
    assert f"test on torn: {dest / 'r1' / 'job-test' / 'torn' / 'summary.json'} is damaged" in out, out
    sums = (dest / "r1" / "SHA256SUMS").read_text()
    assert "job-test/test_data/png/s1.png" in sums and "job-test/test_data/per_slice.csv" in sums
    # a local `hpcseg test` of the collected folder writes test/: a second collect leaves it alone
    local = dest / "r1" / "test" / "test_data"
    local.mkdir(parents=True)
    (local / "summary.json").write_text('{"local": true}')
    (run_dir / "test" / "test_data" / "png" / "s1.png").unlink()  # the job's test changed
    code, out = cli("collect", "--dest", dest)
    assert code == 0, out
    assert (local / "summary.json").read_text() == '{"local": true}'
    assert sorted(p.name for p in (job_test / "png").iterdir()) == ["s0.png"]
    assert "job-test/test_data/png/s1.png" not in (dest / "r1" / "SHA256SUMS").read_text()


@pytest.mark.slow
def test_submit_wait_prints_the_test_dice_and_where_the_overlays_are(cli, tiny_data):
    from fixtures_cluster import JOB_FILE, TINY

    sets = [x for s in [*TINY, "train.epochs=1", "data.test_dir=test_data"] for x in ("--set", s)]
    code, out = cli("submit", JOB_FILE, "--data", tiny_data, "--executor", "local", "--gpus", "0", "--wait", *sets)
    assert code == 0, out
    [run_dir] = [p for p in (cli.scratch / "exercise-improved").iterdir() if not p.name.startswith(".")]
    assert "test on test_data:" in out and "white_matter" in out and "mean/slice" in out, out
    assert f"overlays (2 PNGs): {run_dir / 'test' / 'test_data' / 'png'}" in out, out


@pytest.mark.slow
def test_cancel_confirms_the_owner_with_the_real_scheduler(backend, cli, tiny_data):
    """The owner check passes for this user's own job on each backend (the LSF emulator's `bjobs -o user`, the
    dev cluster's `sacct -o User`, the local process's user and command line)."""
    [(run_id, job_id)] = cli.submit(data=tiny_data, sets=["train.epochs=100000", "train.val_interval=1000"])
    cli.wait(run_id, ("RUNNING",), timeout_s=90)
    code, out = cli("cancel", run_id)
    assert code == 0 and out.strip() == f"{run_id}: cancelled job {job_id} ({backend})", out
    cli.wait(run_id, ("CANCELLED",), timeout_s=90)
