"""Cross-validation summaries: the folds of one experiment (or of one swept setting) as mean and spread of their best
validation Dice per tissue, what `hpcseg status` prints under its table and `collect --ensemble` records.

A fold's run (`submit --folds`) records `fold`, `folds` and `setting` in run.json; its best validation Dice per
tissue is the line of its metrics.jsonl with the best mean (the epoch `checkpoints/best.pt` holds).
"""

from __future__ import annotations

import json
import math
import statistics

from .runs import NotTrusted, Run, read_owned

#: metrics.jsonl of a long run: about 200 bytes an epoch
MAX_METRICS_BYTES = 64 << 20


def fold_key(run: Run) -> tuple[str, str] | None:
    """(experiment, the run id without its `-f<k>`) of a fold's run: the runs of one cross-validation; else None."""
    fold = run.record.get("fold")
    if not run.trusted or isinstance(fold, bool) or not isinstance(fold, int) \
            or not run.run_id.endswith(f"-f{fold}"):
        return None
    return run.experiment, run.run_id[: -len(f"-f{fold}")]


def best_validation(run: Run) -> dict | None:
    """{"epoch", "val_dice": {tissue: Dice}, "val_mean_dice"} of the run's best validation epoch, or None."""
    try:
        lines = read_owned(run.path / "metrics.jsonl", MAX_METRICS_BYTES).decode(errors="replace").splitlines()
    except (OSError, NotTrusted):
        return None
    best = None
    for line in lines:
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):
            continue  # a line being appended
        if not isinstance(record, dict) or not isinstance(record.get("val_dice"), dict):
            continue
        mean, dice = record.get("val_mean_dice"), record["val_dice"]
        if not _number(mean) or not all(isinstance(k, str) and _number(v) for k, v in dice.items()):
            continue
        if best is None or mean > best["val_mean_dice"]:  # the first best, as training keeps it
            best = {"epoch": record.get("epoch"), "val_dice": dice, "val_mean_dice": mean}
    return best


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def summarise(runs: list[Run], states: dict[str, str]) -> list[dict]:
    """One summary per cross-validation (runs grouped by fold_key): its folds, how many are done (COMPLETED), and the
    mean and standard deviation (sample, n - 1) over the folds with a validation so far of each tissue's best Dice
    and of their mean."""
    groups: dict[tuple[str, str], list[Run]] = {}
    for run in runs:
        key = fold_key(run)
        if key is not None:
            groups.setdefault(key, []).append(run)
    out = []
    for (experiment, prefix), members in groups.items():
        members.sort(key=lambda r: r.record["fold"])
        folds = {r.record["fold"]: best_validation(r) for r in members}
        scored = {k: v for k, v in folds.items() if v is not None}
        tissues = list(next(iter(scored.values()))["val_dice"]) if scored else []
        spread = {t: _mean_std([v["val_dice"].get(t) for v in scored.values()]) for t in tissues}
        spread["mean"] = _mean_std([v["val_mean_dice"] for v in scored.values()])
        total = members[0].record.get("folds")
        out.append({"experiment": experiment, "runs": prefix, "sweep": members[0].record.get("sweep") or {},
                    "folds": total if isinstance(total, int) and not isinstance(total, bool) else len(members),
                    "done": sum(states.get(r.run_id) == "COMPLETED" for r in members), "validated": len(scored),
                    "dice": spread, "per_fold": {str(k): v for k, v in folds.items()},
                    "fold_runs": {str(r.record["fold"]): r.run_id for r in members}})
    return out


def _mean_std(values: list) -> dict:
    values = [v for v in values if _number(v)]
    if not values:
        return {"mean": None, "std": None}
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None}


def format_line(summary: dict) -> str:
    """`cross-validation EXP RUNS (sweep): d/K folds done; best validation Dice over n folds: CSF m ± s, ...`"""
    sweep = " ".join(f"{k}={v}" for k, v in summary["sweep"].items())
    head = f"cross-validation {summary['experiment']} {summary['runs']}" + (f" ({sweep})" if sweep else "")
    head += f": {summary['done']}/{summary['folds']} folds done"
    if not summary["validated"]:
        return head + "; no fold validated yet"
    cells = []
    for tissue, value in summary["dice"].items():
        name = "CSF" if tissue == "csf" else tissue.replace("_", " ")
        std = f" ± {value['std']:.3f}" if value["std"] is not None else ""
        cells.append(f"{name} {value['mean']:.3f}{std}" if value["mean"] is not None else f"{name} -")
    n = summary["validated"]
    return head + f"; best validation Dice over {n} fold{'s' if n != 1 else ''} (mean ± sd): " + ", ".join(cells)


def cv_lines(runs: list[Run], statuses) -> list[str]:
    """The cross-validation lines of `runs` for the status table (nothing where no run is a fold)."""
    states = {s.run_id: s.state for s in statuses}
    return [format_line(summary) for summary in summarise(runs, states)]
