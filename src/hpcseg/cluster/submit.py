"""`hpcseg submit`: resolve job, profile and options into runs, build the submitit executor, submit.

Order of precedence for resources: command-line option > the job (file and --set) > site profile ([defaults]) >
hpcseg's defaults (resources.py resolves them, each with its source, for the `resources:` line).
Everything that can be refused (job file, overrides, sweep values, profile, queue, walltime, data folders) is
checked before any folder is created or anything is submitted; a failed submission removes the run folders
it created.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import __version__, versions
from ..jobfile import Job, load_job, parse_override
from .profiles import Profile, load_profile
from . import backends
from .resources import Resources, resolve as resolve_resources
from .scripts import activates_env, check_name, refuse_control
from ..atomic import atomic_write_text
from ..durations import hours_minutes
from ..errors import UserError
from ..outdir import blocked
from .runs import (ClusterError, Run, command_line, git_commit, make_private_dir, new_run_id, remember_scratch,
                   resolve_scratch, write_record)


@dataclass
class SubmitOptions:
    job_file: Path
    data: Path | None = None
    executor: str | None = None
    queue: str | None = None
    gpus: int | None = None
    nodes: int = 1
    cpus: int | None = None
    mem_gb: float | None = None
    time: str | None = None
    profile: str | None = None
    scratch: Path | None = None
    name: str | None = None
    overrides: tuple[str, ...] = ()
    sweeps: tuple[str, ...] = ()
    max_parallel: int | None = None
    dry_run: bool = False
    folds: bool = False  # every cross-validation fold of --data's folds.json, each sweep setting x each fold


@dataclass
class Plan:
    """Everything decided before submitting."""

    executor: str
    profile: Profile
    experiment: str
    scratch: Path
    queue: str | None
    gpus: int
    cpus: int
    mem_gb: float
    minutes: int
    max_parallel: int
    signal_delay_s: int
    train_dir: Path
    val_dir: Path
    test_dir: Path | None
    elements: list[tuple[dict[str, Any], Job]] = field(default_factory=list)  # (sweep values, job)
    warnings: list[str] = field(default_factory=list)  # printed as `hpcseg: warning:` lines
    notes: list[str] = field(default_factory=list)  # printed by a dry run above its script
    nodes: int = 1
    resources: Resources | None = None  # where each resource came from, for the `resources:` line
    #: with --folds: the folds, and per element its (sweep setting index, fold); see fold_axis
    folds: Any = None
    element_folds: list[tuple[int, int]] = field(default_factory=list)

    @property
    def tasks_per_node(self) -> int:
        """Training processes per node: one per GPU (data-parallel training), else one."""
        return max(self.gpus, 1)


# ---------------------------------------------------------------- planning


def pick_executor(requested: str | None, profile: Profile) -> str:
    choice = requested or profile.executor or "auto"
    return backends.detect() if choice == "auto" else choice


def split_values(text: str) -> list[str]:
    """'1e-3,3e-4' -> ['1e-3', '3e-4']; commas inside [...] or quotes do not split ('[4,8],[8,16]')."""
    parts, depth, quote, current = [], 0, "", []
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append("".join(current))
            current = []
            continue
        current.append(ch)
    parts.append("".join(current))
    return [p.strip() for p in parts]


def parse_sweeps(sweeps: tuple[str, ...]) -> list[tuple[str, list[Any]]]:
    """`--sweep KEY=V1,V2,...` -> [(key, values)]; each value checked as a job's (`--sweep KEY: ...` names it),
    every problem of every --sweep reported, one line each."""
    from ..jobfile import JobError, override_problems  # here: the rest of this module is not this check's

    axes, problems = [], []
    for item in sweeps:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or not raw.strip():
            problems.append(f"--sweep {item}: expected KEY=V1,V2,..., e.g. optim.lr=1e-3,3e-4")
            continue
        try:
            values = [parse_override(f"{key}={v}")[1] for v in split_values(raw)]
        except JobError as err:
            problems += [p.replace("--set ", "--sweep ", 1) for p in err.problems]
            continue
        if any(v == "" for v in values):
            problems.append(f"--sweep {item}: an empty value")
            continue
        if key in [k for k, _ in axes]:
            problems.append(f"--sweep {item}: {key} is swept twice")
            continue
        for value in values:
            problems += [p for p in override_problems(key, value, f"--sweep {key}") if p not in problems]
        axes.append((key, values))
    if problems:
        raise JobError(problems)
    return axes


def plan_submission(opts: SubmitOptions) -> Plan:
    profile = load_profile(opts.profile)
    executor = pick_executor(opts.executor, profile)
    given: dict[str, str] = {}  # the keys the job file and --set give (the others are defaults)
    job = load_job(opts.job_file, list(opts.overrides), given)  # a JobError names every problem of the file
    elements = _elements(job, parse_sweeps(opts.sweeps))
    folds = fold_axis(opts) if opts.folds else None
    elements, element_folds = with_folds(elements, folds)
    # the experiment name becomes the scheduler's job name and a folder of every path in the job script
    experiment = check_name("--name" if opts.name else "name", opts.name or job.name)
    for _, element in elements:
        check_name("name", element.name)
    res = resolve_resources({"gpus": opts.gpus, "cpus": opts.cpus, "mem_gb": opts.mem_gb, "time": opts.time,
                             "queue": opts.queue}, job, given, profile, executor, opts.nodes)
    if opts.max_parallel is not None and opts.max_parallel < 1:
        raise ClusterError(f"--max-parallel {opts.max_parallel}: must be at least 1")
    base = Path(opts.data) if opts.data else Path(".")
    folders = {key: getattr(job.data, key) for key in DATA_KEYS if (key != "test_dir" or job.data.test_dir)
               and (folds is None or key == "test_dir")}  # with --folds, the folds train and validate
    paths = {key: (base / rel).absolute() for key, rel in folders.items()}
    scratch, scratch_source = resolve_scratch(opts.scratch, profile.scratch), _scratch_source(opts, profile)
    for what, value in _script_text(opts, profile, paths, scratch_source, scratch):  # before anything reads them
        refuse_control(what, value)
    notes = _check_data_folders(opts, executor, base, folders, paths)
    delay = _signal_delay(executor, profile.signal_delay_s, res.minutes.value, res.minutes.name)
    _check_scratch(scratch_source, scratch)
    check_data([path for path in paths.values() if path.is_dir()] + (folds.folders if folds else []))  # reads files
    gpus = res.gpus.value
    return Plan(executor=executor, profile=profile, experiment=experiment, scratch=scratch, queue=res.queue.value,
                gpus=gpus, cpus=res.cpus.value, mem_gb=res.mem_gb.value, minutes=res.minutes.value,
                max_parallel=opts.max_parallel or len(elements), signal_delay_s=delay,
                train_dir=paths.get("train_dir"), val_dir=paths.get("val_dir"), test_dir=paths.get("test_dir"),
                elements=elements, notes=notes, nodes=opts.nodes, resources=res, folds=folds,
                element_folds=element_folds,
                warnings=_warnings(executor, gpus, res.gpus.name, len(elements), opts.max_parallel)
                + _small_batch_warnings(executor, gpus, elements))


#: the job's data folders, relative to --data (test_dir may be empty: no test)
DATA_KEYS = ("train_dir", "val_dir", "test_dir")


def fold_axis(opts: SubmitOptions):
    """--folds: the folds of --data's folds.json (every fold a run, next to the sweep's axes), read and checked."""
    from ..folds import read_folds

    if not opts.data:
        raise ClusterError("--folds: give --data, the folder `hpcseg prepare --folds K` wrote")
    return read_folds(Path(opts.data).absolute())


def with_folds(elements: list, folds) -> tuple[list, list[tuple[int, int]]]:
    """The elements repeated for each fold (each sweep setting x each fold) and their (setting, fold); unchanged
    without folds."""
    if folds is None:
        return elements, []
    element_folds = [(i, k) for i in range(len(elements)) for k in range(len(folds))]
    if len(element_folds) > 1000:
        raise ClusterError(f"--folds: {len(element_folds)} runs ({len(elements)} settings x {len(folds)} folds); at "
                           f"most 1000 per submission")
    return [elements[i] for i, _ in element_folds], element_folds


def run_ids(sweep_id: str, plan: Plan) -> list[str]:
    """One run id per element: the sweep id, `<sweep id>-<i>` per setting, and `-f<k>` per fold."""
    n = len(plan.elements)
    if plan.folds is not None:
        settings = len(plan.elements) // len(plan.folds)
        return [f"{sweep_id}-{i}-f{k}" if settings > 1 else f"{sweep_id}-f{k}" for i, k in plan.element_folds]
    return [sweep_id] if n == 1 else [f"{sweep_id}-{i}" for i in range(n)]


def run_folders(plan: Plan, element: int) -> tuple[Any, Path]:
    """(training folder(s), validation folder) of an element: the job's, or the other folds and its fold."""
    if plan.folds is None:
        return plan.train_dir, plan.val_dir
    return plan.folds.split(plan.element_folds[element][1])


