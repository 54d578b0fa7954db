"""The cluster's end of a remote call: `hpcseg _remote` (hidden) reads one JSON request on stdin, runs the
command as `hpcseg <command> <args>` would here, and prints only JSON lines (see remote.py).

The answer channel is a private copy of stdout; file descriptor 1 then points at stderr, so that whatever a
scheduler command or a library prints cannot be mistaken for the answer. When the caller goes away (Ctrl-C on
the laptop, a dropped connection) stdin ends, and so does this process, with any `logs --follow` it runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import threading
from pathlib import Path

import click

from .. import __version__
from .remote import MARK, PROTOCOL
from .scripts import CONTROL

#: the commands a remote call may run (and collect's file list); nothing else is reachable from the other end
COMMANDS = {"submit", "status", "logs", "cancel", "collect-files"}
_MAX_REQUEST = 4 << 20


class _Channel:
    """The answer channel: one JSON object a line, from any thread."""

    def __init__(self, fd: int) -> None:
        self._out = os.fdopen(fd, "w", encoding="utf-8", errors="replace")
        self._lock = threading.Lock()

    def send(self, **event) -> None:
        with self._lock:
            self._out.write(json.dumps({MARK: PROTOCOL, **event}) + "\n")
            self._out.flush()


class _Stream:
    """sys.stdout/sys.stderr of the command: what it writes travels as {"out": ...} or {"err": ...}."""

    encoding = "utf-8"
    errors = "replace"

    def __init__(self, channel: _Channel, key: str) -> None:
        self._channel, self._key = channel, key

    def write(self, text: str) -> int:
        if not isinstance(text, str):  # click probes with b"" whether a stream is binary: this one is text
            raise TypeError("a text stream")
        if text:
            self._channel.send(**{self._key: text})
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


@click.command("_remote", hidden=True)
def remote_call() -> None:
    """Serve one request of a remote hpcseg (internal)."""
    from .over_ssh import ON_CLUSTER

    os.environ[ON_CLUSTER] = "1"
    channel = _Channel(os.dup(1))
    os.dup2(2, 1)
    channel.send(hello=True, hpcseg=__version__)
    request = _read_request(channel)
    if request is None:
        sys.exit(2)
    threading.Thread(target=_exit_with_stdin, daemon=True).start()
    beat = request.get("heartbeat_s")
    if isinstance(beat, (int, float)) and not isinstance(beat, bool) and beat > 0:
        threading.Thread(target=_heartbeat, args=(channel, max(float(beat), 0.2)), daemon=True).start()
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _Stream(channel, "out"), _Stream(channel, "err")
    try:
        code, data = _run(request)
    finally:
        sys.stdout, sys.stderr = saved
    channel.send(exit=code, data=data)
    sys.stdout.flush()
    os._exit(0)  # the stdin thread may still be reading


def _read_request(channel: _Channel) -> dict | None:
    def refuse(why: str) -> None:
        channel.send(err=f"hpcseg: error: {why}\n")
        channel.send(exit=2, data=None)

    line = sys.stdin.buffer.readline(_MAX_REQUEST)
    try:
        request = json.loads(line)
    except (ValueError, RecursionError):
        return refuse("_remote: the request is not JSON")
    if not isinstance(request, dict) or request.get(MARK) != PROTOCOL:
        theirs = request.get(MARK) if isinstance(request, dict) else None
        return refuse(f"hpcseg {__version__} here speaks protocol {PROTOCOL}, the caller {theirs!r}: install the "
                      "same hpcseg on both sides")
    command, args, files = request.get("command"), request.get("args"), request.get("files")
    if command not in COMMANDS or not isinstance(args, list) or not all(isinstance(a, str) for a in args) \
            or not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
        return refuse(f"_remote: a malformed request (command {str(command)[:40]!r})")
    if any(CONTROL.search(a) for a in args):
        return refuse("_remote: an argument holds a control character")
    return request


def _exit_with_stdin() -> None:
    """The caller keeps stdin open while it waits: its end (Ctrl-C there, a lost connection) ends this call."""
    try:
        while sys.stdin.buffer.read(4096):
            pass
    except OSError:
        pass
    os._exit(130)


def _heartbeat(channel: _Channel, every_s: float) -> None:
    """For a command that may rightly stay silent (logs --follow): says it is alive within the caller's timeout."""
    import time

    while True:
        time.sleep(every_s)
        channel.send(alive=True)


