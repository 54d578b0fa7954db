"""`hpcseg collect --ensemble`: every fold's best weights of one cross-validation into `DEST/<experiment>-ensemble/`.

The folder (read by hpcseg.ensemble, for `test` and `predict`) holds `fold<k>.pt` (each fold's `checkpoints/best.pt`,
copied as collect copies: one open handle, regular files of this user only), the job (`job.toml`), `ensemble.json`
(the folds, their runs and validation Dice, the normalisation rule, the cross-validation summary) and a verified
`SHA256SUMS`. It is written beside the destination and renamed into place: never half-written. Refused, naming the
fold, while a fold has no best checkpoint.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..checkpoint import load_checkpoint
from ..ensemble import RECORD
from ..outdir import check_replaceable, replacing
from ..runfiles import BEST
from .collect import SUMS, _sha256_file, copy_stable, verify
from .crossval import fold_key, format_line, summarise
from .runs import ClusterError, Run

OUTPUTS = {RECORD, "job.toml", SUMS, "test"}


def _is_output(name: str) -> bool:
    return name in OUTPUTS or (name.startswith("fold") and name.endswith(".pt"))


def ensemble_name(experiment: str, runs_prefix: str, sweep: dict) -> str:
    """`<experiment>-ensemble`, or `<experiment>-<setting>-ensemble` for the folds of one swept setting."""
    setting = runs_prefix.rsplit("-", 1)[-1] if sweep else None
    return f"{experiment}-{setting}-ensemble" if setting else f"{experiment}-ensemble"


def collect_ensemble(runs: list[Run], states: dict[str, str], dest_root: Path) -> dict:
    """Write the ensemble of the one cross-validation among `runs`; returns {"dest", "folds", "line"}."""
    groups: dict[tuple[str, str], list[Run]] = {}
    for run in runs:
        key = fold_key(run)
        if key is not None:
            groups.setdefault(key, []).append(run)
    if not groups:
        raise ClusterError("--ensemble: no cross-validation fold among the runs selected (submit them with --folds)")
    if len(groups) > 1:
        names = ", ".join(prefix for _, prefix in sorted(groups))
        raise ClusterError(f"--ensemble: the runs selected hold {len(groups)} cross-validations ({names}): select one, "
                           f"e.g. hpcseg collect {sorted(groups)[0][1]} --ensemble")
    (experiment, prefix), members = next(iter(groups.items()))
    members.sort(key=lambda r: r.record["fold"])
    total = members[0].record.get("folds")
    present = {r.record["fold"] for r in members}
    missing = [k for k in range(total if isinstance(total, int) else len(members)) if k not in present]
    if missing:
        raise ClusterError(f"{experiment}: fold {missing[0]} of {prefix} has no run among those selected; an "
                           f"ensemble needs every fold")
    for run in members:
        if not os.path.lexists(run.path / BEST):
            raise ClusterError(f"{experiment}: fold {run.record['fold']} (run {run.run_id}) has no best checkpoint "
                               f"yet ({run.path / BEST}); collect the ensemble once every fold has validated")
    [summary] = summarise(members, states)
    dest = Path(dest_root) / ensemble_name(experiment, prefix, summary["sweep"])
    check_replaceable(dest.absolute(), "collect --ensemble", _is_output, RECORD)
    with replacing(dest.absolute()) as tmp:
        folds, sums, rule, first = [], {}, None, None
        for run in members:
            k = run.record["fold"]
            name = f"fold{k}.pt"
            sums[name], _ = copy_stable(run.path / BEST, tmp / name)
            ckpt = load_checkpoint(tmp / name)  # weights_only: what test and predict will load
            if first is None:
                rule, first = ckpt.get("normalisation"), run
            elif ckpt.get("normalisation") != rule:
                raise ClusterError(f"{run.run_id}: its data's normalisation rule differs from fold "
                                   f"{first.record['fold']}'s ({first.run_id}): not one cross-validation")
            best = summary["per_fold"].get(str(k)) or {}
            folds.append({"fold": k, "run_id": run.run_id, "run": str(run.path), "checkpoint": name,
                          "best_epoch": ckpt.get("epoch"), "val_dice": best.get("val_dice"),
                          "val_mean_dice": best.get("val_mean_dice"), "sha256": sums[name]})
        sums["job.toml"], _ = copy_stable(first.path / "job.toml", tmp / "job.toml")
        line = format_line(summary)
        record = {"experiment": experiment, "runs": prefix, "sweep": summary["sweep"], "folds": folds,
                  "normalisation": rule, "cross_validation": {**summary, "line": line},
                  "averaging": "softmax probabilities of every fold's model, averaged (and over infer.tta's mirrors)"}
        (tmp / RECORD).write_text(json.dumps(record, indent=2) + "\n")
        sums[RECORD] = _sha256_file(tmp / RECORD)
        (tmp / SUMS).write_text("".join(f"{sums[n]}  {n}\n" for n in sorted(sums)))
        verify(tmp)
    return {"dest": str(dest), "folds": folds, "line": line}
