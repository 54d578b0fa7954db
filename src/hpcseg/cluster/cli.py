"""The cluster commands, as plain click commands the main `hpcseg` group registers:

    from hpcseg.cluster.cli import cancel, collect, logs, status, submit
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import click

from ..invocation import hpcseg_command
from ..outdir import blocked
from ..runfiles import BEST
from .backends import BACKENDS, executor_names
from .over_ssh import where
from .runs import CANCELLED, ClusterError, NotTrusted, find_one_run, find_runs, open_owned, scratches_to_search

_SCRATCH_HELP = "scratch folder holding <experiment>/<run_id>/ (default: $HPCSEG_SCRATCH, else ./hpcseg-scratch " \
                "and the scratch folders earlier submits used)"


class _ExecutorChoice(click.Choice):
    """--executor's values, read from the backends table whenever they are used."""

    def __init__(self) -> None:
        super().__init__(executor_names())

    @property
    def choices(self) -> tuple[str, ...]:
        return executor_names()

    @choices.setter
    def choices(self, value) -> None:  # click's __init__ sets it; the table stays the source
        pass


_AUTO_ORDER = ", ".join(f"{b.title} where {b.detect} exists" for b in BACKENDS.values() if b.detect)


def _poll_interval() -> float:
    try:
        return float(os.environ.get("HPCSEG_POLL_S", "5"))
    except ValueError:
        return 5.0


# ---------------------------------------------------------------- submit


@click.command()
@where("submit")
@click.argument("job_file", type=click.Path(path_type=Path))
@click.option("--data", type=click.Path(path_type=Path), help="data folder holding the job's training/validation "
              "(and test) folders; default: the current folder")
@click.option("--executor", type=_ExecutorChoice(), default=None, help="where to run: auto picks the first "
              f"scheduler whose command is here ({_AUTO_ORDER}), else this machine")
@click.option("--queue", help="queue (LSF, Grid Engine) or partition (Slurm); default: the profile's queue")
@click.option("--gpus", type=int, help="GPUs per node, one training process each (data-parallel when more than 1)"
              "; default: the job's resources.gpus, else the profile's [defaults], else 1")
@click.option("--nodes", type=int, default=1, show_default=True, help="nodes, each with --gpus GPUs (Slurm)")
@click.option("--cpus", type=int, help="CPU cores per job (per node), shared by its training processes; default "
              "as --gpus")
@click.option("--mem", "mem_gb", type=float, help="memory per job, GB; default as --gpus")
@click.option("--time", "walltime", help="walltime HH:MM, or a number of minutes (90 is 01:30); default as --gpus")
@click.option("--profile", help="site profile: a name in hpc/ (dtu, slurm, sge, local) or a .toml file; LSF, Slurm, "
              "Grid Engine or this machine, its queues, set-up lines and [defaults]")
@click.option("--scratch", type=click.Path(path_type=Path), help="scratch folder for run folders "
              "(default: $HPCSEG_SCRATCH, the profile's, ./hpcseg-scratch)")
@click.option("--name", help="experiment name (default: the job's name)")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="override a job key, e.g. train.epochs=3")
@click.option("--sweep", "sweeps", multiple=True, metavar="KEY=V1,V2,...",
              help="sweep a key; several --sweep make a grid, submitted as one job array")
@click.option("--max-parallel", type=int, help="at most this many array elements run at once")
@click.option("--folds", is_flag=True, help="cross-validation: a run per fold of --data's folds.json (each sweep "
              "setting x each fold), one job array")
