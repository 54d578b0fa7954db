"""Where a training run's wall time goes: seconds per phase, cheap enough to keep on in every run.

Each phase ends in something that waits for the GPU (a loss read, a checkpoint's copy to the host, a Dice read), so
wall-clock seconds around it are the phase's own, without extra synchronisation.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Iterator

#: Phases in the order a run goes through them, with the names the log line uses.
NAMES = {"startup": "start-up", "data": "data loading", "setup": "model set-up", "train": "training",
         "validate": "validation", "checkpoint": "checkpoints", "tensorboard": "TensorBoard", "records": "records"}


def process_age_s() -> float | None:
    """Seconds since this process started (Linux /proc), or None where that cannot be read."""
    try:
        start_ticks = int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[19])
        uptime = float(open("/proc/uptime").read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


class Phases:
    """Seconds per phase; `with phases("train"): ...` adds the block's wall time to "train"."""

    def __init__(self) -> None:
        self.seconds = {name: 0.0 for name in NAMES}
        self.seconds["startup"] = process_age_s() or 0.0  # interpreter, imports and argument checks before training
        self.started = time.perf_counter()

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - started

    def summary(self) -> dict:
        """Seconds per phase, the run's wall time since its process started, and what no phase accounts for."""
        wall = self.seconds["startup"] + time.perf_counter() - self.started
        out = {name: round(value, 3) for name, value in self.seconds.items()}
        out["other"] = round(max(0.0, wall - sum(self.seconds.values())), 3)
        out["wall"] = round(wall, 3)
        return out

    def line(self) -> str:
        """One log line: each phase's seconds and share of the wall time."""
        s = self.summary()
        wall = s["wall"] or 1.0
        parts = [f"{NAMES.get(name, name)} {s[name]:.1f} s ({100 * s[name] / wall:.0f}%)"
                 for name in (*NAMES, "other") if s[name] >= 0.05]
        return f"time: {s['wall']:.1f} s: " + ", ".join(parts)