def _run(request: dict) -> tuple[int, object]:
    """Run the request as the command line would; returns (exit code, data for the caller)."""
    command, args, files = request["command"], list(request["args"]), request["files"]
    with tempfile.TemporaryDirectory(prefix="hpcseg-remote-") as tmp:
        if command == "submit":  # the job file (and profile) came as content: they need not exist here
            job = Path(tmp) / _plain(files.get("job_name", "job"), "job") / "job.toml"
            job.parent.mkdir()
            job.write_text(files.get("job", ""))
            args = [*args, str(job)] if "--" in args else [*args, "--", str(job)]  # after the options' `--`
            if "profile" in files:
                profile = Path(tmp) / f"{_plain(files.get('profile_name', 'profile'), 'profile')}.toml"
                profile.write_text(files["profile"])
                args = ["--profile", str(profile), *args]
        if command == "collect-files":
            return _invoke(collect_files, args)
        main = click.get_current_context().find_root().command  # `hpcseg` itself: cli imports this module

        return _invoke(main, [command, *args])


def _plain(name: str, default: str) -> str:
    return name if name.replace("-", "").replace("_", "").replace(".", "").isalnum() and name[0] != "." else default


def _invoke(command: click.Command, args: list[str]) -> tuple[int, object]:
    """Run a click command in this process, as `hpcseg` would (a user error: its line, exit 2)."""
    from ..errors import UserError

    ctx = None
    try:
        ctx = command.make_context("hpcseg", args)
        with ctx:
            command.invoke(ctx)
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    except click.exceptions.Exit as exit_:
        code = exit_.exit_code
    except click.ClickException as err:
        err.show()
        code = err.exit_code
    except UserError as err:
        err.show()
        code = err.exit_code
    return code, ctx.meta.get("hpcseg.answer") if ctx is not None else None


# ---------------------------------------------------------------- collect's file list


@click.command("collect-files")
@click.argument("selectors", nargs=-1)
@click.option("--top", type=int)
@click.option("--scratch", type=click.Path(path_type=Path))
def collect_files(selectors, top, scratch) -> None:
    """What `collect` would copy of each selected run, with each file's SHA-256 computed here."""
    from .collect import _sources, pick_top
    from ..runfiles import BEST
    from .runs import ClusterError, NotTrusted, find_runs, open_owned, scratches_to_search
    from .status import collect_status

    scratches, chosen, missing = scratches_to_search(scratch), {}, []
    for selector in selectors or [None]:  # a run removed here since it was remembered there is one line, not all
        try:
            chosen.update((r.path, r) for r in find_runs([selector] if selector else [], scratches))
        except ClusterError as err:
            missing.append(str(err))
    runs = sorted(chosen.values(), key=lambda r: (r.experiment, r.run_id))
    if top is not None:
        statuses, _ = collect_status(runs)
        dice = {s.path: s.best_dice for s in statuses}
        runs = pick_top([(r, dice.get(str(r.path))) for r in runs], top)
    answer = []
    for run in runs:
        entry = {"run_id": run.run_id, "experiment": run.experiment, "path": str(run.path), "files": [],
                 "problem": None}
        answer.append(entry)
        if not run.trusted:
            entry["problem"] = f"not collected: {run.damage[0] if run.damage else 'not trusted'}"
            continue
        if not os.path.lexists(run.path / BEST):
            entry["problem"] = "no best checkpoint yet"
            continue
        for name, src in _sources(run).items():
            try:
                with open_owned(src) as fh:
                    digest, size = hashlib.sha256(), 0
                    for chunk in iter(lambda: fh.read(1 << 20), b""):
                        digest.update(chunk)
                        size += len(chunk)
            except FileNotFoundError:
                continue
            except (NotTrusted, OSError) as err:
                entry["problem"] = f"{src}: {getattr(err, 'strerror', None) or err}; not copied"
                break
            entry["files"].append({"name": name, "src": str(src.relative_to(run.path)), "size": size,
                                   "sha256": digest.hexdigest()})
    ctx = click.get_current_context()
    ctx.meta["hpcseg.answer"] = {"runs": answer, "missing": missing, "rsync": shutil.which("rsync") is not None}