@click.option("--dry-run", is_flag=True, help="print the job script(s) and submit nothing")
@click.option("--wait", is_flag=True, help="block until the submitted runs end, then print their status")
def submit(job_file, data, executor, queue, gpus, nodes, cpus, mem_gb, walltime, profile, scratch, name, overrides,
           sweeps, max_parallel, folds, dry_run, wait) -> None:
    """Submit JOB_FILE as a batch job (one run folder per job; a sweep is one job array)."""
    from .status import format_table
    from .submit import SubmitOptions
    from .submit import submit as do_submit

    opts = SubmitOptions(job_file=job_file, data=data, executor=executor, queue=queue, gpus=gpus, nodes=nodes,
                         cpus=cpus, mem_gb=mem_gb, time=walltime, profile=profile, scratch=scratch, name=name,
                         overrides=tuple(overrides), sweeps=tuple(sweeps), max_parallel=max_parallel,
                         dry_run=dry_run, folds=folds)
    result = do_submit(opts, echo=click.echo)
    click.get_current_context().meta["hpcseg.answer"] = {  # what a `submit --host` remembers on the laptop
        "runs": [{"run_id": r.run_id, "experiment": r.experiment, "path": str(r.path)} for r in result.runs]}
    if wait and result.runs:
        try:
            statuses, runs = _wait_for(result.runs)
        except KeyboardInterrupt:  # only the waiting stops: the job is the scheduler's (or its own session's)
            click.echo(_still_running(result.runs), err=True)
            sys.exit(130)
        click.echo(format_table(statuses))
        _echo_cross_validation(runs, statuses)
        _echo_test_results([(run.run_id, run.path / "test") for run in runs])
        if any(s.state != "COMPLETED" for s in statuses):
            sys.exit(1)


def _wait_for(submitted: list) -> tuple[list, list]:
    """Poll until every run has ended, with a line whenever one moves on; returns (statuses, runs)."""
    from .runs import load_run
    from .status import TERMINAL, collect_status

    interval, shown = min(_poll_interval(), 2.0), ""
    while True:
        runs = [load_run(r.path) or r for r in submitted]
        statuses, _ = collect_status(runs)
        if all(s.state in TERMINAL for s in statuses):
            return statuses, runs
        line = "waiting: " + ", ".join(_progress(s) for s in statuses)
        if line != shown:  # a line whenever a run moves on, so the wait is not silent
            click.echo(line)
            shown = line
        time.sleep(interval)


def _still_running(runs: list) -> str:
    """What Ctrl-C in `submit --wait` leaves: the jobs, and the commands that follow and end them."""
    selector = runs[0].run_id if len(runs) == 1 else os.path.commonprefix([r.run_id for r in runs]).rstrip("-")
    what = f"run {selector} (job {runs[0].job_id})" if len(runs) == 1 else f"the {len(runs)} runs of sweep {selector}"
    return (f"hpcseg: interrupted; stopped waiting, {what} still {'runs' if len(runs) == 1 else 'run'}\n"
            f"  follow it:  {hpcseg_command('status', selector)}\n"
            f"  end it:     {hpcseg_command('cancel', selector)}")


def _echo_test_results(folders: list[tuple[str, Path]]) -> None:
    """The Dice table of each run's test and where its overlay PNGs are: what a user looks at first."""
    from .collect import dice_lines

    for run_id, folder in folders:
        lines = dice_lines(folder)
        if lines:
            click.echo(f"\n{run_id}: " + "\n".join(lines))


def _echo_cross_validation(runs, statuses) -> None:
    """Under the table: a line per cross-validation (the folds of an experiment or of a swept setting)."""
    from .crossval import cv_lines

    for line in cv_lines(runs, statuses):
        click.echo(line)


def _progress(s) -> str:
    epoch = f" epoch {s.epoch}/{s.epochs}" if s.epoch else ""
    best = f" best Dice {s.best_dice:.3f}" if s.best_dice is not None else ""
    return f"{s.run_id} {s.state}{epoch}{best}"


# ---------------------------------------------------------------- status


@click.command()
@where("status")
@click.argument("selectors", nargs=-1, metavar="[RUN_OR_EXPERIMENT]...")
@click.option("--scratch", type=click.Path(path_type=Path), help=_SCRATCH_HELP)
@click.option("--json", "as_json", is_flag=True, help="print a JSON list of objects instead of the table (a run "
              "whose scheduler could not be asked has its error in scheduler_error; one left UNKNOWN by an answer "
              "hpcseg cannot read, the warning in scheduler_warning)")
