"""Slurm as an hpcseg backend (see backends.py): submitit's Slurm executor with a bounded sbatch, and the
states and owners of many jobs from one sacct call (one squeue call where accounting is off)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping

from ..errors import CommandError, run_command
from .runs import my_user
from .scripts import BoundedSubmission, dry_run_class, fail_fast_setup, job_python, submission_text
from .unreadable import unknown_states, unreadable_lines

#: Slurm's job states -> hpcseg's (status.STATES)
STATE_MAP = {
    "PENDING": "PENDING", "CONFIGURING": "PENDING", "SUSPENDED": "PENDING", "RESV_DEL_HOLD": "PENDING",
    "RUNNING": "RUNNING", "COMPLETING": "RUNNING", "STAGE_OUT": "RUNNING", "SIGNALING": "RUNNING",
    "COMPLETED": "COMPLETED",
    "FAILED": "FAILED", "NODE_FAIL": "FAILED", "OUT_OF_MEMORY": "FAILED", "BOOT_FAIL": "FAILED",
    "DEADLINE": "FAILED", "SPECIAL_EXIT": "FAILED",
    "CANCELLED": "CANCELLED", "REVOKED": "CANCELLED",
    "TIMEOUT": "TIMEOUT",
    "PREEMPTED": "REQUEUED", "REQUEUED": "REQUEUED", "REQUEUE_FED": "REQUEUED", "REQUEUE_HOLD": "REQUEUED",
    "RESIZING": "RUNNING",
}
_RANGE = re.compile(r"^(\d+)_\[([^\]]+)\]$")
#: a job id as sacct/squeue print it: 12, 12_3, 12_[0-9%2], 12+1 (a heterogeneous job's component)
_JOB_ID = re.compile(r"\d+(_\d+|_\[[^\]]+\])?(\+\d+)?")


# ---------------------------------------------------------------- sacct / squeue


def _expand_slurm_id(job_id: str) -> list[str]:
    """'12_[0-2,5%2]' -> ['12_0', '12_1', '12_2', '12_5']; other ids unchanged."""
    m = _RANGE.match(job_id)
    if not m:
        return [job_id]
    out = []
    for part in m.group(2).split("%")[0].split(","):
        lo, _, hi = part.partition("-")
        if lo.isdigit() and (not hi or hi.isdigit()):
            out += [f"{m.group(1)}_{i}" for i in range(int(lo), int(hi or lo) + 1)]
    return out


def _parse_slurm_lines(text: str, unreadable: list[str] | None = None) -> dict[str, str]:
    """`JobID|Field` lines -> {job id: the field's first word} (array ranges expanded, job steps left out); a
    line that is no job's (binary garbage, a message) is appended to `unreadable`."""
    states: dict[str, str] = {}
    for line in text.splitlines():
        job_id, sep, state = line.strip().partition("|")
        if not line.strip() or (sep and "." in job_id and _JOB_ID.fullmatch(job_id.split(".")[0])):
            continue  # a job step (12.batch, 12.0)
        if not sep or not _JOB_ID.fullmatch(job_id) or not state.split():
            if unreadable is not None:
                unreadable.append(line)
            continue
        raw = state.split()[0]
        for jid in _expand_slurm_id(job_id):
            states[jid] = raw
    return states


def _sacct_or_squeue(job_ids: list[str], field: tuple[str, str], timeout_s: float,
                     unreadable: list[str] | None = None) -> tuple[dict[str, str], str]:
    """One sacct call for `field` (sacct's name, squeue's %-letter) of the jobs (arrays asked by their parent
    id); where sacct is unavailable (accounting disabled, command missing), one squeue call. Returns
    ({job id: value}, source); lines of the answer that are no job's go to `unreadable`."""
    parents = sorted({j.split("_")[0] for j in job_ids})
    try:
        out = run_command(["sacct", "-n", "-P", "-X", "-o", f"JobID,{field[0]}", "-j", ",".join(parents)],
                          timeout_s).stdout
        return _parse_slurm_lines(out, unreadable), "sacct"
    except CommandError as sacct_err:
        try:
            out = run_command(["squeue", "-h", "-r", "--states=all", "-u", my_user(), "-o", f"%i|{field[1]}"],
                              timeout_s).stdout
        except CommandError as squeue_err:
            raise CommandError(f"{sacct_err}; {squeue_err}") from None
        wanted = set(parents)
        return {k: v for k, v in _parse_slurm_lines(out, unreadable).items() if k.split("_")[0] in wanted}, "squeue"


def query_states(runs: list, timeout_s: float) -> tuple[dict[str, str], list[str]]:
    unreadable: list[str] = []
    raw, source = _sacct_or_squeue([r.job_id for r in runs], ("State", "%T"), timeout_s, unreadable)
    states, unknown = {}, {}
    for run in runs:
        if raw.get(run.job_id):
            states[run.job_id] = STATE_MAP.get(raw[run.job_id], "UNKNOWN")
            if raw[run.job_id] not in STATE_MAP:
                unknown.setdefault(raw[run.job_id], []).append(run.job_id)
    notes = [] if source == "sacct" else ["sacct unavailable: Slurm states from squeue and the runs' own files"]
    notes += unknown_states(source, unknown)
    if unreadable:
        notes.append(unreadable_lines(source, unreadable))
    return states, notes


def job_owners(runs: list, timeout_s: float) -> dict[str, str]:
    users, _ = _sacct_or_squeue([r.job_id for r in runs], ("User", "%u"), timeout_s)
    by_parent = {k.split("_")[0]: v.strip() for k, v in users.items()}
    return {r.job_id: by_parent[r.job_id.split("_")[0]] for r in runs if r.job_id.split("_")[0] in by_parent}


def cancel(runs: list, timeout_s: float) -> None:
    run_command(["scancel", *[r.job_id for r in runs]], timeout_s)


def job_id_from_env(environ: Mapping[str, str]) -> str | None:
    if environ.get("SLURM_ARRAY_JOB_ID"):
        return f"{environ['SLURM_ARRAY_JOB_ID']}_{environ.get('SLURM_ARRAY_TASK_ID', '')}"
    return environ.get("SLURM_JOB_ID") or None


# ---------------------------------------------------------------- executor


def _executor_class() -> type:
    from submitit.slurm.slurm import SlurmExecutor, SlurmJob

    class BoundedSlurmExecutor(BoundedSubmission, SlurmExecutor):
        """submitit's Slurm executor with a bounded sbatch."""

        _timeout_key = "time"

        def _array_jobs(self, first_job, n: int) -> list:
            tasks = list(range(first_job.num_tasks))
            return [SlurmJob(folder=self.folder, job_id=f"{first_job.job_id}_{a}", tasks=tasks) for a in range(n)]

    return BoundedSlurmExecutor


#: the job's id as submitit names it (`12345`, `12345_3` in an array), for scripts.fail_fast_setup
JOB_ID_LINE = ('hpcseg_job=${SLURM_ARRAY_JOB_ID:+${SLURM_ARRAY_JOB_ID}_$SLURM_ARRAY_TASK_ID}; '
               'hpcseg_job=${hpcseg_job:-$SLURM_JOB_ID}')


def build_executor(plan, folder: Path, dry_run: bool = False):
    setup, python = list(plan.profile.setup), job_python(plan.profile.setup)
    ex = dry_run_class(_executor_class(), dry_run)(folder=folder, max_num_timeout=plan.profile.max_requeues,
                                                   python=python)
    params: dict[str, Any] = {"job_name": plan.experiment, "time": plan.minutes, "cpus_per_task": plan.cpus,
                              "mem": f"{int(plan.mem_gb)}GB" if plan.mem_gb == int(plan.mem_gb)
                              else f"{int(plan.mem_gb * 1024)}MB",
                              "signal_delay_s": plan.signal_delay_s, "array_parallelism": plan.max_parallel}
    if plan.queue:
        params["partition"] = plan.queue
    if plan.gpus:
        params["gpus_per_node"] = plan.gpus
    if plan.tasks_per_node > 1 or plan.nodes > 1:  # one training process per GPU on every node: srun starts them
        params.update(ntasks_per_node=plan.tasks_per_node, nodes=plan.nodes,
                      cpus_per_task=max(1, plan.cpus // plan.tasks_per_node))
    # submitit's template puts these lines before srun
    params["setup"] = fail_fast_setup(setup, python, folder, JOB_ID_LINE,
                                      plan.profile.name if plan.profile.path else "")
    ex.update_parameters(**params)
    return ex


def job_script(plan, folder: Path, n_elements: int) -> str:
    return submission_text(build_executor(plan, folder, dry_run=True), n_elements)
