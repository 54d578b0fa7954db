"""(Son of) Grid Engine as an hpcseg backend (see backends.py) and a submitit executor.

Tested against a real single-node SGE 8.1.9 (Debian's gridengine packages, started by
``hpc/dev-cluster/sge-start.sh``). What SGE shares with LSF is in script_plugin.py; this module holds SGE's
formats:

- :class:`SgeExecutor` writes a ``#$`` script per job (or one per job array, ``-t 1-N -tc MAX``) and submits
  it with ``qsub`` (bounded, through :class:`~hpcseg.cluster.scripts.BoundedSubmission`). The job asks for the
  walltime as ``h_rt`` and for a soft limit ``s_rt`` ``signal_delay_s`` earlier: at ``s_rt`` SGE sends SIGUSR1
  to the job's process group. The job shell traps it and forwards submitit's warning signal (USR2) to Python,
  which runs in the background with USR1 ignored, so the warning reaches hpcseg's requeue path exactly as LSF's
  and Slurm's USR2 does. (``qsub -notify`` is not used: with it ``qdel`` would send USR2 too, and a cancelled
  job would requeue itself.) Jobs are rerunnable (``-r y``) so that ``qmod -rj`` can requeue them.
- :class:`SgeJob` / :class:`SgeInfoWatcher`: one ``qstat -xml`` call for every unfinished job; a job qstat no
  longer lists gets its state from ``qacct`` (the last accounting record of the job or array task).
- :class:`SgeJobEnvironment`: inside the job (``JOB_ID``, ``SGE_TASK_ID``, ``NSLOTS``, ``PE_HOSTFILE``);
  ``_requeue`` runs ``qmod -rj`` on the job itself, so it resumes under the same id (``RESTARTED=1``).

Job ids: submitit names array elements ``12345_3``; SGE calls them ``12345.3`` (tasks count from 1).

submitit discovers plugins through the entry-point group ``submitit``, and only under the names ``executor`` and
``job_environment`` (submitit 1.5.4, core/plugins.py), so one distribution registers one of each: hpcseg's
``job_environment`` entry point is :func:`hpcseg.cluster.plugins.job_environment`, which returns this module's
environment inside an SGE job (``SUBMITIT_EXECUTOR=sge``, set by the job script) and LSF's elsewhere; the
``executor`` entry point stays LSF's, and hpcseg builds the SGE executor itself (:func:`build_executor`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import time
import typing as tp
import xml.etree.ElementTree as ElementTree
from pathlib import Path

from submitit.core import core, utils

from ..errors import CommandError, run_command
from .runs import my_user
from .script_plugin import (
    OneTaskEnvironment, ScriptExecutor, ScriptJob, ScriptWatcher, check_parameters, executor_for_plan,
    forwarding_tail)
from .scripts import submission_text, check_parameter as _check, is_int as _is_int
from .unreadable import shown, unknown_states, unreadable_lines

#: qstat's state letters -> hpcseg's states (status.STATES), checked in this order on the state string
_QSTAT_STATES = (
    ("E", "FAILED"),  # error state: the job cannot start until someone clears it (qmod -cj)
    ("d", "CANCELLED"),  # being deleted
    ("Rq", "REQUEUED"),  # rescheduled, waiting to run again
    ("r", "RUNNING"), ("t", "RUNNING"),
    ("s", "PENDING"), ("S", "PENDING"), ("T", "PENDING"),  # suspended (as LSF's SUSPENDED)
    ("q", "PENDING"), ("w", "PENDING"), ("h", "PENDING"),
)
#: qacct's "failed" codes with a meaning of their own: 25 rescheduled (requeued), 37 a limit (h_rt) enforced,
#: 100 ended by a signal after the job started ("assumedly after job": qdel)
FAILED_REQUEUED, FAILED_LIMIT, FAILED_AFTER_JOB = 25, 37, 100
#: exit codes of jobs ended by qdel (SIGKILL) or by TERM/INT forwarded by the job shell
CANCEL_EXIT_CODES = (130, 137, 143)
#: what SGE sends at the soft walltime limit s_rt (queue_conf(5)), trapped by the job shell
SOFT_LIMIT_SIGNAL = "USR1"
#: what a path in a #$ directive may not hold: qsub reads a double-quoted argument without escapes, and expands
#: $NAME pseudo variables in -o/-e paths
_NOT_IN_DIRECTIVE = re.compile(r'["\\$]')
#: SGE job names: no blanks, no '/:@\*?', not starting with a digit
_JOB_NAME = re.compile(r"[A-Za-z_][\w.+-]{0,127}")


# ------------------------------------------------------------------------------------------ job ids


def to_sge_id(job_id: str) -> str:
    """submitit's ``12345_3`` -> SGE's ``12345.3``; plain ids unchanged."""
    job_id = str(job_id).strip()
    m = re.fullmatch(r"(\d+)(?:[_.](\d+))?", job_id)
    if m is None:
        raise ValueError(f"Not an SGE job id: {job_id!r}")
    return f"{m.group(1)}.{int(m.group(2))}" if m.group(2) else m.group(1)


def from_sge_id(job_id: str) -> str:
    """SGE's ``12345.3`` -> submitit's ``12345_3``; plain ids unchanged."""
    return to_sge_id(job_id).replace(".", "_")


def _main_id(job_id: str) -> str:
    return to_sge_id(job_id).split(".", 1)[0]


def _expand_tasks(text: str) -> tp.List[int]:
    """qstat's task list ``1``, ``2,3``, ``1-9:2`` or ``4-6:1,9`` -> the task ids."""
    out: tp.List[int] = []
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:-(\d+)(?::(\d+))?)?\s*", part)
        if m:
            lo, hi, step = int(m.group(1)), int(m.group(2) or m.group(1)), int(m.group(3) or 1)
            out += list(range(lo, hi + 1, max(1, step)))
    return out


