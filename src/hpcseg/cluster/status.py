"""`hpcseg status`: one scheduler query per backend for all runs, merged with each run's own files.

The scheduler says what it knows (PENDING, RUNNING, ...); the run folder says what the job itself wrote
(`outcome.json` at the end, `progress.json` every epoch, `attempts.jsonl` at each start, `cancelled.json` from
`hpcseg cancel`, submitit's result file). A job the scheduler has forgotten (LSF after its clean period, Slurm
without accounting) still shows COMPLETED or FAILED from its files; a scheduler command that fails or hangs
(bounded by $HPCSEG_SCHEDULER_TIMEOUT_S, default 10 s) leaves UNKNOWN only where the files know nothing, and
its error is in each affected run's `scheduler_error`. An answer hpcseg cannot read (a state it does not know,
bytes that are no job's line) is a warning naming the command and what it printed, also in the
`scheduler_warning` of each run left UNKNOWN.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import asdict, dataclass
from typing import Iterable

from ..durations import clock
from ..errors import CommandError
from ..invocation import hpcseg_command
from .backends import BACKENDS
from .runs import (CANCELLED, OUTCOME, OUTCOME_FIELDS, PROGRESS, PROGRESS_FIELDS, TRAIN_RECORD, NotTrusted, Run,
                   read_owned)
from .scripts import CANCEL_EXIT_CODES, EXIT_CODE_SUFFIX, SETUP_FAILED_SUFFIX

STATES = ("PENDING", "RUNNING", "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "REQUEUED", "UNKNOWN")
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}
#: A job the scheduler does not list yet (array elements right after submitting) counts as PENDING this long.
GRACE_S = 60


def scheduler_timeout_s() -> float:
    try:
        return float(os.environ.get("HPCSEG_SCHEDULER_TIMEOUT_S", "10"))
    except ValueError:
        return 10.0


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
    #: the scheduler's answer held something hpcseg cannot read (a state it does not know, garbage), where the
    #: run's state is UNKNOWN: the warnings `status` prints, for `status --json`
    scheduler_warning: str | None = None
    gpus: int | None = None  # per node, as submitted; 0 where the training ran on the CPU (its train.json says)
    nodes: int | None = None
    processes: int | None = None  # training processes per node
    fold: int | None = None  # the cross-validation fold of a `submit --folds` run (its run id ends in -f<fold>)

    def to_dict(self) -> dict:
        return asdict(self)


def exit_code(run: Run) -> int | None:
    """The exit code the batch script wrote to `<submitit_dir>/<job_id>_exitcode` (LSF's does), or None."""
    if not run.job_id:
        return None
    try:
        text = read_owned(run.submitit_dir / f"{run.job_id}{EXIT_CODE_SUFFIX}", 64).decode(errors="replace").strip()
    except (NotTrusted, OSError):
        return None
    return int(text) if re.fullmatch(r"-?\d{1,4}", text) else None


def _see_logs(run: Run) -> str:
    return f"see {hpcseg_command('logs', '--err', run.run_id)}"


def setup_failure(run: Run) -> str | None:
    """The line a job script wrote when a set-up line (or its python's `import hpcseg`) failed, or None."""
    if not run.job_id:
        return None
    try:
        text = read_owned(run.submitit_dir / f"{run.job_id}{SETUP_FAILED_SUFFIX}", 4096).decode(errors="replace")
    except (NotTrusted, OSError):
        return None
    return text.strip().splitlines()[0] if text.strip() else None


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
    elif (failed_setup := setup_failure(run)) is not None:  # the job ended before Python ran
        state, error = "FAILED", failed_setup
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
        error = getattr(sched, "reason", None) if state != "CANCELLED" else None  # the scheduler's kill, if it says
    elif sched == "COMPLETED":  # the script ended but the runner wrote no outcome
        state = "CANCELLED" if cancelled else "FAILED"
        error = f"the job ended without writing its outcome ({_see_logs(run)})"
    elif cancelled:
        state = "CANCELLED"
    elif has_result:
        state = "FAILED"
        error = f"the job ended without writing its outcome ({_see_logs(run)})"
    elif (code := exit_code(run)) is not None:  # LSF has forgotten the job; its batch script left this
        state = "CANCELLED" if code in CANCEL_EXIT_CODES else "FAILED"
        error = f"the job exited with code {code} without writing its outcome ({_see_logs(run)})"
    elif sched_failed:
        state = "UNKNOWN"
    elif run.executor in BACKENDS and BACKENDS[run.executor].runs_here:  # gone, left nothing: it was killed
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
                     sweep=run.record.get("sweep") or {}, path=str(run.path), damage=list(run.damage),
                     fold=_fold(run.record), **_resources(run))


def _fold(record: dict) -> int | None:
    fold = record.get("fold")
    return fold if isinstance(fold, int) and not isinstance(fold, bool) else None


