"""Ensemble folders (`hpcseg collect --ensemble`): every cross-validation fold's best weights, loaded as one model set.

The folder holds `fold<k>.pt` (each fold's `checkpoints/best.pt`), `job.toml`, and `ensemble.json`: the folds with
their runs and validation Dice, the normalisation rule of their data, and the cross-validation summary. `test` and
`predict` take the folder as they take a run: every batch goes through every fold's model and their softmax
probabilities are averaged (infer.predict_probabilities). Weights load once, with `weights_only=True`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from .checkpoint import CheckpointError, load_checkpoint, load_weights
from .errors import UserError

RECORD = "ensemble.json"
CHECKPOINT = re.compile(r"fold\d+\.pt")


def is_ensemble(folder: Path) -> bool:
    return (Path(folder) / RECORD).is_file()


def read_record(folder: Path) -> dict:
    """ensemble.json, checked: folds with a checkpoint each (a plain `fold<k>.pt` in the folder)."""
    path = Path(folder) / RECORD
    try:
        record = json.loads(path.read_text())
        folds = record["folds"]
        ok = isinstance(folds, list) and folds and all(
            isinstance(f, dict) and isinstance(f.get("checkpoint"), str) and CHECKPOINT.fullmatch(f["checkpoint"])
            for f in folds)
    except (OSError, ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        raise UserError(f"{path}: damaged (expected folds, each with its checkpoint fold<k>.pt); collect it again")
    return record


def load_fold_models(folder: Path, device) -> tuple:
    """(job, models on `device` in eval mode, ensemble.json) of an ensemble folder: each fold's model from its
    checkpoint, all of one architecture."""
    from .jobfile import job_from_dict
    from .model import build_model

    folder = Path(folder)
    record = read_record(folder)
    job, models, first = None, [], None
    for fold in record["folds"]:
        path = folder / fold["checkpoint"]
        ckpt = load_checkpoint(path)  # weights_only: tensors and plain metadata only
        fold_job = job_from_dict(ckpt["job"], source=str(path))
        if job is None:
            job, first = fold_job, path
        elif fold_job.model != job.model or fold_job.data.num_classes != job.data.num_classes:
            raise CheckpointError(f"{path}: its model differs from {first.name}'s: an ensemble averages models of "
                                  f"one architecture")
        model = build_model(fold_job).to(device)
        load_weights(model, ckpt, path)
        models.append(model.eval())
    return job, models, record
