"""`--host` against a real OpenSSH server and a separate cluster account (fixtures_ssh): what the commands print
and refuse, the protocol's checks, hostile values, every error one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from hpcseg.cluster.remote import Host, RemoteError, check_dest, remote_line


def hpcseg(*args: str, env: dict | None = None, timeout: float = 120, cwd=None) -> subprocess.CompletedProcess:
    """The laptop's `hpcseg` as a process of its own."""
    return subprocess.run([sys.executable, "-m", "hpcseg", *args], capture_output=True, text=True, timeout=timeout,
                          env=env or dict(os.environ), cwd=cwd)


def shared_folder(cluster, prefix: str) -> Path:
    """A folder both users can read (pytest's own tmp folders are private to this user), in the session's folder
    (removed with it)."""
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir=cluster.folder))
    os.chmod(folder, 0o755)
    return folder


def write_profile(folder: Path, setup: list[str], scratch: str, executor: str = "lsf", host: str = "cluster",
                  extra: str = "") -> Path:
    path = folder / "site.toml"
    path.write_text(f'name = "site"\nexecutor = "{executor}"\nhost = "{host}"\nscratch = "{scratch}"\n'
                    f"setup = {json.dumps(setup)}\n{extra}\n[defaults]\ncpus = 1\nmem_gb = 1\ntime = \"00:10\"\n")
    return path


def remember_setup(cluster, tmp_path: Path, setup: list[str], scratch: str = "~/scratch") -> None:
    """`submit --host --dry-run` with a profile: the host and its setup lines are remembered for later calls."""
    from fixtures_cluster import JOB_FILE

    # a scheduler's dry run: the job's data folders need not exist there (a local one refuses them)
    profile = write_profile(tmp_path, setup, scratch, executor="lsf")
    done = hpcseg("submit", str(JOB_FILE), "--profile", str(profile), "--dry-run")
    assert done.returncode == 0, done.stderr


