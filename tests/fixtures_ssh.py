"""pytest plugin: ``ssh_cluster``, a real OpenSSH server on a loopback port in front of a separate cluster account.

The session starts Debian's /usr/sbin/sshd (never the machine's own sshd) with its own host key, sshd_config,
authorized keys and pid file in a temporary folder, listening on 127.0.0.1 only. The cluster account is the unix
user ``hpcseg-cluster`` (made with useradd when absent; home mode 0700, so this user's files there are reached only
over SSH), with a hpcseg of its own: ``~/venv`` (a venv whose .pth borrows the dependencies of the test's venv, so no
second torch install) and a non-editable ``pip install`` of a copy of this checkout. The laptop side gets an ssh
config of the test's (HPCSEG_SSH="ssh -F ...", known hosts in the test folder, strict host key checking) and a
short private XDG_RUNTIME_DIR for the connection sockets.
"""

from __future__ import annotations

import hashlib
import os
import pwd
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
USER = "hpcseg-cluster"
SSHD = "/usr/sbin/sshd"
ALIAS = "cluster"


@dataclass
class SshCluster:
    """What a test needs: the alias to pass as --host, the environment of the laptop side, the cluster's paths."""

    alias: str
    folder: Path
    port: int
    home: Path
    env: dict = field(default_factory=dict)
    log: Path | None = None

    @property
    def venv(self) -> Path:
        return self.home / "venv"

    @property
    def setup_line(self) -> str:
        return f". {self.venv}/bin/activate"  # POSIX: the local executor runs setup lines with sh

    def ssh(self, command: str, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        """Run a shell command as the cluster user, through the test's sshd (as the laptop would)."""
        argv = ["ssh", "-F", str(self.folder / "ssh_config"), self.alias, command]
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=self.env, **kw)

    def accepted(self) -> int:
        """How many SSH connections the server has accepted so far (from its log)."""
        return self.log.read_text(errors="replace").count("Accepted publickey")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ensure_user() -> Path:
    try:
        entry = pwd.getpwnam(USER)
    except KeyError:
        subprocess.run(["useradd", "-m", "-s", "/bin/bash", USER], check=True)
        entry = pwd.getpwnam(USER)
    subprocess.run(["usermod", "-p", "*", USER], check=True)  # no password, not locked: key login only
    home = Path(entry.pw_dir)
    os.chmod(home, 0o700)
    return home


