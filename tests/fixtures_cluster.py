"""pytest plugin for the cluster front end's tests: tiny data, an isolated scratch, the CLI in-process,
`backend`, parametrised over the local executor, the LSF emulator and the real single-node Slurm and SGE, and (for every
test) `submitted_jobs`, which ends each job the test submitted when the test ends, passed or failed.

Load it from tests/conftest.py with ``pytest_plugins = [..., "fixtures_cluster"]`` (it uses the
``lsf_emulator``, ``slurm_cluster`` and ``sge_cluster`` fixtures of fixtures_lsf / fixtures_slurm / fixtures_sge).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

REPO = Path(__file__).resolve().parents[1]
JOB_FILE = REPO / "jobs" / "exercise-improved.toml"
#: a model and data small enough that a job's time is mostly Python importing torch
TINY = ["model.features=[4,4,8,8,16,4]", "train.epochs=3", "train.val_interval=1", "train.crop=[32,32]",
        "infer.roi=[32,32]", "train.threads=1", "train.early_stop=0"]


def write_slices(folder: Path, n: int, seed: int, size: int = 32, bad: bool = False) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        label = np.zeros((size, size), np.uint8)
        q = size // 8
        label[q:-q, q:-q] = 1
        label[2 * q:-2 * q, 2 * q:-2 * q] = 2
        label[3 * q:-3 * q, 3 * q:-3 * q] = 3
        if bad:
            label[0, 0] = 9  # outside the job's classes: the training refuses the folder
        image = (label / 3.0 + rng.normal(0, 0.2, label.shape)).astype(np.float32)
        np.save(folder / f"s{i:03d}_T1w.npy", image)
        np.save(folder / f"s{i:03d}_T1w_tissue_segmentation.npy", label)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """`training_data/` (4 slices), `validation_data/` (2), `test_data/` (2), and `bad_data/` whose
    training labels are out of range (a job on it fails at its start)."""
    root = tmp_path_factory.mktemp("tiny_data")
    write_slices(root / "training_data", 4, 0)
    write_slices(root / "validation_data", 2, 1)
    write_slices(root / "test_data", 2, 2)
    write_slices(root / "bad_data" / "training_data", 2, 3, bad=True)
    write_slices(root / "bad_data" / "validation_data", 2, 4)
    return root


#: the command that submits to the scheduler whose cancel command is the key
_SUBMITTER = {"scancel": "sbatch", "bkill": "bsub", "qdel": "qsub"}


class SubmittedJobs:
    """Every job submitted through submitit (any executor) while installed, to be ended at the test's end."""

    def __init__(self) -> None:
        self.cancel_argvs: list[list[str]] = []
        self.processes: list[subprocess.Popen] = []

    def record(self, cancel: str, job_id: str) -> None:
        """A scheduler job just submitted, and the command that cancels it (scancel, bkill)."""
        if cancel not in _SUBMITTER:
            return
        cancel_path, submit_path = shutil.which(cancel), shutil.which(_SUBMITTER[cancel])
        # only the scheduler the job went to: a test's fake sbatch must not make the real scancel end an id it made up
        if cancel_path and submit_path and Path(cancel_path).parent == Path(submit_path).parent:
            self.cancel_argvs.append([cancel_path, str(job_id)])

    def end_all(self) -> None:
        """scancel / bkill each scheduler job (a whole array by its first id); kill each local job's process group."""
        from hpcseg.errors import CommandError, run_command

        for argv in self.cancel_argvs:
            try:
                run_command(argv, 30, check=False)  # a job that has ended already is no error here
            except CommandError:
                pass
        for process in self.processes:
            if process.poll() is None:
                # hpcseg's local jobs lead their own process group; submitit's plain ones share pytest's
                if os.getpgid(process.pid) == process.pid:
                    os.killpg(process.pid, signal.SIGKILL)
                else:
                    process.kill()
                process.wait(timeout=30)
        self.cancel_argvs.clear()
        self.processes.clear()


