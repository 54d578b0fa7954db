"""This machine as an hpcseg backend (see backends.py): submitit's local executor, detached from the submitting
command; a job is its controller process, whose pid is the job id."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Mapping

from ..durations import hours_minutes
from .runs import my_uid, my_user
from .scripts import fail_fast_setup, job_python


def _default_signals() -> None:
    """The job's controller starts with INT and QUIT at their defaults, as a scheduler starts a job: `hpcseg submit`
    run from a script or a shell in the background ignores them, and a controller that inherited that would ignore
    `hpcseg cancel` (an INT) and leave the training running."""
    for sig in (signal.SIGINT, signal.SIGQUIT):
        signal.signal(sig, signal.SIG_DFL)


def _executor_class() -> type:
    from submitit.local.local import LocalExecutor, LocalJob

    class DetachedLocalExecutor(LocalExecutor):
        """submitit's local executor, with the job's controller detached from the submitting command (own
        session, no inherited terminal or pipes), so `hpcseg submit` returns at once and the job outlives it."""

        def _submit_command(self, command: str) -> LocalJob:
            env = dict(os.environ)
            ntasks = int(self.parameters.get("tasks_per_node", 1))
            env.update(
                SUBMITIT_LOCAL_NTASKS=str(ntasks), SUBMITIT_LOCAL_COMMAND=command,
                SUBMITIT_LOCAL_TIMEOUT_S=str(int(60 * self.parameters.get("timeout_min", 5))),
                SUBMITIT_LOCAL_SIGNAL_DELAY_S=str(int(self.parameters.get("signal_delay_s", 30))),
                SUBMITIT_LOCAL_NODEID="0", SUBMITIT_LOCAL_JOB_NUM_NODES="1", SUBMITIT_STDERR_TO_STDOUT="",
                # the controller execs after the set-up lines: its own pid is the job id, not its parent's
                SUBMITIT_EXECUTOR="local", SUBMITIT_LOCAL_WITH_SHELL="",
            )
            if self.parameters.get("gpus_per_node") is not None:
                env["CUDA_VISIBLE_DEVICES"] = ",".join(str(k) for k in range(self.parameters["gpus_per_node"]))
            cmd: Any = [sys.executable, "-m", "submitit.local._local", str(self.folder)]
            setup = list(self.parameters.get("setup") or ())
            if setup:  # checked set-up lines (build_executor), then the controller: bash, as a scheduler's job
                cmd = ["/bin/bash", "-c", "\n".join([*setup, _controller(self.folder, setup)])]
            self.folder.mkdir(parents=True, exist_ok=True)
            with open(self.folder / "controller.log", "ab") as log:
                process = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                           stderr=subprocess.STDOUT, start_new_session=True,
                                           preexec_fn=_default_signals)
            return LocalJob(folder=self.folder, job_id=str(process.pid), process=process, tasks=list(range(ntasks)))

    return DetachedLocalExecutor


def _setup(plan, folder: Path) -> list[str]:
    """The profile's set-up lines, each checked (scripts.fail_fast_setup; its pid, bash's $$, is the job id)."""
    setup = list(plan.profile.setup)
    if not setup:
        return []
    profile = plan.profile.name if plan.profile.path else ""
    return fail_fast_setup(setup, job_python(setup), folder, "hpcseg_job=$$", profile)


def _controller(folder: Path, setup: list[str]) -> str:
    # exec: the controller takes bash's pid, the job id that `hpcseg cancel` signals (else only bash would end)
    return f"exec {job_python(setup)} -u -m submitit.local._local {shlex.quote(str(folder))}"


def build_executor(plan, folder: Path, dry_run: bool = False):
    """The detached local executor (None for a dry run: job_script describes what it would start)."""
    if dry_run:
        return None
    ex = _executor_class()(folder=folder, max_num_timeout=plan.profile.max_requeues)
    params: dict[str, Any] = {"timeout_min": plan.minutes, "signal_delay_s": plan.signal_delay_s}
    if plan.tasks_per_node > 1:  # one training process per GPU, started by submitit's local controller
        params["tasks_per_node"] = plan.tasks_per_node
    if plan.profile.setup:
        params["setup"] = _setup(plan, folder)
    ex.update_parameters(**params)
    return ex


def job_script(plan, folder: Path, n_elements: int) -> str:
    lines = [*_setup(plan, folder), _controller(folder, plan.profile.setup)]
    return ("#!/bin/bash\n# local executor: a detached background process on this machine, "
            f"walltime {hours_minutes(plan.minutes)}, USR2 {plan.signal_delay_s} s before it\n" + "\n".join(lines)
            + "\n")


# ---------------------------------------------------------------- the running jobs


def alive(pid_text: str | None, folder: str) -> bool:
    """Whether the local job's controller process is still running (not a zombie, a process of this user, and
    really that job's: its command line names the run's submitit folder)."""
    if not pid_text or not pid_text.isdigit():
        return False
    try:
        if os.stat(f"/proc/{pid_text}").st_uid != my_uid():
            return False
        with open(f"/proc/{pid_text}/stat", "rb") as fh:
            stat = fh.read().decode(errors="replace")
        if stat.rsplit(")", 1)[-1].split()[0] in ("Z", "X"):
            return False
        with open(f"/proc/{pid_text}/cmdline", "rb") as fh:
            cmdline = fh.read().decode(errors="replace")
    except OSError:
        return False
    return "submitit.local._local" in cmdline and folder in cmdline


def query_states(runs: list, timeout_s: float) -> tuple[dict[str, str], list[str]]:
    """RUNNING for each run whose controller process is alive; the others are gone (ended)."""
    return {r.job_id: "RUNNING" for r in runs if alive(r.job_id, str(r.submitit_dir))}, []


def job_owners(runs: list, timeout_s: float) -> dict[str, str]:
    """This user for each live job: `alive` accepts only this user's processes."""
    return {r.job_id: my_user() for r in runs if alive(r.job_id, str(r.submitit_dir))}


def cancel(runs: list, timeout_s: float) -> None:
    """SIGINT to each job's controller (submitit's local controller ends the training on it)."""
    for r in runs:
        if alive(r.job_id, str(r.submitit_dir)):  # checked again: the pid must still be this run's
            try:
                os.kill(int(r.job_id), signal.SIGINT)
            except ProcessLookupError:
                pass


def job_id_from_env(environ: Mapping[str, str]) -> str | None:
    return environ.get("SUBMITIT_LOCAL_JOB_ID") or None