@click.option("--watch", is_flag=True, help="refresh until every run has ended or is damaged (Ctrl-C to stop)")
@click.option("--sort", type=click.Choice(["run", "dice", "state"]), default="run", show_default=True,
              help="order of each experiment's runs: by run id, best validation Dice (best first) or state")
def status(selectors, scratch, as_json, watch, sort) -> None:
    """State, epoch, best validation Dice and time left of runs (one scheduler query per backend), with a column
    per swept key."""
    from .status import TERMINAL, collect_status, format_table, sort_statuses

    scratches = scratches_to_search(scratch)
    while True:
        runs = find_runs(selectors, scratches)
        statuses, warnings = collect_status(runs)
        if watch and sys.stdout.isatty() and not as_json:
            click.clear()
        for warning in warnings:  # on stderr with --json too (each UNKNOWN run's are in its scheduler_warning)
            click.echo(f"hpcseg: warning: {warning}", err=True)
        if as_json:
            click.echo(json.dumps([s.to_dict() for s in sort_statuses(statuses, sort)], indent=1))
        else:
            click.echo(format_table(statuses, sort=sort) if statuses else
                       f"no runs under {', '.join(map(str, scratches))}")
            _echo_cross_validation(runs, statuses)
        if not watch or all(s.state in TERMINAL or s.damage for s in statuses):  # a damaged run will not change
            return
        try:
            time.sleep(_poll_interval())
        except KeyboardInterrupt:
            return
        if not as_json:
            click.echo("")


# ---------------------------------------------------------------- collect


@click.command()
@where("collect")
@click.argument("selectors", nargs=-1, metavar="[RUN_OR_EXPERIMENT]...")
@click.option("--dest", type=click.Path(path_type=Path), default=Path("collected"), show_default=True,
              help="copy into DEST/<run_id>/")
@click.option("--top", type=int, help="only the K runs with the best validation Dice")
@click.option("--scratch", type=click.Path(path_type=Path), help=_SCRATCH_HELP)
@click.option("--ensemble", is_flag=True, help="the folds of one cross-validation (submit --folds) as one ensemble "
              "folder, DEST/<experiment>-ensemble/, that test and predict take as a run")
def collect(selectors, dest, top, scratch, ensemble) -> None:
    """Copy best checkpoint, job, metrics, test summary and a training-curve PNG, with verified SHA256SUMS."""
    from .collect import JOB_TEST, collect_run, pick_top
    from .status import collect_status

    if top is not None and top < 1:
        raise ClusterError(f"--top {top}: must be at least 1")
    problem = blocked(dest)
    if problem:
        raise ClusterError(f"--dest {problem}")
    runs = find_runs(selectors, scratches_to_search(scratch))
    if not runs:
        raise ClusterError("no runs to collect")
    if ensemble:
        _collect_ensemble(runs, dest, top)
        return
    if top is not None:
        statuses, _ = collect_status(runs)
        dice = {s.path: s.best_dice for s in statuses}
        runs = pick_top([(r, dice.get(str(r.path))) for r in runs], top)
    done, skipped, failed = 0, [], 0
    for run in runs:
        if run.trusted and not os.path.lexists(run.path / BEST):
            skipped.append(run.run_id)
            continue
        try:
            info = collect_run(run, dest)
        except ClusterError as err:  # a damaged run: said in one line, and the others are still collected
            err.show()
            failed += 1
            continue
        done += 1
        kept = f", {len(info['kept'])} unchanged" if info["kept"] else ""
        click.echo(f"{run.run_id}: {len(info['copied'])} files copied{kept}, SHA256SUMS verified -> {info['dest']}")
        _echo_test_results([(run.run_id, Path(info["dest"]) / JOB_TEST)])
    for run_id in skipped:
        click.echo(f"{run_id}: no best checkpoint yet, skipped", err=True)
    if failed:
        sys.exit(ClusterError.exit_code)
    if not done:
        raise ClusterError("no run has a best checkpoint yet")


