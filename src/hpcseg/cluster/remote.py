"""The other end of SSH: run an hpcseg command on a cluster through the user's own OpenSSH client.

One call is one `ssh DEST bash -lc '<the profile's setup lines>; exec hpcseg _remote'` over a shared connection
(ControlMaster/ControlPersist, its socket in a private folder of this user): the request goes as one JSON line on
stdin, the cluster side answers JSON lines (a hello naming its protocol and version, then the command's output,
then its exit code and data). Everything received is data: checked, printed or returned, never run or unpickled.
Every word that reaches the remote shell is quoted here, in `remote_line`, once.
"""

from __future__ import annotations

import functools
import json
import os
import queue
import re
import shlex
import stat
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .. import __version__
from ..errors import ClusterError
from .scripts import CONTROL

#: The version of the request/answer format; both sides refuse another.
PROTOCOL = 1
#: The key every envelope line carries (its value: the protocol version).
MARK = "hpcseg_remote"
#: The most one answer line may hold (a status of thousands of runs is a few MB).
MAX_LINE = 64 << 20
#: What a remote text may keep when it is printed here: no escape sequences from the other end.
_UNPRINTABLE = re.compile(r"[\x00-\x08\x0b-\x0c\x0e-\x1f\x7f-\x9f]")
_DEST = re.compile(r"(?:ssh://)?(?:(?P<user>[^@/:\s]+)@)?(?P<host>[A-Za-z0-9_.%-]+|\[[0-9A-Fa-f:.]+\])"
                   r"(?::(?P<port>\d{1,5}))?/?")


class RemoteError(ClusterError):
    """The cluster could not be reached, or did not answer as hpcseg (one line, exit 2)."""


def ssh_timeout_s() -> float:
    """How long a remote command may stay silent ($HPCSEG_SSH_TIMEOUT_S, default 60 s)."""
    try:
        value = float(os.environ.get("HPCSEG_SSH_TIMEOUT_S", "60"))
    except ValueError:
        return 60.0
    return value if value > 0 else 60.0


def sanitize(text: str) -> str:
    """Remote text as it may be printed here: newlines, tabs and carriage returns kept, other controls dropped."""
    return _UNPRINTABLE.sub("", text)


@dataclass(frozen=True)
class Host:
    """Where commands run: DEST as OpenSSH takes it, the setup lines run first, the host copies go through."""

    dest: str
    setup: tuple[str, ...] = ()
    transfer: str | None = None

    def __post_init__(self) -> None:
        check_dest("--host", self.dest)
        if self.transfer is not None:
            check_dest("transfer_host", self.transfer)

    @property
    def copy_dest(self) -> str:
        return self.transfer or self.dest


def check_dest(what: str, dest: str) -> tuple[str, str | None]:
    """(ssh target, port) of an alias, `user@host` or `ssh://user@host:port`; refuses what ssh would read as an
    option or what a shell would split."""
    found = CONTROL.search(dest)
    if not dest or dest.startswith("-") or found or any(c.isspace() for c in dest):
        raise RemoteError(f"{what} {dest!r}: not an ssh destination (an alias from ~/.ssh/config, user@host or "
                          "ssh://user@host:port)")
    match = _DEST.fullmatch(dest)
    if not match:
        raise RemoteError(f"{what} {dest!r}: not an ssh destination (an alias from ~/.ssh/config, user@host or "
                          "ssh://user@host:port)")
    target = f"{match['user']}@{match['host']}" if match["user"] else match["host"]
    return target, match["port"]


# ---------------------------------------------------------------- the ssh command


