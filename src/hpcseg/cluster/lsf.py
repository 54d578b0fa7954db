"""IBM Spectrum LSF as a submitit plugin (DTU's cluster: queues gpuv100/gpua100, 24 h walltime).

submitit finds this module through the entry points in group ``submitit`` (``executor``, ``job_environment``),
so ``submitit.AutoExecutor(folder, cluster="lsf")`` works wherever ``bsub`` is on PATH. What LSF shares with the
other script-driven scheduler (SGE) is in script_plugin.py; this module holds LSF's formats:

- :class:`LsfExecutor` writes a ``#BSUB`` script per job (or one per job array) and submits it with
  ``bsub < script``; the script forwards the warning signal (USR2, sent ``signal_delay_s`` before the run limit
  through ``-wa/-wt``) and TERM/INT to Python and writes its exit code to ``<folder>/<job_id>_exitcode``.
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
import math
import os
import re
import typing as tp
from pathlib import Path

from submitit.core import core, utils

from ..durations import hours_minutes
from ..errors import CommandError, run_command
from .backends import SchedulerState
from .script_plugin import (
    OneTaskEnvironment, ScriptExecutor, ScriptJob, ScriptWatcher, check_parameters, executor_for_plan,
    forwarding_tail, parse_exit_code)
from .scripts import (
    CANCEL_EXIT_CODES, submission_text, check_parameter as _check, is_int as _is_int,
    warning_signal as _warning_signal)
from .unreadable import unknown_states, unreadable_lines

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

#: bjobs fields read by the watcher and :func:`query_lsf` (one line per job or array element); the exit reason last,
#: as it is free text (https://www.ibm.com/docs/SSWRJV_10.1.0/lsf_admin/termination_reasons_lsf.html)
BJOBS_FORMAT = "jobid jobindex stat exit_code exit_reason delimiter=','"
#: bjobs lists finished jobs (within CLEAN_PERIOD) only with -a on some sites: always ask with it
BJOBS_ALL = "-a"

_NOT_FOUND = re.compile(r"Job <([^>]+)> is not found")
#: bjobs' answer, without a job id, when none of the jobs asked about is unfinished (and -a was not honoured)
_NONE_UNFINISHED = re.compile(r"No (unfinished )?job found")
#: LSF's termination reasons that are a cancel (by the owner or an administrator); any other ends the job FAILED
_CANCEL_REASONS = ("TERM_OWNER", "TERM_FORCE_OWNER", "TERM_ADMIN", "TERM_FORCE_ADMIN", "TERM_REQUEUE_OWNER",
                   "TERM_REQUEUE_ADMIN")
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
    state: str  #: PENDING, RUNNING, COMPLETED, FAILED, CANCELLED, SUSPENDED, TIMEOUT or UNKNOWN
    reason: tp.Optional[str] = None  #: LSF's exit reason (``TERM_MEMLIMIT: job killed after ...``), None for "-"

    @property
    def lsf_id(self) -> str:
        return to_lsf_id(self.job_id)


def normalise_state(stat: str, exit_code: tp.Optional[int] = None, reason: tp.Optional[str] = None) -> str:
    """Map LSF's STAT (exit code, exit reason) to PENDING/RUNNING/COMPLETED/FAILED/CANCELLED/SUSPENDED/TIMEOUT/UNKNOWN.

    LSF's memory-limit kill starts with SIGINT, as a bkill does (exit code 130): the exit reason tells them apart."""
    stat = stat.strip().upper()
    if stat == "EXIT":
        keyword = (reason or "").split(":", 1)[0].strip().upper()
        if keyword == "TERM_RUNLIMIT":
            return "TIMEOUT"
        if keyword.startswith("TERM_"):
            return "CANCELLED" if keyword in _CANCEL_REASONS else "FAILED"
        return "CANCELLED" if exit_code in CANCEL_EXIT_CODES else "FAILED"
    return _STAT_TO_STATE.get(stat, "UNKNOWN")


def kill_message(reason: tp.Optional[str], mem_gb: tp.Any = None, walltime: tp.Any = None) -> tp.Optional[str]:
    """One line for a job LSF itself ended: "killed by LSF: memory limit (16 GB)"; None for another reason."""
    keyword = (reason or "").split(":", 1)[0].strip().upper()
    if keyword == "TERM_MEMLIMIT":
        asked = f" ({mem_gb:g} GB)" if isinstance(mem_gb, (int, float)) and not isinstance(mem_gb, bool) else ""
        return f"killed by LSF: memory limit{asked}; raise --mem or lower data.host_memory_gb"
    if keyword == "TERM_RUNLIMIT":
        return f"killed by LSF: run time limit{f' ({walltime})' if isinstance(walltime, str) else ''}"
    if keyword.startswith("TERM_") and keyword not in _CANCEL_REASONS:
        return f"killed by LSF: {reason.strip()}"
    return None