# ------------------------------------------------------------------------------------ qstat / qacct


def qstat_state(raw: str) -> str:
    """hpcseg's state of a qstat state string (``qw``, ``hqw``, ``r``, ``Rr``, ``Rq``, ``dr``, ``Eqw``...)."""
    for letters, state in _QSTAT_STATES:
        if letters in raw:
            return state
    return "UNKNOWN"


def qacct_state(failed: int, exit_status: int) -> str:
    """hpcseg's state of a finished job from its last accounting record."""
    if failed == FAILED_REQUEUED:
        return "REQUEUED"
    if failed == FAILED_LIMIT:
        return "TIMEOUT"
    if exit_status in CANCEL_EXIT_CODES and failed in (0, FAILED_AFTER_JOB):
        return "CANCELLED"
    return "COMPLETED" if failed == 0 and exit_status == 0 else "FAILED"


@dataclasses.dataclass(frozen=True)
class SgeJobInfo:
    """One SGE job or array task as qstat or qacct reports it."""

    job_id: str  #: submitit form: ``12345`` or ``12345_3``
    raw: str  #: qstat's state letters, or ``failed=N exit=M`` from qacct
    state: str  #: hpcseg's state
    owner: str = ""
    source: str = "qstat"  #: qstat or qacct
    exit_code: tp.Optional[int] = None  #: qacct's exit_status


def _known_letters(raw: str) -> bool:
    return bool(raw) and all(any(c in letters for letters, _ in _QSTAT_STATES) for c in raw)


def parse_qstat_xml(text: str, warnings: tp.Optional[tp.List[str]] = None) -> tp.Dict[str, SgeJobInfo]:
    """``qstat -xml`` -> {submitit id: info}; an array's tasks each under ``12345_N`` (pending ranges expanded).
    A state of letters hpcseg does not know adds a warning to `warnings`."""
    try:
        root = ElementTree.fromstring(text)
    except ElementTree.ParseError as err:
        raise CommandError(f"qstat -xml printed no valid XML ({err}): {shown(text)}", 0, text[-200:]) from None
    infos: tp.Dict[str, SgeJobInfo] = {}
    unknown: tp.Dict[str, tp.List[str]] = {}
    for job in root.iter("job_list"):
        number = (job.findtext("JB_job_number") or "").strip()
        if not number.isdigit():
            continue
        raw = (job.findtext("state") or "").strip()
        owner = (job.findtext("JB_owner") or "").strip()
        tasks = (job.findtext("tasks") or "").strip()
        keys = [f"{number}_{t}" for t in _expand_tasks(tasks)] if tasks else [number]
        for key in keys:
            infos[key] = SgeJobInfo(key, raw, qstat_state(raw), owner, "qstat")
        if not _known_letters(raw):
            unknown.setdefault(raw, []).append(number)
    if warnings is not None:
        warnings += unknown_states("qstat", unknown)
    return infos