def control_dir() -> Path:
    """The private folder (0700, this user's) of the ControlMaster sockets: short, since a unix socket path may
    hold about 104 bytes; $XDG_RUNTIME_DIR where set, else ~/.cache/hpcseg/ssh."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    folder = Path(runtime) / "hpcseg-ssh" if runtime else Path.home() / ".cache" / "hpcseg" / "ssh"
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    st = os.lstat(folder)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
        raise RemoteError(f"{folder}: not a folder of this user; hpcseg keeps its ssh connection sockets there")
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(folder, 0o700)
    if len(str(folder)) > 60:  # %C is 40 characters
        raise RemoteError(f"{folder}: too long for ssh's connection socket (unix sockets: about 104 bytes); set "
                          "XDG_RUNTIME_DIR to a short folder")
    return folder


def ssh_prefix(dest: str) -> list[str]:
    """`ssh` (or $HPCSEG_SSH, e.g. `ssh -F my_config`) with the shared connection's options, up to the target."""
    target, port = check_dest("--host", dest)
    base = shlex.split(os.environ.get("HPCSEG_SSH", "ssh"))
    port_opts = ["-p", port] if port else []
    opts = ["-o", "ServerAliveInterval=15", "-o", "ServerAliveCountMax=4"]
    if not _own_master(tuple(base + port_opts), target):  # else the user's ControlMaster, shared with their ssh
        persist = os.environ.get("HPCSEG_SSH_PERSIST", "600")
        opts += ["-o", "ControlMaster=auto", "-o", f"ControlPath={control_dir()}/%C", "-o",
                 f"ControlPersist={persist}"]
    return base + opts + port_opts


