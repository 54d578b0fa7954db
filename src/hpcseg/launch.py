"""`hpcseg train --procs N`: start N training processes on this machine with PyTorch's own launcher.

This is what `torchrun --standalone --nproc-per-node N` does (torch.distributed's elastic launcher, called here
as a function): it sets each process's RANK, WORLD_SIZE, LOCAL_RANK and MASTER_ADDR/PORT, and when one process
dies it stops the others, so the command ends with the reason instead of leaving ranks waiting. Each process
runs `hpcseg.train.train`, which forms the process group from those variables (gloo on the CPU).

A cluster job whose scheduler starts one task per host (LSF here) starts its ranks the same way, one launcher per
host; the job's warning signal is passed on to the ranks (`signal_ranks`), which stop together, and the job
requeues once rank 0 saved.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import uuid
from pathlib import Path

from .errors import UserError
from .preempt import Preempted

#: The signals torch's elastic launcher takes over (its TORCHELASTIC_SIGNALS_TO_HANDLE default).
_LAUNCHER_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)

#: A rank's exit code after it stopped for the warning signal (rank 0 saved `last`).
PREEMPTED_EXIT = 3


def _rank_main(job: dict, train_dir: str | list[str], val_dir: str, run_dir: str, resume: bool, warned: bool) -> dict:
    """One rank: train, and print a user error as the command line does (exit 2, no traceback). With `warned`
    (a cluster job), the warning signal stops the ranks together and this rank exits PREEMPTED_EXIT."""
    from .distributed import DistributedError, ranks_from_env
    from .jobfile import job_from_dict
    from .preempt import DeferredSignal
    from .train import folder_list, train

    train_dir = folder_list(train_dir)
    job_ = job_from_dict(job, source=str(Path(run_dir) / "job.toml"))
    try:
        if not warned:
            return train(job_, train_dir, Path(val_dir), Path(run_dir), resume=resume)
        with DeferredSignal(signal.SIGUSR2) as warning:
            return train(job_, train_dir, Path(val_dir), Path(run_dir), resume=resume, progress=False,
                         warning=warning)
    except Preempted:
        sys.exit(PREEMPTED_EXIT)
    except UserError as err:
        # every rank checks the same data and run folder: rank 0 says what is wrong, once; a lost rank says so
        if ranks_from_env().leader or isinstance(err, DistributedError):
            err.show()
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)


def train_processes(procs: int, job, train_dir: Path, val_dir: Path, run_dir: Path, resume: bool,
                    warned: bool = False) -> dict:
    """Train `job` in `procs` processes and return rank 0's summary; a failed rank is one line naming it and how
    it ended. With `warned`, ranks that stopped for the warning signal raise `Preempted` here."""
    import torch
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if torch.cuda.is_available() and procs > torch.cuda.device_count():  # NCCL takes one GPU per rank
        raise UserError(f"--procs {procs}: this machine has {torch.cuda.device_count()} GPU(s) visible; one process "
                        "per GPU")

    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=procs, run_id=str(uuid.uuid4()),
                          rdzv_backend="c10d", rdzv_endpoint="127.0.0.1:0", max_restarts=0)
    from .train import folder_list

    args = (job.to_dict(), [str(d.absolute()) for d in folder_list(train_dir)], str(Path(val_dir).absolute()),
            str(run_dir), resume, warned)
    # the launcher logs a failed rank as a traceback, Ctrl-C as a warning: the one line below says either
    for name in [n for n in logging.root.manager.loggerDict
                 if n.startswith(("torch.distributed.elastic", "torch.multiprocessing"))]:
        logging.getLogger(name).setLevel(logging.CRITICAL)
    # the launcher replaces these handlers for good; a kill after it returned (brequeue's INT while the job
    # requeues) must end this process as it ends one without a launcher, not raise the launcher's exception
    own_handlers = {sig: signal.getsignal(sig) for sig in _LAUNCHER_SIGNALS}
    try:
        return elastic_launch(config, _rank_main)(*args)[0]
    except SignalException:  # Ctrl-C, or a scheduler's kill (TERM): the launcher stopped the ranks; as one process
        raise KeyboardInterrupt from None
    except ChildFailedError as err:
        if warned and any(f.exitcode == PREEMPTED_EXIT for f in err.failures.values()):
            raise Preempted("the ranks stopped for the warning signal") from None
        raise RankFailedError(_describe(err.failures)) from None
    finally:
        for sig, handler in own_handlers.items():
            signal.signal(sig, handler)


def signal_ranks(signum: int) -> None:
    """Send `signum` to the rank processes this process's launcher started (its multiprocessing children)."""
    for pid in _children(os.getpid()):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                if b"multiprocessing.spawn" in handle.read():
                    os.kill(pid, signum)
        except OSError:  # ended meanwhile
            pass


def _children(pid: int) -> list[int]:
    found = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as handle:
                found += [int(child) for child in handle.read().split()]
    except OSError:
        pass
    return found


class RankFailedError(UserError):
    """A training process ended with an error or was killed; the launcher stopped the others."""

    def __init__(self, message: str | None) -> None:
        super().__init__(message or "")
        self.already_shown = message is None


def _describe(failures: dict) -> str | None:
    """The line for the rank whose failure stopped the run: one killed by a signal (other than the TERM with which
    the launcher stops the rest), else one that exited with an unexpected code; None where the failed ranks
    printed their own error (exit 2) or were interrupted."""
    def cause(item) -> tuple:
        code = item[1].exitcode
        return (code >= 0 or code == -signal.SIGTERM, item[1].timestamp, item[0])

    stopped = (UserError.exit_code, 130, -signal.SIGTERM)
    unexplained = {rank: f for rank, f in failures.items() if f.exitcode not in stopped}
    if not unexplained:
        return None
    rank, failure = min(unexplained.items(), key=cause)
    code = failure.exitcode
    how = (f"was killed by {signal.Signals(-code).name}" if code < 0 and -code in signal.Signals._value2member_map_
           else f"exited with code {code}")
    return f"training process of rank {rank} (pid {failure.pid}) {how}; the other ranks were stopped"
