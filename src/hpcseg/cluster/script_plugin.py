"""The shared core of hpcseg's submitit plugins for schedulers that run a job script (LSF, SGE).

A plugin module (lsf.py, sge.py) holds only its scheduler's formats: the script's options, the job-id syntax, how
to query, cancel and requeue, and how to read the answers. What stays the same from one such scheduler to the next
lives here:

- :class:`ScriptWatcher`: one scheduler query per update for every unfinished job; a job the scheduler no longer
  knows gets its state from the exit-code file its script wrote, else submitit's result pickle, else FAILED once a
  grace period has passed.
- :class:`ScriptJob`: registers its files with the watcher and cancels through the plugin's cancel function.
- :class:`OneTaskEnvironment`: inside a job of one task (hpcseg.launch starts a process per GPU itself); the warning
  signal checkpoints and requeues once, however often it comes.
- :class:`ScriptExecutor`: parameters checked by building the script; array elements numbered from 1.
- :func:`forwarding_tail`: the script's last lines, which run Python in the background, forward the scheduler's
  signals to it and write its exit code.
"""

from __future__ import annotations

import functools
import inspect
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

from ..errors import ClusterError, CommandError, run_command
from .scripts import (
    CANCEL_EXIT_CODES, CONTROL, EXIT_CODE_SUFFIX, BoundedSubmission, check_parameter, dry_run_class, is_int,
    fail_fast_setup, is_number, job_python, wait_for_child, warning_signal)

#: states after which a job will not change again
FINAL_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT")


def exit_code_file(paths: utils.JobPaths) -> Path:
    """Where a job script writes the Python process's exit code."""
    return paths.folder / f"{paths.job_id}{EXIT_CODE_SUFFIX}"


def parse_exit_code(text: str) -> int | None:
    """An exit code as a script or the scheduler prints it (None for "-", blank or anything else)."""
    text = text.strip()
    return int(text) if re.fullmatch(r"-?\d+", text) else None


def read_exit_code(paths: utils.JobPaths) -> int | None:
    try:
        return parse_exit_code(exit_code_file(paths).read_text())
    except OSError:
        return None


# ---------------------------------------------------------------------------------- watcher, job


class ScriptWatcher(core.InfoWatcher):
    """Shared by all jobs of one plugin: one scheduler query per update for every unfinished job.

    A subclass says how to ask (:meth:`_query`); the info dicts it returns hold at least ``State`` (one of
    PENDING, RUNNING, COMPLETED, FAILED, CANCELLED, TIMEOUT, REQUEUED, SUSPENDED, UNKNOWN) and ``Source``.
    """

    not_found_grace_s = 60.0  #: how long a job nobody knows counts as UNKNOWN before it is FAILED
    timeout_s = 60.0  #: the limit of one scheduler query
    scheduler = "the scheduler"  #: who forgot a job, in the reason of its FAILED state

    def __init__(self, delay_s: int = 60) -> None:
        super().__init__(delay_s)
        self._paths: tp.Dict[str, utils.JobPaths] = {}
        self._first_seen: tp.Dict[str, float] = {}

    def _query(self, job_ids: tp.Set[str]) -> tp.Dict[str, tp.Optional[tp.Dict[str, str]]]:
        """{job id: info} from the scheduler; None for a job it no longer knows (its files tell); a job left out
        keeps its last info. Raises CommandError when the scheduler fails or hangs."""
        raise NotImplementedError

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

    def first_seen(self, job_ids: tp.Iterable[str]) -> float:
        """When the earliest of these jobs was registered (bounds an accounting query)."""
        return min((self._first_seen.get(j, time.time()) for j in job_ids), default=time.time())

    def _info_from_files(self, job_id: str) -> tp.Dict[str, str]:
        paths = self._paths.get(job_id)
        code = read_exit_code(paths) if paths is not None else None
        if code is not None:
            # the script's shell outlived Python: 130/143 are a forwarded INT/TERM (a cancel); a 137 is not (a
            # scheduler's cancel by SIGKILL ends the shell too, which then writes nothing), so it is FAILED
            state = "COMPLETED" if code == 0 else "CANCELLED" if code in CANCEL_EXIT_CODES else "FAILED"
            return {"JobID": job_id, "State": state, "Source": "files", "EXIT_CODE": str(code)}
        if paths is not None and paths.result_pickle.exists():
            return {"JobID": job_id, "State": "COMPLETED", "Source": "files"}
        if time.time() - self._first_seen.get(job_id, time.time()) < self.not_found_grace_s:
            return {"JobID": job_id, "State": "UNKNOWN", "Source": "files"}
        return {"JobID": job_id, "State": "FAILED", "Source": "files",
                "Reason": f"{self.scheduler} does not know the job and it left no exit-code file nor result"}

    def update(self) -> None:
        to_check = self._registered - self._finished
        if not to_check:
            return
        self._num_calls += 1
        try:
            infos = self._query(to_check)
        except CommandError as e:
            logger.get_logger().warning(f"Call #{self.num_calls} - {e}; status may be inaccurate.")
        else:
            for job_id, info in infos.items():
                self._info_dict[job_id] = self._info_from_files(job_id) if info is None else info
        self._last_status_check = time.time()
        for job_id in to_check:
            if self.is_done(job_id, mode="cache"):
                self._finished.add(job_id)

    def get_state(self, job_id: str, mode: str = "standard") -> str:
        return self.get_info(job_id, mode=mode).get("State") or "UNKNOWN"

    def is_done(self, job_id: str, mode: str = "standard") -> bool:
        return self.get_state(job_id, mode=mode) in FINAL_STATES