def _resources(run: Run) -> dict:
    """The GPUs and training processes per node and the nodes of the run: as run.json says it was submitted (None
    where it says no number), but no GPU where the training says it ran on the CPU (a local job on a machine
    without one trains there in one process per GPU asked)."""
    res = run.record.get("resources")
    res = res if isinstance(res, dict) else {}

    def count(key: str, default: int | None) -> int | None:
        value = res.get(key, default)
        return value if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 4096 else None

    gpus = count("gpus", None)
    processes = count("processes", None) or (max(gpus, 1) if gpus is not None else None)  # one per GPU asked
    if gpus and (run.read_json(TRAIN_RECORD, {"device": str}) or {}).get("device") == "cpu":
        gpus = 0
    return {"gpus": gpus, "nodes": count("nodes", 1), "processes": processes}  # runs before --nodes had none


def collect_status(runs: Iterable[Run], timeout_s: float | None = None) -> tuple[list[RunStatus], list[str]]:
    """Status of every run, with one scheduler query per backend; returns (statuses, warnings)."""
    runs = list(runs)
    timeout_s = scheduler_timeout_s() if timeout_s is None else timeout_s
    now = time.time()
    warnings: list[str] = []
    sched: dict[str, str | None] = {}
    failed: dict[str, str] = {}  # run id -> why its scheduler could not be asked
    noted: dict[str, list[str]] = {}  # run id -> the warnings of its scheduler's answer

    def unfinished(executor: str) -> list[Run]:
        # runs whose outcome is written need no scheduler: ask only about the others
        return [r for r in runs if r.executor == executor and r.job_id and not (r.path / OUTCOME).exists()]

    for name, backend in BACKENDS.items():
        asked = unfinished(name)
        if not asked:
            continue
        try:
            states, notes = backend.query_states(asked, timeout_s)
        except CommandError as err:
            warnings.append(f"{backend.title}: {err}")
            failed.update((r.run_id, str(err)) for r in asked)
            continue
        warnings += notes
        sched.update((r.run_id, states.get(r.job_id)) for r in asked)
        noted.update((r.run_id, notes) for r in asked if notes)
    statuses = [merge(r, sched.get(r.run_id), r.run_id in failed, now) for r in runs]
    for s in statuses:
        s.scheduler_error = failed.get(s.run_id)
        if s.state == "UNKNOWN" and noted.get(s.run_id):
            s.scheduler_warning = "; ".join(noted[s.run_id])
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


def _gpus_cell(s: RunStatus) -> str:
    """`2` GPUs per node (`2x3` on 3 nodes); `cpu`, `cpu x2` for a run that trains on the CPU in 2 processes."""
    if s.gpus is None:
        return "-"
    if s.gpus == 0:
        return "cpu" + (f" x{s.processes}" if s.processes and s.processes > 1 else "")
    return f"{s.gpus}x{s.nodes}" if s.nodes and s.nodes > 1 else str(s.gpus)


def printable(text: str) -> str:
    """A run record's text for the terminal: a control character (an escape sequence's start) shows as '?'."""
    return "".join(c if c.isprintable() else "?" for c in text)


def swept_keys(statuses: list[RunStatus]) -> list[str]:
    """The job keys any of the runs swept (their run records' sweep values), in the order first seen."""
    keys: dict[str, None] = {}
    for s in statuses:
        keys.update((str(k), None) for k in s.sweep)
    return list(keys)


def sweep_value(value) -> str:
    """A swept value as the user wrote it on the command line: 0.001, [4, 8], true."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    return printable(str(value))


def sort_statuses(statuses: list[RunStatus], by: str = "run") -> list[RunStatus]:
    """The runs grouped by experiment, and inside each by run id, by best validation Dice (best first, runs
    without one last) or by state."""
    def rank(s: RunStatus):
        if by == "dice":
            return (s.experiment, s.best_dice is None, -(s.best_dice or 0.0), s.run_id)
        if by == "state":
            return (s.experiment, s.state, s.run_id)
        return (s.experiment, s.run_id)

    return sorted(statuses, key=rank)


def format_table(statuses: list[RunStatus], now: float | None = None, sort: str = "run") -> str:
    now = time.time() if now is None else now
    statuses = sort_statuses(statuses, sort)
    swept = swept_keys(statuses)  # a column per swept key, after the experiment's name
    header = ["RUN", "EXPERIMENT", *map(printable, swept), "EXECUTOR", "JOB", "GPUS", "STATE", "EPOCH", "BEST DICE",
              "UPDATED", "LEFT"]
    rows = [header]
    for s in statuses:
        epoch = f"{s.epoch if s.epoch is not None else '-'}/{s.epochs if s.epochs is not None else '-'}"
        best = f"{s.best_dice:.4f} ({s.best_epoch})" if s.best_dice is not None else "-"
        updated = _age(now - s.updated) if s.updated else "-"
        gpus = _gpus_cell(s)
        values = [sweep_value(s.sweep[k]) if k in s.sweep else "-" for k in swept]
        rows.append([s.run_id, s.experiment, *values, s.executor, s.job_id or "-", gpus, s.state, epoch, best,
                     updated, clock(s.time_left_s) if s.time_left_s is not None and s.state not in TERMINAL else "-"])
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    for s in statuses:
        if s.error and s.state in ("FAILED", "TIMEOUT"):
            lines.append(f"{s.run_id}: {s.error.splitlines()[0][:200]}")
        lines += [f"{s.run_id}: damaged: {problem}" for problem in s.damage]
    return "\n".join(lines)
