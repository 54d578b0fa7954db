"""`collect --host`: the cluster lists each run's files with their SHA-256 (computed there), and they come here
into `DEST/<run_id>/` through rsync over the same ssh connection (resumable: `--partial --append-verify`), or,
where rsync is missing on either side, through `ssh ... tail -c +N` (resumable too), verified alike.

Nothing is written outside DEST, whatever the cluster answers: run ids must be plain names, each file's name one
that collect writes, each source a relative path below the run folder; files land in `DEST/<run_id>/.incoming/`
and are moved into place only once their SHA-256 matches the cluster's. A file already here with that SHA-256 is
not moved again.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path, PurePosixPath

import click

from ..atomic import atomic_write_text
from ..errors import ClusterError
from ..outdir import blocked
from .collect import JOB_TEST, MANIFEST, SUMS, _known, _own_folders, _read_manifest, _read_metrics, curves_png, \
    dice_lines, verify
from .remote import (Host, RemoteError, call, check_dest, connect, remote_line, sanitize, ssh_failure, ssh_prefix,
                     ssh_timeout_s)
from .runs import NotTrusted, open_owned
from .scripts import NAME

INCOMING = ".incoming"
_SHA = re.compile(r"[0-9a-f]{64}")
#: rsync's exit codes of a transfer cut short (connection lost, timeout, killed)
_RSYNC_LOST = {10, 12, 20, 30, 35, 255}


def collect_over_ssh(host: Host, selectors, top, scratch, dest_root: Path) -> int:
    """Collect the selected runs of `host` into `dest_root`; returns the exit code (2 when a run failed)."""
    if top is not None and top < 1:
        raise ClusterError(f"--top {top}: must be at least 1")
    problem = blocked(dest_root)
    if problem:
        raise ClusterError(f"--dest {problem}")
    args = (["--top", str(top)] if top is not None else []) + (["--scratch", str(scratch)] if scratch else [])
    answer = call(host, "collect-files", args + ["--", *selectors])
    if answer.exit:
        return answer.exit
    data = answer.data if isinstance(answer.data, dict) else {}
    for line in data.get("missing") or []:
        ClusterError(f"{host.dest}: {sanitize(str(line))[:300]}").show()
    runs = [_checked_run(host, item) for item in data.get("runs") or []]
    rsync = data.get("rsync") is True and shutil.which(os.environ.get("HPCSEG_RSYNC", "rsync")) is not None
    done, failed = 0, bool(data.get("missing"))
    for run in runs:
        if run["problem"]:
            click.echo(f"{run['run_id']}: {sanitize(run['problem'])[:300]}", err=True)
            failed |= "no best checkpoint" not in run["problem"]
            continue
        try:
            line = _collect_run(host, run, dest_root, rsync)
        except ClusterError as err:  # this run: one line, and the others are still collected
            err.show()
            failed = True
            continue
        done += 1
        click.echo(line)
        lines = dice_lines(dest_root / run["run_id"] / JOB_TEST)
        if lines:
            click.echo(f"\n{run['run_id']}: " + "\n".join(lines))
    if not runs:
        raise ClusterError(f"{host.dest}: no runs to collect")
    if not done and not failed:
        raise ClusterError("no run has a best checkpoint yet")
    return 2 if failed else 0


def _checked_run(host: Host, item) -> dict:
    """One run of the cluster's answer, every name checked: a hostile answer is refused, not followed."""
    def refuse(why: str):
        raise RemoteError(f"{host.dest}: refused the cluster's answer: {why}; nothing was written")

    if not isinstance(item, dict):
        refuse("a run that is not an object")
    run_id, path, files = item.get("run_id"), item.get("path"), item.get("files")
    if not isinstance(run_id, str) or not NAME.fullmatch(run_id) or run_id.startswith("."):
        refuse(f"the run id {json.dumps(run_id)[:60]} is not a plain folder name")
    if not isinstance(path, str) or not path.startswith("/") or not isinstance(files, list):
        refuse(f"run {run_id}: a malformed run folder or file list")
    checked = []
    for f in files:
        if not isinstance(f, dict):
            refuse(f"run {run_id}: a file that is not an object")
        name, src, size, sha = f.get("name"), f.get("src"), f.get("size"), f.get("sha256")
        if not isinstance(name, str) or not _known(name):
            refuse(f"run {run_id}: {json.dumps(name)[:60]} is not a file collect writes")
        if not isinstance(src, str) or not _plain_relative(src):
            refuse(f"run {run_id}: the source {json.dumps(src)[:60]} is not a path inside the run folder")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0 or not isinstance(sha, str) \
                or not _SHA.fullmatch(sha):
            refuse(f"run {run_id}: {name}: a malformed size or SHA-256")
        checked.append({"name": name, "src": src, "size": size, "sha256": sha})
    problem = item.get("problem")
    return {"run_id": run_id, "path": path, "files": checked, "problem": problem if isinstance(problem, str) else None}


