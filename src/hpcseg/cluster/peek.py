"""A running job's output where the scheduler holds its log back until the job ends (LSF without
LSB_STDOUT_DIRECT=y spools it): `hpcseg logs [--follow]` shows it through the scheduler's own command (bpeek)."""

from __future__ import annotations

import subprocess
import sys
from typing import Callable

from ..errors import CommandError, run_command

#: the heading bpeek prints before the output
#: (https://www.ibm.com/docs/SSWRJV_10.1.0/lsf_users_guide/job_output_view.html)
_HEADING = "<< output from stdout >>"


def _without_heading(text: str) -> str:
    first, sep, rest = text.partition("\n")
    return rest if first.strip() == _HEADING else text


def peek(command: list[str], write: Callable[[str], None], timeout_s: float = 30) -> int:
    """Run the peek command once; write what it shows; return the bytes written (as the log will hold them)."""
    proc = run_command(command, timeout_s, check=False)
    if proc.returncode != 0:
        raise CommandError(f"{command[0]} exited {proc.returncode}: {(proc.stderr or proc.stdout).strip()[:200]}")
    text = _without_heading(proc.stdout)
    write(text)
    return len(text.encode())


def follow(command: list[str], write: Callable[[str], None]) -> int:
    """Run the following peek command (bpeek -f) until it ends with the job (or Ctrl-C); return the bytes written."""
    try:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                text=True, encoding="utf-8", errors="replace")
    except OSError as err:
        raise CommandError(f"{command[0]}: {err.strerror or err}") from None
    written, first = 0, True
    try:
        for line in proc.stdout:
            if first and line.strip() == _HEADING:
                first = False
                continue
            first = False
            write(line)
            written += len(line.encode())
    except KeyboardInterrupt:
        proc.terminate()
        raise
    finally:
        proc.wait()
    return written


def note(path, command: list[str]) -> None:
    print(f"hpcseg: note: {path} is empty while the job runs (the scheduler spools its output until the job ends): "
          f"showing {' '.join(command)}", file=sys.stderr)