def submit_with(tmp_path: Path, setup: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    """`submit --dry-run` through a profile whose host is the cluster and whose setup lines are `setup`."""
    from fixtures_cluster import JOB_FILE

    profile = write_profile(tmp_path, setup, "~/scratch", executor="lsf")
    return hpcseg("submit", str(JOB_FILE), "--profile", str(profile), "--dry-run", env=env, timeout=30)


def fake_hpcseg(cluster, script: str) -> str:
    """A setup line that puts a fake `hpcseg` (this shell script) first on the cluster's PATH."""
    folder = shared_folder(cluster, "fake-")
    (folder / "hpcseg").write_text("#!/bin/sh\n" + script)
    os.chmod(folder / "hpcseg", 0o755)
    return f"export PATH={folder}:$PATH"


# ---------------------------------------------------------------- quoting, without a server


def test_remote_line_quotes_each_word_once_and_refuses_control_characters():
    hostile = "a b'\"$(touch x)`id`;*"
    assert remote_line(["ls", hostile]) == "ls " + "'a b'\"'\"'\"$(touch x)`id`;*'"
    with pytest.raises(RemoteError, match="control character"):
        remote_line(["echo", "a\nb"])


@pytest.mark.parametrize("dest", ["-oProxyCommand=x", "a b", "host\n", "", "user@", "ssh://h:99999x"])
def test_a_destination_that_ssh_would_read_as_an_option_or_a_shell_would_split_is_refused(dest):
    with pytest.raises(RemoteError, match="not an ssh destination"):
        check_dest("--host", dest)
    with pytest.raises(RemoteError):
        Host(dest)


def test_destinations_openssh_accepts_pass():
    assert check_dest("--host", "dtu") == ("dtu", None)
    assert check_dest("--host", "s123@login1.hpc.dtu.dk") == ("s123@login1.hpc.dtu.dk", None)
    assert check_dest("--host", "ssh://s123@login1.hpc.dtu.dk:2222") == ("s123@login1.hpc.dtu.dk", "2222")


# ---------------------------------------------------------------- against the server


def test_status_over_ssh_prints_what_status_prints_there(ssh_cluster, tmp_path):
    remember_setup(ssh_cluster, tmp_path, [ssh_cluster.setup_line])
    here = hpcseg("status", "--host", "cluster", "--scratch", "/nonexistent/scratch")
    assert here.returncode == 0, here.stderr
    there = ssh_cluster.ssh(f"{ssh_cluster.setup_line}; hpcseg status --scratch /nonexistent/scratch")
    assert here.stdout == there.stdout == "no runs under /nonexistent/scratch\n"
    as_json = hpcseg("status", "--host", "cluster", "--json", "--scratch", "/nonexistent/scratch")
    assert json.loads(as_json.stdout) == []


def test_hostile_values_arrive_as_one_argument_on_the_server(ssh_cluster, tmp_path):
    remember_setup(ssh_cluster, tmp_path, [ssh_cluster.setup_line])
    marker = tmp_path / "pwned"
    hostile = f"/tmp/a b/'q\"$(touch {marker})`touch {marker}`;touch {marker};*?[x]"
    done = hpcseg("status", "--host", "cluster", "--scratch", hostile)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"no runs under {hostile}\n"
    assert not marker.exists()
    refused = hpcseg("status", "--host", "cluster", "--scratch", "/tmp/a\x1bb")
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1 and "control character" in refused.stderr


def test_a_user_error_there_is_the_same_line_and_exit_code_here(ssh_cluster, tmp_path):
    remember_setup(ssh_cluster, tmp_path, [ssh_cluster.setup_line])
    done = hpcseg("logs", "--host", "cluster", "nosuchrun", "--scratch", "/nonexistent")
    assert done.returncode == 2
    assert done.stderr == "hpcseg: error: nosuchrun: no run or experiment of that name under /nonexistent\n"


def test_the_second_call_reuses_the_shared_connection(ssh_cluster, tmp_path):
    remember_setup(ssh_cluster, tmp_path, [ssh_cluster.setup_line])
    hpcseg("status", "--host", "cluster", "--scratch", "/nonexistent")
    before = ssh_cluster.accepted()
    assert hpcseg("status", "--host", "cluster", "--scratch", "/nonexistent").returncode == 0
    assert ssh_cluster.accepted() == before
    sockets = list((Path(os.environ["XDG_RUNTIME_DIR"]) / "hpcseg-ssh").iterdir())
    assert len(sockets) == 1 and (sockets[0].parent.stat().st_mode & 0o777) == 0o700


# ---------------------------------------------------------------- errors: one line each, exit 2


def _one_line(done: subprocess.CompletedProcess, *needles: str) -> None:
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("hpcseg: error: "), done.stderr
    for needle in needles:
        assert needle in done.stderr, done.stderr


def test_unknown_host(ssh_cluster):
    _one_line(hpcseg("status", "--host", "nosuchhost.invalid"), "nosuchhost.invalid: unknown host")


def test_connection_refused(ssh_cluster):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    _one_line(hpcseg("status", "--host", f"ssh://hpcseg-cluster@127.0.0.1:{port}"), "connection refused")


def test_authentication_failed(ssh_cluster):
    _one_line(hpcseg("status", "--host", f"ssh://nobody@127.0.0.1:{ssh_cluster.port}"), "authentication failed")


def test_host_key_changed_is_said_and_not_bypassed(ssh_cluster, tmp_path):
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "other")], check=True)
    key = (tmp_path / "other.pub").read_text().split()
    known = tmp_path / "known_hosts"
    known.write_text(f"[127.0.0.1]:{ssh_cluster.port} {key[0]} {key[1]}\n")
    config = (ssh_cluster.folder / "ssh_config").read_text().replace(str(ssh_cluster.folder / "known_hosts"),
                                                                       str(known))
    (tmp_path / "ssh_config").write_text(config)
    env = {**os.environ, "HPCSEG_SSH": f"ssh -F {tmp_path / 'ssh_config'}"}
    _one_line(hpcseg("status", "--host", "cluster", env=env), "host key CHANGED", "never bypasses")


def test_no_hpcseg_there(ssh_cluster, tmp_path):
    _one_line(submit_with(tmp_path, ["export PATH=/usr/bin:/bin"]), "no hpcseg there", "install it there")


_HELLO = '{"hpcseg_remote": 1, "hello": true}'


