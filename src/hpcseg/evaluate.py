"""`hpcseg test`: a trained run's best checkpoint on a folder of slices, with Dice per tissue and overlays."""

from __future__ import annotations

import csv
import io
import json
import time
from pathlib import Path

import numpy as np
import torch

from . import TISSUES, volumes
from .atomic import writing
from .data import load_split
from .infer import predict_slices, stack
from .metrics import FolderDice, named, nanmean, per_slice_dice
from .outdir import check_replaceable, replacing
from .segment import save_nifti, segment_volume
from .trained import inference_line, inference_record, load_best_model, trained_rule
from .views import save_overlay, save_views

#: What a test output folder holds; `--out` is replaced as a whole, so only such a folder (or an empty one) may be.
OUTPUTS = {"predictions", "png", "per_slice.csv", "per_subject.csv", "summary.json"}


def test_run(run_dir: Path, data_dir: Path, out_dir: Path | None = None, log=print, overrides: tuple[str, ...] = (),
             **volume_labels) -> dict:
    """Predict every slice of `data_dir` with `run_dir`'s best checkpoint (or an ensemble folder's models); write
    predictions, PNGs, CSV, summary; `overrides` set infer.* keys."""
    run_dir, data_dir = Path(run_dir), Path(data_dir)
    out_dir = Path(out_dir).absolute() if out_dir else run_dir / "test" / data_dir.resolve().name
    check_replaceable(out_dir, "test", OUTPUTS.__contains__, "summary.json")
    if volumes.is_volume_folder(data_dir):
        return test_volumes(run_dir, data_dir, out_dir, log, overrides=overrides, **volume_labels)
    best = load_best_model(run_dir, overrides)
    job, device = best.job, best.device
    split = load_split(data_dir, job.data.num_classes)

    folder_dice = FolderDice(job.data.num_classes, device=device)
    predictions: dict[int, np.ndarray] = {}
    slice_dice: dict[int, list[float]] = {}
    started = time.perf_counter()
    for group, pred in predict_slices(best.models, split.images, job, device):
        labels = stack(split.labels, group, torch.uint8, device)
        folder_dice.update(pred, labels)
        for i, row, p in zip(group, per_slice_dice(pred, labels, job.data.num_classes).tolist(), pred.cpu()):
            slice_dice[i], predictions[i] = row, p[0].numpy().astype(np.uint8)

    dice = named(folder_dice.dice())
    wall = time.perf_counter() - started
    summary = {"run": str(run_dir), "data": str(data_dir), "checkpoint_epoch": best.epoch, "slices": len(split.ids),
               "dice_per_class": dice, "mean_dice": nanmean(list(dice.values())),
               "mean_dice_per_slice": nanmean([nanmean(row) for row in slice_dice.values()]),
               "inference": inference_record(best), "wall_s": round(wall, 3)}
    _write_outputs(out_dir, split, predictions, slice_dice, summary)
    log(format_table(summary))
    log(inference_line(best, f"tested {len(split.ids)} slices", wall))
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
            save_overlay(tmp / "png" / f"{slice_id}.png", split.images[i], split.labels[i], predictions[i],
                         slice_id, slice_dice[i])
            table.writerow([slice_id, *(f"{d:.6f}" for d in slice_dice[i]), f"{nanmean(slice_dice[i]):.6f}"])
        (tmp / "per_slice.csv").write_text(rows.getvalue())
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")


def format_table(summary: dict) -> str:
    lines = [f"{'tissue':<14}{'Dice':>8}"]
    lines += [f"{name:<14}{value:>8.4f}" for name, value in summary["dice_per_class"].items()]
    lines += [f"{'mean':<14}{summary['mean_dice']:>8.4f}",
              f"{'mean/slice':<14}{summary['mean_dice_per_slice']:>8.4f}  ({summary['slices']} slices)"]
    return "\n".join(lines)


def test_volumes(run_dir: Path, data_dir: Path, out_dir: Path, log=print, label_suffix: str = volumes.LABEL_SUFFIX,
                 mapping: str | None = None, overrides: tuple[str, ...] = ()) -> dict:
    """`test_run` on a folder of 3D scans with labels (`<scan>_T1w<label_suffix>.nii[.gz]`, codes by `mapping` as
    prepare's): Dice per tissue of each scan and over every voxel of the folder, on the scans' own voxels, as
    `predict` writes them."""
    codes = volumes.parse_mapping(mapping)
    scans = volumes.find_volumes(data_dir, label_suffix)
    volumes.check_scans(scans, codes)
    best = load_best_model(run_dir, overrides)
    rule = trained_rule(run_dir, best, log)
    percentile = volumes.rule_percentile(rule, str(best.path))
    classes = best.job.data.num_classes
    folder_dice, per_scan = FolderDice(classes), {}
    rows = io.StringIO()
    table = csv.writer(rows)
    table.writerow(["scan", "subject", *TISSUES, "mean"])
    intact = "the previous output is intact" if out_dir.exists() else "nothing was written"
    # a bad scan met half-way, or a full disk (one line), leaves nothing written
    with writing(out_dir, f"writing the test output; {intact}"), replacing(out_dir) as tmp:
        (tmp / "predictions").mkdir()
        (tmp / "png").mkdir()
        wall = 0.0
        for scan in scans:
            started = time.perf_counter()
            seg = segment_volume(best, scan.image, percentile)
            wall += time.perf_counter() - started
            truth = volumes.map_labels(scan.label, volumes.read_volume(scan.label, "label")[0], codes)
            pred_t, truth_t = (torch.from_numpy(a.astype(np.int64))[None, None] for a in (seg.labels, truth))
            one = FolderDice(classes)
            one.update(pred_t, truth_t)
            folder_dice.update(pred_t, truth_t)
            per_scan[scan.scan] = dice = named(one.dice())
            table.writerow([scan.scan, scan.subject, *(f"{d:.6f}" for d in dice.values()),
                            f"{nanmean(list(dice.values())):.6f}"])
            save_nifti(tmp / "predictions" / f"{scan.scan}_prediction.nii.gz", seg.labels, seg.source, classes)
            grid_truth = volumes.resample(truth, seg.source.affine, seg.cut.grid.affine, seg.cut.grid.shape, order=0)
            save_views(tmp / "png" / f"{scan.scan}.png", seg.cut.image, seg.slices, grid_truth, scan.scan,
                       list(dice.values()))
        dice = named(folder_dice.dice())
        summary = {"run": str(run_dir), "data": str(data_dir), "checkpoint_epoch": best.epoch, "scans": len(scans),
                   "dice_per_class": dice, "mean_dice": nanmean(list(dice.values())),
                   "mean_dice_per_scan": nanmean([nanmean(list(d.values())) for d in per_scan.values()]),
                   "dice_per_scan": per_scan, "normalisation": rule, "inference": inference_record(best),
                   "wall_s": round(wall, 3)}
        (tmp / "per_subject.csv").write_text(rows.getvalue())
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    log("\n".join([f"{'tissue':<14}{'3D Dice':>8}", *(f"{k:<14}{v:>8.4f}" for k, v in dice.items()),
                    f"{'mean':<14}{summary['mean_dice']:>8.4f}",
                    f"{'mean/scan':<14}{summary['mean_dice_per_scan']:>8.4f}  ({len(scans)} scans)"]))
    log(inference_line(best, f"tested {len(scans)} scan(s)", wall))
    log(f"wrote {out_dir}")
    return summary
