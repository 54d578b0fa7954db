"""The two jobs `hpcseg doctor` submits: the checks of a node (DoctorRunner), and a walltime probe that must be
warned before its limit, requeue once and finish (WalltimeProbe). Both hold plain data only and write JSON."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import submitit

from ..atomic import append_jsonl, atomic_write_text
from ..doctor import REPORT, host_facts, rows_to_json, run_checks
from .jobrunner import write_outcome
from .runs import ATTEMPTS

#: What the walltime probe writes when its requeued attempt starts: the proof that the warning came and requeued.
REQUEUED = "requeued.json"


class DoctorRunner:
    """Runs every node-side check and writes `doctor.json` (the rows, the host) into the run folder."""

    def __init__(self, expected: dict[str, Any], run_dir: str) -> None:
        self.expected = expected
        self.run_dir = str(run_dir)

    def __call__(self) -> dict:
        run_dir = Path(self.run_dir)
        append_jsonl(run_dir / ATTEMPTS, {"event": "start", "time": time.time(), **host_facts()})
        rows = run_checks(self.expected, run_dir)
        report = {"host": host_facts(), "rows": rows_to_json(rows), "time": time.time()}
        atomic_write_text(run_dir / REPORT, json.dumps(report, indent=2) + "\n")
        write_outcome(run_dir, "COMPLETED")
        return report


class WalltimeProbe(submitit.helpers.Checkpointable):
    """First attempt: waits for the scheduler's warning signal (submitit then calls `checkpoint` and requeues).
    The requeued attempt records that it ran and ends at once."""

    def __init__(self, run_dir: str, wait_s: float) -> None:
        self.run_dir = str(run_dir)
        self.wait_s = wait_s
        self.warned = False

    def __call__(self) -> dict:
        run_dir = Path(self.run_dir)
        append_jsonl(run_dir / ATTEMPTS, {"event": "start", "time": time.time(), "warned_before": self.warned})
        if self.warned:
            record = {"requeued_at": time.time()}
            atomic_write_text(run_dir / REQUEUED, json.dumps(record) + "\n")
            write_outcome(run_dir, "COMPLETED", requeued=True)
            return record
        print("hpcseg doctor: waiting for the walltime warning signal", flush=True)
        deadline = time.monotonic() + self.wait_s
        while time.monotonic() < deadline:  # submitit's handler of the warning signal interrupts this
            time.sleep(1)
        write_outcome(run_dir, "FAILED", error=f"no warning signal within {self.wait_s:g} s")
        return {"requeued_at": None}

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        append_jsonl(Path(self.run_dir) / ATTEMPTS, {"event": "checkpoint", "time": time.time()})
        self.warned = True
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)