def as_cluster(argv: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(["runuser", "-u", USER, "--", *argv], capture_output=True, text=True, **kw)


def _source_copy() -> tuple[Path, str]:
    """A copy of the checkout's package files that the cluster user can read, and their hash."""
    copy = Path(tempfile.mkdtemp(prefix="hpcseg-src-"))
    digest = hashlib.sha256()
    for rel in ["pyproject.toml", "README.md", "LICENSE"]:
        if (REPO / rel).exists():
            shutil.copy(REPO / rel, copy / rel)
            digest.update((REPO / rel).read_bytes())
    shutil.copytree(REPO / "src", copy / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for path in sorted((copy / "src").rglob("*.py")):
        digest.update(str(path.relative_to(copy)).encode() + path.read_bytes())
    subprocess.run(["chmod", "-R", "a+rX", str(copy)], check=True)
    os.chmod(copy, 0o755)
    return copy, digest.hexdigest()


def _cluster_python() -> str:
    """A python of the test's version that the cluster user can run (the venv's base, else the system's)."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    for candidate in [os.path.join(sys.base_prefix, "bin", f"python{version}"), f"/usr/bin/python{version}"]:
        if as_cluster([candidate, "-c", "pass"]).returncode == 0:
            return candidate
    pytest.fail(f"no python{version} that {USER} can run (the venv's base is under a private folder?)")


def let_other_users_through(path: Path) -> None:
    """Give the folders above `path` the search bit for others where they lack it (a checkout cloned into a
    private temporary folder, as CI may): the cluster and laptop users read the test venv's packages and this
    checkout's sources through them. Only o+x, never read: nothing in those folders is listed."""
    for folder in reversed(Path(path).resolve().parents):
        mode = folder.stat().st_mode
        if not mode & 0o001:
            os.chmod(folder, (mode & 0o7777) | 0o001)


def install_cluster_hpcseg(home: Path) -> None:
    """~/venv of the cluster user: the test venv's dependencies through a .pth, hpcseg itself installed from a
    copy of this checkout (not editable); redone only when the sources changed."""
    copy, digest = _source_copy()
    deps = sysconfig.get_paths()["purelib"]
    digest = f"{digest} {deps}"  # another test venv (another checkout) needs its own .pth
    let_other_users_through(Path(deps) / "click")  # every session: the checkout may lie in a private folder
    let_other_users_through(REPO / "tests" / "lsf_emulator")  # the cluster side runs the emulator from here
    try:
        venv = home / "venv"
        stamp = venv / "hpcseg-source.sha256"
        if as_cluster(["cat", str(stamp)]).stdout.strip() == digest:
            return
        as_cluster(["rm", "-rf", str(venv)])
        made = as_cluster([_cluster_python(), "-m", "venv", "--without-pip", str(venv)])
        assert made.returncode == 0, made.stderr
        site = as_cluster([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()"
                           "['purelib'])"]).stdout.strip()
        if as_cluster(["test", "-r", f"{deps}/click/__init__.py"]).returncode != 0:
            pytest.fail(f"{deps}: not readable by {USER}; the cluster's venv borrows the test venv's dependencies "
                        "(keep the checkout in a folder other users can enter, e.g. under /work or /tmp)")
        as_cluster(["sh", "-c", f"echo {deps} > {site}/test-deps.pth"])
        build = Path(tempfile.mkdtemp(prefix="hpcseg-build-"))
        shutil.copytree(copy, build / "src-copy")
        subprocess.run(["chown", "-R", USER, str(build)], check=True)
        installed = as_cluster([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps",
                                "--no-build-isolation", "--no-index", str(build / "src-copy")],
                               cwd=str(build), timeout=300)
        shutil.rmtree(build, ignore_errors=True)
        assert installed.returncode == 0, installed.stderr[-2000:]
        where = as_cluster([str(venv / "bin" / "python"), "-c", "import hpcseg; print(hpcseg.__file__)"])
        assert where.stdout.startswith(str(venv)), f"the cluster's hpcseg is not its own: {where.stdout}"
        as_cluster(["sh", "-c", f"echo {digest} > {stamp}"])
    finally:
        shutil.rmtree(copy, ignore_errors=True)


def _sshd_config(folder: Path, port: int) -> Path:
    """The test server's config: loopback only, key login of the cluster user only (StrictModes off: the keys lie
    under /tmp, whose sticky 1777 mode it would refuse; the folder itself is root's, 0711)."""
    (folder / "authorized").mkdir(mode=0o755)
    config = folder / "sshd_config"
    config.write_text(f"""Port {port}
ListenAddress 127.0.0.1
HostKey {folder}/host_key
PidFile {folder}/sshd.pid
AuthorizedKeysFile {folder}/authorized/%u
AllowUsers {USER}
PermitRootLogin no
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
LogLevel VERBOSE
MaxSessions 50
MaxStartups 50:30:100
PrintMotd no
AcceptEnv LANG LC_*
""")
    return config


def start_sshd(folder: Path) -> tuple[subprocess.Popen, int]:
    port = _free_port()
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(folder / "host_key")], check=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(folder / "client_key")], check=True)
    config = _sshd_config(folder, port)
    shutil.copy(folder / "client_key.pub", folder / "authorized" / USER)
    os.chmod(folder / "authorized" / USER, 0o644)
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation folder
    proc = subprocess.Popen([SSHD, "-D", "-f", str(config), "-E", str(folder / "sshd.log")])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc, port
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"sshd did not start: {(folder / 'sshd.log').read_text(errors='replace')[-1000:]}")


