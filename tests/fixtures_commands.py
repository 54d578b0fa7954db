"""Fake scheduler commands: small scripts put ahead of the real ones on PATH, for tests of what hpcseg runs and how it
reads the answers, without a scheduler (the real ones are tested against the dev clusters and the LSF emulator)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest


def fake_command(folder: Path, name: str, body: str) -> Path:
    """`folder/name`, an executable bash script running `body`."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text("#!/bin/bash\n" + body + "\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


class FakeCommands:
    """Commands in `folder` that each log their call ("name args", one line) to `calls` and print what `set` gave."""

    def __init__(self, folder: Path, calls: Path) -> None:
        self.folder, self.calls = folder, calls

    def set(self, name: str, stdout: str, rc: int = 0) -> None:
        (self.folder / f"{name}.out").parent.mkdir(parents=True, exist_ok=True)
        (self.folder / f"{name}.out").write_text(stdout)
        fake_command(self.folder, name, f"echo \"{name} $*\" >> '{self.calls}'\ncat '{self.folder / name}.out'\n"
                                        f"exit {rc}")


@pytest.fixture
def shims(tmp_path, monkeypatch) -> Path:
    """An empty folder first on PATH, for fake commands (`fake_command`)."""
    folder = tmp_path / "bin"
    folder.mkdir()
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")
    return folder


@pytest.fixture
def fake_commands(shims, tmp_path) -> FakeCommands:
    """Fake commands first on PATH, each set with `set(name, stdout, rc)`; `calls` is the log of their calls."""
    return FakeCommands(shims, tmp_path / "calls.log")


@pytest.fixture
def schedulers(shims, tmp_path) -> Path:
    """bsub, sbatch and qsub that accept every job and log each call (bsub its script too); the log must stay
    absent where submit refuses."""
    log = tmp_path / "scheduler-calls.log"
    fake_command(shims, "bsub", f'echo "bsub $*" >> {log}\ncat >> {log}\necho "Job <4711> is submitted to queue <q>."')
    fake_command(shims, "sbatch", f'echo "sbatch $*" >> {log}\necho "Submitted batch job 4711"')
    fake_command(shims, "qsub", f'echo "qsub $*" >> {log}\necho 4711')
    return log
