"""IBM Spectrum LSF as a submitit plugin (DTU's cluster: queues gpuv100/gpua100, 24 h walltime).

submitit finds this module through the entry points in group ``submitit`` (``executor``, ``job_environment``),
so ``submitit.AutoExecutor(folder, cluster="lsf")`` works wherever ``bsub`` is on PATH.

Shape follows submitit's Slurm support:

- :class:`LsfExecutor` writes a ``#BSUB`` script per job (or one per job array) and submits it with
  ``bsub < script``; the Python process runs in the background of the script, which forwards the
  warning signal (USR2, sent ``signal_delay_s`` before the run limit through ``-wa/-wt``) and TERM/INT to
  it, waits for it and writes its exit code to ``<folder>/<job_id>_exitcode``.
- :class:`LsfJob` / :class:`LsfInfoWatcher`: one ``bjobs`` call for all unfinished jobs; jobs that bjobs has
  forgotten (``CLEAN_PERIOD``) get their state from the exit-code file and submitit's result pickle.
- :class:`LsfJobEnvironment`: inside the job (``LSB_JOBID``, ``LSB_JOBINDEX``, ``LSB_HOSTS``...);
  ``_requeue`` runs ``brequeue`` on the job itself, so checkpointable jobs resume under the same id.

Job ids: submitit names array elements ``12345_3``; LSF calls them ``12345[3]`` (indices start at 1).
:func:`to_lsf_id` / :func:`from_lsf_id` convert.

:func:`query_lsf` and :func:`cancel_lsf` are plain functions for tools that handle many jobs at once
(``hpcseg status``).

Formats come from IBM's documentation and public projects driving LSF; they are exercised here against
the emulator in ``tests/lsf_emulator``, not yet against a real LSF cluster.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
import shlex
import shutil
import signal
import sys
import time
import typing as tp
from pathlib import Path

from submitit.core import core, job_environment, logger, utils

from ..durations import hours_minutes
from ..errors import ClusterError, CommandError, run_command
from .scripts import (
    CANCEL_EXIT_CODES, CONTROL, EXIT_CODE_SUFFIX, BoundedSubmission, dry_run_class, job_python, submission_text,
    check_parameter as _check, is_int as _is_int, is_number as _is_number, wait_for_child,
    warning_signal as _warning_signal)

__all__ = [
    "LsfExecutor",
    "LsfJob",
    "LsfInfoWatcher",
    "LsfJobEnvironment",
    "LsfJobInfo",
    "LsfCommandError",
    "query_lsf",
    "cancel_lsf",
    "to_lsf_id",
    "from_lsf_id",
    "normalise_state",
]

#: bjobs fields read by the watcher and :func:`query_lsf` (one line per job or array element).
BJOBS_FORMAT = "jobid jobindex stat exit_code delimiter=','"
#: normalised states that mean the job is over
FINAL_STATES = ("COMPLETED", "FAILED", "CANCELLED")

_NOT_FOUND = re.compile(r"Job <([^>]+)> is not found")
_ALREADY_GONE = re.compile(r"Job <[^>]+>: (Job has already finished|No matching job found)")
_STAT_TO_STATE = {
    "PEND": "PENDING",
    "WAIT": "PENDING",
    "PROV": "PENDING",
    "RUN": "RUNNING",
    "DONE": "COMPLETED",
    "PSUSP": "SUSPENDED",
    "USUSP": "SUSPENDED",
    "SSUSP": "SUSPENDED",
    "UNKWN": "UNKNOWN",
    "ZOMBI": "UNKNOWN",
}


# ------------------------------------------------------------------------------------------ job ids


def to_lsf_id(job_id: str) -> str:
    """submitit's ``12345_3`` -> LSF's ``12345[3]``; plain ids unchanged."""
    job_id = str(job_id).strip()
    if re.fullmatch(r"\d+\[\d+\]", job_id):
        return job_id
    main, sep, index = job_id.partition("_")
    if not main.isdigit() or (sep and not index.isdigit()):
        raise ValueError(f"Not an LSF job id: {job_id!r}")
    return f"{main}[{int(index)}]" if sep else main


def from_lsf_id(job_id: str) -> str:
    """LSF's ``12345[3]`` -> submitit's ``12345_3``; plain ids (and ``12345_3``) unchanged."""
    job_id = str(job_id).strip()
    m = re.fullmatch(r"(\d+)\[(\d+)\]", job_id)
    if m:
        return f"{m.group(1)}_{int(m.group(2))}"
    to_lsf_id(job_id)  # validates
    return job_id


def _main_id(job_id: str) -> str:
    return from_lsf_id(job_id).split("_", 1)[0]


# ------------------------------------------------------------------------------------ bjobs / bkill


#: An LSF command is missing, hung or failed; the message is one line meant for users, naming the command.
LsfCommandError = CommandError


@dataclasses.dataclass(frozen=True)
class LsfJobInfo:
    """State of one LSF job or array element, as bjobs reports it."""

    job_id: str  #: submitit form: ``12345`` or ``12345_3``
    stat: str  #: LSF's raw state: PEND, RUN, DONE, EXIT, PSUSP, USUSP, SSUSP, WAIT, PROV, UNKWN, ZOMBI
    exit_code: tp.Optional[int]  #: None while running, for DONE jobs, or when LSF shows "-"
    state: str  #: PENDING, RUNNING, COMPLETED, FAILED, CANCELLED, SUSPENDED or UNKNOWN

    @property
    def lsf_id(self) -> str:
        return to_lsf_id(self.job_id)


def normalise_state(stat: str, exit_code: tp.Optional[int] = None) -> str:
    """Map LSF's STAT (and exit code) to PENDING/RUNNING/COMPLETED/FAILED/CANCELLED/SUSPENDED/UNKNOWN."""
    stat = stat.strip().upper()
    if stat == "EXIT":
        return "CANCELLED" if exit_code in CANCEL_EXIT_CODES else "FAILED"
    return _STAT_TO_STATE.get(stat, "UNKNOWN")