def write_client_config(folder: Path, port: int) -> None:
    host_key = (folder / "host_key.pub").read_text().split()
    (folder / "known_hosts").write_text(f"[127.0.0.1]:{port} {host_key[0]} {host_key[1]}\n")
    (folder / "ssh_config").write_text(f"""Host {ALIAS}
  HostName 127.0.0.1
  Port {port}
  User {USER}
Host *
  IdentityFile {folder}/client_key
  IdentitiesOnly yes
  UserKnownHostsFile {folder}/known_hosts
  GlobalKnownHostsFile /dev/null
  StrictHostKeyChecking yes
  BatchMode yes
  ConnectTimeout 5
""")


@pytest.fixture(scope="session")
def ssh_server():
    if os.geteuid() != 0 or not os.path.exists(SSHD) or not shutil.which("runuser"):
        if os.environ.get("CI"):
            pytest.fail("the SSH tests need root, /usr/sbin/sshd and runuser (hpc/run-tests.sh installs sshd)")
        pytest.skip("the SSH tests need root (a second unix user), /usr/sbin/sshd and runuser")
    home = _ensure_user()
    install_cluster_hpcseg(home)
    folder = Path(tempfile.mkdtemp(prefix="hs-", dir="/tmp"))  # short: it also holds the connection sockets
    os.chmod(folder, 0o711)  # sshd reads authorized/<user> as that user; the client key stays 0600
    proc, port = start_sshd(folder)
    write_client_config(folder, port)
    yield folder, port, home
    proc.terminate()
    proc.wait(10)
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def ssh_cluster(ssh_server, tmp_path, monkeypatch) -> SshCluster:
    """The cluster account behind the alias `cluster`, with a fresh scratch (~/scratch-<n>) for this test; the
    laptop side's environment (HPCSEG_SSH, XDG_RUNTIME_DIR, XDG_STATE_HOME) is set in os.environ and in .env."""
    folder, port, home = ssh_server
    runtime = Path(tempfile.mkdtemp(prefix="r", dir=folder))
    os.chmod(runtime, 0o700)
    monkeypatch.setenv("HPCSEG_SSH", f"ssh -F {folder}/ssh_config")
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    monkeypatch.setenv("HPCSEG_SSH_TIMEOUT_S", "60")
    cluster = SshCluster(alias=ALIAS, folder=folder, port=port, home=home, env=dict(os.environ),
                         log=folder / "sshd.log")
    yield cluster
    subprocess.run(["ssh", "-F", str(folder / "ssh_config"), "-o", f"ControlPath={runtime}/hpcseg-ssh/%C",
                    "-O", "exit", ALIAS], capture_output=True, env=cluster.env)  # the test's shared connection


@pytest.fixture(scope="session")
def cluster_data(ssh_server) -> Path:
    """Tiny slices in the cluster account's ~/data (training, validation, test), the cluster user's own files."""
    from fixtures_cluster import write_slices

    home = ssh_server[2]
    data = home / "data"
    if not (home / "data" / "test_data").is_dir():
        for split, n, seed in (("training_data", 4, 0), ("validation_data", 2, 1), ("test_data", 2, 2)):
            write_slices(data / split, n, seed)
        subprocess.run(["chown", "-R", USER, str(data)], check=True)
    return data


@pytest.fixture
def cluster_scratch(ssh_cluster) -> str:
    """A fresh scratch folder of the cluster account for one test (removed again over SSH)."""
    name = f"{ssh_cluster.home}/scratch-{os.urandom(4).hex()}"
    yield name
    as_cluster(["pkill", "-u", USER, "-f", name])  # a job of the test still running there
    shutil.rmtree(name, ignore_errors=True)


