"""A trained run as `test` and `predict` use it: its best model, loaded on the device, and the normalisation rule
its training data was prepared with (which new scans are given too)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from . import volumes
from .checkpoint import load_checkpoint, load_weights
from .device import pick_device, set_threads
from .jobfile import Job, job_from_dict
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


def load_best_model(run_dir: Path) -> BestModel:
    """The model of `run_dir`'s best checkpoint (a run folder, or a folder from `hpcseg collect`), on the device."""
    best = best_checkpoint(Path(run_dir))
    ckpt = load_checkpoint(best)  # weights_only: refuses anything but tensors and plain metadata
    job = job_from_dict(ckpt["job"], source=str(best))
    device = pick_device()
    set_threads(job.train.threads)
    model = build_model(job).to(device)
    load_weights(model, ckpt, best)
    return BestModel(model, job, best, ckpt.get("epoch"), device, ckpt.get("normalisation"), "normalisation" in ckpt)


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
        recorded = volumes.prepared_rule(folders[0].parent) if folders else None
    if recorded is not None:
        return recorded
    log(f"note: {run_dir}: no normalisation rule recorded for its training data (not made by hpcseg prepare, or "
        f"trained before hpcseg recorded it): scans are divided by their {volumes.PERCENTILE:g}th percentile over the "
        f"brain, prepare's default")
    return volumes.RULE
