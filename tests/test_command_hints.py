"""The commands hpcseg prints for the user to run (the resume hint after Ctrl-C, where to find help, `logs`) start
with hpcseg as it was started: `.venv/bin/hpcseg` when it is not on PATH (the quick start never activates .venv),
`python -m hpcseg` when started so, plain `hpcseg` only where PATH finds this one."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fixtures_cluster import REPO, TINY

SCRIPT = Path(sys.executable).parent / "hpcseg"  # the console script of the environment the tests run in
JOB = REPO / "jobs" / "exercise-improved.toml"


def _env(with_venv_on_path: bool) -> dict:
    """This environment without (or with) the venv's bin folder on PATH, as a shell that never activated it."""
    folders = [p for p in os.environ["PATH"].split(os.pathsep) if Path(p) != SCRIPT.parent]
    if with_venv_on_path:
        folders.insert(0, str(SCRIPT.parent))
    return {**os.environ, "PATH": os.pathsep.join(folders), "OMP_NUM_THREADS": "1"}


def _help_hint(argv: list[str], cwd: Path, env: dict) -> str:
    proc = subprocess.run([*argv, "train", "--no-such-option"], capture_output=True, text=True, timeout=120,
                          cwd=cwd, env=env)
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1, proc.stderr
    return proc.stderr.split("(see '")[-1].rstrip().rstrip(")'")


@pytest.mark.skipif(not SCRIPT.exists(), reason="the tests run from an environment without hpcseg's script")
def test_the_help_hint_names_hpcseg_as_it_was_started(tmp_path):
    relative = os.path.relpath(SCRIPT, tmp_path)
    assert _help_hint([relative], tmp_path, _env(False)) == f"{relative} train --help"
    assert _help_hint([str(SCRIPT)], tmp_path, _env(False)) == f"{SCRIPT} train --help"
    assert _help_hint([str(SCRIPT)], tmp_path, _env(True)) == "hpcseg train --help"  # PATH finds this one
    assert _help_hint([sys.executable, "-m", "hpcseg"], tmp_path, _env(False)) == \
        f"{sys.executable} -m hpcseg train --help"


@pytest.mark.parametrize("argv0, start", [
    (".venv/bin/hpcseg", ".venv/bin/hpcseg"),
    ("/opt/hpcseg env/bin/hpcseg", "'/opt/hpcseg env/bin/hpcseg'"),
    (str(Path("src") / "hpcseg" / "__main__.py"), f"{sys.executable} -m hpcseg"),
])
def test_the_resume_and_logs_hints_start_as_hpcseg_was_started(tmp_path, monkeypatch, argv0, start):
    from hpcseg.cli import _resume_hint
    from hpcseg.cluster.runs import load_run
    from hpcseg.cluster.status import merge
    from hpcseg.train import LAST

    monkeypatch.setattr(sys, "argv", [argv0, "train"])
    monkeypatch.setattr(sys, "orig_argv", [sys.executable, "-m", "hpcseg", "train"])
    run_dir = tmp_path / "exp" / "r1"
    (run_dir / LAST).parent.mkdir(parents=True)
    (run_dir / LAST).write_bytes(b"")
    assert _resume_hint(run_dir, []) == f"resume with: {start} train --resume --out {run_dir}"
    (run_dir / "run.json").write_text(json.dumps({"run_id": "r1", "experiment": "exp", "executor": "slurm",
                                                  "job_id": "5", "submit_time": time.time()}))
    status = merge(load_run(run_dir), "COMPLETED", False, time.time())  # the script ended, the runner wrote nothing
    assert status.error == f"the job ended without writing its outcome (see {start} logs --err r1)"


def _wait_for_lines(path: Path, n: int, proc: subprocess.Popen, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not (path.exists() and len(path.read_text().splitlines()) >= n):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"{path} has fewer than {n} lines after {timeout_s} s"
        time.sleep(0.1)


def _interrupted(argv: list[str], metrics: Path, lines: int, cwd: Path) -> str:
    """Run `argv` until metrics.jsonl has `lines` lines, Ctrl-C it (SIGINT); its last line of stderr."""
    proc = subprocess.Popen(argv, cwd=cwd, env=_env(False), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        _wait_for_lines(metrics, lines, proc)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130 and "Traceback" not in err, err
    return err.strip().splitlines()[-1]


@pytest.mark.slow  # two trainings started and interrupted: about 50 s on the loaded 2-core machine
@pytest.mark.skipif(not SCRIPT.exists(), reason="the tests run from an environment without hpcseg's script")
def test_the_resume_hint_after_ctrl_c_runs_as_printed_where_hpcseg_is_not_on_path(tiny_data, tmp_path):
    """`.venv/bin/hpcseg train` (relative, not on PATH) Ctrl-C'd: the printed command, run as printed in the same
    shell, resumes the run; Ctrl-C'd again, it prints the same command."""
    relative = os.path.relpath(SCRIPT, tmp_path)
    sets = sum((["--set", s] for s in [*TINY, "train.epochs=100000"]), [])
    metrics = tmp_path / "my run" / "metrics.jsonl"
    hint = _interrupted([relative, "train", str(JOB), "--data", str(tiny_data), "--out", "my run", *sets], metrics, 1,
                        tmp_path)
    command = f"{relative} train --resume --out 'my run'"
    assert hint == f"hpcseg: interrupted; resume with: {command}"
    assert _interrupted(shlex.split(command), metrics, len(metrics.read_text().splitlines()) + 1, tmp_path) == hint
