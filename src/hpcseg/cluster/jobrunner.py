"""What a cluster job runs: train the job into its run folder, then test it, then write the outcome.

`JobRunner` is a `submitit.helpers.Checkpointable`. On the scheduler's warning signal (USR2 before the walltime,
or preemption) submitit calls `checkpoint()`, which resubmits the same runner; the training has already saved
`checkpoints/last.pt` at the end of the last finished epoch, so the requeued attempt resumes from there and
ends with the same number of epochs as an uninterrupted run. The runner holds only plain data (the job as a
dict, folder paths): all state lives in the run folder.

A job of several tasks (one per GPU: `submit --gpus N [--nodes M]`) runs one runner per task; they train together
(hpcseg.distributed), and the task of rank 0 alone records the attempt, tests and writes the outcome. Where the
scheduler starts one task per job (LSF), that task starts `procs` ranks itself (hpcseg.launch) and passes the
warning signal on to them.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import submitit

from .. import versions
from ..atomic import append_jsonl, atomic_write_text
from ..memlimit import ENV as MEMORY_ENV
from ..runfiles import LAST
from .backends import job_id_here
from .runs import ATTEMPTS, OUTCOME


def export_memory_request(mem_gb: float | None) -> None:
    """The job's memory request as HPCSEG_JOB_MEM_GB (memlimit.py), for this process and the ranks it starts. It
    replaces a value the job inherited: schedulers hand a job the submitting shell's environment, which may hold
    another job's request (a submit from inside a job, or a test process)."""
    if mem_gb:
        os.environ[MEMORY_ENV] = f"{mem_gb:g}"


def report_versions(run_dir: Path) -> None:
    """One line comparing the submitting side's versions (run.json) with this job's: to standard error where they
    differ, so that a job that then fails says why it may have."""
    try:
        record = json.loads((run_dir / "run.json").read_text())
    except (OSError, ValueError):
        record = {}
    level, line = versions.compare(record.get("versions") if isinstance(record, dict) else None)
    prefix = {"error": "hpcseg: error: ", "warning": "hpcseg: warning: "}.get(level, "hpcseg job runner: ")
    print(prefix + line, file=sys.stderr if level in ("error", "warning") else sys.stdout, flush=True)


def report_memory() -> None:
    """One line: the memory limit this job is under, as it sees it (memlimit.py), or that it sees none."""
    from .. import memlimit

    limit = memlimit.tightest()
    line = "no limit seen (no request, cgroup or rlimit)" if limit is None else \
        f"{limit.limit / 1e9:.3g} GB, {limit.room / 1e9:.3g} GB left (from {limit.source})"
    print(f"hpcseg job runner: memory limit: {line}", flush=True)


def write_outcome(run_dir: Path, state: str, **extra: Any) -> None:
    record = {"state": state, "time": time.time(), **extra}
    atomic_write_text(run_dir / OUTCOME, json.dumps(record, indent=2) + "\n")