class ScriptJob(core.Job[core.R]):
    """A job of a script plugin; a subclass sets `watcher` and `_cancel` (the plugin's cancel of many ids)."""

    _cancel: tp.ClassVar[tp.Callable[[tp.Sequence[str]], None]]

    def _register_in_watcher(self) -> None:
        super()._register_in_watcher()
        if not self._tasks[0]:
            self.watcher.register_paths(self.job_id, self.paths)

    @property
    def exit_code_file(self) -> Path:
        """Where the job script writes the Python process's exit code."""
        return exit_code_file(self.paths)

    def cancel(self, check: bool = True) -> None:
        """Cancels the job (an array element alone for ids like ``12345_3``)."""
        try:
            type(self)._cancel([self.job_id])
        except CommandError:
            if check:
                raise


# ---------------------------------------------------------------------------------- environment


class OneTaskEnvironment(job_environment.JobEnvironment):
    """Inside a job of one task (submitit's task ranks are all 0). A subclass gives `_env`, `array_task_id`,
    `hostnames` and the scheduler's requeue command."""

    def _requeue_command(self, job_id: str) -> tp.List[str]:
        raise NotImplementedError

    @property
    def array_job_id(self) -> tp.Optional[str]:
        return os.environ.get(self._env["job_id"]) if self.array_task_id is not None else None

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

    def _handle_signals(self, paths: utils.JobPaths, submission: utils.DelayedSubmission) -> None:
        super()._handle_signals(paths, submission)
        # the scheduler may send the warning both to the job shell (which forwards it) and to this process, or
        # more than once: checkpoint and requeue once only
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
        # a cancel may start with SIGINT, which a background process of a non-interactive shell inherits ignored:
        # Python's default ends it promptly (exit code 130)
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def _requeue(self, countdown: int) -> None:
        command = self._requeue_command(self.job_id)
        run_command(command, 60)
        logger.get_logger().info(f"Requeued job {command[-1]} ({countdown} remaining timeouts)")


# ------------------------------------------------------------------------------------- executor


class ScriptExecutor(BoundedSubmission, core.PicklingExecutor):
    """A submitit executor that writes one job script per job (or array) with `_make_script` and submits it.

    A subclass sets `job_class`, `scheduler` (its name in messages), `submit_command` (looked for on PATH),
    `_make_script` (a staticmethod whose keyword defaults are the valid parameters), the submission command and how
    to read the job id from its output. A value of None in `update_parameters` restores the default.
    """

    scheduler = "the scheduler"
    submit_command = ""
    one_host = ""  #: how a job keeps to one host, in the message refusing --nodes
    job_id_line = ""  #: a shell line setting hpcseg_job to the job's id as submitit names it (scripts.fail_fast_setup)

    def __init__(self, folder: tp.Union[str, Path], max_num_timeout: int = 3, max_pickle_size_gb: float = 1.0,
                 python: tp.Optional[str] = None) -> None:
        super().__init__(folder, max_num_timeout=max_num_timeout, max_pickle_size_gb=max_pickle_size_gb)
        self.python = shlex.quote(sys.executable) if python is None else python
        if self.affinity() < 0:
            raise RuntimeError(f'Could not find "{self.submit_command}" on PATH: is this a {self.scheduler} cluster?')

    @staticmethod
    def _make_script(command: str, folder: tp.Union[str, Path], **parameters: tp.Any) -> str:
        raise NotImplementedError

    @classmethod
    def _equivalence_dict(cls) -> core.EquivalenceDict:
        return {"name": "job_name", "timeout_min": "timeout_min", "mem_gb": "mem_gb", "nodes": "nodes",
                "cpus_per_task": "cores", "gpus_per_node": "gpus", "tasks_per_node": "tasks_per_node"}

    @classmethod
    def _valid_parameters(cls) -> tp.Set[str]:
        return set(_script_defaults(cls._make_script))

    def _internal_update_parameters(self, **kwargs: tp.Any) -> None:
        unknown = sorted(set(kwargs) - self._valid_parameters() - {"map_count"})
        if unknown:
            raise ValueError(f"Unknown {self.scheduler} executor parameter(s) {', '.join(unknown)}; "
                             f"valid: {', '.join(sorted(self._valid_parameters()))}")
        merged = {k: v for k, v in {**self.parameters, **kwargs}.items() if v is not None}
        self._make_script(command="true", folder=self.folder, **merged)  # raises on a bad value, before any job
        self.parameters.clear()
        self.parameters.update(merged)

    def _array_jobs(self, first_job: core.Job[tp.Any], n: int) -> tp.List[core.Job[tp.Any]]:
        """The elements of an array (numbered from 1, as LSF and SGE do); only they are tracked."""
        self.job_class.watcher.unregister_job(first_job.job_id)
        return [self.job_class(folder=self.folder, job_id=f"{first_job.job_id}_{i}") for i in range(1, n + 1)]

    @property
    def _submitit_command_str(self) -> str:
        return " ".join([self.python, "-u -m submitit.core._submit", shlex.quote(str(self.folder))])

    def _make_submission_file_text(self, command: str, uid: str) -> str:
        return self._make_script(command=command, folder=self.folder, **self.parameters)

    def _num_tasks(self) -> int:
        return 1

    @classmethod
    def affinity(cls) -> int:
        return -1 if shutil.which(cls.submit_command) is None else 2