def _parse_exit_code(text: str) -> tp.Optional[int]:
    text = text.strip()
    return int(text) if re.fullmatch(r"-?\d+", text) else None


def _parse_bjobs_lines(stdout: str) -> tp.Dict[str, LsfJobInfo]:
    """Lines of ``bjobs -noheader -o BJOBS_FORMAT`` -> {submitit id: info}."""
    infos: tp.Dict[str, LsfJobInfo] = {}
    for line in stdout.splitlines():
        parts = [p.strip() for p in (line.split(",") if "," in line else line.split())]
        if len(parts) < 3 or not parts[0].isdigit():
            continue
        jobid, index, stat = parts[0], parts[1], parts[2]
        exit_code = _parse_exit_code(parts[3]) if len(parts) > 3 else None
        key = jobid if index in ("0", "-", "") else f"{jobid}_{int(index)}"
        infos[key] = LsfJobInfo(key, stat, exit_code, normalise_state(stat, exit_code))
    return infos


def _bjobs(main_ids: tp.Iterable[str], timeout_s: float) -> tp.Tuple[tp.Dict[str, LsfJobInfo], tp.Set[str]]:
    """One bjobs call -> (infos by submitit id, main ids that LSF does not know)."""
    ids = sorted(set(main_ids), key=lambda x: (len(x), x))
    proc = run_command(["bjobs", "-noheader", "-o", BJOBS_FORMAT, *ids], timeout_s, check=False)
    not_found: tp.Set[str] = set()
    errors = []
    for line in proc.stderr.splitlines():
        m = _NOT_FOUND.search(line)
        if m:
            not_found.add(_main_id(m.group(1)))
        elif line.strip():
            errors.append(line.strip())
    if proc.returncode != 0 and (errors or not not_found):  # "not found" alone is an answer, not a failure
        raise LsfCommandError(f"bjobs exited {proc.returncode}: {errors[0] if errors else 'no message'}",
                              proc.returncode, proc.stderr)
    return _parse_bjobs_lines(proc.stdout), not_found


def query_lsf(job_ids: tp.Sequence[str], timeout_s: float = 10) -> tp.Dict[str, LsfJobInfo]:
    """States of many jobs with ONE bjobs call.

    ``job_ids`` may be ``12345``, ``12345_3`` or ``12345[3]``. The result is keyed by submitit ids:
    a requested element under ``12345_3``, a plain job under ``12345``, and a plain id naming an
    array under each of its elements (``12345_1``, ...). Jobs that LSF does not know (never existed,
    or finished longer ago than CLEAN_PERIOD) are absent. Raises :class:`LsfCommandError` when bjobs
    is missing, fails or does not answer within ``timeout_s``.
    """
    requested = [from_lsf_id(j) for j in job_ids]
    if not requested:
        return {}
    infos, _ = _bjobs((_main_id(j) for j in requested), timeout_s)
    out: tp.Dict[str, LsfJobInfo] = {}
    for job_id in requested:
        if job_id in infos:
            out[job_id] = infos[job_id]
        elif "_" not in job_id:  # a whole array
            out.update({k: v for k, v in infos.items() if k.split("_", 1)[0] == job_id})
    return out


