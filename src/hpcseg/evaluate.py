"""`hpcseg test`: a trained run's best checkpoint on a folder of slices, with Dice per tissue and overlays."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import TISSUES
from .atomic import writing
from .checkpoint import load_checkpoint, load_weights
from .data import load_split
from .infer import predict_slices, stack
from .jobfile import Job, job_from_dict
from .metrics import FolderDice, named, nanmean, per_slice_dice
from .outdir import check_replaceable, replacing
from .model import build_model
from .train import BEST, pick_device, set_threads

#: Overlay colours of CSF, grey matter, white matter.
COLOURS = np.array([[0.0, 0.0, 0.0], [0.2, 0.5, 1.0], [1.0, 0.3, 0.2], [1.0, 0.9, 0.2]])
#: What a test output folder holds; `--out` is replaced as a whole, so only such a folder (or an empty one) may be.
OUTPUTS = {"predictions", "png", "per_slice.csv", "summary.json"}


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


def load_best_model(run_dir: Path) -> BestModel:
    """The model of `run_dir`'s best checkpoint (a run folder, or a folder from `hpcseg collect`), on the device."""
    best = best_checkpoint(Path(run_dir))
    ckpt = load_checkpoint(best)  # weights_only: refuses anything but tensors and plain metadata
    job = job_from_dict(ckpt["job"], source=str(best))
    device = pick_device()
    set_threads(job.train.threads)
    model = build_model(job).to(device)
    load_weights(model, ckpt, best)
    return BestModel(model, job, best, ckpt.get("epoch"), device)


def test_run(run_dir: Path, data_dir: Path, out_dir: Path | None = None, log=print) -> dict:
    """Predict every slice of `data_dir` with `run_dir`'s best checkpoint; write predictions, PNGs, CSV, summary."""
    run_dir, data_dir = Path(run_dir), Path(data_dir)
    out_dir = Path(out_dir).absolute() if out_dir else run_dir / "test" / data_dir.resolve().name
    check_replaceable(out_dir, "test", OUTPUTS.__contains__, "summary.json")
    best = load_best_model(run_dir)
    job, device = best.job, best.device
    split = load_split(data_dir, job.data.num_classes)

    folder_dice = FolderDice(job.data.num_classes, device=device)
    predictions: dict[int, np.ndarray] = {}
    slice_dice: dict[int, list[float]] = {}
    for group, pred in predict_slices(best.model, split.images, job, device):
        labels = stack(split.labels, group, torch.uint8, device)
        folder_dice.update(pred, labels)
        for i, row, p in zip(group, per_slice_dice(pred, labels, job.data.num_classes).tolist(), pred.cpu()):
            slice_dice[i], predictions[i] = row, p[0].numpy().astype(np.uint8)

    dice = named(folder_dice.dice())
    summary = {"run": str(run_dir), "data": str(data_dir), "checkpoint_epoch": best.epoch, "slices": len(split.ids),
               "dice_per_class": dice, "mean_dice": nanmean(list(dice.values())),
               "mean_dice_per_slice": nanmean([nanmean(row) for row in slice_dice.values()])}
    _write_outputs(out_dir, split, predictions, slice_dice, summary)
    log(format_table(summary))
    log(f"wrote {out_dir}")
    return summary


def _write_outputs(out_dir: Path, split, predictions, slice_dice, summary) -> None:
    """Everything goes to a temporary folder first and replaces `out_dir` in one rename: never half-written."""
    intact = "the previous output is intact" if out_dir.exists() else "nothing was written"
    with writing(out_dir, f"writing the test output; {intact}"), replacing(out_dir) as tmp:
        (tmp / "predictions").mkdir()
        (tmp / "png").mkdir()
        rows = io.StringIO()
        table = csv.writer(rows)
        table.writerow(["id", *TISSUES, "mean"])
        for i, slice_id in enumerate(split.ids):
            np.save(tmp / "predictions" / f"{slice_id}_prediction.npy", predictions[i])
            save_overlay(tmp / "png" / f"{slice_id}.png", split.images[i], split.labels[i], predictions[i])
            table.writerow([slice_id, *(f"{d:.6f}" for d in slice_dice[i]), f"{nanmean(slice_dice[i]):.6f}"])
        (tmp / "per_slice.csv").write_text(rows.getvalue())
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")


def save_overlay(path: Path, image: np.ndarray, label: np.ndarray, pred: np.ndarray) -> None:
    """One PNG: the image with the label overlaid (left) and with the prediction overlaid (right)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    lo, hi = np.percentile(image, [0.5, 99.5])
    grey = np.clip((image - lo) / max(hi - lo, 1e-6), 0, 1)[..., None].repeat(3, axis=-1)

    def overlay(classes: np.ndarray) -> np.ndarray:
        colour = COLOURS[np.clip(classes, 0, len(COLOURS) - 1)]
        alpha = np.where(classes > 0, 0.45, 0.0)[..., None]
        return grey * (1 - alpha) + colour * alpha

    gap = np.ones((image.shape[0], 4, 3))
    plt.imsave(path, np.concatenate([overlay(label), gap, overlay(pred)], axis=1))


def format_table(summary: dict) -> str:
    lines = [f"{'tissue':<14}{'Dice':>8}"]
    lines += [f"{name:<14}{value:>8.4f}" for name, value in summary["dice_per_class"].items()]
    lines += [f"{'mean':<14}{summary['mean_dice']:>8.4f}",
              f"{'mean/slice':<14}{summary['mean_dice_per_slice']:>8.4f}  ({summary['slices']} slices)"]
    return "\n".join(lines)
