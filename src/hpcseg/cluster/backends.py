"""The schedulers hpcseg submits to, in one table: every cluster command loops over `BACKENDS`.

`submit` (the --executor choices, auto-detection, the warning-signal default, the executor), `status`,
`cancel`, `logs`, the profiles' valid executors, the job id a run record may hold and the job runner's job-id
lookup all read this table; nothing outside the backend modules names a scheduler.

Adding a scheduler (say PBS, as `pbs`):

1. Write `src/hpcseg/cluster/pbs.py` with the six functions every backend module has (see slurm.py, lsf.py,
   local.py; `Plan` is submit.Plan, `runs` are runs.Run objects with a job id):

   - `build_executor(plan, folder, dry_run) -> submitit executor` for one job and for a job array (submit calls
     `submit` or `submit_array` on it); with `dry_run` it must not need the scheduler on this machine. The
     one place that turns a Plan into scheduler parameters: GPUs, tasks per node etc. go here.
   - `job_script(plan, folder, n_elements) -> str`: the script a dry run prints (`scripts.submission_text`).
   - `query_states(runs, timeout_s) -> ({job id: state}, [warnings])`: ONE scheduler call for all the runs;
     states normalised to status.STATES (PENDING, RUNNING, COMPLETED, FAILED, CANCELLED, TIMEOUT, REQUEUED,
     UNKNOWN); jobs it does not know are absent.
   - `job_owners(runs, timeout_s) -> {job id: user name}`: who owns each job, as the scheduler says (`cancel`
     cancels only this user's jobs).
   - `cancel(runs, timeout_s)`: cancel the jobs (ones already over are no error).
   - `job_id_from_env(environ) -> str | None`: inside a job, its id (runs on the compute node).

   A scheduler driven by a job script needs a submitit executor: script_plugin.py has the core that lsf.py and
   sge.py share (watcher, job, job environment, executor, the script's signal-forwarding tail).
   Every scheduler command goes through `hpcseg.errors.run_command`, which raises one CommandError (a
   UserError) naming the command; parsing of the scheduler's output stays in this module.
2. Add one `Backend(...)` entry to `BACKENDS` below (its place sets the auto-detection order).
3. Add its row to the table of backends in docs/cluster.md, and a test against the scheduler or an emulator.
"""

from __future__ import annotations

import importlib
import os
import re
import shutil
from dataclasses import dataclass
from typing import Any, Mapping


class SchedulerState(str):
    """A state of status.STATES as a backend's `query_states` returns it, with the scheduler's reason where it gives
    one (LSF's exit reason of a job it killed: "killed by LSF: memory limit (16 GB)"); a plain str has none."""

    reason: str | None

    def __new__(cls, state: str, reason: str | None = None) -> "SchedulerState":
        value = super().__new__(cls, state)
        value.reason = reason
        return value


@dataclass(frozen=True)
class Backend:
    """One scheduler: what hpcseg needs to know of it, and the module that talks to it."""

    name: str  #: the --executor value and run.json's "executor"
    title: str  #: its name in messages ("Slurm: sacct exited 1: ...")
    module: str  #: the module with the backend functions (see this file's docstring)
    detect: str | None  #: auto picks this backend where this command is on PATH; None: the fallback
    job_id_vars: tuple[str, ...]  #: environment variables that hold the job id inside a job
    job_id_syntax: str  #: a regular expression every job id it records matches (run.json is checked)
    signal_delay_s: int  #: default seconds between the warning signal and the walltime
    signal_unit_s: int = 1  #: the warning's granularity (LSF's -wt counts whole minutes)
    queues: bool = True  #: has queues/partitions (--queue)
    arrays: bool = True  #: a sweep is one job array (else one job per element)
    runs_here: bool = False  #: jobs run on this machine: its GPUs count, and a job it does not list has ended

    def impl(self) -> Any:
        """The backend module, imported on first use (submitit and the plugins load only when needed)."""
        return importlib.import_module(self.module)

    def build_executor(self, plan, folder, dry_run: bool = False):
        return self.impl().build_executor(plan, folder, dry_run)

    def job_script(self, plan, folder, n_elements: int) -> str:
        return self.impl().job_script(plan, folder, n_elements)

    def query_states(self, runs: list, timeout_s: float) -> tuple[dict[str, str], list[str]]:
        return self.impl().query_states(runs, timeout_s)

    def job_owners(self, runs: list, timeout_s: float) -> dict[str, str]:
        return self.impl().job_owners(runs, timeout_s)

    def cancel(self, runs: list, timeout_s: float) -> None:
        self.impl().cancel(runs, timeout_s)

    def peek_command(self, job_id: str, follow: bool) -> list[str] | None:
        """The command that shows a running job's output so far where the scheduler holds it back until the job ends
        (LSF's bpeek); None for a scheduler that writes the log as the job runs."""
        peek = getattr(self.impl(), "peek_command", None)
        return peek(job_id, follow) if peek is not None else None

    def job_id_from_env(self, environ: Mapping[str, str]) -> str | None:
        if not any(environ.get(var) for var in self.job_id_vars):
            return None  # not inside one of its jobs: its module need not be imported
        return self.impl().job_id_from_env(environ)

    def valid_job_id(self, job_id: str) -> bool:
        return re.fullmatch(self.job_id_syntax, job_id) is not None


#: Every backend by name, in auto-detection order (the first whose command is on PATH; the fallback last).
BACKENDS: dict[str, Backend] = {b.name: b for b in (
    Backend(name="lsf", title="LSF", module="hpcseg.cluster.lsf", detect="bsub",
            job_id_vars=("LSB_JOBID",), job_id_syntax=r"\d+(_\d+)?", signal_delay_s=300, signal_unit_s=60),
    Backend(name="slurm", title="Slurm", module="hpcseg.cluster.slurm", detect="sbatch",
            job_id_vars=("SLURM_ARRAY_JOB_ID", "SLURM_JOB_ID"), job_id_syntax=r"\d+(_\d+)?", signal_delay_s=120),
    # SGE after Slurm and LSF: PBS has a qsub too, so it is detected by qconf, which only Grid Engine has
    Backend(name="sge", title="SGE", module="hpcseg.cluster.sge", detect="qconf",
            job_id_vars=("JOB_ID",), job_id_syntax=r"\d+(_\d+)?", signal_delay_s=120),
    Backend(name="local", title="local", module="hpcseg.cluster.local", detect=None,
            job_id_vars=("SUBMITIT_LOCAL_JOB_ID",), job_id_syntax=r"\d+", signal_delay_s=60,
            queues=False, arrays=False, runs_here=True),
)}


def executor_names() -> tuple[str, ...]:
    """What --executor and a profile's `executor` accept."""
    return ("auto", *BACKENDS)


def get(name: str) -> Backend | None:
    return BACKENDS.get(name)


def detect() -> str:
    """The first backend whose command is on PATH, else the fallback (the local executor)."""
    for backend in BACKENDS.values():
        if backend.detect and shutil.which(backend.detect):
            return backend.name
    return next(b.name for b in BACKENDS.values() if b.detect is None)


def job_id_here(environ: Mapping[str, str] | None = None) -> str | None:
    """Inside a job: its scheduler's job id (None elsewhere)."""
    environ = os.environ if environ is None else environ
    for backend in BACKENDS.values():
        job_id = backend.job_id_from_env(environ)
        if job_id:
            return job_id
    return None
