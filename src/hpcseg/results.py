"""What a run folder says about its run, for comparing runs: its settings, its best validation and test Dice, its
epochs, wall time and requeues. Read by `hpcseg report` and by the TensorBoard HParams summary (hparams.py).

A run folder is a scratch run (`<scratch>/<experiment>/<run_id>/`), a folder `hpcseg collect` wrote
(`DEST/<run_id>/`, the job's test in `job-test/`) or a foreground `hpcseg train --out` folder. Only regular files
of this user are read (runs.read_owned): a scratch may be shared, so nothing in it is trusted unchecked.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import TISSUES
from .cluster.collect import JOB_TEST, summary_ok
from .cluster.runs import (ATTEMPTS, MAX_RECORD_BYTES, OUTCOME, PROGRESS, RUN_RECORD, NotTrusted, json_records,
                           read_owned)
from .jobfile import tomllib

#: Job keys that name or describe a run rather than set it: never a compared setting.
NOT_SETTINGS = {"name", "description"}
#: The settings every comparison shows, differing or not (train.precision: the one training chose).
ALWAYS = ("train.batch_size", "optim.lr", "train.precision", "gpus")
#: The largest metrics.jsonl or per_slice.csv read (a run of 100,000 epochs is about 30 MB).
MAX_TABLE_BYTES = 64 * MAX_RECORD_BYTES


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{"optim": {"lr": 1e-3}} -> {"optim.lr": 1e-3}: the keys `--set` and `--sweep` name."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


@dataclass
class RunResult:
    """One run, as its folder tells it; `damage` names the files that could not be read."""

    path: Path
    run_id: str
    experiment: str
    record: dict = field(default_factory=dict)  # run.json (empty for a foreground run)
    job: dict = field(default_factory=dict)  # job.toml, flattened
    metrics: list[dict] = field(default_factory=list)  # metrics.jsonl's epoch records
    tests: dict[str, dict] = field(default_factory=dict)  # test folder name -> its summary.json
    test_dirs: dict[str, Path] = field(default_factory=dict)
    train_record: dict = field(default_factory=dict)  # train.json
    progress: dict = field(default_factory=dict)
    attempts: list[dict] = field(default_factory=list)
    outcome: dict | None = None
    damage: list[str] = field(default_factory=list)

    @property
    def sweep(self) -> dict:
        sweep = self.record.get("sweep")
        return sweep if isinstance(sweep, dict) else {}

    @property
    def best(self) -> dict | None:
        """The epoch record with the best validation mean Dice (the first of equals, as training keeps it)."""
        validated = [m for m in self.metrics if _number(m.get("val_mean_dice"))]
        return max(validated, key=lambda m: m["val_mean_dice"]) if validated else None

    @property
    def best_dice(self) -> dict[str, float]:
        """Best validation Dice per tissue and `mean`, from the best epoch; empty before the first validation."""
        best = self.best
        if best is None:
            return {}
        return {**{k: v for k, v in best["val_dice"].items() if _number(v)}, "mean": best["val_mean_dice"]}

    @property
    def test_dice(self) -> dict[str, float]:
        """Dice per tissue and `mean` of the job's test (the first test folder), empty where none ran."""
        for summary in self.tests.values():
            return {**summary["dice_per_class"], "mean": summary["mean_dice"]}
        return {}

    @property
    def epochs_done(self) -> int | None:
        epochs = [m["epoch"] for m in self.metrics]
        return max(epochs) if epochs else self.progress.get("epoch")

    @property
    def gpus(self) -> int:
        """GPUs of the job, all nodes together: run.json's resources, else 0 (a foreground run on the CPU)."""
        res = self.record.get("resources")
        res = res if isinstance(res, dict) else {}
        gpus, nodes = res.get("gpus"), res.get("nodes", 1)
        ok = all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 4096 for v in (gpus, nodes))
        if ok:
            return gpus * nodes
        return 1 if self.train_record.get("device", "cpu") != "cpu" else 0

    @property
    def fold(self) -> Any:
        """The cross-validation fold the run trained on (run.json's `fold` or a job key `...fold`), else None."""
        if self.record.get("fold") is not None:
            return self.record["fold"]
        for key in self.job:
            if key == "fold" or key.endswith(".fold"):
                return self.job[key]
        return None

    @property
    def fold_key(self) -> str | None:
        return next((k for k in self.job if k == "fold" or k.endswith(".fold")), None)

    @property
    def requeues(self) -> int | None:
        """Starts after the first (attempts.jsonl), None where the folder has no attempts (collected, foreground)."""
        starts = sum(1 for a in self.attempts if a.get("event") == "start")
        return max(0, starts - 1) if starts else None

    @property
    def wall_s(self) -> float | None:
        """Seconds the job ran: each attempt from its start to the next event (its requeue, or the outcome),
        queue waits between attempts left out; without attempts, the epochs' seconds summed."""
        events = [a for a in self.attempts if _number(a.get("time"))]
        if any(a.get("event") == "start" for a in events):
            end_of_run = (self.outcome or {}).get("time", self.progress.get("updated"))
            total = 0.0
            for i, event in enumerate(events):
                if event.get("event") != "start":
                    continue
                end = events[i + 1]["time"] if i + 1 < len(events) else end_of_run
                if _number(end) and end >= event["time"]:
                    total += end - event["time"]
            return total
        seconds = [m["seconds"] for m in self.metrics if _number(m.get("seconds"))]
        return sum(seconds) if seconds else None

    @property
    def gpu_hours(self) -> float | None:
        wall = self.wall_s
        return None if wall is None else wall * self.gpus / 3600

    def setting(self, key: str) -> Any:
        """A job key's value, or `gpus` (all nodes') and `train.precision` as training chose it."""
        if key == "gpus":
            return self.gpus
        if key == "train.precision" and isinstance(self.train_record.get("precision"), str):
            return self.train_record["precision"]
        if key in self.sweep:
            return self.sweep[key]
        return self.job.get(key)