def _elements(job: Job, axes: list[tuple[str, list[Any]]]) -> list[tuple[dict[str, Any], Job]]:
    """(sweep values, job) of each run of the submission: the grid of the sweep axes, or the job alone."""
    for key, _ in axes:
        if key.startswith("resources."):  # the plan, and a job array, has one set of resources
            raise ClusterError(f"--sweep {key}: every run of one submission gets the same resources; submit once per "
                               f"value with --set {key}=VALUE")
    elements = []
    for combo in itertools.product(*[values for _, values in axes]):
        values = {key: value for (key, _), value in zip(axes, combo)}
        elements.append((values, job.replace(**values) if values else job))
    if len(elements) > 1000:
        raise ClusterError(f"--sweep: {len(elements)} combinations; at most 1000 per submission")
    return elements


def _script_text(opts: SubmitOptions, profile: Profile, paths: dict[str, Path], scratch_source: str,
                 scratch: Path) -> list[tuple[str, Any]]:
    """(what, value) of every free text that may reach a job script (paths, set-up lines, scheduler options): each
    is checked for control characters once, here (names and queues have their own character sets)."""
    where = profile.path
    items: list[tuple[str, Any]] = [(f"{where}: setup[{i}]", line) for i, line in enumerate(profile.setup)]
    if profile.scratch is not None:
        items.append((f"{where}: scratch", profile.scratch))
    for name, queue in profile.queues.items():
        items += [(f"{where}: queues.{name}.extra.{option}", item) for option, setting in queue.extra.items()
                  for item in (setting if isinstance(setting, list) else [setting])]
    if not activates_env(profile.setup):  # the script runs the submitting python then
        items.append(("the submitting python's path", sys.executable))
    if opts.data:
        items.append(("--data", opts.data))
    items += [(f"data.{key}", path) for key, path in paths.items()]
    items.append((scratch_source, scratch))
    return items