def _parse_bjobs_lines(stdout: str, unreadable: tp.Optional[tp.List[str]] = None) -> tp.Dict[str, LsfJobInfo]:
    """Lines of ``bjobs -noheader -o BJOBS_FORMAT`` -> {submitit id: info}; a line that is no job's (binary
    garbage, a message) is appended to `unreadable`."""
    infos: tp.Dict[str, LsfJobInfo] = {}
    for line in stdout.splitlines():
        parts = [p.strip() for p in (line.split(",") if "," in line else line.split())]
        if len(parts) < 3 or not parts[0].isdigit() or not re.fullmatch(r"\d+|-|", parts[1]) or not parts[2]:
            if line.strip() and unreadable is not None:
                unreadable.append(line)
            continue
        jobid, index, stat = parts[0], parts[1], parts[2]
        exit_code = parse_exit_code(parts[3]) if len(parts) > 3 else None
        reason = ",".join(parts[4:]).strip() if len(parts) > 4 else ""  # free text: may hold the delimiter
        reason = None if reason in ("", "-") else reason
        key = jobid if index in ("0", "-", "") else f"{jobid}_{int(index)}"
        infos[key] = LsfJobInfo(key, stat, exit_code, normalise_state(stat, exit_code, reason), reason)
    return infos


def _bjobs(main_ids: tp.Iterable[str], timeout_s: float, unreadable: tp.Optional[tp.List[str]] = None,
           ) -> tp.Tuple[tp.Dict[str, LsfJobInfo], tp.Set[str]]:
    """One bjobs call -> (infos by submitit id, main ids that LSF does not know); lines of its answer that are no
    job's go to `unreadable`."""
    ids = sorted(set(main_ids), key=lambda x: (len(x), x))
    proc = run_command(["bjobs", BJOBS_ALL, "-noheader", "-o", BJOBS_FORMAT, *ids], timeout_s, check=False)
    not_found: tp.Set[str] = set()
    errors = []
    none_left = False
    for line in proc.stderr.splitlines():
        m = _NOT_FOUND.search(line)
        if m:
            not_found.add(_main_id(m.group(1)))
        elif _NONE_UNFINISHED.search(line):
            none_left = True
        elif line.strip():
            errors.append(line.strip())
    infos = _parse_bjobs_lines(proc.stdout, unreadable)
    if none_left:  # no job id in this answer: every job asked about and not listed is gone
        listed = {_main_id(k) for k in infos}
        not_found.update(i for i in ids if i not in listed)
    if proc.returncode != 0 and (errors or not not_found):  # "not found" alone is an answer, not a failure
        raise LsfCommandError(f"bjobs exited {proc.returncode}: {errors[0] if errors else 'no message'}",
                              proc.returncode, proc.stderr)
    return infos, not_found


def query_lsf(job_ids: tp.Sequence[str], timeout_s: float = 10,
              unreadable: tp.Optional[tp.List[str]] = None) -> tp.Dict[str, LsfJobInfo]:
    """States of many jobs with ONE bjobs call.

    ``job_ids`` may be ``12345``, ``12345_3`` or ``12345[3]``. The result is keyed by submitit ids:
    a requested element under ``12345_3``, a plain job under ``12345``, and a plain id naming an
    array under each of its elements (``12345_1``, ...). Jobs that LSF does not know (never existed,
    or finished longer ago than CLEAN_PERIOD) are absent. Raises :class:`LsfCommandError` when bjobs
    is missing, fails or does not answer within ``timeout_s``. Lines of bjobs' answer that are no job's go to
    ``unreadable``.
    """
    requested = [from_lsf_id(j) for j in job_ids]
    if not requested:
        return {}
    infos, _ = _bjobs((_main_id(j) for j in requested), timeout_s, unreadable)
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


class LsfInfoWatcher(ScriptWatcher):
    """Shared by all LsfJobs: one ``bjobs`` call for every unfinished job (arrays queried by their id).

    States are the normalised ones of :func:`normalise_state`; a job that bjobs no longer knows gets its state
    from its own files (script_plugin.ScriptWatcher).
    """

    scheduler = "bjobs"

    def _query(self, job_ids: tp.Set[str]) -> tp.Dict[str, tp.Optional[tp.Dict[str, str]]]:
        infos, not_found = _bjobs({_main_id(j) for j in job_ids}, self.timeout_s)
        out: tp.Dict[str, tp.Optional[tp.Dict[str, str]]] = {k: _as_dict(v) for k, v in infos.items()}
        out.update({j: None for j in job_ids if _main_id(j) in not_found})
        return out


