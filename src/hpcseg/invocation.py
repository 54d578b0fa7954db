"""The words that started this hpcseg, for every command hpcseg prints for the user to run (resume, logs, help):
`.venv/bin/hpcseg` where it was started so (the quick start never puts hpcseg on PATH), `python -m hpcseg` where
so, plain `hpcseg` where PATH finds this very one."""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from pathlib import Path


def hpcseg_words() -> list[str]:
    """`['hpcseg']`, `['.venv/bin/hpcseg']` or `['.venv/bin/python', '-m', 'hpcseg']`, as this process was
    started; `['hpcseg']` where it was not started as hpcseg at all (imported by a test, say)."""
    argv0 = sys.argv[0] if sys.argv else ""
    path = Path(argv0)
    if path.name == "__main__.py" and path.parent.name == "hpcseg":  # python -m hpcseg
        python = (getattr(sys, "orig_argv", None) or [sys.executable])[0] or sys.executable
        return [python, "-m", "hpcseg"]
    if path.name != "hpcseg":
        return ["hpcseg"]
    found = shutil.which("hpcseg")
    try:
        if found and os.path.samefile(found, argv0):
            return ["hpcseg"]
    except OSError:
        pass
    return [argv0]


def hpcseg_command(*words: object) -> str:
    """One command line for the user to run: this hpcseg, then `words`, quoted for a POSIX shell."""
    return shlex.join([*hpcseg_words(), *map(str, words)])