def _check_data_folders(opts: SubmitOptions, executor: str, base: Path, folders: dict[str, str],
                        paths: dict[str, Path]) -> list[str]:
    """Refuse a data folder missing here; a dry run for a scheduler (from a laptop, say, of a cluster path) notes it
    instead and returns the notes (printed above the script)."""
    notes: list[str] = []
    if opts.data and not base.is_dir():
        _unreachable(opts, executor, notes, base.absolute(), f"--data {opts.data}: no such folder")
        return notes
    if opts.data and "train_dir" in folders:
        from ..data import refuse_slice_folder

        refuse_slice_folder("--data", Path(opts.data), folders["train_dir"], folders["val_dir"],
                            folders.get("test_dir", ""))
    where = f"--data {opts.data}" if opts.data else "the current folder"
    for key, path in paths.items():
        if not path.is_dir():
            _unreachable(opts, executor, notes, path,
                         f"data.{key} = {folders[key]!r}: no folder {path} (relative to {where})")
    return notes


def _unreachable(opts: SubmitOptions, executor: str, notes: list[str], path: Path, refusal: str) -> None:
    """A data folder missing here: a real submission refuses it, and so does a dry run of a job that would run
    here; a dry run for a scheduler notes it instead."""
    if not opts.dry_run or backends.BACKENDS[executor].runs_here:
        raise ClusterError(refusal)
    notes.append(f"# note: data folder {path} not reachable from here, not checked")