def _plain_relative(src: str) -> bool:
    parts = PurePosixPath(src).parts
    return bool(parts) and not src.startswith("/") and "\\" not in src and len(parts) <= 5 \
        and all(p not in ("", ".", "..") and not p.startswith(".") for p in parts)


def _sha256(path: Path) -> str | None:
    """The SHA-256 of a regular file of this user (not through a link), None where there is none."""
    try:
        with open_owned(path) as fh:
            digest = hashlib.sha256()
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
            return digest.hexdigest()
    except (OSError, NotTrusted):
        return None


def _collect_run(host: Host, run: dict, dest_root: Path, rsync: bool) -> str:
    dest = dest_root / run["run_id"]
    dest_root.mkdir(parents=True, exist_ok=True)
    _own_folders(dest, "x", create=True)
    files = run["files"]
    if not any(f["name"] == "best.pt" for f in files):
        raise ClusterError(f"{run['run_id']}: no best checkpoint yet")
    need = [f for f in files if _sha256(dest / f["name"]) != f["sha256"]]
    moved = 0
    if need:
        incoming = dest / INCOMING
        _own_folders(dest, f"{INCOMING}/x", create=True)
        for f in need:
            _own_folders(incoming, f["src"], create=True)
        connect(host.copy_dest)  # the transfer host's own shared connection, a password typed once
        moved = (_rsync if rsync else _cat)(host, run["path"], need, incoming)
        for f in need:  # each checked against the cluster's SHA-256 before it takes its place
            got = _sha256(incoming / f["src"])
            if got != f["sha256"]:
                (incoming / f["src"]).unlink(missing_ok=True)
                raise ClusterError(f"{run['run_id']}: {f['name']}: its SHA-256 here differs from the cluster's "
                                   "(changed there while being copied?); run collect again")
        for f in need:
            _own_folders(dest, f["name"], create=True)
            os.replace(incoming / f["src"], dest / f["name"])
        shutil.rmtree(incoming, ignore_errors=True)
    entries = {f["name"]: {"sha256": f["sha256"], "source": ["ssh", f["sha256"]]} for f in files}
    old = _read_manifest(dest).get("curves.png")
    metrics = entries.get("metrics.jsonl")
    if metrics and old and old.get("source") == metrics["sha256"] and _sha256(dest / "curves.png") == old["sha256"]:
        entries["curves.png"] = old
    elif metrics:
        curves_png(_read_metrics(dest / "metrics.jsonl"), dest / "curves.png", f"{run['run_id']}")
        entries["curves.png"] = {"sha256": _sha256(dest / "curves.png"), "source": metrics["sha256"]}
    atomic_write_text(dest / SUMS, "".join(f"{entries[n]['sha256']}  {n}\n" for n in sorted(entries)))
    verify(dest)
    atomic_write_text(dest / MANIFEST, json.dumps(entries, indent=1, sort_keys=True) + "\n")
    kept = len(files) - len(need)
    return (f"{run['run_id']}: {len(need)} files copied ({_size(moved)} moved){f', {kept} unchanged' if kept else ''}"
            f", SHA256SUMS verified -> {dest}")