def parse_qacct(text: str, warnings: tp.Optional[tp.List[str]] = None) -> tp.Dict[str, SgeJobInfo]:
    """``qacct -j`` records -> {submitit id: info of the job's or task's LAST record} (a requeued job has one
    record per attempt, in the order they ended). A record hpcseg cannot read (no job number, no failed or
    exit_status number) adds a warning to `warnings`; such a job's state is UNKNOWN."""
    infos: tp.Dict[str, SgeJobInfo] = {}
    unreadable: tp.List[str] = []
    for block in re.split(r"^=+\s*$", text, flags=re.M):
        fields: tp.Dict[str, str] = {}
        for line in block.splitlines():
            key, _, value = line.partition(" ")
            if key:
                fields[key] = value.strip()
        number = fields.get("jobnumber", "")
        if not number.isdigit():
            if block.strip():
                unreadable.append(next(ln for ln in block.splitlines() if ln.strip()))
            continue
        task = fields.get("taskid", "undefined")
        key = f"{number}_{int(task)}" if task.isdigit() else number
        failed = int(m.group()) if (m := re.match(r"\d+", fields.get("failed", ""))) else -1
        code = int(m.group()) if (m := re.match(r"-?\d+", fields.get("exit_status", ""))) else -1
        state = qacct_state(failed, code)
        if failed == -1 or (code == -1 and not fields.get("exit_status", "").startswith("-1")):
            unreadable.append(f"job {number}: failed {fields.get('failed', '(none)')}, exit_status "
                              f"{fields.get('exit_status', '(none)')}")
            state = "UNKNOWN"
        infos[key] = SgeJobInfo(key, f"failed={failed} exit={code}", state, fields.get("owner", ""), "qacct", code)
    if unreadable and warnings is not None:
        warnings.append(unreadable_lines("qacct", unreadable))
    return infos


def _qstat(timeout_s: float, user: str = "*", warnings: tp.Optional[tp.List[str]] = None,
           ) -> tp.Dict[str, SgeJobInfo]:
    """Every job of `user` that qstat lists (all users by default: cancel checks owners), from one call."""
    return parse_qstat_xml(run_command(["qstat", "-xml", "-u", user], timeout_s).stdout, warnings)


def _qacct(main_ids: tp.Collection[str], since: tp.Optional[float], timeout_s: float,
           warnings: tp.Optional[tp.List[str]] = None) -> tp.Dict[str, SgeJobInfo]:
    """Accounting records of the jobs, from one qacct call: one job by its id, several as this user's jobs that
    started after `since` (qacct takes one job id only). A job without a record (deleted while pending, or not
    yet written) is absent."""
    if len(main_ids) == 1:
        cmd = ["qacct", "-j", next(iter(main_ids))]
    else:
        cmd = ["qacct", "-o", my_user()]
        if since is not None:
            cmd += ["-b", time.strftime("%Y%m%d%H%M", time.localtime(since - 60))]
        cmd += ["-j"]
    proc = run_command(cmd, timeout_s, check=False)
    if proc.returncode != 0 and "not found" not in proc.stderr:  # "job id N not found": no record, an answer
        last = (proc.stderr.strip().splitlines() or ["no message"])[-1]
        raise CommandError(f"{' '.join(cmd[:3])} exited {proc.returncode}: {last}", proc.returncode, proc.stderr)
    infos = parse_qacct(proc.stdout, warnings)
    return {k: v for k, v in infos.items() if k.split("_")[0] in main_ids}