def _check_scratch(source: str, scratch: Path) -> None:
    unset = re.search(r"\$\{?(\w+)", str(scratch))  # expandvars leaves unset variables as they are
    if unset:
        raise ClusterError(f"{source} {str(scratch)!r}: ${unset.group(1)} is not set here, so the path cannot be "
                           "expanded; set it or give --scratch")
    problem = blocked(scratch)
    if problem:  # a --dry-run that accepts it would promise a submission that cannot happen
        raise ClusterError(f"scratch {problem}")


def check_data(folders: list[Path]) -> None:
    """Refuse what `train` would refuse at the job's start, cheaply: every image paired with its label and every
    file's header (readable, numeric, 2D, not empty, image and label of one shape); pixel values are read by the
    job. Raises one DataError, one line per problem."""
    from ..data import DataError, find_pairs

    problems: list[str] = []
    for folder in folders:
        try:
            pairs = find_pairs(folder)
        except DataError as err:
            problems += err.problems
            continue
        for pair in pairs:
            image, label = _slice_shape(pair.image, "image", problems), _slice_shape(pair.label, "label", problems)
            if image and label and image != label:
                problems.append(f"{pair.label}: shape {label[0]}x{label[1]} differs from its image {pair.image.name} "
                                f"({image[0]}x{image[1]})")
    if problems:
        raise DataError(problems)


def _slice_shape(path: Path, what: str, problems: list[str]) -> tuple[int, ...] | None:
    """The 2D shape a slice file's header declares (None, with a line in `problems`, where it is no slice)."""
    from numpy.lib import format as npy

    from ..data import NPY_MAGIC, _describe

    try:
        if path.name.lower().endswith(".npy"):
            with open(path, "rb") as handle:  # the header only: faster than loading or mapping the pixels
                if handle.read(len(NPY_MAGIC)) != NPY_MAGIC:
                    raise ValueError("not a .npy file (no NumPy header)")
                handle.seek(0)
                version = npy.read_magic(handle)
                read_header = npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0
                shape, _, dtype = read_header(handle)
        else:
            import nibabel as nib

            img = nib.load(path)
            shape, dtype = img.shape, img.get_data_dtype()
            if len(shape) > 2 and len([n for n in shape if n != 1]) == 2:  # as data.py reads it: extra axes of 1
                shape = tuple(n for n in shape if n != 1)
    except Exception as error:  # noqa: BLE001 - any failure to read is one reported problem
        problems.append(f"{path}: cannot read {what} ({_describe(error, path)})")
        return None
    if dtype.kind not in "biuf":
        problems.append(f"{path}: {what} has non-numeric dtype {dtype}")
    elif len(shape) != 2 or 0 in shape:
        problems.append(f"{path}: {what} is {'not 2D' if len(shape) != 2 else 'empty'} (shape {tuple(shape)})")
    else:
        return tuple(shape)
    return None


def _gpus_here() -> int:
    """NVIDIA GPUs of this machine, without importing torch."""
    try:
        return len(os.listdir("/proc/driver/nvidia/gpus"))
    except OSError:
        return 0


def _warnings(executor: str, gpus: int, source: str, n: int, max_parallel: int | None) -> list[str]:
    """What will happen that the options do not say: a CPU run, a --max-parallel not applied."""
    warnings = []
    backend = backends.BACKENDS[executor]
    if backend.runs_here and gpus > 0 and _gpus_here() == 0:
        processes = f" in {gpus} processes" if gpus > 1 else ""
        warnings.append(f"{source} {gpus}: this machine has no GPU; the {executor} job trains on its CPU{processes}")
    if not backend.arrays and max_parallel is not None and max_parallel < n:
        # no array, so nothing holds elements back: say so rather than let N trainings share the cores unasked
        warnings.append(f"--max-parallel {max_parallel}: the {executor} executor has no job arrays; all {n} runs "
                        "start at once")
    return warnings


#: Below this batch a GPU waits on kernel launches more than it computes (H200, exercise-improved: batch 2 trained
#: 125 samples/s, batch 32 1,659); jobs/gpu.toml trains at 32.
GPU_MIN_BATCH = 16


