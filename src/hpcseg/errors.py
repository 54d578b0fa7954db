"""The base of every error a user can fix by changing their input (job file, data, run folder, checkpoint,
cluster options), and the one way hpcseg runs an outside command.

The command line prints such an error as `hpcseg: error: <line>` (one line per problem in `.problems` if it has
them), exits 2 and shows no traceback. This module imports nothing heavy, so catching it costs nothing.
"""

from __future__ import annotations

import subprocess
import sys

EXIT_CODE = 2


class UserError(Exception):
    """Bad input, named in the message."""

    exit_code = EXIT_CODE

    def lines(self) -> list[str]:
        return list(getattr(self, "problems", None) or [str(self)])

    def show(self, file=None) -> None:
        """Print as the command line does, for commands that report an error and go on with the next item."""
        for line in self.lines():
            print(f"hpcseg: error: {line}", file=file or sys.stderr)


class ClusterError(UserError):
    """A user error of the cluster commands (options, profiles, run folders, the scheduler's answer)."""


class CommandError(ClusterError):
    """An outside command (bsub, sbatch, sacct, bjobs, bkill, scancel, ...) was missing, hung or failed."""

    def __init__(self, message: str, returncode: int | None = None, stderr: str = "") -> None:
        super().__init__(message)
        self.returncode = returncode
        self.stderr = stderr


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def run_command(cmd: list[str], timeout_s: float, *, check: bool = True, input: str | None = None,
                ) -> subprocess.CompletedProcess:
    """Run `cmd` with a timeout; output is decoded as UTF-8 with undecodable bytes replaced (a scheduler may
    print any byte). Raises one CommandError naming the command, and its exit code and last stderr line when it
    failed (unless `check` is False, when a non-zero exit is returned for the caller to read)."""
    name = cmd[0]
    try:
        proc = subprocess.run(cmd, capture_output=True, timeout=timeout_s, check=False, input=input,
                              stdin=None if input is not None else subprocess.DEVNULL, text=True,
                              encoding="utf-8", errors="replace")
    except subprocess.TimeoutExpired:
        raise CommandError(f"{name} did not answer within {timeout_s:g} s (the scheduler may be overloaded "
                           "or down); nothing was changed by hpcseg") from None
    except OSError as err:
        raise CommandError(f"{name}: {err.strerror or err}"
                           + (" (not on PATH: is this machine part of the cluster?)"
                              if isinstance(err, FileNotFoundError) else "")) from None
    if check and proc.returncode != 0:
        detail = _last_line(proc.stderr) or _last_line(proc.stdout) or "no message"
        raise CommandError(f"{name} exited {proc.returncode}: {detail}", proc.returncode, proc.stderr)
    return proc
