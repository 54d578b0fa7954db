"""Time `hpcseg status` over 1,000 run folders with one scheduler query; prints JSON.

    python benchmarks/status_1000.py [--runs 1000] [--executor slurm|lsf|local]

Creates realistic run folders (run.json, job.toml, progress.json, metrics.jsonl, attempts.jsonl, outcome.json for
the finished third, a submitit folder) in a temporary scratch, with job ids the scheduler does not know, and a
stand-in `sacct`/`bjobs` first on PATH that answers the one query (so the number measures hpcseg, not a
scheduler). Reports the wall time of the full command (`hpcseg status --json`, a fresh process) and of the
in-process scan + merge, and how many scheduler calls were made.
"""

from __future__ import annotations

import argparse
import json
import os
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def make_runs(scratch: Path, n: int, executor: str) -> None:
    now = time.time()
    for i in range(n):
        exp = f"exp{i % 10}"
        run_id = f"20250101-{i:06d}-abcd"
        run_dir = scratch / exp / run_id
        (run_dir / "submitit").mkdir(parents=True)
        (run_dir / "checkpoints").mkdir()
        job_id = str(100000 + i)
        record = {"run_id": run_id, "experiment": exp, "executor": executor, "job_id": job_id, "epochs": 700,
                  "submit_time": now - 86400, "submitit_dir": str(run_dir / "submitit"), "sweep": {},
                  "hpcseg_version": "0.1.0", "command_line": ["hpcseg", "submit", "jobs/x.toml"]}
        (run_dir / "run.json").write_text(json.dumps(record, indent=2))
        (run_dir / "job.toml").write_text('name = "x"\n[train]\nepochs = 700\n')
        epoch = 700 if i % 3 == 0 else i % 700
        (run_dir / "progress.json").write_text(json.dumps(
            {"epoch": epoch, "epochs": 700, "best_dice": 0.8 + (i % 100) / 1000, "best_epoch": max(1, epoch - 5),
             "seconds_per_epoch": 12.0, "updated": now - i, "finished": i % 3 == 0}))
        (run_dir / "metrics.jsonl").write_text("".join(
            json.dumps({"epoch": e, "train_loss": 0.5, "lr": 1e-3, "samples_per_s": 100, "seconds": 12}) + "\n"
            for e in range(1, 21)))
        (run_dir / "attempts.jsonl").write_text(json.dumps({"event": "start", "time": now - 3600}) + "\n")
        if i % 3 == 0:
            (run_dir / "outcome.json").write_text(json.dumps({"state": "COMPLETED"}))
            (run_dir / "submitit" / f"{job_id}_0_result.pkl").write_bytes(b"x")


def stand_in(bin_dir: Path, calls: Path) -> None:
    bin_dir.mkdir()
    for name, out in (("sacct", 'for j in $(echo "$@" | tr "," " "); do case $j in 1*) echo "$j|RUNNING";; esac; done'),
                      ("bjobs", 'for j in "$@"; do case $j in 1*) echo "$j,0,RUN,-";; esac; done')):
        path = bin_dir / name
        path.write_text(f'#!/bin/sh\necho "{name}" >> {calls}\n{out}\n')
        path.chmod(path.stat().st_mode | stat.S_IEXEC)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--executor", default="slurm", choices=["slurm", "lsf", "local"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        scratch, calls = tmp / "scratch", tmp / "calls.log"
        make_runs(scratch, args.runs, args.executor)
        stand_in(tmp / "bin", calls)
        env = dict(os.environ, HPCSEG_SCRATCH=str(scratch), PATH=f"{tmp / 'bin'}{os.pathsep}{os.environ['PATH']}")
        started = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", "from hpcseg.cli import main; main()", "status", "--json"],
                              env=env, capture_output=True, text=True, check=True)
        command_s = time.perf_counter() - started
        rows = json.loads(proc.stdout)
        states: dict[str, int] = {}
        for row in rows:
            states[row["state"]] = states.get(row["state"], 0) + 1
        n_calls = len(calls.read_text().splitlines()) if calls.exists() else 0

        os.environ.update(env)
        from hpcseg.cluster.runs import iter_runs
        from hpcseg.cluster.status import collect_status

        started = time.perf_counter()
        statuses, _ = collect_status(list(iter_runs(scratch)))
        in_process_s = time.perf_counter() - started
        print(json.dumps({"runs": len(rows), "executor": args.executor, "command_s": round(command_s, 3),
                          "in_process_s": round(in_process_s, 3), "scheduler_calls": n_calls,
                          "states": states}, indent=1))


if __name__ == "__main__":
    main()
