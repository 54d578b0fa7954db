"""(Son of) Grid Engine as an hpcseg backend (see backends.py) and a submitit executor.

Tested against a real single-node SGE 8.1.9 (Debian's gridengine packages, started by
``hpc/dev-cluster/sge-start.sh``). Shape follows hpcseg's LSF plugin (lsf.py):

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
import xml.etree.ElementTree as ElementTree
from pathlib import Path

from submitit.core import core, job_environment, logger, utils

from ..errors import ClusterError, CommandError, run_command
from .runs import my_user
from .scripts import (
    CONTROL, EXIT_CODE_SUFFIX, BoundedSubmission, dry_run_class, job_python, submission_text,
    check_parameter as _check, is_int as _is_int, is_number as _is_number, wait_for_child,
    warning_signal as _warning_signal)

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


def parse_qstat_xml(text: str) -> tp.Dict[str, SgeJobInfo]:
    """``qstat -xml`` -> {submitit id: info}; an array's tasks each under ``12345_N`` (pending ranges expanded)."""
    try:
        root = ElementTree.fromstring(text)
    except ElementTree.ParseError as err:
        raise CommandError(f"qstat -xml printed no valid XML ({err})", 0, text[-200:]) from None
    infos: tp.Dict[str, SgeJobInfo] = {}
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
    return infos


def parse_qacct(text: str) -> tp.Dict[str, SgeJobInfo]:
    """``qacct -j`` records -> {submitit id: info of the job's or task's LAST record} (a requeued job has one
    record per attempt, in the order they ended)."""
    infos: tp.Dict[str, SgeJobInfo] = {}
    for block in re.split(r"^=+\s*$", text, flags=re.M):
        fields: tp.Dict[str, str] = {}
        for line in block.splitlines():
            key, _, value = line.partition(" ")
            if key:
                fields[key] = value.strip()
        number = fields.get("jobnumber", "")
        if not number.isdigit():
            continue
        task = fields.get("taskid", "undefined")
        key = f"{number}_{int(task)}" if task.isdigit() else number
        failed = int(m.group()) if (m := re.match(r"\d+", fields.get("failed", ""))) else -1
        code = int(m.group()) if (m := re.match(r"-?\d+", fields.get("exit_status", ""))) else -1
        infos[key] = SgeJobInfo(key, f"failed={failed} exit={code}", qacct_state(failed, code),
                                fields.get("owner", ""), "qacct", code)
    return infos


def _qstat(timeout_s: float, user: str = "*") -> tp.Dict[str, SgeJobInfo]:
    """Every job of `user` that qstat lists (all users by default: cancel checks owners), from one call."""
    return parse_qstat_xml(run_command(["qstat", "-xml", "-u", user], timeout_s).stdout)


def _qacct(main_ids: tp.Collection[str], since: tp.Optional[float], timeout_s: float) -> tp.Dict[str, SgeJobInfo]:
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
    infos = parse_qacct(proc.stdout)
    return {k: v for k, v in infos.items() if k.split("_")[0] in main_ids}


def query_sge(job_ids: tp.Sequence[str], timeout_s: float = 10,
              since: tp.Optional[float] = None) -> tp.Dict[str, SgeJobInfo]:
    """States of many jobs: ONE qstat call, and one qacct call for the jobs qstat no longer lists.

    ``job_ids`` may be ``12345``, ``12345_3`` or ``12345.3``; the result is keyed by submitit ids (a plain id
    naming an array under each of its tasks that qstat lists, or, once it lists none, that accounting knows: hpcseg
    asks for each task by its own id). ``since`` (a time before the jobs were submitted) bounds the
    accounting records read. Raises CommandError when qstat or qacct fails or hangs.
    """
    requested = [from_sge_id(j) for j in job_ids]
    if not requested:
        return {}
    infos = _qstat(timeout_s, my_user())  # this user's jobs: hpcseg asks about its own runs

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
        records = _qacct({j.split("_")[0] for j in missing}, since, timeout_s)
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


def _exit_code_file(paths: utils.JobPaths) -> Path:
    return paths.folder / f"{paths.job_id}{EXIT_CODE_SUFFIX}"


