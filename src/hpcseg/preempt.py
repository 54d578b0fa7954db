"""The scheduler's warning signal, deferred to the end of the current training step.

submitit handles USR2 (walltime warning, preemption) by checkpointing and requeueing at once. While the training
loop runs its steps, `DeferredSignal` only records the signal: the loop finishes the step it is in, saves
`checkpoints/last` (mid-epoch, so nothing is lost), raises `Preempted`, and the caller hands the signal on to
submitit's handler with `forward()`. During an epoch's validation and saves it waits for them and the loop stops
once `last` holds the epoch; outside the training loop (the job's test) it goes to submitit at once. The ranks of
a multi-GPU run agree each step whether any of them got it, so all stop at the same step.
"""

from __future__ import annotations

import contextlib
import signal
from types import FrameType
from typing import Iterator


class Preempted(Exception):
    """Training stopped after a warning signal; `checkpoints/last` holds the state to resume from."""


class DeferredSignal:
    def __init__(self, signum: int, relay=None) -> None:
        self.signum = signum
        self.relay = relay  # called with the signal as it comes: a job's launcher passes it on to its ranks
        self.received: tuple[int, FrameType | None] | None = None
        self.deferring = False
        self._previous = None

    def __enter__(self) -> "DeferredSignal":
        self._previous = signal.signal(self.signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        signal.signal(self.signum, self._previous)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = (signum, frame)
        if self.relay is not None:
            self.relay(signum)
        if not self.deferring:
            self.forward()

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """While inside, the signal is only recorded: the training loop asks `requested()` after each step."""
        self.deferring = True
        try:
            yield
        finally:
            self.deferring = False

    def requested(self) -> bool:
        """True once the signal came; the training loop asks after every step."""
        return self.received is not None

    def forward(self) -> None:
        """Run the handler that was there before (submitit's: checkpoint, requeue, exit); also where the signal
        reached another rank of the run only, and the ranks agreed to stop."""
        previous = self._previous
        if callable(previous):
            previous(*(self.received or (self.signum, None)))