def _small_batch_warnings(executor: str, gpus: int, elements: list[tuple[dict[str, Any], Job]]) -> list[str]:
    """One line when a job that will train on a GPU asks for a batch too small to keep it busy."""
    on_this_cpu = backends.BACKENDS[executor].runs_here and _gpus_here() == 0
    if gpus < 1 or on_this_cpu:  # a CPU run: small batches are right there
        return []
    small = sorted({job.train.batch_size for _, job in elements if job.train.batch_size < GPU_MIN_BATCH})
    if not small:
        return []
    return [f"train.batch_size {', '.join(map(str, small))}: leaves the GPU mostly idle (on an H200 batch 2 trains "
            f"125 samples/s, batch 32 1,659); use jobs/gpu.toml or --set train.batch_size=32 (optim.lr follows "
            f"optim.lr_scaling)"]


def _signal_delay(executor: str, asked: int | None, minutes: int, source: str) -> int:
    """Seconds between the warning signal and the walltime: as asked (else the executor's default), but at most
    half the walltime, so that the warning never comes at the start; in the backend's unit (LSF: whole minutes)."""
    backend = backends.BACKENDS[executor]
    delay = asked if asked is not None else backend.signal_delay_s
    unit = backend.signal_unit_s
    delay = min(unit * math.ceil(max(delay, 1) / unit), unit * (minutes * 60 // 2 // unit))
    if delay < unit:
        raise ClusterError(f"{source} {hours_minutes(minutes)}: too short for a warning signal before the walltime "
                           f"({backend.title} warns in whole minutes, at most half the walltime ahead); give at least "
                           f"{hours_minutes(2 * math.ceil(unit / 60))}")
    return delay


def _scratch_source(opts: SubmitOptions, profile: Profile) -> str:
    """Where the scratch folder came from, in resolve_scratch's order, for a message."""
    if opts.scratch:
        return "--scratch"
    if os.environ.get("HPCSEG_SCRATCH"):
        return "$HPCSEG_SCRATCH"
    return f"{profile.path}: scratch" if profile.scratch else "scratch"


# ---------------------------------------------------------------- executors


def build_executor(plan: Plan, folder: Path, dry_run: bool = False):
    """The backend's submitit executor for `plan`, for one job or a job array in `folder`."""
    try:
        return backends.BACKENDS[plan.executor].build_executor(plan, folder, dry_run)
    except ValueError as err:  # a scheduler plugin's own parameter checks: one line, as every refusal
        raise ClusterError(f"--executor {plan.executor}: {' '.join(str(err).split())}") from None


def job_script(plan: Plan, folder: Path, n_elements: int) -> str:
    """The script that would be submitted (for --dry-run)."""
    try:
        return backends.BACKENDS[plan.executor].job_script(plan, folder, n_elements)
    except ValueError as err:
        raise ClusterError(f"--executor {plan.executor}: {' '.join(str(err).split())}") from None


# ---------------------------------------------------------------- submitting


@dataclass
class Submitted:
    runs: list[Run]
    scripts: list[str] = field(default_factory=list)


def submit(opts: SubmitOptions, echo=print) -> Submitted:
    plan = plan_submission(opts)
    n = len(plan.elements)
    sweep_id = new_run_id()
    ids = run_ids(sweep_id, plan)
    exp_dir = plan.scratch / plan.experiment
    array = n > 1 and backends.BACKENDS[plan.executor].arrays  # else one job per element
    for warning in plan.warnings:
        print(f"hpcseg: warning: {warning}", file=sys.stderr)
    shared = exp_dir / ".arrays" / sweep_id if array else None

    if opts.dry_run:
        folder = shared or exp_dir / ids[0] / "submitit"
        scripts = [job_script(plan, folder, n)] if array or n == 1 else \
            [job_script(plan, exp_dir / rid / "submitit", 1) for rid in ids]
        for note in plan.notes:
            echo(note)
        for i, ((values, _), rid) in enumerate(zip(plan.elements, ids)):
            where = f"  {' '.join(f'{k}={v!r}' for k, v in values.items())}" if values else ""
            where += f"  fold {plan.element_folds[i][1]}" if plan.folds is not None else ""
            echo(f"# would submit run {rid} ({plan.executor}){where} -> {exp_dir / rid}")
        echo(f"# {plan.resources.line()}")
        for script in scripts:
            echo(script.rstrip("\n"))
        return Submitted(runs=[], scripts=scripts)

    from .jobrunner import JobRunner

    made: list[Path] = []  # every folder this submission creates, outermost first: removed if it fails
    filled: list[Path] = []  # of them, those it writes files into
    try:
        made += make_private_dir(exp_dir)
        runs, runners = [], []
        commit = git_commit()
        for i, ((values, job), rid) in enumerate(zip(plan.elements, ids)):
            train_dir, val_dir = run_folders(plan, i)
            run_dir = exp_dir / rid
            made += make_private_dir(run_dir)
            filled.append(run_dir)
            submitit_dir = shared if shared else run_dir / "submitit"
            atomic_write_text(run_dir / "job.toml", job.to_toml())
            record = {
                "run_id": rid, "experiment": plan.experiment, "executor": plan.executor, "job_id": None,
                "array_job_id": None, "sweep_id": sweep_id if n > 1 else None, "sweep": values,
                "submit_time": time.time(), "hpcseg_version": __version__, "git_commit": commit,
                "command_line": command_line(), "job_file": str(Path(opts.job_file).absolute()),
                "profile": plan.profile.name, "queue": plan.queue,
                "resources": {"gpus": plan.gpus, "nodes": plan.nodes, "processes": plan.tasks_per_node,
                              "cpus": plan.cpus, "mem_gb": plan.mem_gb,
                              "time": hours_minutes(plan.minutes), "signal_delay_s": plan.signal_delay_s},
                "data": {"train_dir": [str(d) for d in train_dir] if isinstance(train_dir, list) else str(train_dir),
                         "val_dir": str(val_dir), "test_dir": str(plan.test_dir) if plan.test_dir else None},
                "epochs": job.train.epochs, "submitit_dir": str(submitit_dir),
                "versions": versions.here(),  # the job compares its own at its start (jobrunner)
            }
            if plan.folds is not None:  # status groups the folds of a setting into one cross-validation line
                record.update(setting=plan.element_folds[i][0], fold=plan.element_folds[i][1], folds=len(plan.folds))
            run = Run(path=run_dir, record=record)
            write_record(run)
            runs.append(run)
            runners.append(JobRunner(job.to_dict(), [str(d) for d in train_dir] if isinstance(train_dir, list)
                                     else str(train_dir), str(val_dir), str(run_dir),
                                     str(plan.test_dir) if plan.test_dir else None, procs=plan.tasks_per_node,
                                     mem_gb=plan.mem_gb))
        if shared is not None:
            made += make_private_dir(shared)
            filled.append(shared)
            for run in runs:
                os.symlink(os.path.relpath(shared, run.path), run.path / "submitit")
            ex = build_executor(plan, shared)
            jobs = ex.submit_array(runners)
        else:
            jobs = []
            for run, runner in zip(runs, runners):
                ex = build_executor(plan, run.path / "submitit")
                jobs.append(ex.submit(runner))
        for run, job in zip(runs, jobs):
            run.record["job_id"] = str(job.job_id)
            if shared is not None:
                run.record["array_job_id"] = str(job.job_id).split("_")[0].split("[")[0]
            write_record(run)
    except Exception as err:  # refused by us, by the scheduler, or its command is missing or hangs
        _remove(made, filled)
        raise refusal(err, plan.executor) from None
    remember_scratch(plan.scratch)
    echo(plan.resources.line())
    for run in runs:
        sweep = "  " + " ".join(f"{k}={v}" for k, v in run.record["sweep"].items()) if run.record["sweep"] else ""
        sweep += f"  fold {run.record['fold']}" if "fold" in run.record else ""
        echo(f"submitted run {run.run_id}  job {run.job_id}  ({plan.executor}){sweep}  {run.path}")
    return Submitted(runs=runs)


def refusal(err: Exception, executor: str) -> UserError:
    """The one line for a submission that failed: hpcseg's or the scheduler command's own, else submitit's."""
    if isinstance(err, UserError):  # refused by hpcseg or the scheduler's command: already one line
        return err
    message = " ".join(str(err).split())  # submitit's own failures (no job id in the answer, say)
    return ClusterError(f"submitting to {executor} failed: {message[:400]}")


def _remove(made: list[Path], filled: list[Path]) -> None:
    """Remove what a failed submission created: its run folders with their files, and the folders above them
    (scratch included) where they are empty (another submission may have put its runs there meanwhile)."""
    for folder in reversed(made):
        if folder in filled:
            shutil.rmtree(folder, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                folder.rmdir()