class SgeInfoWatcher(core.InfoWatcher):
    """Shared by all SgeJobs: one qstat call (and one qacct call for jobs qstat has forgotten) per update.

    A job neither lists gets its state from its files (the exit-code file of the job script, else submitit's
    result pickle); with neither it is UNKNOWN for ``not_found_grace_s`` (accounting is written as a job ends,
    on some sites later), then FAILED.
    """

    not_found_grace_s = 60.0
    timeout_s = 60.0

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

    def _make_command(self) -> tp.Optional[tp.List[str]]:
        return ["qstat", "-xml", "-u", my_user()] if self._registered - self._finished else None

    def read_info(self, string: tp.Union[bytes, str]) -> tp.Dict[str, tp.Dict[str, str]]:
        if not isinstance(string, str):
            string = string.decode()
        return {k: self._as_dict(v) for k, v in parse_qstat_xml(string).items()}

    @staticmethod
    def _as_dict(info: SgeJobInfo) -> tp.Dict[str, str]:
        return {"JobID": info.job_id, "State": info.state, "Raw": info.raw, "Source": info.source,
                "EXIT_CODE": "" if info.exit_code is None else str(info.exit_code)}

    def _info_from_files(self, job_id: str) -> tp.Dict[str, str]:
        paths = self._paths.get(job_id)
        try:
            text = _exit_code_file(paths).read_text().strip() if paths is not None else ""
        except OSError:
            text = ""
        if re.fullmatch(r"-?\d+", text):
            code = int(text)
            return {"JobID": job_id, "State": "COMPLETED" if code == 0 else
                    ("CANCELLED" if code in CANCEL_EXIT_CODES else "FAILED"), "Source": "files", "EXIT_CODE": text}
        if paths is not None and paths.result_pickle.exists():
            return {"JobID": job_id, "State": "COMPLETED", "Source": "files"}
        if time.time() - self._first_seen.get(job_id, time.time()) < self.not_found_grace_s:
            return {"JobID": job_id, "State": "UNKNOWN", "Source": "files"}
        return {"JobID": job_id, "State": "FAILED", "Source": "files",
                "Reason": "neither qstat nor qacct knows the job, and it left no exit-code file nor result"}

    def update(self) -> None:
        to_check = self._registered - self._finished
        if not to_check:
            return
        self._num_calls += 1
        try:
            since = min(self._first_seen.get(j, time.time()) for j in to_check)
            infos = query_sge(sorted(to_check), self.timeout_s, since=since)
        except CommandError as e:
            logger.get_logger().warning(f"Call #{self.num_calls} - {e}; status may be inaccurate.")
        else:
            for job_id in to_check:
                info = infos.get(job_id)
                self._info_dict[job_id] = self._as_dict(info) if info else self._info_from_files(job_id)
        self._last_status_check = time.time()
        for job_id in to_check:
            if self.is_done(job_id, mode="cache"):
                self._finished.add(job_id)

    def is_done(self, job_id: str, mode: str = "standard") -> bool:
        return self.get_state(job_id, mode=mode) in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT")

    def get_state(self, job_id: str, mode: str = "standard") -> str:
        return self.get_info(job_id, mode=mode).get("State") or "UNKNOWN"


class SgeJob(core.Job[core.R]):
    _cancel_command = "qdel"
    watcher = SgeInfoWatcher(delay_s=600)

    def _register_in_watcher(self) -> None:
        super()._register_in_watcher()
        if not self._tasks[0]:
            self.watcher.register_paths(self.job_id, self.paths)

    @property
    def sge_id(self) -> str:
        """The id SGE commands take: ``12345`` or ``12345.3``."""
        return to_sge_id(self.job_id)

    def cancel(self, check: bool = True) -> None:
        try:
            cancel_sge([self.job_id])
        except CommandError:
            if check:
                raise


# ---------------------------------------------------------------------------------- environment