def _collect_ensemble(runs, dest: Path, top) -> None:
    from .collect_ensemble import collect_ensemble
    from .status import collect_status

    if top is not None:
        raise ClusterError("--top with --ensemble: an ensemble holds every fold")
    statuses, _ = collect_status(runs)
    info = collect_ensemble(runs, {s.run_id: s.state for s in statuses}, dest)
    folds = ", ".join(f"fold {f['fold']} {f['run_id']} (epoch {f['best_epoch']})" for f in info["folds"])
    click.echo(f"{len(info['folds'])} folds' best weights ({folds}), SHA256SUMS verified -> {info['dest']}")
    click.echo(info["line"])


# ---------------------------------------------------------------- report


@click.command()
@click.argument("selectors", nargs=-1, required=True, metavar="EXPERIMENT...")
@click.option("--out", type=click.Path(path_type=Path), default=Path("report.html"), show_default=True,
              help="the HTML file to write (self-contained: opens offline)")
@click.option("--scratch", type=click.Path(path_type=Path), help=_SCRATCH_HELP)
def report(selectors, out, scratch) -> None:
    """One HTML page comparing runs: an experiment, run or sweep id, or a folder (an experiment's, a run's, or one
    `hpcseg collect` wrote)."""
    from ..report import write_report

    problem = blocked(out.parent if str(out.parent) else Path("."))
    if problem:
        raise ClusterError(f"--out {problem}")
    if out.is_dir():
        raise ClusterError(f"--out {out}: a folder; give a file name such as {out / 'report.html'}")
    path, count = write_report(list(selectors), scratches_to_search(scratch), out)
    click.echo(f"wrote {path}: {count} runs")


# ---------------------------------------------------------------- cancel


@click.command()
@where("cancel")
@click.argument("selectors", nargs=-1, required=True, metavar="RUN...")
@click.option("--scratch", type=click.Path(path_type=Path), help=_SCRATCH_HELP)
def cancel(selectors, scratch) -> None:
    """Cancel runs (a run id, a sweep id or an experiment name): only jobs of this user, from run folders of
    this user."""
    from .status import TERMINAL, collect_status

    runs = find_runs(selectors, scratches_to_search(scratch))
    statuses, _ = collect_status(runs)
    refused: list[str] = []
    live = []
    for r, s in zip(runs, statuses):
        if not r.trusted:
            refused.append(f"{r.run_id}: not cancelled: {r.damage[0]}")
        elif s.state in TERMINAL:
            click.echo(f"{r.run_id}: already {s.state}")
        elif not r.job_id:
            click.echo(f"{r.run_id}: no job id recorded, nothing to cancel ({_why_no_job_id(r)})", err=True)
        else:
            live.append(r)
    by_exec: dict[str, list] = {}
    for r in live:
        by_exec.setdefault(r.executor, []).append(r)
    try:
        _cancel_groups(by_exec, refused)
    finally:  # also when a scheduler's cancel command fails: the runs refused before are named
        for line in refused:
            ClusterError(line).show()
    if refused:
        sys.exit(ClusterError.exit_code)