def query_sge(job_ids: tp.Sequence[str], timeout_s: float = 10, since: tp.Optional[float] = None,
              warnings: tp.Optional[tp.List[str]] = None) -> tp.Dict[str, SgeJobInfo]:
    """States of many jobs: ONE qstat call, and one qacct call for the jobs qstat no longer lists.

    ``job_ids`` may be ``12345``, ``12345_3`` or ``12345.3``; the result is keyed by submitit ids (a plain id
    naming an array under each of its tasks that qstat lists, or, once it lists none, that accounting knows: hpcseg
    asks for each task by its own id). ``since`` (a time before the jobs were submitted) bounds the
    accounting records read. Raises CommandError when qstat or qacct fails or hangs. What hpcseg cannot read in
    their answers adds warnings to ``warnings``.
    """
    requested = [from_sge_id(j) for j in job_ids]
    if not requested:
        return {}
    infos = _qstat(timeout_s, my_user(), warnings)  # this user's jobs: hpcseg asks about its own runs

    def pick(source: tp.Dict[str, SgeJobInfo], job_id: str) -> tp.Dict[str, SgeJobInfo]:
        if job_id in source:
            return {job_id: source[job_id]}
        if "_" not in job_id:
            return {k: v for k, v in source.items() if k.split("_")[0] == job_id}
        return {}

    out: tp.Dict[str, SgeJobInfo] = {}
    for job_id in requested:
        out.update(pick(infos, job_id))
    missing = [j for j in requested if not pick(out, j)]
    if missing:
        records = _qacct({j.split("_")[0] for j in missing}, since, timeout_s, warnings)
        for job_id in missing:
            out.update(pick(records, job_id))
    return out


def cancel_sge(job_ids: tp.Sequence[str], timeout_s: float = 30) -> None:
    """qdel the given jobs (submitit or SGE ids: ``12345_3`` deletes that task alone) in one call; jobs that
    are over already are no error."""
    ids = [to_sge_id(j) for j in job_ids]
    if not ids:
        return
    proc = run_command(["qdel", *ids], timeout_s, check=False)
    errors = [ln.strip() for ln in (proc.stderr + proc.stdout).splitlines()
              if re.search(r"denied|error|invalid", ln) and "does not exist" not in ln]
    if proc.returncode != 0 and errors:
        raise CommandError(f"qdel exited {proc.returncode}: {errors[-1]}", proc.returncode, proc.stderr)


# ---------------------------------------------------------------------------------- watcher, job


class SgeInfoWatcher(ScriptWatcher):
    """Shared by all SgeJobs: one qstat call (and one qacct call for jobs qstat has forgotten) per update.

    A job neither lists gets its state from its files (script_plugin.ScriptWatcher): accounting is written as a
    job ends, on some sites later.
    """

    scheduler = "neither qstat nor qacct"

    def _query(self, job_ids: tp.Set[str]) -> tp.Dict[str, tp.Optional[tp.Dict[str, str]]]:
        infos = query_sge(sorted(job_ids), self.timeout_s, since=self.first_seen(job_ids))
        return {j: _as_dict(infos[j]) if j in infos else None for j in job_ids}


def _as_dict(info: SgeJobInfo) -> tp.Dict[str, str]:
    return {"JobID": info.job_id, "State": info.state, "Raw": info.raw, "Source": info.source,
            "EXIT_CODE": "" if info.exit_code is None else str(info.exit_code)}


class SgeJob(ScriptJob[core.R]):
    _cancel_command = "qdel"
    _cancel = staticmethod(cancel_sge)
    watcher = SgeInfoWatcher(delay_s=600)

    @property
    def sge_id(self) -> str:
        """The id SGE commands take: ``12345`` or ``12345.3``."""
        return to_sge_id(self.job_id)


# ---------------------------------------------------------------------------------- environment


