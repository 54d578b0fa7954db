"""A trained run as `test` and `predict` use it: its best model (or an ensemble folder's fold models), loaded on the
device, and the normalisation rule its training data was prepared with (which new scans are given too)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import volumes
from .checkpoint import load_checkpoint, load_weights
from .device import pick_device, set_threads
from .ensemble import RECORD as ENSEMBLE_RECORD
from .ensemble import is_ensemble, load_fold_models
from .errors import UserError
from .infer import FLIPS
from .jobfile import Job, job_from_dict, parse_override
from .model import build_model
from .runfiles import BEST, RunDirError, recorded_data


def best_checkpoint(run_dir: Path) -> Path:
    """A run folder's `checkpoints/best.pt`, or the `best.pt` of a folder that `hpcseg collect` wrote."""
    collected = run_dir / "best.pt"
    return collected if not (run_dir / BEST).exists() and collected.is_file() else run_dir / BEST


@dataclass
class BestModel:
    """A run's best model with its weights loaded, on the device, with its job and where its checkpoint came from."""

    model: torch.nn.Module
    job: Job
    path: Path
    epoch: int | None
    device: torch.device
    #: The normalisation rule of the data it was trained on, as its checkpoint records it (None: none recorded), and
    #: whether the checkpoint says at all (those written before hpcseg recorded it do not).
    normalisation: dict | None = None
    says_normalisation: bool = False
    #: An ensemble's models (its folds', `model` the first), and its ensemble.json's folds; empty for one model.
    ensemble: list[torch.nn.Module] = field(default_factory=list)
    folds: list[dict] = field(default_factory=list)

    @property
    def models(self) -> list[torch.nn.Module]:
        return self.ensemble or [self.model]


def load_best_model(run_dir: Path, overrides: tuple[str, ...] = ()) -> BestModel:
    """The model of `run_dir`'s best checkpoint (a run folder, or a folder from `hpcseg collect`), or the models of
    an ensemble folder (`hpcseg collect --ensemble`), on the device; `overrides` set infer.* keys of its job."""
    run_dir = Path(run_dir)
    device = pick_device()
    if is_ensemble(run_dir):  # every fold's model; the rule of their data, as ensemble.json records it
        job, models, record = load_fold_models(run_dir, device)
        set_threads(job.train.threads)
        rule = record.get("normalisation")
        best = BestModel(models[0], job, run_dir / ENSEMBLE_RECORD, None, device, rule if isinstance(rule, dict)
                         else None, True, ensemble=models, folds=record["folds"])
    else:
        path = best_checkpoint(run_dir)
        ckpt = load_checkpoint(path)  # weights_only: refuses anything but tensors and plain metadata
        job = job_from_dict(ckpt["job"], source=str(path))
        set_threads(job.train.threads)
        model = build_model(job).to(device)
        load_weights(model, ckpt, path)
        best = BestModel(model, job, path, ckpt.get("epoch"), device, ckpt.get("normalisation"),
                         "normalisation" in ckpt)
    best.job = infer_overrides(best.job, overrides)
    return best


def infer_overrides(job: Job, overrides: tuple[str, ...]) -> Job:
    """The job with `--set infer.KEY=VALUE` applied: test and predict change how a trained model predicts, no more."""
    for item in overrides:
        key, value = parse_override(item)
        if not key.startswith("infer."):
            raise UserError(f"--set {item}: test and predict take infer.* keys only (the model is trained already)")
        job = job.replace(**{key: value})
    return job


def inference_record(best: BestModel) -> dict:
    """How the predictions were made, for summary.json and predict.json: models (and folds), mirrors, windows."""
    cfg = best.job.infer
    return {"models": len(best.models), "folds": [f.get("fold") for f in best.folds] or None, "tta": cfg.tta,
            "mirrors": len(FLIPS[cfg.tta]), "roi": list(cfg.roi), "sw_mode": cfg.sw_mode, "overlap": cfg.overlap}


def inference_line(best: BestModel, what: str, seconds: float) -> str:
    """One line saying what the inference cost: models x mirrors, and the wall time."""
    record = inference_record(best)
    folds = f" (folds {', '.join(map(str, record['folds']))})" if record["folds"] else ""
    return (f"{what} with {record['models']} model(s){folds} x {record['mirrors']} mirror(s) "
            f"(tta {record['tta']}) in {seconds:.1f} s wall time")


def trained_rule(run_dir: Path, best: BestModel, log=print) -> dict:
    """The normalisation rule the run's training data was prepared with: recorded in its best checkpoint, or, for
    a checkpoint from before hpcseg recorded it, in the prepare.json of the data folder its train.json names; else
    the built-in volumes.RULE, with a one-line note."""
    if best.says_normalisation:
        recorded = best.normalisation
    else:
        try:
            folders = recorded_data(run_dir)
        except RunDirError:
            folders = None
        first = (folders[0][0] if isinstance(folders[0], list) else folders[0]) if folders else None  # a fold: several
        recorded = volumes.prepared_rule(first.parent) if first else None
    if recorded is not None:
        return recorded
    log(f"note: {run_dir}: no normalisation rule recorded for its training data (not made by hpcseg prepare, or "
        f"trained before hpcseg recorded it): scans are divided by their {volumes.PERCENTILE:g}th percentile over the "
        f"brain, prepare's default")
    return volumes.RULE