def executor_for_plan(cls: tp.Type[ScriptExecutor], plan: tp.Any, folder: Path, dry_run: bool, job_name: str,
                      settings: tp.Tuple[str, ...] = ()) -> ScriptExecutor:
    """The executor `cls` for hpcseg's submission plan (submit.Plan): one job or an array, each on one host (with
    several GPUs its one task starts a training process per GPU: hpcseg.launch). A profile queue's `extra` table
    gives additional_parameters, but for its keys in `settings`, which are executor parameters of their own."""
    if plan.nodes > 1:
        raise ClusterError(f"--nodes {plan.nodes}: an {cls.scheduler} job of hpcseg runs on one host ({cls.one_host}); "
                           "use --gpus for that host's GPUs")
    setup, python = list(plan.profile.setup), job_python(plan.profile.setup)
    executor = dry_run_class(cls, dry_run)(folder=folder, max_num_timeout=plan.profile.max_requeues, python=python)
    params: tp.Dict[str, tp.Any] = {
        "job_name": job_name, "timeout_min": plan.minutes, "cores": plan.cpus, "mem_gb": plan.mem_gb,
        "gpus": plan.gpus, "signal_delay_s": plan.signal_delay_s, "array_parallelism": plan.max_parallel}
    if plan.queue:
        params["queue"] = plan.queue
        queue = plan.profile.queues.get(plan.queue)
        extra = dict(queue.extra) if queue is not None and queue.extra else {}
        params.update({k: extra.pop(k) for k in settings if k in extra})
        if extra:
            params["additional_parameters"] = extra
    params["setup"] = fail_fast_setup(setup, python, folder, cls.job_id_line,
                                      plan.profile.name if plan.profile.path else "")
    executor.update_parameters(**params)
    return executor


@functools.lru_cache()
def _script_defaults(make_script: tp.Callable[..., str]) -> tp.Dict[str, tp.Any]:
    spec = inspect.signature(make_script)
    return {k: p.default for k, p in spec.parameters.items()
            if p.default is not inspect.Parameter.empty and k != "map_count"}


# ------------------------------------------------------------------------------------- job script


