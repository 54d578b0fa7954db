"""What may reach a generated job script, which python it runs, and a bounded submission command.

A job script is text the scheduler hands to a shell: a newline (or any control character) inside a value would
end a `#BSUB`/`#SBATCH` comment line and start a command. So every value that reaches a script is either a name
from a conservative character set (experiment/job name, queue) or free text without control characters (paths,
set-up lines, scheduler options), and the free text is quoted wherever a shell reads it.
"""

from __future__ import annotations

import os
import re
import shlex
import sys
import uuid
from pathlib import Path
from typing import Any

from ..errors import ClusterError, run_command

#: C0 controls (newline, CR, NUL, tab, ...), DEL and C1 controls
CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
#: experiment (= job) names: a plain folder name that every scheduler takes unquoted
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}")
#: queue (LSF) and partition (Slurm) names
QUEUE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
#: exit codes of a job killed on request (128 + SIGINT, 128 + SIGTERM: bkill, hpcseg cancel)
CANCEL_EXIT_CODES = (130, 143)
#: `<submitit folder>/<job id><EXIT_CODE_SUFFIX>`: where a batch script that outlives the scheduler's memory of
#: the job (LSF's) writes the job's exit code
EXIT_CODE_SUFFIX = "_exitcode"
#: `<submitit folder>/<job id><SETUP_FAILED_SUFFIX>`: the one line naming the set-up line (or the python) that
#: ended a job before Python ran; `hpcseg status` shows it
SETUP_FAILED_SUFFIX = "_setup_failed"
#: a setup line that activates a Python environment (venv, virtualenv, conda, mamba)
_ACTIVATES = re.compile(r"(^|[;&|({]\s*)(source|\.)\s+\S*activate\b|\b(conda|mamba|micromamba)\s+activate\b")


def refuse_control(what: str, value: Any) -> None:
    """One line naming `what` when `value` holds a control character (it would split a job script's line)."""
    found = CONTROL.search(str(value))
    if found:
        raise ClusterError(f"{what} {str(value)!r}: holds the control character {found.group()!r}; a value that "
                           "reaches a job script must be one line of printable text")


def check_name(what: str, value: str) -> str:
    if not NAME.fullmatch(value):
        raise ClusterError(f"{what} {value!r}: an experiment name must be a plain folder name of at most 128 "
                           "letters, digits, '_', '.', '+' and '-', starting with a letter or digit (it also names "
                           "the scheduler's job)")
    return value


def check_queue_name(what: str, value: str) -> str:
    if not QUEUE.fullmatch(value):
        raise ClusterError(f"{what} {value!r}: a queue or partition name may hold only letters, digits, '_', '.' "
                           "and '-'")
    return value


def activates_env(setup: list[str] | tuple[str, ...]) -> bool:
    """Whether a setup line activates a Python environment (then the job runs its `python3`)."""
    return any(_ACTIVATES.search(line) for line in setup)


def job_python(setup: list[str] | tuple[str, ...]) -> str:
    """The python a job script runs, as a shell word: the activated environment's (`python3` from PATH) when a
    setup line activates one, else the submitting python (`submit` refuses a path of it with a control
    character); its absolute path may not exist on the cluster."""
    return "python3" if activates_env(setup) else shlex.quote(sys.executable)


def fail_fast_setup(setup: list[str] | tuple[str, ...], python: str, folder: Path | str, job_id_line: str,
                    profile: str = "") -> list[str]:
    """The set-up lines of a job script, each followed by a check that ends the job if it failed, then a check
    that the job's `python` imports hpcseg: a failure is one line `hpcseg: error: ...` in the job's log and in
    `<folder>/<job id>_setup_failed` (which `hpcseg status` shows), instead of a bare python failing later.
    `job_id_line` sets `hpcseg_job` to the job's id as submitit names it (`12345`, `12345_3`)."""
    where = f" (profile {profile})" if profile else ""
    lines = [
        f"# a line that fails ends the job, named in its log and in <job id>{SETUP_FAILED_SUFFIX}",
        job_id_line,
        f'hpcseg_failed={shlex.quote(str(folder))}/"$hpcseg_job"{SETUP_FAILED_SUFFIX}',
        'rm -f "$hpcseg_failed"',
        "hpcseg_setup_failed() { printf 'hpcseg: error: %s\\n' \"$1\" >&2; printf '%s\\n' \"$1\" > \"$hpcseg_failed\"; "
        "exit 1; }",
    ]
    for number, line in enumerate(setup, 1):
        failed = f"set-up line {number} failed: {line}{where}"
        lines += [line, f"[ $? = 0 ] || hpcseg_setup_failed {shlex.quote(failed)}"]
    fix = "install hpcseg into the environment that the set-up lines activate" if activates_env(setup) else \
        "no set-up line activates an environment, so the job runs the submitting python, which must exist on the node"
    lines += [f"{python} -c 'import hpcseg'",
              f"[ $? = 0 ] || hpcseg_setup_failed {shlex.quote(f'{python} cannot import hpcseg: {fix}{where}')}"]
    return lines