def _as_dict(info: LsfJobInfo) -> tp.Dict[str, str]:
    return {"JobID": info.job_id, "STAT": info.stat, "State": info.state, "Source": "bjobs",
            "EXIT_CODE": "" if info.exit_code is None else str(info.exit_code), "Reason": info.reason or ""}


class LsfJob(ScriptJob[core.R]):
    _cancel_command = "bkill"
    _cancel = staticmethod(cancel_lsf)
    watcher = LsfInfoWatcher(delay_s=600)

    @property
    def lsf_id(self) -> str:
        """The id LSF commands take: ``12345`` or ``12345[3]``."""
        return to_lsf_id(self.job_id)

    def _interrupt(self, timeout: bool = False) -> None:
        """Sends the preemption/timeout signal to the job (for tests): the job requeues if it can."""
        del timeout  # LSF has one warning signal for both
        run_command(["bkill", "-s", LsfJobEnvironment.USR_SIG, self.lsf_id], 60)


# ---------------------------------------------------------------------------------- environment


class LsfJobEnvironment(OneTaskEnvironment):
    """Inside an LSF job: one task per job (submitit's task ranks are all 0)."""

    _env = {
        "job_id": "LSB_JOBID",
        "array_job_id": "LSB_JOBID",
        "array_task_id": "LSB_JOBINDEX",
    }

    @property
    def array_task_id(self) -> tp.Optional[str]:
        index = os.environ.get("LSB_JOBINDEX", "0").strip()
        return None if index in ("", "0") else index

    @property
    def hostnames(self) -> tp.List[str]:
        """Hosts of the job, from ``LSB_MCPU_HOSTS`` ("hostA 4 hostB 2") or ``LSB_HOSTS`` (one per slot)."""
        mcpu = os.environ.get("LSB_MCPU_HOSTS", "").split()
        hosts = mcpu[0::2] if mcpu else os.environ.get("LSB_HOSTS", "").split()
        unique = list(dict.fromkeys(hosts))
        return unique or [self.hostname]

    def _requeue_command(self, job_id: str) -> tp.List[str]:
        return ["brequeue", to_lsf_id(job_id)]


# ------------------------------------------------------------------------------------- executor