@functools.lru_cache(maxsize=16)
def _own_master(base: tuple[str, ...], target: str) -> bool:
    """Whether the user's ssh config shares connections to `target` already (ControlMaster and ControlPath)."""
    try:
        shown = subprocess.run([*base, "-G", target], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    config = dict(line.split(" ", 1) for line in shown.stdout.splitlines() if " " in line)
    return config.get("controlmaster", "false") in ("true", "auto", "ask", "autoask") \
        and config.get("controlpath", "none") not in ("none", "")


def connect(dest: str) -> None:
    """Open the shared connection unless it is open: without a timeout and with this terminal, so that a password
    or a second factor can be typed (once); the calls then run over it, bounded by $HPCSEG_SSH_TIMEOUT_S."""
    target, _ = check_dest("--host", dest)
    prefix = ssh_prefix(dest)
    try:
        if subprocess.run(prefix + ["-O", "check", target], capture_output=True).returncode == 0:
            return
        opened = subprocess.run(prefix + [target, "true"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    except OSError as err:
        raise RemoteError(f"{prefix[0]}: {err.strerror or err} (hpcseg uses your OpenSSH client)") from None
    if opened.returncode != 0:
        stderr = opened.stderr.decode(errors="replace")
        last = next((sanitize(x.strip())[:200] for x in reversed(stderr.splitlines()) if x.strip()), "no message")
        raise ssh_failure(dest, stderr) or RemoteError(f"{dest}: ssh failed: {last}")


def ssh_argv(dest: str, words: list[str]) -> list[str]:
    """The ssh command that runs `words` (each one argument there) on `dest`."""
    target, _ = check_dest("--host", dest)
    return ssh_prefix(dest) + [target, remote_line(words)]


def remote_line(words: list[str]) -> str:
    """The one line ssh hands the remote shell: every word quoted once, here; a control character is refused
    (the remote shell would split the line there)."""
    for word in words:
        # a Script's lines are each checked; the newlines between them are its own
        found = CONTROL.search(word.replace("\n", " ") if isinstance(word, Script) else word)
        if found:
            raise RemoteError(f"{word!r}: holds the control character {found.group()!r}; a value sent to the "
                              "cluster must be one line of printable text")
    return " ".join(shlex.quote(word) for word in words)


class Script(str):
    """A word of several lines for `bash -c`, built here: its lines are checked one by one."""


def hpcseg_script(setup: tuple[str, ...]) -> Script:
    """The bash script of a remote call: the profile's setup lines (as a job runs them), then hpcseg."""
    return Script("\n".join([*setup, "exec hpcseg _remote"]))


# ---------------------------------------------------------------- one call


@dataclass
class Answer:
    exit: int
    data: object = None


def call(host: Host, command: str, args: list[str], *, files: dict[str, str] | None = None,
         on_out: Callable[[str], None] | None = None, on_err: Callable[[str], None] | None = None,
         heartbeat: bool = False) -> Answer:
    """Run `hpcseg <command> <args>` on `host`; its output goes to on_out/on_err (default: this process's stdout
    and stderr, as it comes). Raises RemoteError, one line, when the cluster cannot be reached or answers
    otherwise than hpcseg's protocol."""
    for arg in args:
        if CONTROL.search(arg):
            raise RemoteError(f"{arg!r}: holds the control character {CONTROL.search(arg).group()!r}; a value sent "
                              "to the cluster must be one line of printable text")
    on_out = on_out or _write(sys.stdout)
    on_err = on_err or _write(sys.stderr)
    timeout = ssh_timeout_s()
    request = {MARK: PROTOCOL, "hpcseg": __version__, "command": command, "args": args, "files": files or {},
               "heartbeat_s": timeout / 3 if heartbeat else None}
    argv = ssh_argv(host.dest, ["bash", "-lc", hpcseg_script(host.setup)])
    connect(host.dest)
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    except OSError as err:
        raise RemoteError(f"{argv[0]}: {err.strerror or err} (hpcseg uses your OpenSSH client)") from None
    lines: queue.Queue = queue.Queue()
    errors: list[bytes] = []
    threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True).start()
    stderr_done = threading.Thread(target=lambda: errors.extend(proc.stderr), daemon=True)
    stderr_done.start()
    try:
        proc.stdin.write((json.dumps(request) + "\n").encode())
        proc.stdin.flush()
    except OSError:
        pass  # ssh ended already: its stderr says why
    try:
        return _read_answer(host, command, proc, lines, errors, stderr_done, timeout, on_out, on_err)
    finally:
        if proc.poll() is None:  # Ctrl-C, a timeout, an error: the remote side ends with its stdin
            proc.kill()
        proc.wait()


def _write(stream) -> Callable[[str], None]:
    def write(text: str) -> None:
        stream.write(sanitize(text))
        stream.flush()
    return write


def _pump(stream, lines: queue.Queue) -> None:
    for line in iter(lambda: stream.readline(MAX_LINE), b""):
        lines.put(line)
    lines.put(None)


def _read_answer(host, command, proc, lines, errors, stderr_done, timeout, on_out, on_err) -> Answer:
    hello, garbage = None, []
    while True:
        try:
            line = lines.get(timeout=timeout)
        except queue.Empty:
            raise RemoteError(f"{host.dest}: `hpcseg {command}` there was silent for {timeout:g} s "
                              "($HPCSEG_SSH_TIMEOUT_S); stopped it, nothing was changed here") from None
        if line is None:
            break
        event = _event(line)
        if hello is None:
            if event is None or "hello" not in event:
                garbage.append(line.decode(errors="replace").strip())
                continue
            hello = event
            _check_hello(host, hello)
            continue
        if event is None:
            raise RemoteError(f"{host.dest}: the cluster side printed something that is not hpcseg's answer "
                              f"({_shorten(line)}); nothing was changed here")
        if isinstance(event.get("out"), str):
            on_out(event["out"])
        elif isinstance(event.get("err"), str):
            on_err(event["err"])
        elif "exit" in event:
            code = event["exit"]
            if not isinstance(code, int) or isinstance(code, bool):
                raise RemoteError(f"{host.dest}: the cluster side answered a malformed exit code {code!r}")
            return Answer(exit=code, data=event.get("data"))
    proc.wait()
    stderr_done.join(2)
    raise _failure(host, command, proc.returncode, b"".join(errors).decode(errors="replace"), hello, garbage)


def _event(line: bytes) -> dict | None:
    try:
        event = json.loads(line)
    except (ValueError, RecursionError):
        return None
    return event if isinstance(event, dict) and MARK in event else None


def _shorten(line) -> str:
    text = line.decode(errors="replace") if isinstance(line, bytes) else line
    return repr(sanitize(text.strip())[:80])


def _check_hello(host: Host, hello: dict) -> None:
    theirs, version = hello.get(MARK), sanitize(str(hello.get("hpcseg", "?")))[:40]
    if theirs == PROTOCOL:
        return
    if isinstance(theirs, int) and not isinstance(theirs, bool) and theirs < PROTOCOL:
        raise RemoteError(f"{host.dest}: hpcseg {version} there is too old for this hpcseg's protocol {PROTOCOL}: "
                          "pip install -U hpcseg there (after the profile's setup lines)")
    raise RemoteError(f"{host.dest}: hpcseg {version} there speaks protocol {theirs!r}, this hpcseg "
                      f"{__version__} speaks {PROTOCOL}: pip install -U hpcseg here")


#: ssh's own messages (exit 255) and what they mean for the user
_SSH_FAILURES = [
    ("REMOTE HOST IDENTIFICATION HAS CHANGED", "its host key CHANGED since it was last seen (ssh refused it; hpcseg "
     "never bypasses this): ask your site whether the key was replaced, then fix ~/.ssh/known_hosts"),
    ("Host key verification failed", "ssh could not verify its host key (unknown or changed; hpcseg never bypasses "
     "this): connect once with plain `ssh` to check and accept it"),
    ("Could not resolve hostname", "unknown host (not an alias in ~/.ssh/config, and no such name)"),
    ("Name or service not known", "unknown host (not an alias in ~/.ssh/config, and no such name)"),
    ("Connection refused", "connection refused (no ssh server on that port)"),
    ("Permission denied", "authentication failed (ssh refused your keys or password)"),
    ("Too many authentication failures", "authentication failed (ssh refused your keys or password)"),
    ("Connection timed out", "connection timed out"),
    ("No route to host", "no route to host"),
]


def ssh_failure(dest: str, stderr: str) -> RemoteError | None:
    """ssh's own refusal in `stderr` (unknown host, refused, authentication, host key) as one line, or None."""
    for needle, meaning in _SSH_FAILURES:
        if needle in stderr:
            return RemoteError(f"{dest}: {meaning}")
    return None


def _failure(host: Host, command: str, code: int | None, stderr: str, hello, garbage: list[str]) -> RemoteError:
    """The one line that says why a call ended without hpcseg's answer."""
    last = next((sanitize(x.strip())[:200] for x in reversed(stderr.splitlines()) if x.strip()), "")
    if hello is not None:
        there = f"; it may have gone through there: hpcseg status --host {host.dest}" if command in ("submit",
                                                                                                       "cancel") else ""
        return RemoteError(f"{host.dest}: the connection was lost during `hpcseg {command}` there "
                           f"({last or 'no message'}); nothing was changed here{there}")
    if code == 255:
        return ssh_failure(host.dest, stderr) or RemoteError(f"{host.dest}: ssh failed: {last or 'no message'}")
    if code == 127 or "hpcseg: command not found" in stderr or "hpcseg: not found" in stderr:
        return RemoteError(f"{host.dest}: no hpcseg there after the profile's setup lines: install it there once "
                           "(pip install hpcseg in the environment the setup lines activate)")
    if "No such command '_remote'" in stderr or "_remote" in stderr and "Usage" in stderr:
        return RemoteError(f"{host.dest}: hpcseg there is too old for this hpcseg's protocol {PROTOCOL}: "
                           "pip install -U hpcseg there (after the profile's setup lines)")
    seen = _shorten(garbage[0]) if garbage else "nothing"
    return RemoteError(f"{host.dest}: the cluster side did not answer as hpcseg (it printed {seen}, exit {code}"
                       f"{': ' + last if last else ''}); nothing was changed here")