@pytest.fixture(scope="session")
def cluster_user_on_slurm(slurm_cluster, ssh_server):
    """The dev Slurm's accounting knows the cluster user (an association in hpc/dev-cluster/start.sh's account),
    so that its jobs are accepted and listed by sacct."""
    from hpcseg.errors import run_command

    shown = run_command(["sacctmgr", "-n", "-P", "show", "assoc", "account=hpcseg", f"user={USER}",
                         "format=user"], 30, check=False)
    if USER not in shown.stdout:
        run_command(["sacctmgr", "-i", "add", "user", USER, "Account=hpcseg", "Cluster=hpcseg-dev"], 30)
    return slurm_cluster


LAPTOP = "hpcseg-laptop"


@dataclass
class Laptop:
    """A second unprivileged user as the laptop side: it cannot read the cluster account's home, so what it
    gets from there came over SSH."""

    home: Path
    env: dict

    def hpcseg(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(["runuser", "-u", LAPTOP, "--", "env", *[f"{k}={v}" for k, v in self.env.items()],
                               str(self.home / "venv" / "bin" / "python"), "-m", "hpcseg", *args],
                              capture_output=True, text=True, timeout=timeout, cwd=str(self.home))

    def run(self, *argv: str) -> subprocess.CompletedProcess:
        return subprocess.run(["runuser", "-u", LAPTOP, "--", *argv], capture_output=True, text=True)


@pytest.fixture(scope="session")
def laptop(ssh_server) -> Laptop:
    """The user `hpcseg-laptop` (made when absent, home 0700) with a venv that borrows this checkout and its
    dependencies through a .pth, its own copy of the test's client key, ssh config and known hosts."""
    folder, port, _ = ssh_server
    try:
        entry = pwd.getpwnam(LAPTOP)
    except KeyError:
        subprocess.run(["useradd", "-m", "-s", "/bin/bash", LAPTOP], check=True)
        entry = pwd.getpwnam(LAPTOP)
    home = Path(entry.pw_dir)
    os.chmod(home, 0o700)
    run = lambda *argv: subprocess.run(["runuser", "-u", LAPTOP, "--", *argv], capture_output=True,  # noqa: E731
                                       text=True)
    if not (home / "venv" / "bin" / "python").exists():
        python = f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}"
        assert run(python, "-m", "venv", "--without-pip", str(home / "venv")).returncode == 0
    site = run(str(home / "venv" / "bin" / "python"), "-c",
               "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip()
    let_other_users_through(REPO / "src" / "hpcseg")
    let_other_users_through(Path(sysconfig.get_paths()["purelib"]) / "click")
    run("sh", "-c", f"printf '%s\\n' {REPO / 'src'} {sysconfig.get_paths()['purelib']} > {site}/test-deps.pth")
    keys = home / "ssh-test"
    shutil.rmtree(keys, ignore_errors=True)
    keys.mkdir(mode=0o700)
    shutil.copy(folder / "client_key", keys / "client_key")
    shutil.copy(folder / "known_hosts", keys / "known_hosts")
    (keys / "ssh_config").write_text((folder / "ssh_config").read_text().replace(str(folder), str(keys)))
    runtime = Path(tempfile.mkdtemp(prefix="l", dir="/tmp"))
    for path in (keys, runtime):
        subprocess.run(["chown", "-R", LAPTOP, str(path)], check=True)
    os.chmod(keys / "client_key", 0o600)
    env = {"HPCSEG_SSH": f"ssh -F {keys}/ssh_config", "XDG_RUNTIME_DIR": str(runtime),
           "XDG_STATE_HOME": str(home / "state"), "HOME": str(home), "PATH": "/usr/bin:/bin"}
    yield Laptop(home=home, env=env)
    subprocess.run(["runuser", "-u", LAPTOP, "--", "ssh", "-F", f"{keys}/ssh_config", "-o",
                    f"ControlPath={runtime}/hpcseg-ssh/%C", "-O", "exit", ALIAS], capture_output=True)
    shutil.rmtree(runtime, ignore_errors=True)
