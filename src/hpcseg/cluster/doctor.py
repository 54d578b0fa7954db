"""`hpcseg doctor`: check a site in one job. Submits the node checks (DoctorRunner) and a walltime probe
(WalltimeProbe) with the site's profile and queue, as `submit` would, watches them, and prints one table.

What the table says comes from the job's own view of the node (doctor.json, written by hpcseg.doctor on the node)
and from what this side saw: whether the log grew while the job ran, and whether the probe was warned and requeued.
The table is also written as `report.json` in the check's run folder, to attach to a bug report.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import click

from ..atomic import atomic_write_text
from .. import versions
from ..doctor import REPORT, SPOOL_MARKER, SPOOL_SEEN, Row
from ..durations import hours_minutes
from ..errors import CommandError
from . import backends
from .cli import _ExecutorChoice
from .doctor_jobs import REQUEUED, DoctorRunner, WalltimeProbe
from .peek import peek
from .profiles import load_profile
from .runs import (ClusterError, Run, command_line, load_run, make_private_dir, new_run_id, read_owned,
                   remember_scratch, resolve_scratch, write_record)
from .scripts import refuse_control

EXPERIMENT = "hpcseg-doctor"
#: The probe's walltime: the shortest every scheduler accepts with a warning before it (LSF counts whole minutes).
PROBE_MINUTES = 2


@dataclass
class DoctorOptions:
    profile: str | None = None
    executor: str | None = None
    queue: str | None = None
    gpus: int | None = None
    cpus: int | None = None
    mem_gb: float | None = None
    time: str = "00:15"
    scratch: Path | None = None
    walltime_probe: bool = True
    timeout_s: float = 3600.0
    poll_s: float = 2.0


@dataclass
class Submitted:
    check: Run
    probe: Run | None
    rows: list[Row] = field(default_factory=list)


def _plan(opts: DoctorOptions, walltime: str):
    """A submission plan for one doctor job, its resources resolved as `submit` resolves a job's that sets none:
    the options, then the profile's [defaults], then hpcseg's."""
    from ..jobfile import Job
    from .resources import resolve
    from .submit import Plan, _check_scratch, _signal_delay, pick_executor

    profile = load_profile(opts.profile)
    executor = pick_executor(opts.executor, profile)
    res = resolve({"gpus": opts.gpus, "cpus": opts.cpus, "mem_gb": opts.mem_gb, "time": walltime,
                   "queue": opts.queue}, Job(), {}, profile, executor)
    scratch = resolve_scratch(opts.scratch, profile.scratch)
    refuse_control("--scratch", scratch)
    _check_scratch("--scratch" if opts.scratch else "scratch", scratch)
    delay = _signal_delay(executor, profile.signal_delay_s, res.minutes.value, res.minutes.name)
    plan = Plan(executor=executor, profile=profile, experiment=EXPERIMENT, scratch=scratch, queue=res.queue.value,
                gpus=res.gpus.value, cpus=res.cpus.value, mem_gb=res.mem_gb.value, minutes=res.minutes.value,
                max_parallel=1, signal_delay_s=delay, train_dir=scratch, val_dir=scratch, test_dir=None,
                resources=res)
    return _one_task(plan)


def _submit_one(plan, run_id: str, runner: Any, kind: str) -> Run:
    from .submit import _remove, build_executor, refusal

    run_dir = plan.scratch / plan.experiment / run_id
    made = make_private_dir(run_dir)
    try:
        record = {"run_id": run_id, "experiment": plan.experiment, "executor": plan.executor, "job_id": None,
                  "array_job_id": None, "sweep_id": None, "sweep": {}, "submit_time": time.time(),
                  "command_line": command_line(), "profile": plan.profile.name, "queue": plan.queue, "doctor": kind,
                  "resources": {"gpus": plan.gpus, "nodes": 1, "cpus": plan.cpus, "mem_gb": plan.mem_gb,
                                "time": hours_minutes(plan.minutes), "signal_delay_s": plan.signal_delay_s},
                  "submitit_dir": str(run_dir / "submitit")}
        run = Run(path=run_dir, record=record)
        write_record(run)
        job = build_executor(plan, run_dir / "submitit").submit(runner)
    except Exception as err:  # as submit: one line, and nothing of this run left behind
        _remove(made, [run_dir])
        raise refusal(err, plan.executor) from None
    run.record["job_id"] = str(job.job_id)
    write_record(run)
    return run


def submit_doctor(opts: DoctorOptions, echo: Callable[[str], None] = print) -> Submitted:
    # both plans are checked before anything is made or submitted
    plan = _plan(opts, opts.time)
    probe_plan = _plan(DoctorOptions(**{**opts.__dict__, "gpus": 0}), hours_minutes(PROBE_MINUTES)) \
        if opts.walltime_probe else None
    echo(plan.resources.line())
    expected = {"versions": versions.here(), "setup": list(plan.profile.setup), "mem_gb": plan.mem_gb,
                "ranks": plan.gpus if plan.gpus > 1 else 1, "spool_wait_s": 60}
    run_id = new_run_id()
    check = _submit_one(plan, run_id, DoctorRunner(expected, str(plan.scratch / EXPERIMENT / run_id)),
                        "checks")
    echo(f"submitted the checks: run {check.run_id}  job {check.job_id}  ({plan.executor})  {check.path}")
    probe = None
    if probe_plan is not None:
        pid = f"{run_id}-walltime"
        wait_s = PROBE_MINUTES * 60 + 60
        probe = _submit_one(probe_plan, pid, WalltimeProbe(str(probe_plan.scratch / EXPERIMENT / pid), wait_s),
                            "walltime")
        echo(f"submitted the walltime probe ({PROBE_MINUTES} min, warned {probe_plan.signal_delay_s} s before): "
             f"run {probe.run_id}  job {probe.job_id}")
    remember_scratch(plan.scratch)
    return Submitted(check=check, probe=probe)


def _one_task(plan):
    """The plan with one task whatever its GPUs: the checks start the ranks of their all-reduce themselves."""
    from .submit import Plan

    class OneTask(Plan):
        tasks_per_node = 1  # shadows Plan's property: one training process per GPU is not what the checks want

    return OneTask(**{k: getattr(plan, k) for k in plan.__dataclass_fields__})


def watch(sub: Submitted, opts: DoctorOptions, echo: Callable[[str], None] = print) -> list[Row]:
    """Wait for both jobs, answering the check job's log marker while it runs; then build the rows."""
    from .status import TERMINAL, collect_status

    runs = [r for r in (sub.check, sub.probe) if r is not None]
    deadline = time.monotonic() + opts.timeout_s
    states: dict[str, str] = {}
    while True:
        fresh = [load_run(r.path) or r for r in runs]
        statuses, _ = collect_status(fresh)
        states = {s.run_id: s.state for s in statuses}
        if states.get(sub.check.run_id) == "RUNNING" and not (sub.check.path / SPOOL_SEEN).exists():
            where = _marker_seen(fresh[0])
            if where:
                atomic_write_text(sub.check.path / SPOOL_SEEN, where + "\n")
        if all(state in TERMINAL for state in states.values()):
            break
        if time.monotonic() > deadline:
            echo(f"hpcseg: warning: doctor: gave up waiting after {opts.timeout_s:g} s; the jobs may still run")
            break
        time.sleep(opts.poll_s)
    return rows_for(sub, states)