def submit_timeout_s() -> float:
    """How long bsub/sbatch may take to accept a job ($HPCSEG_SUBMIT_TIMEOUT_S, default 60 s)."""
    try:
        value = float(os.environ.get("HPCSEG_SUBMIT_TIMEOUT_S", "60"))
    except ValueError:
        return 60.0
    return value if 0 < value < float("inf") else 60.0


class BoundedSubmission:
    """Mixin for a submitit executor: its submission command runs through `run_command`, with
    `submit_timeout_s()`, instead of submitit's CommandFunction, which waits for ever on a hanging bsub/sbatch.
    Otherwise the same steps as submitit's `Executor._submit_command`, and a job array is submitted by a copy of
    this executor (submitit's Slurm array path would use a plain SlurmExecutor). The executor says how its array
    elements are named (`_array_jobs`) and which parameter holds the walltime (`_timeout_key`)."""

    _timeout_key = "timeout_min"

    def _submission_input(self, submission_file_path: Path) -> str | None:
        """Text for the command's standard input (LSF reads the script there); None: none."""
        return None

    def _array_jobs(self, first_job, n: int) -> list:
        raise NotImplementedError

    def _submit_command(self, command: str):
        from submitit.core import utils

        tmp_uuid = uuid.uuid4().hex
        path = utils.JobPaths.get_first_id_independent_folder(self.folder) / f".submission_file_{tmp_uuid}.sh"
        path.write_text(self._make_submission_file_text(command, tmp_uuid))
        proc = run_command(self._make_submission_command(path), submit_timeout_s(),
                           input=self._submission_input(path))
        job_id = self._get_job_id_from_submission_command(proc.stdout)
        job = self.job_class(folder=self.folder, job_id=job_id, tasks=list(range(self._num_tasks())))
        job.paths.move_temporary_file(path, "submission_file", keep_as_symlink=True)
        self._write_job_id(job.job_id, tmp_uuid)
        self._set_job_permissions(job.paths.folder)
        return job

    def _internal_process_submissions(self, delayed_submissions: list) -> list:
        if len(delayed_submissions) == 1:
            return super()._internal_process_submissions(delayed_submissions)
        from submitit.core import utils

        folder = utils.JobPaths.get_first_id_independent_folder(self.folder)
        folder.mkdir(parents=True, exist_ok=True)
        pickle_paths = []
        for delayed in delayed_submissions:
            pickle_path = folder / f"{uuid.uuid4().hex}.pkl"
            delayed.set_timeout(self.parameters.get(self._timeout_key, 5), self.max_num_timeout)
            delayed.dump(pickle_path)
            pickle_paths.append(pickle_path)
        array_ex = type(self)(self.folder, self.max_num_timeout, self.max_pickle_size_gb, python=self.python)
        array_ex.update_parameters(**self.parameters)
        array_ex.parameters["map_count"] = len(delayed_submissions)  # the others are not submitted as arrays
        self._throttle()
        jobs = self._array_jobs(array_ex._submit_command(self._submitit_command_str), len(delayed_submissions))
        for job, pickle_path in zip(jobs, pickle_paths):
            job.paths.move_temporary_file(pickle_path, "submitted_pickle")
        return jobs


def dry_run_class(base: type, dry_run: bool) -> type:
    """For a dry run, the executor class `base` needing no scheduler on this machine."""
    return type(f"Dry{base.__name__}", (base,), {"affinity": classmethod(lambda c: 2)}) if dry_run else base


def submission_text(executor, n_elements: int) -> str:
    """The job script a scheduler executor would submit for one job or an array of `n_elements` (dry runs)."""
    if n_elements > 1:
        executor.parameters["map_count"] = n_elements
    return executor._make_submission_file_text(executor._submitit_command_str, "dry-run")


# ---------------------------------------------------------------- what the scheduler plugins (lsf, sge) share


def check_parameter(cond: bool, message: str) -> None:
    """A plugin's check of an executor parameter: a ValueError, which submit reports as one line."""
    if not cond:
        raise ValueError(message)


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def warning_signal() -> str:
    """The preemption signal submitit jobs handle (USR2 unless SUBMITIT_PREEMPT_SIGNAL says otherwise)."""
    from submitit.core import job_environment

    return job_environment.JobEnvironment.USR_SIG.upper().removeprefix("SIG")


def wait_for_child(child: str, exit_file: str) -> list[str]:
    """Batch-script lines that wait for the Python process in `$child` (a signal the script forwards interrupts
    `wait` while the process runs on), write its exit code to `$exit_file` and exit with it."""
    return [
        "while :; do",
        "    submitit_trapped=0",
        f'    wait "${child}"',
        "    submitit_rc=$?",
        '    [ "$submitit_trapped" = 1 ] || break  # the child ended',
        f'    kill -0 "${child}" 2>/dev/null && continue  # a forwarded signal interrupted wait',
        f'    wait "${child}" 2>/dev/null',
        "    submitit_status=$?",
        '    [ "$submitit_status" = 127 ] || submitit_rc=$submitit_status',
        "    break",
        "done",
        f'echo "$submitit_rc" > "${exit_file}"',
        'exit "$submitit_rc"',
    ]