def _size(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


def _rsync(host: Host, run_path: str, need: list[dict], incoming: Path) -> int:
    """rsync the files over the shared connection; returns the bytes received."""
    target, _ = check_dest("transfer_host", host.copy_dest)
    shell = shlex.join(ssh_prefix(host.copy_dest))
    tty = sys.stderr.isatty()
    argv = [os.environ.get("HPCSEG_RSYNC", "rsync"), "--files-from=-", "--from0", "-s", "-t",
            "--partial", "--append-verify", "--no-links", "--no-devices", "--no-specials", "--chmod=D700,F600",
            f"--timeout={max(1, int(ssh_timeout_s()))}", "--stats", "-e", shell,
            *(["--info=progress2"] if tty else []), *shlex.split(os.environ.get("HPCSEG_RSYNC_OPTIONS", "")),
            f"{target}:{run_path}/", f"{incoming}/"]
    listing = b"".join(f["src"].encode() + b"\0" for f in need)
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = _talk(proc, listing, tty)
    except KeyboardInterrupt:
        proc.kill()
        proc.wait()
        raise
    received = re.search(rb"Total bytes received: ([\d,.]+)", out)
    moved = int(re.sub(rb"[,.]", b"", received.group(1))) if received else 0
    refused = ssh_failure(host.copy_dest, err.decode(errors="replace"))
    if proc.returncode != 0 and refused:  # the transfer host could not be reached at all
        raise refused
    if proc.returncode in _RSYNC_LOST:
        raise RemoteError(f"{host.copy_dest}: the connection was lost during the copy (rsync exited "
                          f"{proc.returncode}); run collect again to move only what is missing")
    if proc.returncode != 0:
        last = next((sanitize(x.strip())[:200] for x in reversed(err.decode(errors="replace").splitlines())
                     if x.strip()), "no message")
        raise ClusterError(f"{host.copy_dest}: rsync exited {proc.returncode}: {last}")
    return moved


def _talk(proc, listing: bytes, tty: bool) -> tuple[bytes, bytes]:
    """Feed rsync its file list, show its progress on a terminal, keep its output for the stats."""
    err: list[bytes] = []
    reader = threading.Thread(target=lambda: err.extend(proc.stderr), daemon=True)
    reader.start()
    proc.stdin.write(listing)
    proc.stdin.close()
    out = b""
    for chunk in iter(lambda: proc.stdout.read1(4096), b""):
        out += chunk
        if tty and b"Number of files" not in out:
            sys.stderr.write(sanitize(chunk.decode(errors="replace")))
            sys.stderr.flush()
    proc.wait()
    reader.join(5)
    if tty:
        sys.stderr.write("\n")
    return out, b"".join(err)


def _cat(host: Host, run_path: str, need: list[dict], incoming: Path) -> int:
    """Without rsync: each file through `tail -c +N` over the shared connection, appended to what an earlier,
    interrupted collect left (a file that then does not match is sent whole again)."""
    target, _ = check_dest("transfer_host", host.copy_dest)
    total = sum(f["size"] for f in need)
    progress = _Progress(len(need), total) if sys.stderr.isatty() else None
    moved = 0
    for i, f in enumerate(need):
        part = incoming / f["src"]
        have = part.stat().st_size if part.is_file() and not part.is_symlink() else 0
        if have > f["size"]:
            part.unlink()
            have = 0
        argv = ssh_prefix(host.copy_dest) + [target, remote_line(["tail", "-c", f"+{have + 1}", "--",
                                                                 f"{run_path}/{f['src']}"])]
        with open(part, "ab") as out:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            errors: list[bytes] = []
            threading.Thread(target=lambda: errors.extend(proc.stderr), daemon=True).start()
            try:
                for chunk in iter(lambda: proc.stdout.read1(1 << 16), b""):
                    if have + len(chunk) > f["size"]:
                        proc.kill()
                        raise ClusterError(f"{host.copy_dest}: {f['name']}: more bytes than the cluster listed")
                    out.write(chunk)
                    have += len(chunk)
                    moved += len(chunk)
                    if progress:
                        progress.show(i, moved)
            finally:
                if proc.poll() is None:
                    proc.kill()
                proc.wait()
        refused = ssh_failure(host.copy_dest, b"".join(errors).decode(errors="replace"))
        if proc.returncode != 0 and refused:
            raise refused
        if proc.returncode != 0:
            raise RemoteError(f"{host.copy_dest}: the connection was lost during the copy (ssh exited "
                              f"{proc.returncode}); run collect again to move only what is missing")
    if progress:
        progress.done()
    return moved


class _Progress:
    """One line on the terminal: files, bytes, rate, time left."""

    def __init__(self, files: int, total: int) -> None:
        self.files, self.total, self.start, self.last = files, total, time.monotonic(), 0.0

    def show(self, index: int, moved: int) -> None:
        now = time.monotonic()
        if now - self.last < 0.2:
            return
        self.last = now
        rate = moved / max(now - self.start, 1e-6)
        left = (self.total - moved) / rate if rate > 0 else 0
        sys.stderr.write(f"\r{index + 1}/{self.files} files  {_size(moved)} of {_size(self.total)}  "
                         f"{_size(rate)}/s  {left:.0f} s left   ")
        sys.stderr.flush()

    def done(self) -> None:
        sys.stderr.write("\n")
