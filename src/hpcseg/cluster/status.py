"""`hpcseg status`: one scheduler query per backend for all runs, merged with each run's own files.

The scheduler says what it knows (PENDING, RUNNING, ...); the run folder says what the job itself wrote
(`outcome.json` at the end, `progress.json` every epoch, `attempts.jsonl` at each start, `cancelled.json` from
`hpcseg cancel`, submitit's result file). A job the scheduler has forgotten (LSF after its clean period, Slurm
without accounting) still shows COMPLETED or FAILED from its files; a scheduler command that fails or hangs
(bounded by $HPCSEG_SCHEDULER_TIMEOUT_S, default 10 s) leaves UNKNOWN only where the files know nothing, and
its error is in each affected run's `scheduler_error`.
"""

from __future__ import annotations

import os
import pwd
import re
import time
from dataclasses import asdict, dataclass
from typing import Iterable

from ..errors import CommandError, run_command
from .runs import CANCELLED, OUTCOME, OUTCOME_FIELDS, PROGRESS, PROGRESS_FIELDS, NotTrusted, Run, my_uid, read_owned

STATES = ("PENDING", "RUNNING", "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "REQUEUED", "UNKNOWN")
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}
#: A job the scheduler does not list yet (array elements right after submitting) counts as PENDING this long.
GRACE_S = 60


def scheduler_timeout_s() -> float:
    try:
        return float(os.environ.get("HPCSEG_SCHEDULER_TIMEOUT_S", "10"))
    except ValueError:
        return 10.0


def my_user() -> str:
    """This user's name as schedulers report a job's owner (from the user id, not from $USER)."""
    try:
        return pwd.getpwuid(my_uid()).pw_name
    except KeyError:
        return str(my_uid())


#: exit codes in `<submitit_dir>/<job_id>_exitcode` of a job that was killed on request (128 + SIGINT, SIGTERM)
CANCEL_EXIT_CODES = (130, 143)


# ---------------------------------------------------------------- Slurm