def _cancel_groups(by_exec: dict[str, list], refused: list[str]) -> None:
    """Cancel each executor's runs; a run that is not cancelled gets a line in `refused`."""
    from ..errors import CommandError
    from .runs import mark_cancelled, my_user
    from .status import scheduler_timeout_s

    me = my_user()
    for executor, group in by_exec.items():
        backend = BACKENDS.get(executor)
        if backend is None:  # a run.json from another tool or version: nothing here knows how to cancel it
            refused += [f"{r.run_id}: not cancelled: its run.json names executor {executor!r}, which hpcseg does "
                        f"not know (job id {r.job_id})" for r in group]
            continue
        # a run.json names a job id; the scheduler must say the job is this user's before it is cancelled
        try:
            owners, why = backend.job_owners(group, scheduler_timeout_s()), None
        except CommandError as err:
            owners, why = {}, f"the scheduler could not say whose it is ({err})"
        mine = []
        for r in group:
            owner = owners.get(r.job_id)
            if owner == me:
                mine.append(r)
                continue
            reason = why or (f"{executor} does not list it" if owner is None else f"{executor} says it is {owner}'s")
            refused.append(f"{r.run_id}: not cancelled: job {r.job_id} is not confirmed as yours ({me}): {reason}")
        if not mine:
            continue
        backend.cancel(mine, 30)
        for r in mine:
            mark_cancelled(r.path / CANCELLED)
            click.echo(f"{r.run_id}: cancelled job {r.job_id} ({executor})")


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _log_size(path: Path) -> int:
    try:
        return path.stat().st_size if not path.is_symlink() else -1
    except OSError:
        return 0


def _peek_command(run, follow: bool) -> list[str] | None:
    """The scheduler's command that shows a running job's held-back output (bpeek), where the run's job runs."""
    from .status import collect_status

    backend = BACKENDS.get(run.executor)
    if backend is None or not run.job_id:
        return None
    statuses, _ = collect_status([run])
    return backend.peek_command(run.job_id, follow) if statuses[0].state == "RUNNING" else None


def _why_no_job_id(run) -> str:
    return f"damaged: {run.damage[0]}" if run.damage else "the submission did not complete"


# ---------------------------------------------------------------- logs


@click.command()
@where("logs")
@click.argument("run_selector", metavar="RUN")
@click.option("--err", "stderr", is_flag=True, help="standard error instead of standard output")
@click.option("--follow", is_flag=True, help="keep printing new lines until the job ends (Ctrl-C to stop)")
@click.option("--scratch", type=click.Path(path_type=Path), help=_SCRATCH_HELP)
def logs(run_selector, stderr, follow, scratch) -> None:
    """Print the job's standard output (or error) from submitit's log files."""
    from .status import TERMINAL, collect_status

    run = find_one_run(run_selector, scratches_to_search(scratch))
    if not run.trusted:
        raise ClusterError(f"{run.run_id}: {run.damage[0]}")
    path = run.log_path(stderr)
    if path is None:
        raise ClusterError(f"{run.run_id}: no job id recorded ({_why_no_job_id(run)})")
    position = 0
    quiet_rounds = 0
    peeked = False  # a scheduler that spools the log (LSF) showed the running job's output through its own command
    while True:
        if not peeked and not stderr and _log_size(path) == 0 and (command := _peek_command(run, follow)):
            from . import peek

            peeked = True
            peek.note(path, command)
            try:
                shown = peek.follow(command, _write) if follow else peek.peek(command, _write)
            except KeyboardInterrupt:
                return
            if not follow:
                return
            position += shown  # the log holds it too once the job has ended: the rest is read from there
        if os.path.lexists(path):
            try:
                with open_owned(path) as fh:
                    fh.seek(position)
                    chunk = fh.read()
            except NotTrusted as err:
                raise ClusterError(f"{path}: {err}; not read") from None
            except OSError as err:
                raise ClusterError(f"{path}: {err.strerror or err}") from None
            position += len(chunk)
            if chunk:
                sys.stdout.write(chunk.decode(errors="replace"))
                sys.stdout.flush()
        elif not follow:
            if stderr and _peek_command(run, False):  # running: the scheduler spools its output until the end
                raise ClusterError(f"{run.run_id}: no error log yet ({path}): the scheduler spools the job's output "
                                   f"until it ends; `hpcseg logs {run.run_id}` shows its output so far")
            raise ClusterError(f"{run.run_id}: no log yet ({path}); the job has not started")
        if not follow:
            return
        statuses, _ = collect_status([run])
        if statuses[0].state in TERMINAL:
            quiet_rounds += 1
            if quiet_rounds > 1:  # one more read after the end, for the last lines
                return
        try:
            time.sleep(1.0)
        except KeyboardInterrupt:
            return