@pytest.fixture(autouse=True)
def submitted_jobs(monkeypatch):
    """Record every job the test submits and end them all when it ends, passed or failed (a failed test used to
    leave a 100,000-epoch job running)."""
    from submitit.core import core
    from submitit.local.local import LocalJob

    jobs = SubmittedJobs()
    write_job_id, local_init = core.PicklingExecutor._write_job_id, LocalJob.__init__

    # every scheduler executor (submitit's, hpcseg's own submission path) announces a new job id through this
    def recording_write_job_id(self, job_id, uid):
        jobs.record(self.job_class._cancel_command, job_id)
        write_job_id(self, job_id, uid)

    def recording_local_init(self, *args, **kwargs):  # every local executor, hpcseg's detached one included
        local_init(self, *args, **kwargs)
        if self._process is not None:  # the job is this controller process (and its children)
            jobs.processes.append(self._process)

    monkeypatch.setattr(core.PicklingExecutor, "_write_job_id", recording_write_job_id)
    monkeypatch.setattr(LocalJob, "__init__", recording_local_init)
    try:
        yield jobs
    finally:
        jobs.end_all()


@dataclass
class Cli:
    """The `hpcseg` command run in-process against an isolated scratch folder."""

    scratch: Path
    tmp: Path
    extra_submit: list[str] = field(default_factory=list)

    def __call__(self, *args: str) -> tuple[int, str]:
        from hpcseg.cli import main

        result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
        return result.exit_code, result.output

    def submit(self, *args: str, sets: list[str] = (), data: Path | None = None) -> list[tuple[str, str]]:
        """Submit; returns [(run_id, job_id)]; fails the test if the command fails."""
        cmd = ["submit", JOB_FILE, *self.extra_submit, *args]
        if data is not None:
            cmd += ["--data", data]
        for s in [*TINY, *sets]:
            cmd += ["--set", s]
        code, out = self(*cmd)
        assert code == 0, out
        return re.findall(r"submitted run (\S+)\s+job (\S+)", out)

    def status(self, *selectors: str) -> list[dict]:
        code, out = self("status", "--json", *selectors)
        assert code == 0, out
        # the JSON list starts a line; warnings (stderr, mixed in here) may come before it
        start = re.search(r"^\[", out, flags=re.M)
        assert start, out
        return json.JSONDecoder().raw_decode(out, start.start())[0]

    def wait(self, run_id: str, states: tuple[str, ...], timeout_s: float = 60, seen: set | None = None,
             until=None) -> dict:
        """Poll status until the run is in one of `states` (and `until(row)` holds); records states seen."""
        deadline = time.time() + timeout_s
        while True:
            row = self.status(run_id)[0]
            if seen is not None:
                seen.add(row["state"])
            if row["state"] in states and (until is None or until(row)):
                return row
            if time.time() > deadline:
                raise AssertionError(f"{run_id} still {row['state']} after {timeout_s} s: {row}")
            time.sleep(0.3)


@pytest.fixture
def cli(tmp_path, monkeypatch):
    scratch = tmp_path / "scratch"
    monkeypatch.setenv("HPCSEG_SCRATCH", str(scratch))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.setenv("HPCSEG_POLL_S", "0.3")
    monkeypatch.setenv("HPCSEG_SCHEDULER_TIMEOUT_S", "10")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    return Cli(scratch=scratch, tmp=tmp_path)


@pytest.fixture(params=["local", "lsf", "slurm", "sge"])
def backend(request, cli) -> str:
    """Each cluster test runs on the local executor, the LSF emulator, the single-node Slurm and the single-node
    SGE."""
    name = request.param
    common = ["--gpus", "0", "--cpus", "1", "--mem", "1"]
    if name == "lsf":
        request.getfixturevalue("lsf_emulator")
        cli.extra_submit = ["--executor", "lsf", "--queue", "gpuv100", *common]
    elif name == "slurm":
        request.getfixturevalue("slurm_cluster")
        cli.extra_submit = ["--executor", "slurm", "--queue", "gpuv100", *common]
    elif name == "sge":
        request.getfixturevalue("sge_cluster")
        cli.extra_submit = ["--executor", "sge", "--queue", "all.q", *common]
    else:
        cli.extra_submit = ["--executor", "local", *common]
    return name