class SgeJobEnvironment(OneTaskEnvironment):
    """Inside an SGE job: one task per job (submitit's task ranks are all 0)."""

    _env = {"job_id": "JOB_ID", "array_job_id": "JOB_ID", "array_task_id": "SGE_TASK_ID"}

    @property
    def array_task_id(self) -> tp.Optional[str]:
        task = os.environ.get("SGE_TASK_ID", "").strip()
        return task if task.isdigit() else None  # "undefined" outside arrays

    @property
    def hostnames(self) -> tp.List[str]:
        """Hosts of the job: the first column of ``$PE_HOSTFILE`` for a parallel job, else this host."""
        try:
            lines = Path(os.environ["PE_HOSTFILE"]).read_text().splitlines()
        except (KeyError, OSError):
            lines = []
        hosts = list(dict.fromkeys(line.split()[0] for line in lines if line.split()))
        return hosts or [self.hostname]

    def _requeue_command(self, job_id: str) -> tp.List[str]:
        return ["qmod", "-rj", to_sge_id(job_id)]


# ------------------------------------------------------------------------------------- executor


def _hms(seconds: float) -> str:
    total = max(1, math.ceil(seconds))
    return f"{total // 3600}:{total % 3600 // 60:02d}:{total % 60:02d}"


def _mem_per_slot(mem_gb: float, slots: int) -> str:
    """SGE's memory requests count per slot: the job's total split over its slots, in whole MB (or GB)."""
    mb = math.ceil(mem_gb * 1024 / slots)
    return f"{mb // 1024}G" if mb % 1024 == 0 else f"{mb}M"