def cancel_lsf(job_ids: tp.Sequence[str], timeout_s: float = 30) -> None:
    """bkill the given jobs (submitit or LSF ids) in one call; jobs already over are not an error."""
    ids = [to_lsf_id(j) for j in job_ids]
    if not ids:
        return
    proc = run_command(["bkill", *ids], timeout_s, check=False)
    errors = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip() and not _ALREADY_GONE.search(ln)]
    if errors:
        raise LsfCommandError(f"bkill exited {proc.returncode}: {errors[0]}", proc.returncode, proc.stderr)


# ---------------------------------------------------------------------------------- watcher, job


def _exit_code_file(paths: utils.JobPaths) -> Path:
    return paths.folder / f"{paths.job_id}{EXIT_CODE_SUFFIX}"


def _read_exit_code(paths: utils.JobPaths) -> tp.Optional[int]:
    try:
        return _parse_exit_code(_exit_code_file(paths).read_text())
    except OSError:
        return None


class LsfInfoWatcher(core.InfoWatcher):
    """Shared by all LsfJobs: one ``bjobs`` call for every unfinished job (arrays queried by their id).

    States are the normalised ones of :func:`normalise_state`. A job that bjobs no longer knows gets its
    state from its own files: the exit-code file written by the batch script, else submitit's result
    pickle; with neither, it counts as FAILED once it has been unknown for ``not_found_grace_s``.
    """

    not_found_grace_s = 60.0
    bjobs_timeout_s = 60.0

    def __init__(self, delay_s: int = 60) -> None:
        super().__init__(delay_s)
        self._paths: tp.Dict[str, utils.JobPaths] = {}
        self._first_seen: tp.Dict[str, float] = {}

    def register_job(self, job_id: str) -> None:
        super().register_job(job_id)
        self._first_seen.setdefault(job_id, time.time())

    def register_paths(self, job_id: str, paths: utils.JobPaths) -> None:
        self._paths[job_id] = paths

    def unregister_job(self, job_id: str) -> None:
        self._registered.discard(job_id)
        self._paths.pop(job_id, None)

    def clear(self) -> None:
        super().clear()
        self._first_seen = {}

    def _make_command(self) -> tp.Optional[tp.List[str]]:
        to_check = {_main_id(j) for j in self._registered - self._finished}
        if not to_check:
            return None
        return ["bjobs", "-noheader", "-o", BJOBS_FORMAT, *sorted(to_check, key=lambda x: (len(x), x))]

    def read_info(self, string: tp.Union[bytes, str]) -> tp.Dict[str, tp.Dict[str, str]]:
        """Reads ``bjobs -noheader -o BJOBS_FORMAT`` output."""
        if not isinstance(string, str):
            string = string.decode()
        return {k: self._as_dict(v, "bjobs") for k, v in _parse_bjobs_lines(string).items()}

    @staticmethod
    def _as_dict(info: LsfJobInfo, source: str) -> tp.Dict[str, str]:
        return {
            "JobID": info.job_id,
            "STAT": info.stat,
            "EXIT_CODE": "" if info.exit_code is None else str(info.exit_code),
            "State": info.state,
            "Source": source,
        }

    def _info_from_files(self, job_id: str) -> tp.Dict[str, str]:
        paths = self._paths.get(job_id)
        code = _read_exit_code(paths) if paths is not None else None
        if code is not None:
            stat = "DONE" if code == 0 else "EXIT"
            return self._as_dict(LsfJobInfo(job_id, stat, code, normalise_state(stat, code)), "files")
        if paths is not None and paths.result_pickle.exists():
            return self._as_dict(LsfJobInfo(job_id, "DONE", None, "COMPLETED"), "files")
        if time.time() - self._first_seen.get(job_id, time.time()) < self.not_found_grace_s:
            return {"JobID": job_id, "State": "UNKNOWN", "Source": "files"}
        return {
            "JobID": job_id,
            "State": "FAILED",
            "Source": "files",
            "Reason": "bjobs does not know the job and it left no exit-code file nor result",
        }

    def update(self) -> None:
        """Updates all unfinished registered jobs with one bjobs call."""
        command = self._make_command()
        if command is None:
            return
        self._num_calls += 1
        to_check = self._registered - self._finished
        try:
            logger.get_logger().debug(f"Call #{self.num_calls} - Command {' '.join(command)}")
            infos, not_found = _bjobs(command[4:], self.bjobs_timeout_s)
        except LsfCommandError as e:
            logger.get_logger().warning(f"Call #{self.num_calls} - {e}; status may be inaccurate.")
        else:
            self._info_dict.update({k: self._as_dict(v, "bjobs") for k, v in infos.items()})
            for job_id in to_check:
                if _main_id(job_id) in not_found:
                    self._info_dict[job_id] = self._info_from_files(job_id)
        self._last_status_check = time.time()
        for job_id in to_check:
            if self.is_done(job_id, mode="cache"):
                self._finished.add(job_id)

    def get_state(self, job_id: str, mode: str = "standard") -> str:
        info = self.get_info(job_id, mode=mode)
        return info.get("State") or "UNKNOWN"

    def is_done(self, job_id: str, mode: str = "standard") -> bool:
        return self.get_state(job_id, mode=mode) in FINAL_STATES