class SgeJobEnvironment(job_environment.JobEnvironment):
    """Inside an SGE job: one task per job (submitit's task ranks are all 0)."""

    _env = {"job_id": "JOB_ID", "array_job_id": "JOB_ID", "array_task_id": "SGE_TASK_ID"}

    @property
    def array_job_id(self) -> tp.Optional[str]:
        return os.environ.get("JOB_ID") if self.array_task_id is not None else None

    @property
    def array_task_id(self) -> tp.Optional[str]:
        task = os.environ.get("SGE_TASK_ID", "").strip()
        return task if task.isdigit() else None  # "undefined" outside arrays

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
        """Hosts of the job: the first column of ``$PE_HOSTFILE`` for a parallel job, else this host."""
        try:
            lines = Path(os.environ["PE_HOSTFILE"]).read_text().splitlines()
        except (KeyError, OSError):
            lines = []
        hosts = list(dict.fromkeys(line.split()[0] for line in lines if line.split()))
        return hosts or [self.hostname]

    def _handle_signals(self, paths: utils.JobPaths, submission: utils.DelayedSubmission) -> None:
        super()._handle_signals(paths, submission)
        # checkpoint and requeue once, however often the warning comes (the shell forwards each USR1)
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

    def _requeue(self, countdown: int) -> None:
        jid = to_sge_id(self.job_id)
        run_command(["qmod", "-rj", jid], 60)
        logger.get_logger().info(f"Requeued job {jid} ({countdown} remaining timeouts)")


# ------------------------------------------------------------------------------------- executor


def _hms(seconds: float) -> str:
    total = max(1, math.ceil(seconds))
    return f"{total // 3600}:{total % 3600 // 60:02d}:{total % 60:02d}"


def _mem_per_slot(mem_gb: float, slots: int) -> str:
    """SGE's memory requests count per slot: the job's total split over its slots, in whole MB (or GB)."""
    mb = math.ceil(mem_gb * 1024 / slots)
    return f"{mb // 1024}G" if mb % 1024 == 0 else f"{mb}M"