# pylint: disable=too-many-arguments,too-many-locals,unused-argument
def _make_qsub_string(
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
    pe_name: str = "smp",
    mem_resource: str = "mem_free",
    gpu_resource: str = "gpu",
    setup: tp.Optional[tp.Sequence[str]] = None,
    additional_parameters: tp.Optional[tp.Mapping[str, tp.Any]] = None,
    stderr_to_stdout: bool = False,
    nodes: int = 1,
    tasks_per_node: int = 1,
    map_count: tp.Optional[int] = None,  # internal: number of array elements
) -> str:
    """Text of the SGE batch script; raises ValueError (one line) on a bad parameter.

    cores > 1 asks for that many slots of the parallel environment ``pe_name`` (one host: allocation $pe_slots);
    mem_gb is the job's total memory, asked per slot as ``-l <mem_resource>=...`` (SGE multiplies by the slots);
    gpus as ``-l <gpu_resource>=N`` (a consumable the site defines); timeout_min is ``h_rt`` and
    ``s_rt = h_rt - signal_delay_s`` sends the warning; additional_parameters are extra ``#$`` lines
    ({"l": "gpu_type=v100"} -> ``#$ -l gpu_type=v100``; a list value repeats the option, True gives a bare flag).
    No value may hold a control character (a newline would end a ``#$`` line and start a command), and the folder
    may not hold ``"``, ``\\`` or ``$`` (qsub takes a quoted -o path as it is, and expands ``$NAME`` in it).
    """
    _check(isinstance(job_name, str) and _JOB_NAME.fullmatch(job_name) is not None,
           f"SGE parameter job_name must be letters, digits, '_', '.', '+', '-' not starting with a digit, "
           f"got {job_name!r}")
    extra = additional_parameters or {}
    _check(isinstance(extra, tp.Mapping), f"SGE parameter additional_parameters must be a mapping, got {extra!r}")
    flat = [v for value in extra.values() for v in (value if isinstance(value, (list, tuple)) else [value])]
    check_parameters("SGE", "its parallel environment's slots", [
        ("folder", folder), ("command", command), *(("additional_parameters", item) for item in [*extra, *flat])],
        cores=cores, mem_gb=mem_gb, gpus=gpus, timeout_min=timeout_min, signal_delay_s=signal_delay_s,
        array_parallelism=array_parallelism, setup=setup, nodes=nodes, tasks_per_node=tasks_per_node,
        stderr_to_stdout=stderr_to_stdout)
    _check(_NOT_IN_DIRECTIVE.search(str(folder)) is None,
           f"SGE job folder {str(folder)!r}: holds '\"', '\\' or '$', which qsub cannot take in a #$ -o path")
    for what, value in (("queue", queue), ("pe_name", pe_name), ("mem_resource", mem_resource),
                        ("gpu_resource", gpu_resource)):
        _check(value is None and what == "queue" or isinstance(value, str) and re.fullmatch(r"[\w.@*-]+", value),
               f"SGE parameter {what} must be a name, got {value!r}")
    _check(signal_delay_s < timeout_min * 60,
           f"SGE parameter signal_delay_s={signal_delay_s!r} puts the warning (s_rt) no earlier than the walltime "
           f"(h_rt {_hms(timeout_min * 60)}) ends: lower it or raise timeout_min")

    paths = utils.JobPaths(folder=folder)
    tag = "$JOB_ID_$TASK_ID" if map_count is not None else "$JOB_ID"

    def sge_pattern(path: Path) -> str:  # qsub's -o/-e pseudo variables, double-quoted where blanks need it
        text = str(path).replace("%j", tag).replace("%t", "0").replace("%A", "$JOB_ID").replace("%a", "$TASK_ID")
        return text if re.fullmatch(r"[\w./+,:@=%~$-]+", text) else f'"{text}"'


    # -V: the job gets the submitting environment, as Slurm's and LSF's jobs do by default
    options: tp.List[tp.Tuple[str, str]] = [("-N", job_name), ("-S", "/bin/bash"), ("-V", ""), ("-r", "y")]
    if queue is not None:
        options.append(("-q", queue))
    if cores > 1:
        options.append(("-pe", f"{pe_name} {cores}"))
    wall_s = timeout_min * 60
    options.append(("-l", f"h_rt={_hms(wall_s)},s_rt={_hms(wall_s - signal_delay_s)}"))
    if mem_gb is not None:
        options.append(("-l", f"{mem_resource}={_mem_per_slot(mem_gb, cores)}"))
    if gpus:
        options.append(("-l", f"{gpu_resource}={gpus}"))
    if map_count is not None:
        _check(_is_int(map_count) and map_count >= 1, f"array size must be >= 1, got {map_count!r}")
        options += [("-t", f"1-{map_count}"), ("-tc", str(min(map_count, array_parallelism)))]
    options.append(("-o", sge_pattern(paths.stdout)))
    if stderr_to_stdout:
        options.append(("-j", "y"))
    else:
        options.append(("-e", sge_pattern(paths.stderr)))
    for key, value in extra.items():
        _check(isinstance(key, str) and re.fullmatch(r"-?[A-Za-z][\w-]*", key) is not None,
               f"SGE additional_parameters key must be a qsub option like 'l' or '-l', got {key!r}")
        for v in value if isinstance(value, (list, tuple)) else [value]:
            _check(v is True or re.fullmatch(r"[^\s'\"\\]+", str(v)) is not None,
                   f"SGE additional_parameters value {v!r} of -{key.lstrip('-')}: qsub takes one word without "
                   "blanks or quotes")
            options.append((key if key.startswith("-") else f"-{key}", "" if v is True else str(v)))

    lines = ["#!/bin/bash", "", "# Parameters"]
    lines += [f"#$ {opt} {value}".rstrip() for opt, value in options]
    if setup:
        lines += ["", "# setup", *setup]

    lines += forwarding_tail("sge", folder, command, job_var="JOB_ID", index_var="SGE_TASK_ID", no_index="undefined",
                             soft_limit_signal=SOFT_LIMIT_SIGNAL)
    return "\n".join(lines)