class LsfJob(core.Job[core.R]):
    _cancel_command = "bkill"
    watcher = LsfInfoWatcher(delay_s=600)

    def _register_in_watcher(self) -> None:
        super()._register_in_watcher()
        if not self._tasks[0]:
            self.watcher.register_paths(self.job_id, self.paths)

    @property
    def lsf_id(self) -> str:
        """The id LSF commands take: ``12345`` or ``12345[3]``."""
        return to_lsf_id(self.job_id)

    @property
    def exit_code_file(self) -> Path:
        """Where the batch script writes the Python process's exit code."""
        return _exit_code_file(self.paths)

    def cancel(self, check: bool = True) -> None:
        """bkill the job (an array element alone for ids like ``12345_3``)."""
        try:
            cancel_lsf([self.job_id])
        except LsfCommandError:
            if check:
                raise

    def _interrupt(self, timeout: bool = False) -> None:
        """Sends the preemption/timeout signal to the job (for tests): the job requeues if it can."""
        del timeout  # LSF has one warning signal for both
        run_command(["bkill", "-s", LsfJobEnvironment.USR_SIG, self.lsf_id], 60)


# ---------------------------------------------------------------------------------- environment


class LsfJobEnvironment(job_environment.JobEnvironment):
    """Inside an LSF job: one task per job (submitit's task ranks are all 0)."""

    _env = {
        "job_id": "LSB_JOBID",
        "array_job_id": "LSB_JOBID",
        "array_task_id": "LSB_JOBINDEX",
    }

    @property
    def array_job_id(self) -> tp.Optional[str]:
        return os.environ.get("LSB_JOBID") if self.array_task_id is not None else None

    @property
    def array_task_id(self) -> tp.Optional[str]:
        index = os.environ.get("LSB_JOBINDEX", "0").strip()
        return None if index in ("", "0") else index

    @property
    def num_tasks(self) -> int:
        return 1

    @property
    def num_nodes(self) -> int:
        return max(1, len(self.hostnames))

    @property
    def node(self) -> int:
        return 0

    @property
    def global_rank(self) -> int:
        return 0

    @property
    def local_rank(self) -> int:
        return 0

    @property
    def hostnames(self) -> tp.List[str]:
        """Hosts of the job, from ``LSB_MCPU_HOSTS`` ("hostA 4 hostB 2") or ``LSB_HOSTS`` (one per slot)."""
        mcpu = os.environ.get("LSB_MCPU_HOSTS", "").split()
        hosts = mcpu[0::2] if mcpu else os.environ.get("LSB_HOSTS", "").split()
        unique = list(dict.fromkeys(hosts))
        return unique or [self.hostname]

    def _handle_signals(self, paths: utils.JobPaths, submission: utils.DelayedSubmission) -> None:
        super()._handle_signals(paths, submission)
        # LSF may deliver the warning signal both to the job shell (which forwards it) and to this
        # process: checkpoint and requeue once only.
        usr_sig = self._usr_sig()
        handler = signal.getsignal(usr_sig)
        handled: tp.List[int] = []

        def once(signum: int, frame: tp.Any) -> None:
            if handled:
                logger.get_logger().info(f"Ignoring repeated signal {signal.Signals(signum).name}")
                return
            handled.append(signum)
            handler(signum, frame)  # type: ignore[operator]

        signal.signal(usr_sig, once)
        # bkill/brequeue start with SIGINT; a background process of a non-interactive shell inherits it
        # ignored, so restore Python's default to end promptly (exit code 130).
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def _requeue(self, countdown: int) -> None:
        jid = to_lsf_id(self.job_id)
        run_command(["brequeue", jid], 60)
        logger.get_logger().info(f"Requeued job {jid} ({countdown} remaining timeouts)")


# ------------------------------------------------------------------------------------- executor