def _marker_seen(run: Run) -> str | None:
    """Where this side sees the check job's first line while it runs: "log", "peek" (the scheduler's peek command,
    where it spools the log until the job ends), or None (not yet)."""
    log = run.log_path()
    try:
        if log is not None and SPOOL_MARKER.encode() in read_owned(log, limit=1 << 20):
            return "log"
    except (OSError, ClusterError):
        pass
    command = backends.BACKENDS[run.executor].peek_command(str(run.job_id), follow=False)
    if command is None:
        return None
    shown: list[str] = []
    try:
        peek(command, shown.append, timeout_s=30)
    except CommandError:
        return None
    return "peek" if SPOOL_MARKER in "".join(shown) else None


def rows_for(sub: Submitted, states: dict[str, str]) -> list[Row]:
    rows = [Row("check job", states.get(sub.check.run_id) == "COMPLETED",
                f"{sub.check.executor} job {sub.check.job_id}: {states.get(sub.check.run_id, 'UNKNOWN')}",
                "" if states.get(sub.check.run_id) == "COMPLETED" else f"see hpcseg logs {sub.check.run_id}")]
    try:
        report = json.loads(read_owned(sub.check.path / REPORT))
        rows += [Row(**{k: item.get(k) for k in ("check", "ok", "value", "detail")}) for item in report["rows"]]
        host = report.get("host", {}).get("host")
        if host:
            rows.insert(1, Row("node", None, str(host), str(report["host"].get("python", ""))))
    except (OSError, ClusterError, ValueError, KeyError, TypeError):
        rows.append(Row("node checks", False, "no doctor.json", "the check job did not get as far as writing it"))
    if sub.probe is not None:
        state = states.get(sub.probe.run_id, "UNKNOWN")
        requeued = (sub.probe.path / REQUEUED).exists()
        rows.append(Row("walltime warning", requeued and state == "COMPLETED",
                        f"{PROBE_MINUTES} min job: {'warned, requeued once, finished' if requeued else 'not requeued'}"
                        f" ({state})", "" if requeued else
                        f"the warning signal did not arrive or did not requeue: see hpcseg logs {sub.probe.run_id}"))
    return rows


