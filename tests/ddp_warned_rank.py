"""One rank of a data-parallel run that the scheduler's warning signal reaches mid-epoch on rank 1 alone, for
tests/test_ddp.py; run as `torchrun --standalone --nproc-per-node 2 ddp_warned_rank.py JOB DATA RUN AT KEY=VALUE...`.

Rank 1 sends itself USR2 in its AT-th training step; every rank must stop after that same step (rank 0 saves
`last`), print the steps it trained and exit 3, as `Preempted` ends a cluster job's attempt before it requeues.
"""

import os
import signal
import sys
from pathlib import Path

import hpcseg.train as T
from hpcseg.jobfile import load_job
from hpcseg.preempt import DeferredSignal, Preempted


def main(job_file: str, data: str, run: str, at: str, *overrides: str) -> None:
    rank, steps = int(os.environ["RANK"]), {"n": 0}
    crop_batch = T.crop_batch

    def crop_then_signal(*args, **kwargs):  # one crop per training step
        steps["n"] += 1
        if rank == 1 and steps["n"] == int(at):
            os.kill(os.getpid(), signal.SIGUSR2)
        return crop_batch(*args, **kwargs)

    T.crop_batch = crop_then_signal
    signal.signal(signal.SIGUSR2, lambda signum, frame: None)  # stands for submitit's handler
    job = load_job(Path(job_file), list(overrides))
    with DeferredSignal(signal.SIGUSR2) as warning:
        try:
            T.train(job, Path(data) / "training_data", Path(data) / "validation_data", Path(run), progress=False,
                    warning=warning)
        except Preempted:
            print(f"rank {rank} stopped after {steps['n']} steps", flush=True)
            sys.exit(3)
    print(f"rank {rank} was not stopped", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