def check_parameters(scheduler: str, one_host: str, free_text: tp.Iterable[tp.Tuple[str, tp.Any]], *, cores: tp.Any,
                     mem_gb: tp.Any, gpus: tp.Any, timeout_min: tp.Any, signal_delay_s: tp.Any,
                     array_parallelism: tp.Any, setup: tp.Any, nodes: tp.Any, tasks_per_node: tp.Any,
                     stderr_to_stdout: tp.Any) -> None:
    """The checks of the parameters every script plugin takes; a ValueError (one line) names the first bad one.

    `free_text` ((what, value) pairs: the folder, the command, set-up lines, extra options) may not hold a control
    character: a newline would end a directive line of the script and start a command."""
    _check = check_parameter
    _check(setup is None or (not isinstance(setup, str) and all(isinstance(s, str) for s in setup)),
           f"{scheduler} parameter setup must be a list of shell lines, got {setup!r}")
    for what, value in [*free_text, *(("setup", line) for line in setup or ())]:
        _check(CONTROL.search(str(value)) is None,
               f"{scheduler} parameter {what} must be one line without control characters, got {value!r}")
    _check(is_int(cores) and cores >= 1, f"{scheduler} parameter cores must be an integer >= 1, got {cores!r}")
    _check(mem_gb is None or (is_number(mem_gb) and mem_gb > 0),
           f"{scheduler} parameter mem_gb must be a positive number (total GB for the job), got {mem_gb!r}")
    _check(is_int(gpus) and gpus >= 0, f"{scheduler} parameter gpus must be an integer >= 0, got {gpus!r}")
    _check(is_number(timeout_min) and timeout_min > 0,
           f"{scheduler} parameter timeout_min must be a positive number of minutes, got {timeout_min!r}")
    _check(is_number(signal_delay_s) and signal_delay_s >= 0,
           f"{scheduler} parameter signal_delay_s must be a number of seconds >= 0, got {signal_delay_s!r}")
    _check(is_int(array_parallelism) and array_parallelism >= 1,
           f"{scheduler} parameter array_parallelism must be an integer >= 1, got {array_parallelism!r}")
    _check(nodes == 1, f"{scheduler} executor runs jobs on one host ({one_host}); nodes={nodes!r} is not supported")
    _check(tasks_per_node == 1,
           f"{scheduler} executor runs one task per job; tasks_per_node={tasks_per_node!r} is not supported")
    _check(isinstance(stderr_to_stdout, bool),
           f"{scheduler} parameter stderr_to_stdout must be a bool, got {stderr_to_stdout!r}")


def shell_path(pattern: str, tags: tp.Mapping[str, str]) -> str:
    """A path with submitit's %j/%A/%a/%t tags as one quoted shell word, each tag replaced by its variable."""
    return "".join(f'"{tags[p]}"' if p in tags else shlex.quote(p) for p in re.split(r"(%[jAat])", pattern) if p)


def forwarding_tail(executor: str, folder: tp.Union[str, Path], command: str, job_var: str, index_var: str,
                    no_index: str, soft_limit_signal: tp.Optional[str] = None) -> tp.List[str]:
    """The lines that end a job script: say which plugin's job environment applies, run Python in the background
    (SIGINT restored) so that the shell can forward the scheduler's signals to it, wait for it and write its exit
    code beside submitit's files (the scheduler may forget the job before hpcseg asks).

    `job_var`/`index_var`: the scheduler's variables of the job id and array index (`no_index` outside arrays).
    `soft_limit_signal`: a warning the scheduler sends the whole process group (SGE's s_rt USR1): Python ignores
    it, and the shell forwards it as submitit's warning signal."""
    prefix = f"SUBMITIT_{executor.upper()}"
    usr_sig = warning_signal()
    tags = {"%j": f"${{{prefix}_JOB_ID}}", "%A": f"${{{job_var}}}", "%a": f"${{{index_var}}}", "%t": "0"}
    ignore = f" trap '' {soft_limit_signal};" if soft_limit_signal else ""
    traps = [(usr_sig, soft_limit_signal)] if soft_limit_signal else []
    traps += [(sig, sig) for sig in dict.fromkeys([usr_sig, "TERM", "INT"])]
    exit_file = shell_path(str(utils.JobPaths(folder=folder).folder / f"%j{EXIT_CODE_SUFFIX}"), tags)
    lines = [
        "",
        "# command",
        f"export SUBMITIT_EXECUTOR={executor}",
        f'if [ "${{{index_var}:-{no_index}}}" != "{no_index}" ]; then',
        f'    {prefix}_JOB_ID="${{{job_var}}}_${{{index_var}}}"',
        "else",
        f'    {prefix}_JOB_ID="${{{job_var}}}"',
        "fi",
        f"{prefix}_EXIT_FILE={exit_file}",
        f'rm -f "${prefix}_EXIT_FILE"',
        "# Python runs in the background (SIGINT restored) so that this shell can forward the scheduler's "
        "signals to it",
    ]
    if soft_limit_signal:
        lines.append(f"# (the soft-limit warning {soft_limit_signal}, sent to the whole process group, reaches "
                     f"Python as {usr_sig} through this shell only)")
    lines += [
        f"( trap - INT;{ignore} exec {command} ) &",
        f"{prefix}_CHILD=$!",
        f'submitit_forward() {{ submitit_trapped=1; kill -s "$1" "${prefix}_CHILD" 2>/dev/null; }}',
        *[f"trap 'submitit_forward {sent}' {received}" for sent, received in traps],
        *wait_for_child(f"{prefix}_CHILD", f"{prefix}_EXIT_FILE"),
        "",
    ]
    return lines
