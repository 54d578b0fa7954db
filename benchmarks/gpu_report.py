"""Summaries of gpu_run.sh's end-to-end and time-to-Dice steps: one printed table each, appended to RESULTS.md.

  python benchmarks/gpu_report.py e2e RUN TEST_OUT TRAIN_WALL_S TEST_WALL_S [--results RESULTS.md]
  python benchmarks/gpu_report.py ttd LOOP.json... [--results RESULTS.md]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

#: train.json's phases in the order a run goes through them (hpcseg.phases.NAMES), then what no phase covers
PHASES = ("startup", "data", "setup", "train", "validate", "checkpoint", "tensorboard", "records", "other")


def e2e(run: Path, test_out: Path, train_wall: float, test_wall: float) -> tuple[dict, list[str]]:
    """The whole job, process start to test summary: each phase's seconds and share of the total."""
    record = json.loads((run / "train.json").read_text())
    progress = json.loads((run / "progress.json").read_text())
    summary = json.loads((test_out / "summary.json").read_text())
    phases = record.get("phases_s", {})
    total = train_wall + test_wall
    shares = {name: phases.get(name, 0.0) for name in PHASES}
    # the train process's own wall time against what train() saw (exit, interpreter teardown after training)
    shares["exit"] = max(0.0, train_wall - phases.get("wall", train_wall))
    shares["test"] = test_wall
    out = {"train_wall_s": round(train_wall, 2), "test_wall_s": round(test_wall, 2), "total_s": round(total, 2),
           "device": record.get("device"), "precision": record.get("precision"), "epochs": progress.get("epoch"),
           "best_dice": progress.get("best_dice"), "best_epoch": progress.get("best_epoch"),
           "stopped_early": progress.get("stopped_early"), "test_mean_dice": summary.get("mean_dice"),
           "phases_s": {k: round(v, 2) for k, v in shares.items()}}
    lines = [f"- {out['device']}, precision {out['precision']}: {out['epochs']} epochs"
             f"{' (early stop)' if out['stopped_early'] else ''}, best validation mean Dice {out['best_dice']} at epoch "
             f"{out['best_epoch']}, test mean Dice {out['test_mean_dice']}; **{total:.1f} s** from `hpcseg train` start "
             f"to the test summary (train {train_wall:.1f} s, test {test_wall:.1f} s)", "",
             "| phase | seconds | share |", "|---|---|---|"]
    lines += [f"| {name} | {value:.2f} | {100 * value / total:.1f}% |" for name, value in shares.items()]
    return out, lines


def ttd(paths: list[Path]) -> tuple[dict, list[str]]:
    """Each loop's Dice at each wall-time point, side by side."""
    loops = [json.loads(p.read_text()) for p in paths if p.is_file()]
    points = sorted({pt["point_s"] for loop in loops for pt in loop["points"]})
    lines = ["| loop | " + " | ".join(f"Dice at {p:g} s (reached at s; samples)" for p in points) + " |",
             "|---|" + "---|" * len(points)]
    for loop in loops:
        cells = []
        for p in points:
            pt = next((x for x in loop["points"] if x["point_s"] == p), None)
            cells.append(f"{pt['mean_dice']} ({pt['at_s']}; {pt['samples']})" if pt else "not reached")
        lines.append(f"| {loop['name']} | " + " | ".join(cells) + " |")
    return {"loops": loops}, lines


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    e = sub.add_parser("e2e")
    e.add_argument("run", type=Path)
    e.add_argument("test_out", type=Path)
    e.add_argument("train_wall_s", type=float)
    e.add_argument("test_wall_s", type=float)
    t = sub.add_parser("ttd")
    t.add_argument("loops", type=Path, nargs="+")
    for q in (e, t):
        q.add_argument("--results", type=Path, default=None, help="RESULTS.md to append to (default: none)")
        q.add_argument("--note", default="", help="a line said above the table")
    args = p.parse_args(argv)
    if args.what == "e2e":
        result, lines = e2e(args.run, args.test_out, args.train_wall_s, args.test_wall_s)
        title = "end to end: the GPU default job through hpcseg train + hpcseg test"
    else:
        result, lines = ttd(args.loops)
        title = "time to Dice at fixed wall times"
    if args.note:
        lines = [f"- {args.note}", *lines]
    print("\n".join(lines), flush=True)
    if args.results:
        info = C.machine()
        C.append_results(title, info, C.command_line(), lines, result, args.results)


if __name__ == "__main__":
    main()