def format_rows(rows: list[Row]) -> str:
    mark = {True: "ok", False: "PROBLEM", None: "-"}
    width = max(len(r.check) for r in rows)
    lines = []
    for row in rows:
        lines.append(f"{row.check:<{width}}  {mark[row.ok]:<7}  {row.value}")
        if row.detail:
            lines.append(f"{'':<{width}}  {'':<7}  {row.detail}")
    return "\n".join(lines)


def write_report(sub: Submitted, rows: list[Row]) -> Path:
    path = sub.check.path / "report.json"
    payload = {"command_line": command_line(), "check_run": sub.check.run_id,
               "probe_run": sub.probe.run_id if sub.probe else None, "versions_here": versions.here(),
               "rows": [row.__dict__ for row in rows]}
    atomic_write_text(path, json.dumps(payload, indent=2) + "\n")
    return path


def run_doctor(opts: DoctorOptions, echo: Callable[[str], None] = print) -> int:
    sub = submit_doctor(opts, echo)
    rows = watch(sub, opts, echo)
    echo(format_rows(rows))
    echo(f"report: {write_report(sub, rows)}")
    return 1 if any(row.ok is False for row in rows) else 0


@click.command()
@click.option("--profile", help="site profile: a name in hpc/ (dtu, slurm, sge, local) or a .toml file")
@click.option("--executor", type=_ExecutorChoice(), default=None, help="where to run (default: the profile's, else auto)")
@click.option("--queue", help="queue (LSF, Grid Engine) or partition (Slurm)")
@click.option("--gpus", type=int, help="GPUs for the check job; 2 or more also checks an all-reduce between ranks")
@click.option("--cpus", type=int, help="cores for the check job")
@click.option("--mem", "mem_gb", type=float, help="memory for the check job, GB (its limit is checked on the node)")
@click.option("--time", "walltime", default="00:15", show_default=True, help="walltime of the check job, HH:MM")
@click.option("--scratch", type=click.Path(path_type=Path), help="scratch folder (default: as submit's)")
@click.option("--no-walltime-probe", is_flag=True, help="skip the second job that must be warned and requeue once")
def doctor(profile, executor, queue, gpus, cpus, mem_gb, walltime, scratch, no_walltime_probe) -> None:
    """Check a site in one job: set-up lines, versions, memory limit, CUDA, a training step, the log, TMPDIR,
    the scratch file system and the walltime warning; prints a table (also in the run folder as report.json)."""
    opts = DoctorOptions(profile=profile, executor=executor, queue=queue, gpus=gpus, cpus=cpus, mem_gb=mem_gb,
                         time=walltime, scratch=scratch, walltime_probe=not no_walltime_probe)
    sys.exit(run_doctor(opts, echo=click.echo))
