"""From the laptop, end to end over a real sshd: submit, status, logs (--follow and Ctrl-C), cancel, collect
(verified, resumed after a killed connection, then moving nothing), and a hostile cluster side."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fixtures_cluster import JOB_FILE, TINY
from test_ssh import _one_line, fake_hpcseg, hpcseg, write_profile


EMULATOR = Path(__file__).resolve().parent / "lsf_emulator"


def submit(tmp_path, cluster, scratch, *sets, executor="local") -> str:
    setup = [cluster.setup_line]
    if executor == "lsf":  # the LSF emulator as the cluster's scheduler, for its commands and its jobs
        setup += [f"export PATH={EMULATOR}:$PATH", f"export LSF_EMU_DIR={scratch}/lsf",
                  "export LSF_EMU_TERMINATE_INTERVAL_S=1"]
    profile = write_profile(tmp_path, setup, scratch, executor=executor)
    args = [a for s in [*TINY, *sets] for a in ("--set", s)]
    args += ["--queue", "gpuv100"] if executor == "lsf" else []
    done = hpcseg("submit", str(JOB_FILE), "--profile", str(profile), "--data", str(cluster.home / "data"),
                  "--gpus", "0", *args)
    assert done.returncode == 0, done.stderr
    found = re.findall(r"submitted run (\S+)\s+job (\S+)\s+\((\w+)\)\s+(\S+)", done.stdout)
    assert len(found) == 1, done.stdout
    run_id, _, ran_on, path = found[0]
    assert ran_on == executor and path == f"{scratch}/exercise-improved/{run_id}"
    return run_id


def wait_state(run_id: str, states: set[str], timeout_s: float = 180) -> dict:
    deadline = time.time() + timeout_s
    while True:
        done = hpcseg("status", "--host", "cluster", "--json", run_id)
        assert done.returncode == 0, done.stderr
        row = json.loads(done.stdout)[0]
        if row["state"] in states:
            return row
        assert time.time() < deadline, row
        time.sleep(1)


def remote_sha256(cluster, path: str) -> str:
    return cluster.ssh(f"sha256sum {path}").stdout.split()[0]


@pytest.mark.slow
def test_submit_status_logs_collect_from_the_laptop(ssh_cluster, cluster_data, cluster_scratch, tmp_path):
    run_id = submit(tmp_path, ssh_cluster, cluster_scratch)
    row = wait_state(run_id, {"COMPLETED", "FAILED"})
    assert row["state"] == "COMPLETED" and row["best_dice"] is not None, row
    # a bare status here includes the run submitted over SSH, under its host
    bare = hpcseg("status")
    assert bare.returncode == 0 and "on cluster:" in bare.stdout and run_id in bare.stdout, bare
    assert [r["host"] for r in json.loads(hpcseg("status", "--json").stdout) if r["run_id"] == run_id] == ["cluster"]
    # the same table as on the cluster itself
    there = ssh_cluster.ssh(f"{ssh_cluster.setup_line}; hpcseg status {run_id}")
    here = hpcseg("status", "--host", "cluster", run_id)
    strip = lambda text: re.sub(r"\d+s ago|\d+m ago", "", text)  # noqa: E731 - the age moves on between calls
    assert strip(here.stdout) == strip(there.stdout)
    logs = hpcseg("logs", run_id)  # bare: the remembered run is found on its host
    assert logs.returncode == 0 and "epoch" in logs.stdout.lower(), logs
    dest = tmp_path / "collected"
    first = hpcseg("collect", "--host", "cluster", run_id, "--dest", str(dest))
    assert first.returncode == 0, first.stderr
    # best.pt, job.toml, run.json, metrics.jsonl, and TensorBoard's two event files (tb/, the HParams session)
    assert f"{run_id}: 6 files copied" in first.stdout and "SHA256SUMS verified" in first.stdout
    sums = dict(reversed(line.split("  ")) for line in (dest / run_id / "SHA256SUMS").read_text().splitlines())
    assert sums["best.pt"] == remote_sha256(ssh_cluster, f"{cluster_scratch}/exercise-improved/{run_id}"
                                                         "/checkpoints/best.pt")
    import torch

    torch.load(dest / run_id / "best.pt", weights_only=True)
    assert (dest / run_id / "curves.png").stat().st_size > 1000
    assert not (dest / run_id / ".incoming").exists()
    again = hpcseg("collect", "--host", "cluster", run_id, "--dest", str(dest))
    assert f"{run_id}: 0 files copied (0 B moved), 6 unchanged" in again.stdout, again
    bare = hpcseg("collect", "--dest", str(tmp_path / "bare"))  # a bare collect includes the remembered runs
    assert bare.returncode == 0 and (tmp_path / "bare" / run_id / "best.pt").is_file(), bare


@pytest.mark.slow
def test_cancel_and_logs_follow_with_ctrl_c(ssh_cluster, cluster_data, cluster_scratch, tmp_path):
    run_id = submit(tmp_path, ssh_cluster, cluster_scratch, "train.epochs=100000", "train.early_stop=0",
                    executor="lsf")
    wait_state(run_id, {"RUNNING"})
    follow = subprocess.Popen([sys.executable, "-m", "hpcseg", "logs", "--host", "cluster", "--follow", run_id],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = follow.stdout.readline()
    assert first, follow.stderr.read()
    tails = lambda: ssh_cluster.ssh("ps -u hpcseg-cluster -o args=").stdout.count("_remote")  # noqa: E731
    assert tails() >= 1
    follow.send_signal(signal.SIGINT)
    assert follow.wait(15) == 0
    deadline = time.time() + 30  # sshd notices the closed connection within seconds; a loaded CI machine, later
    while tails() and time.time() < deadline:  # the remote tail ends with its connection
        time.sleep(0.2)
    assert tails() == 0
    done = hpcseg("cancel", "--host", "cluster", run_id)
    assert done.returncode == 0 and f"{run_id}: cancelled job" in done.stdout, done
    assert wait_state(run_id, {"CANCELLED", "FAILED", "COMPLETED"})["state"] == "CANCELLED"


def make_run(cluster, scratch: str, run_id: str, best_mb: int = 0, link: str | None = None) -> str:
    """A run folder made on the cluster side, over SSH (its files the cluster user's own)."""
    folder = f"{scratch}/exp/{run_id}"
    record = json.dumps({"run_id": run_id, "experiment": "exp", "executor": "local"})
    best = f"ln -s {link} {folder}/checkpoints/best.pt" if link else \
        f"head -c {best_mb * 1000000 or 1000} /dev/urandom > {folder}/checkpoints/best.pt"
    made = cluster.ssh(f"mkdir -p {folder}/checkpoints && echo '{record}' > {folder}/run.json && {best} "
                       f"&& echo 'name = \"x\"' > {folder}/job.toml")
    assert made.returncode == 0, made.stderr
    return folder


def test_collect_killed_connection_then_resume_then_nothing(ssh_cluster, cluster_scratch, tmp_path):
    profile = write_profile(tmp_path, [ssh_cluster.setup_line], cluster_scratch)
    assert hpcseg("submit", str(JOB_FILE), "--profile", str(profile), "--dry-run").returncode == 0
    folder = make_run(ssh_cluster, cluster_scratch, "20260101-000000-abcd", best_mb=20)
    dest = tmp_path / "dest"
    env = {**os.environ, "HPCSEG_RSYNC_OPTIONS": "--bwlimit=4m"}
    slow = subprocess.Popen([sys.executable, "-m", "hpcseg", "collect", "--host", "cluster", "--scratch",
                             cluster_scratch, "--dest", str(dest)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    incoming = dest / "20260101-000000-abcd" / ".incoming"
    deadline = time.time() + 30
    while not any(p.is_file() and p.stat().st_size > 2_000_000 for p in incoming.rglob("*")):
        assert time.time() < deadline and slow.poll() is None, slow.communicate()
        time.sleep(0.1)
    socket_dir = Path(os.environ["XDG_RUNTIME_DIR"]) / "hpcseg-ssh"
    subprocess.run(["ssh", "-F", str(ssh_cluster.folder / "ssh_config"), "-o", f"ControlPath={socket_dir}/%C",
                    "-O", "exit", "cluster"], capture_output=True)  # the shared connection dies mid-copy
    out, err = slow.communicate(timeout=30)
    assert slow.returncode == 2 and "connection was lost during the copy" in err, (out, err)
    assert not (dest / "20260101-000000-abcd" / "best.pt").exists()  # nothing half-written in place
    partial = sum(p.stat().st_size for p in incoming.rglob("*") if p.is_file())
    assert 2_000_000 < partial < 20_000_000
    resumed = hpcseg("collect", "--host", "cluster", "--scratch", cluster_scratch, "--dest", str(dest))
    assert resumed.returncode == 0, resumed.stderr
    moved = re.search(r"\(([\d.]+) MB moved\)", resumed.stdout)
    assert moved and float(moved.group(1)) * 1e6 < 20_000_000 - partial + 1_000_000, resumed.stdout
    sha = remote_sha256(ssh_cluster, f"{folder}/checkpoints/best.pt")
    assert f"{sha}  best.pt" in (dest / "20260101-000000-abcd" / "SHA256SUMS").read_text()
    again = hpcseg("collect", "--host", "cluster", "--scratch", cluster_scratch, "--dest", str(dest))
    assert "0 files copied (0 B moved), 3 unchanged" in again.stdout, again


def test_collect_without_rsync_copies_through_ssh_verified(ssh_cluster, cluster_scratch, tmp_path):
    profile = write_profile(tmp_path, [ssh_cluster.setup_line], cluster_scratch)
    assert hpcseg("submit", str(JOB_FILE), "--profile", str(profile), "--dry-run").returncode == 0
    folder = make_run(ssh_cluster, cluster_scratch, "20260101-000000-cafe", best_mb=2)
    env = {**os.environ, "HPCSEG_RSYNC": "/nonexistent/rsync"}
    done = hpcseg("collect", "--host", "cluster", "--scratch", cluster_scratch, "--dest", str(tmp_path / "d"), env=env)
    assert done.returncode == 0 and "3 files copied (2.0 MB moved)" in done.stdout, done
    sha = remote_sha256(ssh_cluster, f"{folder}/checkpoints/best.pt")
    assert f"{sha}  best.pt" in (tmp_path / "d" / "20260101-000000-cafe" / "SHA256SUMS").read_text()


def test_a_hostile_run_folder_there_writes_nothing_outside_dest(ssh_cluster, cluster_scratch, tmp_path):
    profile = write_profile(tmp_path, [ssh_cluster.setup_line], cluster_scratch)
    assert hpcseg("submit", str(JOB_FILE), "--profile", str(profile), "--dry-run").returncode == 0
    make_run(ssh_cluster, cluster_scratch, "20260101-000000-dead", link="/etc/passwd")
    dest = tmp_path / "dest"
    done = hpcseg("collect", "--host", "cluster", "--scratch", cluster_scratch, "--dest", str(dest))
    assert done.returncode == 2 and "symbolic link" in done.stderr, done
    assert not list(dest.rglob("best.pt"))


@pytest.mark.parametrize("answer, refusal", [
    ({"run_id": "../x", "path": "/tmp", "files": []}, "the run id \"../x\" is not a plain folder name"),
    ({"run_id": "r1", "path": "/tmp", "files": [{"name": "../../x", "src": "a", "size": 1, "sha256": "0" * 64}]},
     "is not a file collect writes"),
    ({"run_id": "r1", "path": "/tmp", "files": [{"name": "best.pt", "src": "/etc/passwd", "size": 1,
                                                 "sha256": "0" * 64}]}, "is not a path inside the run folder"),
    ({"run_id": "r1", "path": "/tmp", "files": [{"name": "best.pt", "src": "../../etc/passwd", "size": 1,
                                                 "sha256": "0" * 64}]}, "is not a path inside the run folder"),
])
def test_a_hostile_answer_is_refused_here(ssh_cluster, tmp_path, answer, refusal):
    canned = json.dumps({"hpcseg_remote": 1, "exit": 0, "data": {"runs": [answer], "rsync": True}})
    setup = fake_hpcseg(ssh_cluster, f"echo '{{\"hpcseg_remote\": 1, \"hello\": true}}'; echo '{canned}'")
    profile = write_profile(tmp_path, [setup], "~/scratch")
    assert hpcseg("submit", str(JOB_FILE), "--profile", str(profile), "--dry-run").returncode == 0
    dest = tmp_path / "dest"
    _one_line(hpcseg("collect", "--host", "cluster", "--dest", str(dest)), "refused the cluster's answer", refusal)
    assert not dest.exists() or not list(dest.rglob("*"))


@pytest.mark.slow
def test_submit_to_the_dev_slurm_over_ssh_and_collect(ssh_cluster, cluster_data, cluster_scratch,
                                                       cluster_user_on_slurm, tmp_path):
    setup = [ssh_cluster.setup_line]
    profile = write_profile(tmp_path, setup, cluster_scratch, executor="slurm")
    args = [a for s in TINY for a in ("--set", s)]
    # the job file's resources (4 cores, 16 GB, 24:00) beat the profile's defaults, and exceed the dev node
    done = hpcseg("submit", str(JOB_FILE), "--profile", str(profile), "--data", str(ssh_cluster.home / "data"),
                  "--gpus", "0", "--cpus", "1", "--mem", "1", "--time", "00:10",
                  "--queue", cluster_user_on_slurm.partition, *args)
    assert done.returncode == 0, done.stderr
    run_id = re.search(r"submitted run (\S+)\s+job \d+\s+\(slurm\)", done.stdout).group(1)
    try:
        row = wait_state(run_id, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, timeout_s=240)
        assert row["state"] == "COMPLETED", row
        collected = hpcseg("collect", run_id, "--dest", str(tmp_path / "d"))  # bare: the run is remembered
        assert collected.returncode == 0 and "SHA256SUMS verified" in collected.stdout, collected
    finally:
        hpcseg("cancel", "--host", "cluster", run_id)


def test_collect_goes_through_the_profiles_transfer_host(ssh_cluster, cluster_scratch, tmp_path):
    make_run(ssh_cluster, cluster_scratch, "20260101-000000-beef", best_mb=1)
    config = ssh_cluster.folder / "ssh_config"
    for transfer, rsync in (("nosuchtransfer.invalid", "rsync"), ("nosuchtransfer.invalid", "/nonexistent"),
                            ("127.0.0.1", "rsync")):
        profile = write_profile(tmp_path, [ssh_cluster.setup_line], cluster_scratch,
                                extra=f'transfer_host = "hpcseg-cluster@{transfer}"')
        assert hpcseg("submit", str(JOB_FILE), "--profile", str(profile), "--dry-run").returncode == 0
        env = {**os.environ, "HPCSEG_RSYNC": rsync,
               "HPCSEG_SSH": f"ssh -F {config} -o Port={ssh_cluster.port}"}
        done = hpcseg("collect", "--host", "cluster", "--scratch", cluster_scratch, "--dest", str(tmp_path / "d"),
                      env=env)
        if transfer.endswith(".invalid"):  # the copies go to the transfer host, not to the login host
            assert done.returncode == 2 and "nosuchtransfer.invalid: unknown host" in done.stderr, done
        else:
            assert done.returncode == 0 and "3 files copied" in done.stdout, done


def test_submit_sends_the_job_as_content_and_checks_data_there(ssh_cluster, tmp_path):
    private = tmp_path / "mine.toml"  # pytest's tmp folder: the cluster user cannot read it
    private.write_text(JOB_FILE.read_text())
    profile = write_profile(tmp_path, [ssh_cluster.setup_line], f"{ssh_cluster.home}/scratch-dry")
    dry = hpcseg("submit", str(private), "--profile", str(profile), "--set", "train.epochs=7",
                 "--sweep", "optim.lr=1e-3,3e-4", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.count("# would submit run") == 2 and "optim.lr=0.001" in dry.stdout, dry.stdout
    assert f"{ssh_cluster.home}/scratch-dry/exercise-improved/" in dry.stdout
    alone = hpcseg("submit", str(private), "--host", "cluster", "--dry-run")  # the profile remembered for DEST
    assert alone.returncode == 0 and f"{ssh_cluster.home}/scratch-dry/exercise-improved/" in alone.stdout, alone
    refused = hpcseg("submit", str(private), "--profile", str(profile), "--data", "/nonexistent/data")
    _one_line(refused, "--data /nonexistent/data: no such folder")


@pytest.mark.parametrize("rsync", ["rsync", "/nonexistent/rsync"])
def test_collect_shows_its_progress_on_a_terminal(ssh_cluster, cluster_scratch, tmp_path, rsync):
    make_run(ssh_cluster, cluster_scratch, "20260101-000000-f00d", best_mb=3)
    profile = write_profile(tmp_path, [ssh_cluster.setup_line], cluster_scratch)
    assert hpcseg("submit", str(JOB_FILE), "--profile", str(profile), "--dry-run").returncode == 0
    command = " ".join([sys.executable, "-m", "hpcseg", "collect", "--host", "cluster", "--scratch", cluster_scratch,
                        "--dest", str(tmp_path / "d")])
    env = {**os.environ, "HPCSEG_RSYNC": rsync, "HPCSEG_RSYNC_OPTIONS": "--bwlimit=3m"}
    done = subprocess.run(["script", "-qec", command, "/dev/null"], capture_output=True, text=True, env=env,
                          timeout=60)
    assert done.returncode == 0, done.stdout
    if rsync == "rsync":  # rsync's own: bytes, percent, rate, time left, files
        assert re.search(r"\d+%\s+\S+/s\s+\d+:\d\d:\d\d", done.stdout) and "to-chk=" in done.stdout, done.stdout
    else:
        assert re.search(r"\d/3 files\s+[\d.]+ \w?B of 3.0 MB\s+[\d.]+ \w?B/s\s+\d+ s left", done.stdout), done.stdout
    assert "SHA256SUMS verified" in done.stdout


def test_the_laptop_as_another_user_gets_the_files_only_over_ssh(ssh_cluster, cluster_scratch, laptop):
    folder = make_run(ssh_cluster, cluster_scratch, "20260101-000000-1a97", best_mb=1)
    assert laptop.run("cat", f"{folder}/checkpoints/best.pt").returncode != 0  # not readable here directly
    profile = laptop.home / "site.toml"
    profile.write_text(f'name = "site"\nexecutor = "lsf"\nhost = "cluster"\nscratch = "{cluster_scratch}"\n'
                       f'setup = ["{ssh_cluster.setup_line}"]\n')
    subprocess.run(["chown", "hpcseg-laptop", str(profile)], check=True)
    dry = laptop.hpcseg("submit", str(JOB_FILE), "--profile", str(profile), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    dest = f"got-{os.urandom(4).hex()}"  # the laptop user's home outlives a test session
    done = laptop.hpcseg("collect", "--host", "cluster", "--scratch", cluster_scratch, "--dest", dest)
    assert done.returncode == 0 and "3 files copied" in done.stdout, done
    sums = laptop.run("cat", str(laptop.home / dest / "20260101-000000-1a97" / "SHA256SUMS")).stdout
    laptop.run("rm", "-rf", str(laptop.home / dest))
    assert f"{remote_sha256(ssh_cluster, folder + '/checkpoints/best.pt')}  best.pt" in sums
    status = laptop.hpcseg("status", "--host", "cluster", "--scratch", cluster_scratch)
    assert status.returncode == 0 and "20260101-000000-1a97" in status.stdout, status