class SgeExecutor(ScriptExecutor):
    """Submits jobs to (Son of) Grid Engine with ``qsub``.

    Parameters (``update_parameters``): queue, cores, mem_gb (total for the job), gpus, timeout_min,
    signal_delay_s, job_name, array_parallelism, pe_name (parallel environment for cores > 1, default smp),
    mem_resource (default mem_free; h_vmem where the site enforces it), gpu_resource (default gpu), setup,
    additional_parameters (extra #$ lines), stderr_to_stdout; nodes and tasks_per_node must be 1. None restores
    the default. ``folder`` must be on a file system shared with the execution hosts.
    """

    job_class = SgeJob
    scheduler = "SGE"
    submit_command = "qsub"
    one_host = "its parallel environment's slots"
    job_id_line = 'hpcseg_job=$JOB_ID; [ "${SGE_TASK_ID:-undefined}" = undefined ] || hpcseg_job=${JOB_ID}_$SGE_TASK_ID'
    _make_script = staticmethod(_make_qsub_string)

    @classmethod
    def name(cls) -> str:
        return "sge"

    def _make_submission_command(self, submission_file_path: Path) -> tp.List[str]:
        return ["qsub", "-terse", str(submission_file_path)]

    @staticmethod
    def _get_job_id_from_submission_command(string: tp.Union[bytes, str]) -> str:
        """Job id from ``qsub -terse``: ``12345`` for a job, ``12345.1-4:1`` for an array."""
        if not isinstance(string, str):
            string = string.decode()
        match = re.search(r"^(\d+)(?:\.\d+-\d+:\d+)?\s*$", string, flags=re.M)
        if match is None:
            raise utils.FailedSubmissionError(f"Could not find a job id in qsub's output: {string.strip()!r}")
        return match.group(1)


# ------------------------------------------------------------------------------ hpcseg's backend


def query_states(runs: tp.Sequence[tp.Any], timeout_s: float) -> tp.Tuple[tp.Dict[str, str], tp.List[str]]:
    """hpcseg's state of each run's job: one qstat call, one qacct call for the jobs qstat forgot."""
    times = [t for r in runs if isinstance(t := r.record.get("submit_time"), (int, float))]
    warnings: tp.List[str] = []
    infos = query_sge([r.job_id for r in runs], timeout_s, since=min(times) if times else None, warnings=warnings)
    return ({r.job_id: infos[from_sge_id(r.job_id)].state for r in runs if from_sge_id(r.job_id) in infos},
            warnings)


def job_owners(runs: tp.Sequence[tp.Any], timeout_s: float) -> tp.Dict[str, str]:
    """{job id: user} from one qstat call; a job qstat does not list (over) is absent."""
    infos = _qstat(timeout_s)
    owners = {k.split("_")[0]: v.owner for k, v in infos.items()}
    return {r.job_id: owners[_main_id(r.job_id)] for r in runs if _main_id(r.job_id) in owners}


def cancel(runs: tp.Sequence[tp.Any], timeout_s: float) -> None:
    cancel_sge([r.job_id for r in runs], timeout_s)


def job_id_from_env(environ: tp.Mapping[str, str]) -> tp.Optional[str]:
    """``12345``, or ``12345_3`` for an array task (submitit's form); None outside an SGE job (JOB_ID alone is
    too common a name: SGE also sets SGE_TASK_ID, "undefined" outside arrays)."""
    job_id, task = environ.get("JOB_ID", ""), environ.get("SGE_TASK_ID", "")
    if not job_id.isdigit() or not task:
        return None
    return f"{job_id}_{task}" if task.isdigit() else job_id


#: hpcseg settings a profile's queue may give in its `extra` table, beside plain qsub options
_SETTINGS = ("pe_name", "mem_resource", "gpu_resource")


def _job_name(experiment: str) -> str:
    """SGE refuses a job name that starts with a digit; hpcseg's experiment names may."""
    return experiment if not experiment[:1].isdigit() else f"hpcseg-{experiment}"


def build_executor(plan: tp.Any, folder: Path, dry_run: bool = False) -> SgeExecutor:
    """The SGE executor for hpcseg's submission plan (submit.Plan): one job or an array on one host; a profile
    queue's `extra` table gives extra qsub options and the settings pe_name, mem_resource and gpu_resource."""
    return executor_for_plan(SgeExecutor, plan, folder, dry_run, job_name=_job_name(plan.experiment),
                             settings=_SETTINGS)


def job_script(plan: tp.Any, folder: Path, n_elements: int) -> str:
    return submission_text(build_executor(plan, folder, dry_run=True), n_elements)
