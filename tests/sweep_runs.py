"""A real local sweep to compare (two runs of a tiny job, trained and tested by `hpcseg submit --wait`), and
varied copies of one of its runs for experiments of many runs (the report's 40-run look and its benchmark).

    from sweep_runs import local_sweep, vary_copies  # local_sweep: a session-wide pytest fixture
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from fixtures_cluster import JOB_FILE, TINY, write_slices

EXPERIMENT = "sweep"
LRS = ("1e-3", "3e-3")


@dataclass
class Sweep:
    scratch: Path
    data: Path
    env: dict
    runs: list[Path]  # the run folders, in run id order


def run_sweep(root: Path, lrs=LRS, experiment: str = EXPERIMENT) -> Sweep:
    """Submit a sweep of optim.lr to the local executor and wait for its runs (each trains 3 epochs and tests)."""
    data = root / "data"
    for split, n, seed in (("training_data", 4, 0), ("validation_data", 2, 1), ("test_data", 4, 2)):
        write_slices(data / split, n, seed)
    env = {**os.environ, "HPCSEG_SCRATCH": str(root / "scratch"), "XDG_STATE_HOME": str(root / "state"),
           "OMP_NUM_THREADS": "1", "HPCSEG_POLL_S": "0.3"}
    sets = [a for s in [*TINY, "data.test_dir=test_data", "resources.gpus=0"] for a in ("--set", s)]
    cmd = [sys.executable, "-m", "hpcseg", "submit", str(JOB_FILE), "--data", str(data), "--executor", "local",
           "--name", experiment, "--sweep", "optim.lr=" + ",".join(lrs), *sets, "--wait"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    runs = sorted(p for p in (root / "scratch" / experiment).iterdir() if not p.name.startswith("."))
    return Sweep(scratch=root / "scratch", data=data, env=env, runs=runs)


@pytest.fixture(scope="session")
def local_sweep(tmp_path_factory) -> Sweep:
    return run_sweep(tmp_path_factory.mktemp("sweep"))


def vary_copies(template: Path, experiment_dir: Path, n: int, seed: int = 0) -> list[Path]:
    """`n` copies of the run folder `template` in `experiment_dir`, each with its own run id, swept optim.lr and
    model.dropout, and its own metrics (the template's curves scaled) and per-slice test Dice: realistic folders
    as many as wanted, without training each."""
    rng = random.Random(seed)
    experiment_dir.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        run_id = f"20260101-{i:06d}-{seed:04x}"
        dest = experiment_dir / run_id
        shutil.copytree(template, dest, symlinks=True, ignore=shutil.ignore_patterns("checkpoints", "submitit",
                                                                                     "predictions"))
        lr, dropout = [1e-4, 3e-4, 1e-3, 3e-3][i % 4], [0.0, 0.2, 0.4][i // 4 % 3]
        record = json.loads((dest / "run.json").read_text())
        record.update(run_id=run_id, experiment=experiment_dir.name, sweep={"optim.lr": lr, "model.dropout": dropout},
                      submitit_dir=str(dest / "submitit"), job_id=None)
        (dest / "run.json").write_text(json.dumps(record))
        skill = rng.uniform(0.6, 1.4)
        lines = []
        for line in (dest / "metrics.jsonl").read_text().splitlines():
            m = json.loads(line)
            m["train_loss"] *= 2 - skill
            if "val_mean_dice" in m:
                m["val_dice"] = {k: min(1.0, v * skill) for k, v in m["val_dice"].items()}
                m["val_mean_dice"] = sum(m["val_dice"].values()) / len(m["val_dice"])
            lines.append(json.dumps(m))
        (dest / "metrics.jsonl").write_text("\n".join(lines) + "\n")
        validated = [json.loads(line) for line in lines if "val_mean_dice" in line]
        if validated:  # what `status` shows: the best epoch of the varied metrics
            best = max(validated, key=lambda m: m["val_mean_dice"])
            progress = json.loads((dest / "progress.json").read_text())
            progress.update(best_dice=best["val_mean_dice"], best_epoch=best["epoch"])
            (dest / "progress.json").write_text(json.dumps(progress))
        for test in (dest / "test").iterdir():
            csv_path = test / "per_slice.csv"
            rows = csv_path.read_text().splitlines()
            varied = [rows[0]]
            for row in rows[1:]:
                name, *values = row.split(",")
                varied.append(",".join([name, *(f"{min(1.0, float(v) * skill * rng.uniform(0.8, 1.2)):.6f}"
                                                for v in values)]))
            csv_path.write_text("\n".join(varied) + "\n")
            summary = json.loads((test / "summary.json").read_text())
            summary["dice_per_class"] = {k: min(1.0, v * skill) for k, v in summary["dice_per_class"].items()}
            summary["mean_dice"] = sum(summary["dice_per_class"].values()) / len(summary["dice_per_class"])
            (test / "summary.json").write_text(json.dumps(summary))
        out.append(dest)
    return out