def _read_json(path: Path, damage: list[str]) -> dict | None:
    try:
        data = json.loads(read_owned(path))
    except FileNotFoundError:
        return None
    except (NotTrusted, OSError, ValueError, RecursionError) as err:
        damage.append(f"{path.name}: {getattr(err, 'strerror', None) or err or 'not JSON'}, not read")
        return None
    return data if isinstance(data, dict) else None


def _read_lines(path: Path, damage: list[str]) -> list[dict]:
    """The JSON objects of a JSON-lines file; a line being appended, or damaged, is left out."""
    try:
        text = read_owned(path, MAX_TABLE_BYTES).decode(errors="replace")
    except FileNotFoundError:
        return []
    except (NotTrusted, OSError) as err:
        damage.append(f"{path.name}: {getattr(err, 'strerror', None) or err}, not read")
        return []
    return json_records(text.splitlines())


def _epoch_records(records: list[dict]) -> list[dict]:
    """The epoch records that can be compared: an epoch and a finite training loss; validation only when whole."""
    out = []
    for record in records:
        if not isinstance(record.get("epoch"), int) or not _number(record.get("train_loss")):
            continue
        val = record.get("val_dice")
        if not _number(record.get("val_mean_dice")) or not isinstance(val, dict):
            record = {k: v for k, v in record.items() if k not in ("val_mean_dice", "val_dice")}
        out.append(record)
    return out


def load_result(path: Path, experiment: str | None = None) -> RunResult:
    """The run in folder `path`; `experiment` where the folder's parent is not named after it (collected)."""
    path = Path(path)
    damage: list[str] = []
    record = _read_json(path / RUN_RECORD, damage) or {}
    name = record.get("experiment") if isinstance(record.get("experiment"), str) else None
    result = RunResult(path=path, run_id=path.name, experiment=experiment or name or path.parent.name,
                       record=record, damage=damage)
    try:
        result.job = flatten(tomllib.loads(read_owned(path / "job.toml").decode()))
    except FileNotFoundError:
        pass
    except (NotTrusted, OSError, ValueError) as err:
        damage.append(f"job.toml: {getattr(err, 'strerror', None) or err}, not read")
    result.metrics = _epoch_records(_read_lines(path / "metrics.jsonl", damage))
    result.train_record = _read_json(path / "train.json", damage) or {}
    result.progress = _read_json(path / PROGRESS, damage) or {}
    result.attempts = _read_lines(path / ATTEMPTS, damage)
    result.outcome = _read_json(path / OUTCOME, damage)
    for folder in ("test", JOB_TEST):  # a scratch run's own test, or the job's test a collect copied
        try:
            names = sorted(p for p in (path / folder).iterdir() if p.is_dir() and not p.is_symlink()
                           and not p.name.startswith("."))
        except OSError:
            continue
        for test in names:
            summary = _read_json(test / "summary.json", damage)
            if summary_ok(summary):
                result.tests.setdefault(test.name, summary)
                result.test_dirs.setdefault(test.name, test)
    return result


def differing_keys(results: list[RunResult]) -> list[str]:
    """The job keys whose values differ between the runs: the swept keys first (as swept), then the others."""
    keys: dict[str, None] = {}
    for r in results:
        keys.update((k, None) for k in r.sweep if k not in NOT_SETTINGS)
    every = sorted({k for r in results for k in r.job} - NOT_SETTINGS)
    for key in every:
        values = {json.dumps(r.setting(key), sort_keys=True, default=str) for r in results}
        if len(values) > 1:
            keys[key] = None
    return list(keys)


def tissue_names(results: list[RunResult]) -> list[str]:
    """The tissues the runs validated or tested, in label order."""
    seen: dict[str, None] = {}
    for r in results:
        seen.update((k, None) for k in [*r.best_dice, *r.test_dice] if k != "mean")
    return sorted(seen, key=lambda t: (TISSUES.index(t) if t in TISSUES else len(TISSUES), t))