@pytest.mark.parametrize("script, needles", [
    ("echo \"Error: No such command '_remote'.\" >&2; exit 2", ["too old", "pip install -U hpcseg there"]),
    ('echo \'{"hpcseg_remote": 0, "hello": true, "hpcseg": "0.0.9"}\'; cat >/dev/null',
     ["hpcseg 0.0.9 there is too old", "pip install -U hpcseg there"]),
    ('echo \'{"hpcseg_remote": 7, "hello": true, "hpcseg": "9.0"}\'; cat >/dev/null',
     ["hpcseg 9.0 there speaks protocol 7", "pip install -U hpcseg here"]),
    ("echo 'rm -rf / # <script>'; echo '[1, 2]'", ["did not answer as hpcseg", "rm -rf /"]),  # garbage
    (f"echo '{_HELLO}'; echo 'garbage after the hello'; cat >/dev/null",
     ["not hpcseg's answer", "garbage after the hello"]),
])
def test_a_cluster_side_that_is_too_old_too_new_or_prints_garbage(ssh_cluster, tmp_path, script, needles):
    _one_line(submit_with(tmp_path, [fake_hpcseg(ssh_cluster, script)]), *needles)
    assert not (Path(os.environ["XDG_STATE_HOME"]) / "hpcseg" / "remote_runs.json").exists()  # nothing remembered


def test_a_silent_remote_command_times_out(ssh_cluster, tmp_path):
    env = {**os.environ, "HPCSEG_SSH_TIMEOUT_S": "2"}
    _one_line(submit_with(tmp_path, ["sleep 30"], env=env), "silent for 2 s", "HPCSEG_SSH_TIMEOUT_S")


def test_a_connection_lost_mid_command(ssh_cluster, tmp_path):
    # the hello, then the session's sshd process dies: the laptop sees the connection end mid-answer
    fake = fake_hpcseg(ssh_cluster, f"echo '{_HELLO}'; sleep 1; kill -9 $PPID; sleep 5")
    _one_line(submit_with(tmp_path, [fake]), "connection was lost during `hpcseg submit`", "status --host cluster")


def test_a_bare_status_shows_the_local_runs_and_one_warning_for_an_unreachable_host(ssh_cluster, tmp_path):
    from hpcseg.cluster.remote_runs import RemoteRun, remember

    run = Path("hpcseg-scratch") / "exp" / "20260101-000000-0001"  # a run of this machine, in ./hpcseg-scratch
    run.mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"run_id": run.name, "experiment": "exp", "executor": "local"}))
    remember(Host("nosuchhost.invalid"), None, [RemoteRun("nosuchhost.invalid", "20260101-000000-0002", "exp",
                                                          "/scratch")])
    done = hpcseg("status", cwd=os.getcwd())
    assert done.returncode == 0 and "20260101-000000-0001" in done.stdout, done
    assert "20260101-000000-0002" not in done.stdout
    assert done.stderr == ("hpcseg: warning: nosuchhost.invalid: unknown host (not an alias in ~/.ssh/config, and no "
                           "such name); its 1 remembered runs are not shown\n")


def test_the_users_own_control_master_is_used_where_their_config_has_one(ssh_cluster, tmp_path):
    sockets = Path(tempfile.mkdtemp(prefix="u", dir=ssh_cluster.folder))
    config = tmp_path / "ssh_config"
    config.write_text(f"Host cluster\n  ControlMaster auto\n  ControlPath {sockets}/%C\n  ControlPersist 60\n"
                      + (ssh_cluster.folder / "ssh_config").read_text())
    env = {**os.environ, "HPCSEG_SSH": f"ssh -F {config}"}
    remember_setup(ssh_cluster, tmp_path, [ssh_cluster.setup_line])
    done = hpcseg("status", "--host", "cluster", "--scratch", "/nonexistent", env=env)
    assert done.returncode == 0, done.stderr
    assert len(list(sockets.iterdir())) == 1  # the user's socket, shared with their own ssh
    subprocess.run(["ssh", "-F", str(config), "-O", "exit", "cluster"], capture_output=True)


def test_profile_keys_host_and_transfer_host(tmp_path):
    from hpcseg.cluster.profiles import load_profile
    from hpcseg.errors import ClusterError

    good = tmp_path / "good.toml"
    good.write_text('host = "dtu"\ntransfer_host = "s123@transfer.gbar.dtu.dk"\n')
    profile = load_profile(str(good))
    assert (profile.host, profile.transfer_host) == ("dtu", "s123@transfer.gbar.dtu.dk")
    for key, value in (("host", "-oProxyCommand=touch x"), ("transfer_host", "a b"), ("host", 3)):
        bad = tmp_path / "bad.toml"
        bad.write_text(f"{key} = {json.dumps(value)}\n")
        with pytest.raises(ClusterError, match=rf"^{bad}: {key}"):
            load_profile(str(bad))