def _shell_path(pattern: str) -> str:
    """A path pattern with submitit's %j/%A/%a/%t tags as a quoted shell word using the job's variables."""
    tags = {"%j": "${SUBMITIT_SGE_JOB_ID}", "%A": "${JOB_ID}", "%a": "${SGE_TASK_ID}", "%t": "0"}
    return "".join(f'"{tags[p]}"' if p in tags else shlex.quote(p) for p in re.split(r"(%[jAat])", pattern) if p)


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
    for what, value in [("folder", folder), ("command", command), *(("setup", line) for line in setup or ()),
                        *(("additional_parameters", item) for item in [*extra, *flat])]:
        _check(CONTROL.search(str(value)) is None,
               f"SGE parameter {what} must be one line without control characters, got {value!r}")
    _check(_NOT_IN_DIRECTIVE.search(str(folder)) is None,
           f"SGE job folder {str(folder)!r}: holds '\"', '\\' or '$', which qsub cannot take in a #$ -o path")
    for what, value in (("queue", queue), ("pe_name", pe_name), ("mem_resource", mem_resource),
                        ("gpu_resource", gpu_resource)):
        _check(value is None and what == "queue" or isinstance(value, str) and re.fullmatch(r"[\w.@*-]+", value),
               f"SGE parameter {what} must be a name, got {value!r}")
    _check(_is_int(cores) and cores >= 1, f"SGE parameter cores must be an integer >= 1, got {cores!r}")
    _check(mem_gb is None or (_is_number(mem_gb) and mem_gb > 0),
           f"SGE parameter mem_gb must be a positive number (total GB for the job), got {mem_gb!r}")
    _check(_is_int(gpus) and gpus >= 0, f"SGE parameter gpus must be an integer >= 0, got {gpus!r}")
    _check(_is_number(timeout_min) and timeout_min > 0,
           f"SGE parameter timeout_min must be a positive number of minutes, got {timeout_min!r}")
    _check(_is_number(signal_delay_s) and signal_delay_s >= 0,
           f"SGE parameter signal_delay_s must be a number of seconds >= 0, got {signal_delay_s!r}")
    _check(signal_delay_s < timeout_min * 60,
           f"SGE parameter signal_delay_s={signal_delay_s!r} puts the warning (s_rt) no earlier than the walltime "
           f"(h_rt {_hms(timeout_min * 60)}) ends: lower it or raise timeout_min")
    _check(_is_int(array_parallelism) and array_parallelism >= 1,
           f"SGE parameter array_parallelism must be an integer >= 1, got {array_parallelism!r}")
    _check(setup is None or (not isinstance(setup, str) and all(isinstance(s, str) for s in setup)),
           f"SGE parameter setup must be a list of shell lines, got {setup!r}")
    _check(nodes == 1, f"SGE executor runs jobs on one host; nodes={nodes!r} is not supported")
    _check(tasks_per_node == 1, f"SGE executor runs one task per job; tasks_per_node={tasks_per_node!r} is not supported")

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

    usr_sig = _warning_signal()
    forwarded = list(dict.fromkeys([usr_sig, "TERM", "INT"]))
    lines += [
        "",
        "# command",
        "export SUBMITIT_EXECUTOR=sge",
        'if [ "${SGE_TASK_ID:-undefined}" != "undefined" ]; then',
        '    SUBMITIT_SGE_JOB_ID="${JOB_ID}_${SGE_TASK_ID}"',
        "else",
        '    SUBMITIT_SGE_JOB_ID="${JOB_ID}"',
        "fi",
        f"SUBMITIT_SGE_EXIT_FILE={_shell_path(str(paths.folder / ('%j' + EXIT_CODE_SUFFIX)))}",
        'rm -f "$SUBMITIT_SGE_EXIT_FILE"',
        "# Python runs in the background so that this shell can forward signals to it; it ignores the soft",
        f"# walltime signal ({SOFT_LIMIT_SIGNAL}, sent to the whole process group), which this shell turns into "
        f"{usr_sig}",
        f"( trap - INT; trap '' {SOFT_LIMIT_SIGNAL}; exec {command} ) &",
        "SUBMITIT_SGE_CHILD=$!",
        'submitit_forward() { submitit_trapped=1; kill -s "$1" "$SUBMITIT_SGE_CHILD" 2>/dev/null; }',
        f"trap 'submitit_forward {usr_sig}' {SOFT_LIMIT_SIGNAL}",
        *[f"trap 'submitit_forward {sig}' {sig}" for sig in forwarded],
        *wait_for_child("SUBMITIT_SGE_CHILD", "SUBMITIT_SGE_EXIT_FILE"),
        "",
    ]
    return "\n".join(lines)


@functools.lru_cache()
def _default_parameters() -> tp.Dict[str, tp.Any]:
    import inspect  # pylint: disable=import-outside-toplevel

    spec = inspect.signature(_make_qsub_string)
    return {k: p.default for k, p in spec.parameters.items()
            if p.default is not inspect.Parameter.empty and k not in ("map_count",)}