_SLURM_MAP = {
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


def _parse_slurm_lines(text: str) -> dict[str, str]:
    """`JobID|Field` lines -> {job id: the field's first word} (array ranges expanded, job steps left out)."""
    states: dict[str, str] = {}
    for line in text.splitlines():
        job_id, _, state = line.strip().partition("|")
        if not job_id or "." in job_id:
            continue
        raw = state.split()[0] if state.split() else ""
        for jid in _expand_slurm_id(job_id):
            states[jid] = raw
    return states


def _sacct_or_squeue(parents: list[str], field: tuple[str, str], timeout_s: float) -> tuple[dict[str, str], str]:
    """One sacct call for `field` (sacct's name, squeue's %-letter) of the jobs `parents`; where sacct is
    unavailable, one squeue call. Returns ({job id: value}, source)."""
    try:
        out = run_command(["sacct", "-n", "-P", "-X", "-o", f"JobID,{field[0]}", "-j", ",".join(parents)],
                          timeout_s).stdout
        return _parse_slurm_lines(out), "sacct"
    except CommandError as sacct_err:
        try:
            out = run_command(["squeue", "-h", "-r", "--states=all", "-u", my_user(), "-o", f"%i|{field[1]}"],
                              timeout_s).stdout
        except CommandError as squeue_err:
            raise CommandError(f"{sacct_err}; {squeue_err}") from None
        wanted = set(parents)
        return {k: v for k, v in _parse_slurm_lines(out).items() if k.split("_")[0] in wanted}, "squeue"


def query_slurm(job_ids: list[str], timeout_s: float) -> tuple[dict[str, str], str]:
    """Raw Slurm state per job id ('123' or '123_4'), from ONE sacct call; where sacct is unavailable
    (accounting disabled, command missing), from one squeue call. Returns (states, source)."""
    return _sacct_or_squeue(sorted({j.split("_")[0] for j in job_ids}), ("State", "%T"), timeout_s)


# ---------------------------------------------------------------- LSF


def query_lsf_states(job_ids: list[str], timeout_s: float) -> dict[str, str]:
    from .lsf import query_lsf

    try:
        infos = query_lsf(job_ids, timeout_s=timeout_s)
    except Exception as err:  # bjobs failed, hung, or printed what the plugin cannot read
        message = " ".join(str(err).split())[:200]
        raise CommandError(message if message.startswith("bjobs") else f"bjobs: {message}") from None
    return {str(k): v.state for k, v in infos.items()}


def job_owners(executor: str, job_ids: list[str], timeout_s: float) -> dict[str, str]:
    """The user who owns each job as the scheduler reports it ({job id: user}); jobs it does not know are
    absent. Raises CommandError where the scheduler cannot be asked."""
    parents = sorted({j.split("_")[0] for j in job_ids})
    if executor == "slurm":
        users, _ = _sacct_or_squeue(parents, ("User", "%u"), timeout_s)
    else:  # lsf: bjobs exits non-zero when some job is not found, which only leaves that job unconfirmed
        proc = run_command(["bjobs", "-noheader", "-o", "jobid user delimiter=','", *parents], timeout_s,
                           check=False)
        users = dict(line.strip().split(",", 1) for line in proc.stdout.splitlines() if line.count(",") == 1)
    by_parent = {k.split("_")[0]: v.strip() for k, v in users.items()}
    return {j: by_parent[j.split("_")[0]] for j in job_ids if j.split("_")[0] in by_parent}


_LSF_MAP = {"SUSPENDED": "PENDING"}


# ---------------------------------------------------------------- local


def local_alive(pid_text: str | None, folder: str) -> bool:
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


# ---------------------------------------------------------------- merging


@dataclass
class RunStatus:
    run_id: str
    experiment: str
    executor: str
    job_id: str | None
    state: str
    scheduler_state: str | None
    epoch: int | None
    epochs: int | None
    best_dice: float | None
    best_epoch: int | None
    updated: float | None
    time_left_s: float | None
    error: str | None
    sweep: dict
    path: str
    damage: list[str]
    scheduler_error: str | None = None  # the scheduler could not be asked: the state is from the files only

    def to_dict(self) -> dict:
        return asdict(self)


def exit_code(run: Run) -> int | None:
    """The exit code the LSF batch script wrote to `<submitit_dir>/<job_id>_exitcode`, or None."""
    if not run.job_id:
        return None
    try:
        text = read_owned(run.submitit_dir / f"{run.job_id}_exitcode", 64).decode(errors="replace").strip()
    except (NotTrusted, OSError):
        return None
    return int(text) if re.fullmatch(r"-?\d{1,4}", text) else None


def merge(run: Run, sched: str | None, sched_failed: bool, now: float) -> RunStatus:
    """The run's state from the scheduler's (normalised) state and its own files."""
    if not run.trusted:  # another user's folder: nothing in it is read
        return RunStatus(run_id=run.run_id, experiment=run.experiment, executor="?", job_id=None, state="UNKNOWN",
                         scheduler_state=None, epoch=None, epochs=None, best_dice=None, best_epoch=None,
                         updated=None, time_left_s=None, error=None, sweep={}, path=str(run.path),
                         damage=list(run.damage))
    outcome = run.read_json(OUTCOME, OUTCOME_FIELDS)
    progress = run.read_json(PROGRESS, PROGRESS_FIELDS) or {}
    cancelled = (run.path / CANCELLED).exists()
    result = run.result_file()
    has_result = bool(result and result.exists())
    attempts = run.attempts()
    last_event = attempts[-1].get("event") if attempts else None
    error = None
    if outcome and outcome.get("state") in TERMINAL:
        state = outcome["state"]
        error = outcome.get("error")
    elif sched in ("RUNNING", "PENDING", "REQUEUED"):
        state = sched
        if sched == "PENDING" and last_event in ("checkpoint", "requeued"):
            state = "REQUEUED"  # saved its state on the warning signal and waits to run again
        elif sched == "PENDING" and last_event == "start":
            state = "RUNNING"  # it has started since the scheduler's answer was made
        if cancelled and state == "PENDING":
            state = "CANCELLED"
    elif sched in ("CANCELLED", "TIMEOUT", "FAILED"):
        # a job killed on `hpcseg cancel` may end as FAILED (its exit code): the user cancelled it
        state = "CANCELLED" if cancelled and sched == "FAILED" else sched
    elif sched == "COMPLETED":  # the script ended but the runner wrote no outcome
        state = "CANCELLED" if cancelled else "FAILED"
        error = "the job ended without writing its outcome (see hpcseg logs --err)"
    elif cancelled:
        state = "CANCELLED"
    elif has_result:
        state = "FAILED"
        error = "the job ended without writing its outcome (see hpcseg logs --err)"
    elif (code := exit_code(run)) is not None:  # LSF has forgotten the job; its batch script left this
        state = "CANCELLED" if code in CANCEL_EXIT_CODES else "FAILED"
        error = f"the job exited with code {code} without writing its outcome (see hpcseg logs --err)"
    elif sched_failed:
        state = "UNKNOWN"
    elif run.executor == "local":  # the process is gone and left nothing: it was killed
        state = "FAILED"
        error = "the job's process ended without writing its outcome"
    elif now - float(run.record.get("submit_time") or 0) < GRACE_S and not attempts:
        state = "PENDING"  # not listed yet
    else:
        state = "UNKNOWN"
    epoch, epochs = progress.get("epoch"), progress.get("epochs") or run.record.get("epochs")
    spe = progress.get("seconds_per_epoch")
    left = None
    if state in ("RUNNING", "REQUEUED", "PENDING") and spe and epoch is not None and epochs:
        left = max(0.0, (epochs - epoch) * spe)
    elif state == "COMPLETED":
        left = 0.0
    return RunStatus(run_id=run.run_id, experiment=run.experiment, executor=run.executor, job_id=run.job_id,
                     state=state, scheduler_state=sched, epoch=epoch, epochs=epochs,
                     best_dice=progress.get("best_dice"), best_epoch=progress.get("best_epoch"),
                     updated=progress.get("updated"), time_left_s=left, error=error,
                     sweep=run.record.get("sweep") or {}, path=str(run.path), damage=list(run.damage))


def collect_status(runs: Iterable[Run], timeout_s: float | None = None) -> tuple[list[RunStatus], list[str]]:
    """Status of every run, with one scheduler query per backend; returns (statuses, warnings)."""
    runs = list(runs)
    timeout_s = scheduler_timeout_s() if timeout_s is None else timeout_s
    now = time.time()
    warnings: list[str] = []
    sched: dict[str, str | None] = {}
    failed: dict[str, str] = {}  # run id -> why its scheduler could not be asked

    def unfinished(executor: str) -> list[Run]:
        # runs whose outcome is written need no scheduler: ask only about the others
        return [r for r in runs if r.executor == executor and r.job_id and not (r.path / OUTCOME).exists()]

    slurm_runs = unfinished("slurm")
    if slurm_runs:
        try:
            states, source = query_slurm([r.job_id for r in slurm_runs], timeout_s)
            for r in slurm_runs:
                raw = states.get(r.job_id)
                sched[r.run_id] = _SLURM_MAP.get(raw, "UNKNOWN") if raw else None
            if source != "sacct":
                warnings.append("sacct unavailable: Slurm states from squeue and the runs' own files")
        except CommandError as err:
            warnings.append(f"Slurm: {err}")
            failed.update((r.run_id, str(err)) for r in slurm_runs)
    lsf_runs = unfinished("lsf")
    if lsf_runs:
        try:
            states = query_lsf_states([r.job_id for r in lsf_runs], timeout_s)
            for r in lsf_runs:
                raw = states.get(r.job_id)
                sched[r.run_id] = _LSF_MAP.get(raw, raw) if raw else None
        except CommandError as err:
            warnings.append(f"LSF: {err}")
            failed.update((r.run_id, str(err)) for r in lsf_runs)
    for r in unfinished("local"):
        sched[r.run_id] = "RUNNING" if local_alive(r.job_id, str(r.submitit_dir)) else None
    statuses = [merge(r, sched.get(r.run_id), r.run_id in failed, now) for r in runs]
    for s in statuses:
        s.scheduler_error = failed.get(s.run_id)
    return statuses, warnings


# ---------------------------------------------------------------- table


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f}s ago"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f}m ago"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f}h ago"
    return f"{seconds / 86400:.0f}d ago"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


def format_table(statuses: list[RunStatus], now: float | None = None) -> str:
    now = time.time() if now is None else now
    header = ["RUN", "EXPERIMENT", "EXECUTOR", "JOB", "STATE", "EPOCH", "BEST DICE", "UPDATED", "LEFT"]
    rows = [header]
    for s in statuses:
        epoch = f"{s.epoch if s.epoch is not None else '-'}/{s.epochs if s.epochs is not None else '-'}"
        best = f"{s.best_dice:.4f} ({s.best_epoch})" if s.best_dice is not None else "-"
        updated = _age(now - s.updated) if s.updated else "-"
        rows.append([s.run_id, s.experiment, s.executor, s.job_id or "-", s.state, epoch, best, updated,
                     _duration(s.time_left_s) if s.state not in TERMINAL else "-"])
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    for s in statuses:
        if s.error and s.state in ("FAILED", "TIMEOUT"):
            lines.append(f"{s.run_id}: {s.error.splitlines()[0][:200]}")
        lines += [f"{s.run_id}: damaged: {problem}" for problem in s.damage]
    return "\n".join(lines)