def _bsub_value(value: str, force: bool = False) -> str:
    """Quotes a #BSUB argument the way LSF users write it (double quotes when needed or forced)."""
    if not force and re.fullmatch(r"[\w.,:/%@+=-]+", value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _shell_path(pattern: str) -> str:
    """A path pattern with submitit's %j/%A/%a/%t tags as a quoted shell word using the job's variables."""
    tags = {
        "%j": "${SUBMITIT_LSF_JOB_ID}",
        "%A": "${LSB_JOBID}",
        "%a": "${LSB_JOBINDEX}",
        "%t": "0",
    }
    out = []
    for piece in re.split(r"(%[jAat])", pattern):
        if piece in tags:
            out.append(f'"{tags[piece]}"')
        elif piece:
            out.append(shlex.quote(piece))
    return "".join(out)


def _mem_per_core(mem_gb: float, cores: int) -> str:
    mb = mem_gb * 1024 / cores
    if mb % 1024 == 0:
        return f"{int(mb // 1024)}GB"
    return f"{math.ceil(mb)}MB"


def _minutes(value: float) -> str:
    """bsub's -W: whole minutes, rounded up, at least 1."""
    return hours_minutes(max(1, math.ceil(value)), hour_digits=1)


def _flat(additional_parameters: tp.Any) -> tp.List[tp.Any]:
    """The keys and values of additional_parameters (a mapping or a list of raw strings), flattened."""
    if isinstance(additional_parameters, tp.Mapping):
        values = [v for value in additional_parameters.values()
                  for v in (value if isinstance(value, (list, tuple)) else [value])]
        return [*additional_parameters, *values]
    return list(additional_parameters or ()) if not isinstance(additional_parameters, str) else [additional_parameters]


def _sets_option(additional_parameters: tp.Any, option: str) -> bool:
    """Whether additional_parameters names the bsub option (``M``, ``-M`` or a raw ``-M 5GB``)."""
    if isinstance(additional_parameters, tp.Mapping):
        return any(str(k).lstrip("-") == option for k in additional_parameters)
    return any(re.match(rf"\s*(#BSUB\s+)?-{option}\b", str(x)) for x in _flat(additional_parameters))


# pylint: disable=too-many-arguments,too-many-locals,unused-argument
def _make_bsub_string(
    command: str,
    folder: tp.Union[str, Path],
    job_name: str = "submitit",
    queue: tp.Optional[str] = None,
    cores: int = 1,
    mem_gb: tp.Optional[float] = None,
    gpus: int = 0,
    timeout_min: float = 5,
    signal_delay_s: float = 90,
    array_parallelism: int = 256,
    setup: tp.Optional[tp.Sequence[str]] = None,
    additional_parameters: tp.Optional[tp.Union[tp.Mapping[str, tp.Any], tp.Sequence[str]]] = None,
    stderr_to_stdout: bool = False,
    nodes: int = 1,
    tasks_per_node: int = 1,
    map_count: tp.Optional[int] = None,  # internal: number of array elements
) -> str:
    """Text of the LSF batch script; raises ValueError (one line) on a bad parameter.

    mem_gb is the job's total memory, emitted per core both as the reservation (``rusage[mem=...]``) and as
    the per-process limit (``-M``), as DTU expects (unless additional_parameters sets ``M``);
    signal_delay_s becomes ``-wa USR2 -wt <minutes, rounded up, at least 1>``, which must be below the walltime;
    additional_parameters are extra #BSUB lines: a mapping ({"R": "select[gpu32gb]"} -> ``#BSUB -R ...``; a list
    value repeats the option, True gives a bare flag) or raw strings (``'-R "select[gpu32gb]"'``).
    No value may hold a control character: a newline would end a #BSUB line and start a command.
    """
    _check(isinstance(job_name, str) and job_name.strip() != "" and not re.search(r"[\[\]]", job_name),
           f"LSF parameter job_name must be a non-empty name without brackets, got {job_name!r}")
    for what, value in [("job_name", job_name), ("folder", folder), ("command", command), *(
            ("setup", line) for line in setup or ()), *(
            ("additional_parameters", item) for item in _flat(additional_parameters))]:
        _check(CONTROL.search(str(value)) is None,
               f"LSF parameter {what} must be one line without control characters, got {value!r}")
    _check(queue is None or (isinstance(queue, str) and re.fullmatch(r"[\w.-]+", queue) is not None),
           f"LSF parameter queue must be a queue name, got {queue!r}")
    _check(_is_int(cores) and cores >= 1, f"LSF parameter cores must be an integer >= 1, got {cores!r}")
    _check(mem_gb is None or (_is_number(mem_gb) and mem_gb > 0),
           f"LSF parameter mem_gb must be a positive number (total GB for the job), got {mem_gb!r}")
    _check(_is_int(gpus) and gpus >= 0, f"LSF parameter gpus must be an integer >= 0, got {gpus!r}")
    _check(_is_number(timeout_min) and timeout_min > 0,
           f"LSF parameter timeout_min must be a positive number of minutes, got {timeout_min!r}")
    _check(_is_number(signal_delay_s) and signal_delay_s >= 0,
           f"LSF parameter signal_delay_s must be a number of seconds >= 0, got {signal_delay_s!r}")
    _check(_is_int(array_parallelism) and array_parallelism >= 1,
           f"LSF parameter array_parallelism must be an integer >= 1, got {array_parallelism!r}")
    _check(setup is None or (not isinstance(setup, str) and all(isinstance(s, str) for s in setup)),
           f"LSF parameter setup must be a list of shell lines, got {setup!r}")
    _check(nodes == 1, f"LSF executor runs jobs on one host (span[hosts=1]); nodes={nodes!r} is not supported")
    _check(tasks_per_node == 1,
           f"LSF executor runs one task per job; tasks_per_node={tasks_per_node!r} is not supported")
    _check(isinstance(stderr_to_stdout, bool), f"LSF parameter stderr_to_stdout must be a bool, got {stderr_to_stdout!r}")
    warn_min, wall_min = max(1, math.ceil(signal_delay_s / 60)), max(1, math.ceil(timeout_min))
    _check(warn_min < wall_min, f"LSF parameter signal_delay_s={signal_delay_s!r} gives the warning (-wt {warn_min}, "
           f"whole minutes) no earlier than the walltime (-W {_minutes(timeout_min)}) ends: lower it or raise "
           "timeout_min")

    paths = utils.JobPaths(folder=folder)
    tag = "%J_%I" if map_count is not None else "%J"

    def lsf_pattern(path: Path) -> str:
        return str(path).replace("%j", tag).replace("%t", "0").replace("%A", "%J").replace("%a", "%I")

    name = job_name
    if map_count is not None:
        _check(_is_int(map_count) and map_count >= 1, f"array size must be >= 1, got {map_count!r}")
        name = f"{job_name}[1-{map_count}]%{min(map_count, array_parallelism)}"

    options: tp.List[tp.Tuple[str, str]] = [("-J", name)]
    if queue is not None:
        options.append(("-q", queue))
    options += [("-n", str(cores)), ("-R", "span[hosts=1]")]
    if mem_gb is not None:
        options.append(("-R", f"rusage[mem={_mem_per_core(mem_gb, cores)}]"))
        if not _sets_option(additional_parameters, "M"):
            options.append(("-M", _mem_per_core(mem_gb, cores)))  # LSF kills a process above it (per core at DTU)
    if gpus:
        options.append(("-gpu", f"num={gpus}:mode=exclusive_process"))
    options.append(("-W", _minutes(timeout_min)))
    options += [("-wa", _warning_signal()), ("-wt", str(warn_min))]
    options.append(("-o", lsf_pattern(paths.stdout)))
    if not stderr_to_stdout:
        options.append(("-e", lsf_pattern(paths.stderr)))

    lines = ["#!/bin/bash", "", "# Parameters"]
    quoted = ("-R", "-gpu")  # DTU's scripts always quote resource strings
    lines += [f"#BSUB {opt} {_bsub_value(value, force=opt in quoted)}" for opt, value in options]
    if additional_parameters:
        if isinstance(additional_parameters, tp.Mapping):
            for key, value in additional_parameters.items():
                _check(isinstance(key, str) and re.fullmatch(r"-?[A-Za-z][\w-]*", key) is not None,
                       f"LSF additional_parameters key must be a bsub option like 'M' or '-M', got {key!r}")
                opt = key if key.startswith("-") else f"-{key}"
                values = value if isinstance(value, (list, tuple)) else [value]
                for v in values:
                    lines.append(f"#BSUB {opt}" if v is True else f"#BSUB {opt} {_bsub_value(str(v))}")
        elif not isinstance(additional_parameters, str) and all(
            isinstance(x, str) for x in additional_parameters
        ):
            for raw in additional_parameters:
                raw = raw.strip()
                raw = raw[len("#BSUB"):].strip() if raw.startswith("#BSUB") else raw
                _check(raw.startswith("-") and "\n" not in raw,
                       f"LSF additional_parameters entries must be bsub options like '-M 5GB', got {raw!r}")
                lines.append(f"#BSUB {raw}")
        else:
            raise ValueError(
                "LSF parameter additional_parameters must be a mapping {option: value} or a list of "
                f"'-opt value' strings, got {additional_parameters!r}"
            )
    if setup:
        lines += ["", "# setup", *setup]

    usr_sig = _warning_signal()
    forwarded = list(dict.fromkeys([usr_sig, "TERM", "INT"]))
    lines += [
        "",
        "# command",
        "export SUBMITIT_EXECUTOR=lsf",
        'if [ "${LSB_JOBINDEX:-0}" != "0" ]; then',
        '    SUBMITIT_LSF_JOB_ID="${LSB_JOBID}_${LSB_JOBINDEX}"',
        "else",
        '    SUBMITIT_LSF_JOB_ID="${LSB_JOBID}"',
        "fi",
        f"SUBMITIT_LSF_EXIT_FILE={_shell_path(str(paths.folder / ('%j' + EXIT_CODE_SUFFIX)))}",
        'rm -f "$SUBMITIT_LSF_EXIT_FILE"',
        "# Python runs in the background (SIGINT restored) so that this shell can forward LSF's signals to it",
        f"( trap - INT; exec {command} ) &",
        "SUBMITIT_LSF_CHILD=$!",
        'submitit_forward() { submitit_trapped=1; kill -s "$1" "$SUBMITIT_LSF_CHILD" 2>/dev/null; }',
        *[f"trap 'submitit_forward {sig}' {sig}" for sig in forwarded],
        *wait_for_child("SUBMITIT_LSF_CHILD", "SUBMITIT_LSF_EXIT_FILE"),
        "",
    ]
    return "\n".join(lines)


@functools.lru_cache()
def _default_parameters() -> tp.Dict[str, tp.Any]:
    import inspect  # pylint: disable=import-outside-toplevel

    spec = inspect.signature(_make_bsub_string)
    return {
        k: p.default
        for k, p in spec.parameters.items()
        if p.default is not inspect.Parameter.empty and k not in ("map_count",)
    }


class LsfExecutor(BoundedSubmission, core.PicklingExecutor):
    """Submits jobs to IBM Spectrum LSF with ``bsub``.

    Parameters (``update_parameters``): queue, cores, mem_gb (total for the job), gpus, timeout_min,
    signal_delay_s, job_name, array_parallelism, setup (shell lines run before Python, e.g.
    ``module load cuda/12.1``), additional_parameters (extra #BSUB lines), stderr_to_stdout; nodes and
    tasks_per_node are accepted for AutoExecutor compatibility and must be 1. A value of None restores the
    default.

    ``folder`` must be on a file system shared with the compute nodes (at DTU: /work3/$USER, ~/).
    """

    job_class = LsfJob

    def __init__(
        self,
        folder: tp.Union[str, Path],
        max_num_timeout: int = 3,
        max_pickle_size_gb: float = 1.0,
        python: tp.Optional[str] = None,
    ) -> None:
        super().__init__(folder, max_num_timeout=max_num_timeout, max_pickle_size_gb=max_pickle_size_gb)
        self.python = shlex.quote(sys.executable) if python is None else python
        if self.affinity() < 0:
            raise RuntimeError('Could not find "bsub" on PATH: is this an LSF cluster (or the LSF emulator)?')

    @classmethod
    def _equivalence_dict(cls) -> core.EquivalenceDict:
        return {
            "name": "job_name",
            "timeout_min": "timeout_min",
            "mem_gb": "mem_gb",
            "nodes": "nodes",
            "cpus_per_task": "cores",
            "gpus_per_node": "gpus",
            "tasks_per_node": "tasks_per_node",
        }

    @classmethod
    def _valid_parameters(cls) -> tp.Set[str]:
        return set(_default_parameters())

    def _internal_update_parameters(self, **kwargs: tp.Any) -> None:
        unknown = sorted(set(kwargs) - self._valid_parameters())
        if unknown:
            raise ValueError(
                f"Unknown LSF executor parameter(s) {', '.join(unknown)}; "
                f"valid: {', '.join(sorted(self._valid_parameters()))}"
            )
        # None means "back to the default", as for submitit's AutoExecutor
        merged = {k: v for k, v in {**self.parameters, **kwargs}.items() if v is not None}
        _make_bsub_string(command="true", folder=self.folder, **merged)
        self.parameters.clear()
        self.parameters.update(merged)

    def _array_jobs(self, first_job: core.Job[tp.Any], n: int) -> tp.List[core.Job[tp.Any]]:
        """The elements of an array (LSF numbers them from 1); only they are tracked."""
        LsfJob.watcher.unregister_job(first_job.job_id)
        return [LsfJob(folder=self.folder, job_id=f"{first_job.job_id}_{i}") for i in range(1, n + 1)]

    @property
    def _submitit_command_str(self) -> str:
        return " ".join([self.python, "-u -m submitit.core._submit", shlex.quote(str(self.folder))])

    def _make_submission_file_text(self, command: str, uid: str) -> str:
        return _make_bsub_string(command=command, folder=self.folder, **self.parameters)

    def _num_tasks(self) -> int:
        return 1

    def _make_submission_command(self, submission_file_path: Path) -> tp.List[str]:
        return ["bsub"]

    def _submission_input(self, submission_file_path: Path) -> str:
        # LSF reads #BSUB directives from a script given on standard input
        return submission_file_path.read_text()

    @staticmethod
    def _get_job_id_from_submission_command(string: tp.Union[bytes, str]) -> str:
        """Job id from bsub's ``Job <12345> is submitted to queue <gpuv100>.``"""
        if not isinstance(string, str):
            string = string.decode()
        match = re.search(r"Job <(\d+)>", string)
        if match is None:
            raise utils.FailedSubmissionError(f"Could not find a job id in bsub's output: {string.strip()!r}")
        return match.group(1)

    @classmethod
    def affinity(cls) -> int:
        return -1 if shutil.which("bsub") is None else 2


# ------------------------------------------------------------------------------ hpcseg's backend


#: hpcseg's states (status.STATES) of the normalised LSF states that differ
_HPCSEG_STATE = {"SUSPENDED": "PENDING"}


def query_states(runs: tp.Sequence[tp.Any], timeout_s: float) -> tp.Tuple[tp.Dict[str, str], tp.List[str]]:
    """hpcseg's state of each run's job, from one bjobs call (see backends.py)."""
    infos = query_lsf([r.job_id for r in runs], timeout_s=timeout_s)
    return {str(k): _HPCSEG_STATE.get(v.state, v.state) for k, v in infos.items()}, []


def job_owners(runs: tp.Sequence[tp.Any], timeout_s: float) -> tp.Dict[str, str]:
    """{job id: user} from one bjobs call; a job bjobs does not find is absent (its non-zero exit is no error)."""
    parents = sorted({_main_id(r.job_id) for r in runs})
    proc = run_command(["bjobs", "-noheader", "-o", "jobid user delimiter=','", *parents], timeout_s, check=False)
    users = dict(line.strip().split(",", 1) for line in proc.stdout.splitlines() if line.count(",") == 1)
    return {r.job_id: users[_main_id(r.job_id)].strip() for r in runs if _main_id(r.job_id) in users}


def cancel(runs: tp.Sequence[tp.Any], timeout_s: float) -> None:
    cancel_lsf([r.job_id for r in runs], timeout_s)


def job_id_from_env(environ: tp.Mapping[str, str]) -> tp.Optional[str]:
    """``12345``, or ``12345[3]`` for an array element, as LSF names it."""
    if not environ.get("LSB_JOBID"):
        return None
    index = environ.get("LSB_JOBINDEX", "0")
    return environ["LSB_JOBID"] + (f"[{index}]" if index not in ("", "0") else "")


def build_executor(plan: tp.Any, folder: Path, dry_run: bool = False) -> LsfExecutor:
    """The LSF executor for hpcseg's submission plan (submit.Plan): one job or an array. A job runs on one host;
    with several GPUs its one task starts a training process per GPU (hpcseg.launch)."""
    if plan.nodes > 1:
        raise ClusterError(f"--nodes {plan.nodes}: an LSF job runs on one host (span[hosts=1]); use --gpus for "
                           "that host's GPUs")
    setup = list(plan.profile.setup)
    ex = dry_run_class(LsfExecutor, dry_run)(folder=folder, max_num_timeout=plan.profile.max_requeues,
                                             python=job_python(setup))
    params: tp.Dict[str, tp.Any] = {
        "job_name": plan.experiment, "timeout_min": plan.minutes, "cores": plan.cpus, "mem_gb": plan.mem_gb,
        "gpus": plan.gpus, "signal_delay_s": plan.signal_delay_s, "array_parallelism": plan.max_parallel}
    if plan.queue:
        params["queue"] = plan.queue
        queue = plan.profile.queues.get(plan.queue)
        if queue is not None and queue.extra:
            params["additional_parameters"] = dict(queue.extra)
    if setup:
        params["setup"] = setup
    ex.update_parameters(**params)
    return ex


def job_script(plan: tp.Any, folder: Path, n_elements: int) -> str:
    return submission_text(build_executor(plan, folder, dry_run=True), n_elements)
