"""The scheduler's warning signal, deferred to the end of the current training step.

submitit handles USR2 (walltime warning, preemption) by checkpointing and requeueing at once. While the training
loop runs its steps, `DeferredSignal` only records the signal: the loop finishes the step it is in, saves
`checkpoints/last` (mid-epoch, so nothing is lost), raises `Preempted`, and the caller hands the signal on to
submitit's handler with `forward()`. Outside the steps (validation, saving) the signal goes to submitit at once.
"""

from __future__ import annotations

import contextlib
import signal
from types import FrameType
from typing import Iterator


class Preempted(Exception):
    """Training stopped after a warning signal; `checkpoints/last` holds the state to resume from."""


class DeferredSignal:
    def __init__(self, signum: int) -> None:
        self.signum = signum
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
        """Run the handler that was there before (submitit's: checkpoint, requeue, exit)."""
        previous = self._previous
        if callable(previous) and self.received is not None:
            previous(*self.received)