class SgeExecutor(BoundedSubmission, core.PicklingExecutor):
    """Submits jobs to (Son of) Grid Engine with ``qsub``.

    Parameters (``update_parameters``): queue, cores, mem_gb (total for the job), gpus, timeout_min,
    signal_delay_s, job_name, array_parallelism, pe_name (parallel environment for cores > 1, default smp),
    mem_resource (default mem_free; h_vmem where the site enforces it), gpu_resource (default gpu), setup,
    additional_parameters (extra #$ lines), stderr_to_stdout; nodes and tasks_per_node must be 1. None restores
    the default. ``folder`` must be on a file system shared with the execution hosts.
    """

    job_class = SgeJob

    def __init__(self, folder: tp.Union[str, Path], max_num_timeout: int = 3, max_pickle_size_gb: float = 1.0,
                 python: tp.Optional[str] = None) -> None:
        super().__init__(folder, max_num_timeout=max_num_timeout, max_pickle_size_gb=max_pickle_size_gb)
        self.python = shlex.quote(sys.executable) if python is None else python
        if self.affinity() < 0:
            raise RuntimeError('Could not find "qsub" on PATH: is this a Grid Engine cluster?')

    @classmethod
    def name(cls) -> str:
        return "sge"

    @classmethod
    def _equivalence_dict(cls) -> core.EquivalenceDict:
        return {"name": "job_name", "timeout_min": "timeout_min", "mem_gb": "mem_gb", "nodes": "nodes",
                "cpus_per_task": "cores", "gpus_per_node": "gpus", "tasks_per_node": "tasks_per_node"}

    @classmethod
    def _valid_parameters(cls) -> tp.Set[str]:
        return set(_default_parameters())

    def _internal_update_parameters(self, **kwargs: tp.Any) -> None:
        unknown = sorted(set(kwargs) - self._valid_parameters() - {"map_count"})
        if unknown:
            raise ValueError(f"Unknown SGE executor parameter(s) {', '.join(unknown)}; "
                             f"valid: {', '.join(sorted(self._valid_parameters()))}")
        merged = {k: v for k, v in {**self.parameters, **kwargs}.items() if v is not None}
        _make_qsub_string(command="true", folder=self.folder, **merged)
        self.parameters.clear()
        self.parameters.update(merged)

    def _array_jobs(self, first_job: core.Job[tp.Any], n: int) -> tp.List[core.Job[tp.Any]]:
        """The tasks of an array (SGE numbers them from 1); only they are tracked."""
        SgeJob.watcher.unregister_job(first_job.job_id)
        return [SgeJob(folder=self.folder, job_id=f"{first_job.job_id}_{i}") for i in range(1, n + 1)]

    @property
    def _submitit_command_str(self) -> str:
        return " ".join([self.python, "-u -m submitit.core._submit", shlex.quote(str(self.folder))])

    def _make_submission_file_text(self, command: str, uid: str) -> str:
        return _make_qsub_string(command=command, folder=self.folder, **self.parameters)

    def _num_tasks(self) -> int:
        return 1

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

    @classmethod
    def affinity(cls) -> int:
        return -1 if shutil.which("qsub") is None else 2


# ------------------------------------------------------------------------------ hpcseg's backend


def query_states(runs: tp.Sequence[tp.Any], timeout_s: float) -> tp.Tuple[tp.Dict[str, str], tp.List[str]]:
    """hpcseg's state of each run's job: one qstat call, one qacct call for the jobs qstat forgot."""
    times = [t for r in runs if isinstance(t := r.record.get("submit_time"), (int, float))]
    infos = query_sge([r.job_id for r in runs], timeout_s, since=min(times) if times else None)
    return {r.job_id: infos[from_sge_id(r.job_id)].state for r in runs if from_sge_id(r.job_id) in infos}, []


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
    """The SGE executor for hpcseg's submission plan (submit.Plan): one job or an array. A job runs on one host
    (the parallel environment's slots); with several GPUs its one task starts a training process per GPU
    (hpcseg.launch), as on LSF."""
    if plan.nodes > 1:
        raise ClusterError(f"--nodes {plan.nodes}: an SGE job of hpcseg runs on one host (its parallel environment's "
                           "slots); use --gpus for that host's GPUs")
    setup = list(plan.profile.setup)
    ex = dry_run_class(SgeExecutor, dry_run)(folder=folder, max_num_timeout=plan.profile.max_requeues,
                                             python=job_python(setup))
    params: tp.Dict[str, tp.Any] = {
        "job_name": _job_name(plan.experiment), "timeout_min": plan.minutes, "cores": plan.cpus,
        "mem_gb": plan.mem_gb, "gpus": plan.gpus, "signal_delay_s": plan.signal_delay_s,
        "array_parallelism": plan.max_parallel}
    if plan.queue:
        params["queue"] = plan.queue
        queue = plan.profile.queues.get(plan.queue)
        if queue is not None and queue.extra:
            extra = dict(queue.extra)
            params.update({k: extra.pop(k) for k in _SETTINGS if k in extra})
            if extra:
                params["additional_parameters"] = extra
    if setup:
        params["setup"] = setup
    ex.update_parameters(**params)
    return ex


def job_script(plan: tp.Any, folder: Path, n_elements: int) -> str:
    return submission_text(build_executor(plan, folder, dry_run=True), n_elements)