def _bsub_value(value: str, force: bool = False) -> str:
    """Quotes a #BSUB argument the way LSF users write it (double quotes when needed or forced)."""
    if not force and re.fullmatch(r"[\w.,:/%@+=-]+", value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


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
    _check(queue is None or (isinstance(queue, str) and re.fullmatch(r"[\w.-]+", queue) is not None),
           f"LSF parameter queue must be a queue name, got {queue!r}")
    check_parameters("LSF", "span[hosts=1]", [
        ("job_name", job_name), ("folder", folder), ("command", command),
        *(("additional_parameters", item) for item in _flat(additional_parameters))],
        cores=cores, mem_gb=mem_gb, gpus=gpus, timeout_min=timeout_min, signal_delay_s=signal_delay_s,
        array_parallelism=array_parallelism, setup=setup, nodes=nodes, tasks_per_node=tasks_per_node,
        stderr_to_stdout=stderr_to_stdout)
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

    lines += forwarding_tail("lsf", folder, command, job_var="LSB_JOBID", index_var="LSB_JOBINDEX", no_index="0")
    return "\n".join(lines)


class LsfExecutor(ScriptExecutor):
    """Submits jobs to IBM Spectrum LSF with ``bsub``.

    Parameters (``update_parameters``): queue, cores, mem_gb (total for the job), gpus, timeout_min,
    signal_delay_s, job_name, array_parallelism, setup (shell lines run before Python, e.g.
    ``module load python3/3.11.9``), additional_parameters (extra #BSUB lines), stderr_to_stdout; nodes and
    tasks_per_node are accepted for AutoExecutor compatibility and must be 1. A value of None restores the
    default.

    ``folder`` must be on a file system shared with the compute nodes (at DTU: /work3/$USER, ~/).
    """

    job_class = LsfJob
    scheduler = "LSF"
    submit_command = "bsub"
    one_host = "span[hosts=1]"
    job_id_line = 'hpcseg_job=$LSB_JOBID; [ "${LSB_JOBINDEX:-0}" = 0 ] || hpcseg_job=${LSB_JOBID}_$LSB_JOBINDEX'
    _make_script = staticmethod(_make_bsub_string)

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


# ------------------------------------------------------------------------------ hpcseg's backend


#: hpcseg's states (status.STATES) of the normalised LSF states that differ
_HPCSEG_STATE = {"SUSPENDED": "PENDING"}


def query_states(runs: tp.Sequence[tp.Any], timeout_s: float) -> tp.Tuple[tp.Dict[str, str], tp.List[str]]:
    """hpcseg's state of each run's job, from one bjobs call (see backends.py); a job LSF killed itself (memory or
    run time limit) carries the reason as one line, with what the run asked for."""
    unreadable: tp.List[str] = []
    infos = query_lsf([r.job_id for r in runs], timeout_s=timeout_s, unreadable=unreadable)
    unknown: tp.Dict[str, tp.List[str]] = {}
    for key, info in infos.items():  # LSF's own UNKWN/ZOMBI are states it knows; any other word is not
        if info.stat.upper() not in _STAT_TO_STATE and info.stat.upper() != "EXIT":
            unknown.setdefault(info.stat, []).append(str(key))
    notes = unknown_states("bjobs", unknown) + ([unreadable_lines("bjobs", unreadable)] if unreadable else [])
    asked = {str(r.job_id): (r.record.get("resources") or {}) for r in runs if isinstance(r.record, dict)}
    states: tp.Dict[str, str] = {}
    for key, info in infos.items():
        resources = asked.get(str(key)) or asked.get(_main_id(key)) or {}
        if not isinstance(resources, dict):
            resources = {}
        message = kill_message(info.reason, resources.get("mem_gb"), resources.get("time"))
        states[str(key)] = SchedulerState(_HPCSEG_STATE.get(info.state, info.state), message)
    for run in runs:  # forgotten by bjobs (CLEAN_PERIOD): LSF's job report at the end of the log still says why
        reason = None if str(run.job_id) in states else _reported_reason(run)
        if reason is not None:
            resources = asked.get(str(run.job_id)) or {}
            resources = resources if isinstance(resources, dict) else {}
            state = normalise_state("EXIT", None, reason)
            states[str(run.job_id)] = SchedulerState(state, kill_message(reason, resources.get("mem_gb"),
                                                                         resources.get("time")))
    return states, notes


#: the termination reason line of LSF's job report, appended to the job's output file when it ends
_REPORTED = re.compile(r"^TERM_[A-Z_]+: .*$", re.MULTILINE)


def _reported_reason(run: tp.Any, tail: int = 8192) -> tp.Optional[str]:
    """The exit reason in the job report LSF appended to the run's log (its last report, of the last attempt)."""
    from .runs import NotTrusted, open_owned

    path = run.log_path(False) if getattr(run, "trusted", False) else None
    if path is None:
        return None
    try:
        with open_owned(path) as fh:
            fh.seek(max(0, os.fstat(fh.fileno()).st_size - tail))
            text = fh.read(tail).decode(errors="replace")
    except (OSError, NotTrusted):
        return None
    report = text.rsplit("Sender: LSF System", 1)
    if len(report) < 2:
        return None
    found = _REPORTED.findall(report[1])
    return found[-1].strip() if found else None


def job_owners(runs: tp.Sequence[tp.Any], timeout_s: float) -> tp.Dict[str, str]:
    """{job id: user} from one bjobs call; a job bjobs does not find is absent (its non-zero exit is no error)."""
    parents = sorted({_main_id(r.job_id) for r in runs})
    proc = run_command(["bjobs", BJOBS_ALL, "-noheader", "-o", "jobid user delimiter=','", *parents], timeout_s,
                       check=False)
    users = dict(line.strip().split(",", 1) for line in proc.stdout.splitlines() if line.count(",") == 1)
    return {r.job_id: users[_main_id(r.job_id)].strip() for r in runs if _main_id(r.job_id) in users}


def cancel(runs: tp.Sequence[tp.Any], timeout_s: float) -> None:
    cancel_lsf([r.job_id for r in runs], timeout_s)


def peek_command(job_id: str, follow: bool) -> tp.List[str]:
    """bpeek [-f]: a running job's output so far, which LSF spools until the job ends unless the site sets
    LSB_STDOUT_DIRECT=y (https://www.ibm.com/docs/en/SSWRJV_10.1.0/lsf_command_ref/bpeek.1.html)."""
    return ["bpeek", *(["-f"] if follow else []), to_lsf_id(job_id)]


def job_id_from_env(environ: tp.Mapping[str, str]) -> tp.Optional[str]:
    """``12345``, or ``12345[3]`` for an array element, as LSF names it."""
    if not environ.get("LSB_JOBID"):
        return None
    index = environ.get("LSB_JOBINDEX", "0")
    return environ["LSB_JOBID"] + (f"[{index}]" if index not in ("", "0") else "")


def build_executor(plan: tp.Any, folder: Path, dry_run: bool = False) -> LsfExecutor:
    """The LSF executor for hpcseg's submission plan (submit.Plan): one job or an array on one host
    (span[hosts=1]); a profile queue's `extra` table gives extra #BSUB options."""
    return executor_for_plan(LsfExecutor, plan, folder, dry_run, job_name=plan.experiment)


def job_script(plan: tp.Any, folder: Path, n_elements: int) -> str:
    return submission_text(build_executor(plan, folder, dry_run=True), n_elements)