class JobRunner(submitit.helpers.Checkpointable):
    """Train (resuming from `checkpoints/last.pt` when it exists), test if the job has a test folder, and
    record the outcome in `outcome.json`."""

    def __init__(self, job: dict, train_dir: str | list[str], val_dir: str, run_dir: str,
                 test_dir: str | None = None, procs: int = 1, mem_gb: float | None = None) -> None:
        self.job = job
        self.procs = procs  # training processes per host: one per GPU
        self.mem_gb = mem_gb  # what the job asked for: LSF may enforce it with no cgroup or rlimit to read
        # a cross-validation fold trains on several folders: the other folds
        self.train_dir = [str(d) for d in train_dir] if isinstance(train_dir, (list, tuple)) else str(train_dir)
        self.val_dir = str(val_dir)
        self.run_dir = str(run_dir)
        self.test_dir = str(test_dir) if test_dir else None

    def __call__(self) -> dict | None:
        from ..distributed import export_submitit_environment
        from ..jobfile import job_from_dict

        export_memory_request(getattr(self, "mem_gb", None))
        ranks = export_submitit_environment()  # torchrun's variables from submitit's, for the group
        if not ranks.leader:
            return self._train_as_follower()
        launching = ranks.world == 1 and getattr(self, "procs", 1) > 1  # one task per job: it starts the ranks
        run_dir = Path(self.run_dir)
        resume = (run_dir / LAST).exists()
        attempt = {"event": "start", "time": time.time(), "host": socket.gethostname(), "pid": os.getpid(),
                   "job_id": job_id_here(), "resume": resume}
        append_jsonl(run_dir / ATTEMPTS, attempt)
        (run_dir / OUTCOME).unlink(missing_ok=True)  # running again: an earlier outcome no longer holds
        print(f"hpcseg job runner: {'resuming' if resume else 'starting'} {run_dir} on {attempt['host']}",
              flush=True)
        report_versions(run_dir)
        report_memory()
        if not resume:  # an earlier attempt that died before its first checkpoint: start that run over
            for stale in ("metrics.jsonl", "progress.json"):
                (run_dir / stale).unlink(missing_ok=True)
            shutil.rmtree(run_dir / "tb", ignore_errors=True)
        try:
            from ..preempt import DeferredSignal, Preempted
            from ..train import folder_list, train

            job = job_from_dict(self.job, source=str(run_dir / "run.json"))
            train_dirs = folder_list(self.train_dir)
            relay = None
            if launching:
                from ..launch import signal_ranks, train_processes

                relay = signal_ranks
            with DeferredSignal(submitit.JobEnvironment._usr_sig(), relay=relay) as warning:
                try:
                    if launching:  # the signal is only recorded here, and passed on to the ranks
                        with warning.deferred():
                            summary = train_processes(self.procs, job, train_dirs, Path(self.val_dir),
                                                      run_dir, resume, warned=True)
                    else:
                        summary = train(job, train_dirs, Path(self.val_dir), run_dir, resume=resume,
                                        progress=False, warning=warning)
                except Preempted:  # `last` holds the state: now let submitit checkpoint and requeue
                    warning.forward()
                    raise
            result: dict[str, Any] = {"train": summary}
            if self.test_dir:
                from ..evaluate import test_run

                test = test_run(run_dir, Path(self.test_dir))
                from ..hparams import write_hparams  # the HParams session again, now with the test's Dice

                write_hparams(run_dir)
                result["test"] = {"data": self.test_dir, "mean_dice": test.get("mean_dice"),
                                  "dice_per_class": test.get("dice_per_class")}
        except submitit.core.utils.UncompletedJobError as err:  # timed out more often than allowed
            write_outcome(run_dir, "TIMEOUT", error=str(err))
            raise
        except SystemExit:  # submitit's signal handler requeued the job
            append_jsonl(run_dir / ATTEMPTS, {"event": "requeued", "time": time.time()})
            raise
        except Exception as err:
            write_outcome(run_dir, "FAILED", error=f"{type(err).__name__}: {err}",
                          traceback=traceback.format_exc(limit=20))
            print(f"hpcseg job runner: FAILED: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
            raise
        write_outcome(run_dir, "COMPLETED", **result)
        print("hpcseg job runner: COMPLETED", flush=True)
        return result

    def _train_as_follower(self) -> dict | None:
        """A task of rank > 0: it trains its part of each batch and writes nothing. On the warning signal it stops
        at the step the ranks agree on and ends; rank 0 saves `last` and requeues the job."""
        from ..jobfile import job_from_dict
        from ..preempt import DeferredSignal, Preempted
        from ..train import folder_list, train

        run_dir = Path(self.run_dir)
        job = job_from_dict(self.job, source=str(run_dir / "run.json"))
        with DeferredSignal(submitit.JobEnvironment._usr_sig()) as warning:
            try:
                return {"train": train(job, folder_list(self.train_dir), Path(self.val_dir), run_dir,
                                       resume=(run_dir / LAST).exists(), progress=False, warning=warning)}
            except Preempted:
                print("hpcseg job runner: stopped for the warning signal; rank 0 requeues the job", flush=True)
                return None

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        """Called by submitit on USR2: the state is on disk already, so resubmit this same runner."""
        run_dir = Path(self.run_dir)
        try:
            append_jsonl(run_dir / ATTEMPTS, {"event": "checkpoint", "time": time.time()})
        except OSError:
            pass
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)
