"""A one-line progress bar for training: epoch, loss, Dice, ETA. Silent when stdout is not a terminal."""

from __future__ import annotations

import sys
import time

from .durations import clock


class EpochProgress:
    def __init__(self, epochs: int, start_epoch: int, enabled: bool | None = None, stream=None) -> None:
        self.stream = stream or sys.stdout
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.epochs, self.start_epoch = epochs, start_epoch
        self.started = time.perf_counter()
        self.last_dice: float | None = None

    def update(self, record: dict, state) -> None:
        if "val_mean_dice" in record:
            self.last_dice = record["val_mean_dice"]
        if not self.enabled:  # a log line per validation round instead of a bar, for batch-job logs
            if "val_mean_dice" in record:
                self.stream.write(f"epoch {record['epoch']}/{self.epochs} loss {record['train_loss']:.4f} "
                                  f"val mean Dice {record['val_mean_dice']:.4f}\n")
                self.stream.flush()
            return
        done = record["epoch"] - self.start_epoch
        per_epoch = (time.perf_counter() - self.started) / max(done, 1)
        eta = per_epoch * (self.epochs - record["epoch"])
        width = 24
        filled = int(width * record["epoch"] / self.epochs)
        dice = "-" if self.last_dice is None else f"{self.last_dice:.3f}"
        best = f" (best {state.best_dice:.3f} @ {state.best_epoch})" if state.best_epoch else ""
        line = (f"\repoch {record['epoch']}/{self.epochs} [{'#' * filled}{'.' * (width - filled)}] "
                f"loss {record['train_loss']:.4f} dice {dice}{best} {per_epoch:.1f} s/epoch ETA {clock(eta)}")
        self.stream.write(line.ljust(100))
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()
