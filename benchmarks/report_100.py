"""Time `hpcseg report` over an experiment of 100 runs; prints JSON.

    python benchmarks/report_100.py [--runs 100] [--rounds 3]

Trains and tests one real tiny run (a local `hpcseg submit --wait`, about 20 s), copies it into 100 run folders
with their own swept values, metrics and per-slice test Dice (tests/sweep_runs.vary_copies), then runs
`hpcseg report <experiment folder>` as a fresh process `--rounds` times. The figure is the median wall time of
the whole command (Python start, imports, reading 100 folders, drawing the plots, writing the page).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "tests"), str(REPO / "benchmarks")]

from _common import machine  # noqa: E402
from sweep_runs import run_sweep, vary_copies  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        sweep = run_sweep(root / "template", lrs=("1e-3",))
        experiment = root / "scratch" / "bench"
        vary_copies(sweep.runs[0], experiment, args.runs)
        out = root / "report.html"
        cmd = [sys.executable, "-m", "hpcseg", "report", str(experiment), "--out", str(out)]
        env = {**sweep.env, "HPCSEG_SCRATCH": str(root / "scratch")}
        seconds = []
        for _ in range(args.rounds):
            started = time.perf_counter()
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
            seconds.append(time.perf_counter() - started)
            if done.returncode != 0:
                sys.exit(done.stdout + done.stderr)
        result = {"benchmark": "report_100", "runs": args.runs, "rounds": args.rounds,
                  "median_s": round(statistics.median(seconds), 2), "seconds": [round(s, 2) for s in seconds],
                  "page_mib": round(out.stat().st_size / 2**20, 2), "limit_s": 10, "machine": machine()}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
