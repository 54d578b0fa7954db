"""`hpcseg test`: a trained run's best checkpoint on a folder of slices, with Dice per tissue and overlays."""

from __future__ import annotations

import csv
import io
import json
import time
from dataclasses import dataclass, field
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
from .volumes import LABEL_SUFFIX, is_volume_folder

#: Overlay colours of CSF, grey matter, white matter, and their names in the legend.
COLOURS = np.array([[0.0, 0.0, 0.0], [0.2, 0.5, 1.0], [1.0, 0.3, 0.2], [1.0, 0.9, 0.2]])
LEGEND = ("CSF", "grey matter", "white matter")
#: Overlay panels of small slices are enlarged (by a whole factor, at most 8) towards this many pixels.
OVERLAY_SIZE = 160
#: What a test output folder holds; `--out` is replaced as a whole, so only such a folder (or an empty one) may be.
OUTPUTS = {"predictions", "png", "per_slice.csv", "per_subject.csv", "summary.json"}


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
    from .ensemble import RECORD, is_ensemble, load_fold_models

    if is_ensemble(Path(run_dir)):  # every fold's model; the rule of their data, as ensemble.json records it
        device = pick_device()
        job, models, record = load_fold_models(Path(run_dir), device)
        set_threads(job.train.threads)
        rule = record.get("normalisation")
        best = BestModel(models[0], job, Path(run_dir) / RECORD, None, device, rule if isinstance(rule, dict) else None,
                         True, ensemble=models, folds=record["folds"])
    else:
        best = best_checkpoint(Path(run_dir))
        ckpt = load_checkpoint(best)  # weights_only: refuses anything but tensors and plain metadata
        job = job_from_dict(ckpt["job"], source=str(best))
        device = pick_device()
        set_threads(job.train.threads)
        model = build_model(job).to(device)
        load_weights(model, ckpt, best)
        best = BestModel(model, job, best, ckpt.get("epoch"), device, ckpt.get("normalisation"),
                         "normalisation" in ckpt)
    best.job = infer_overrides(best.job, overrides)
    return best


def infer_overrides(job: Job, overrides: tuple[str, ...]) -> Job:
    """The job with `--set infer.KEY=VALUE` applied: test and predict change how a trained model predicts, no more."""
    from .errors import UserError
    from .jobfile import parse_override

    for item in overrides:
        key, value = parse_override(item)
        if not key.startswith("infer."):
            raise UserError(f"--set {item}: test and predict take infer.* keys only (the model is trained already)")
        job = job.replace(**{key: value})
    return job


def inference_record(best: BestModel) -> dict:
    """How the predictions were made, for summary.json and predict.json: models (and folds), mirrors, windows."""
    from .infer import FLIPS

    cfg = best.job.infer
    return {"models": len(best.models), "folds": [f.get("fold") for f in best.folds] or None, "tta": cfg.tta,
            "mirrors": len(FLIPS[cfg.tta]), "roi": list(cfg.roi), "sw_mode": cfg.sw_mode, "overlap": cfg.overlap}


def inference_line(best: BestModel, what: str, seconds: float) -> str:
    """One line saying what the inference cost: models x mirrors, and the wall time."""
    record = inference_record(best)
    folds = f" (folds {', '.join(map(str, record['folds']))})" if record["folds"] else ""
    return (f"{what} with {record['models']} model(s){folds} x {record['mirrors']} mirror(s) "
            f"(tta {record['tta']}) in {seconds:.1f} s wall time")


def test_run(run_dir: Path, data_dir: Path, out_dir: Path | None = None, log=print, overrides: tuple[str, ...] = (),
             **volume_labels) -> dict:
    """Predict every slice of `data_dir` with `run_dir`'s best checkpoint (or an ensemble folder's models); write
    predictions, PNGs, CSV, summary."""
    run_dir, data_dir = Path(run_dir), Path(data_dir)
    out_dir = Path(out_dir).absolute() if out_dir else run_dir / "test" / data_dir.resolve().name
    check_replaceable(out_dir, "test", OUTPUTS.__contains__, "summary.json")
    if is_volume_folder(data_dir):
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


def save_overlay(path: Path, image: np.ndarray, label: np.ndarray, pred: np.ndarray, slice_id: str = "",
                 dice: list[float] | None = None) -> None:
    """One PNG: a title with the slice id and its Dice (mean over tissues, then each), the image with the label
    (left) and with the prediction (right), each tissue a light fill with a solid outline so the T1 shows through,
    and a colour legend. Drawn with Pillow, not a matplotlib figure: `hpcseg test` writes one per slice."""
    from PIL import Image, ImageDraw, ImageFont
    from PIL.PngImagePlugin import PngInfo

    scale = max(1, min(8, -(-OVERLAY_SIZE // max(min(image.shape), 1))))  # small slices enlarged, pixels kept sharp
    lo, hi = np.percentile(image, [0.5, 99.5])
    grey = np.clip((image - lo) / max(hi - lo, 1e-6), 0, 1)[..., None].repeat(3, axis=-1)
    grey = _enlarge(grey, scale)

    def overlay(classes: np.ndarray) -> np.ndarray:
        classes = _enlarge(np.clip(classes, 0, len(COLOURS) - 1), scale)
        padded = np.pad(classes, 1, mode="edge")
        edge = ((padded[1:-1, 1:-1] != padded[:-2, 1:-1]) | (padded[1:-1, 1:-1] != padded[2:, 1:-1])
                | (padded[1:-1, 1:-1] != padded[1:-1, :-2]) | (padded[1:-1, 1:-1] != padded[1:-1, 2:]))
        alpha = np.where(classes > 0, np.where(edge, 1.0, 0.25), 0.0)[..., None]
        return grey * (1 - alpha) + COLOURS[classes] * alpha

    font = ImageFont.load_default(size=13)
    line = 18
    title = slice_id
    if dice is not None:
        shown = ", ".join(f"{name} {'-' if d != d else f'{d:.3f}'}" for name, d in zip(LEGEND, dice))
        title += f"   Dice {nanmean(list(dice)):.3f}   ({shown})"
    left, right = (Image.fromarray((overlay(c) * 255).round().astype(np.uint8)) for c in (label, pred))
    gap = 6
    width = max(left.width + gap + right.width, int(font.getlength(title)) + 8, 330)
    canvas = Image.new("RGB", (width, 2 * line + left.height + line + 4), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 2), title, fill="black", font=font)
    draw.text((4, line + 2), "label", fill="black", font=font)
    draw.text((left.width + gap + 4, line + 2), "prediction", fill="black", font=font)
    canvas.paste(left, (0, 2 * line))
    canvas.paste(right, (left.width + gap, 2 * line))
    x, y = 4, 2 * line + left.height + 4
    for name, colour in zip(LEGEND, COLOURS[1:]):
        draw.rectangle((x, y + 2, x + 11, y + 13), fill=tuple(round(c * 255) for c in colour), outline="black")
        draw.text((x + 16, y), name, fill="black", font=font)
        x += 16 + int(font.getlength(name)) + 14
    info = PngInfo()
    info.add_text("Title", title)
    canvas.save(path, pnginfo=info)


def _enlarge(array: np.ndarray, scale: int) -> np.ndarray:
    return array.repeat(scale, axis=0).repeat(scale, axis=1) if scale > 1 else array


def format_table(summary: dict) -> str:
    lines = [f"{'tissue':<14}{'Dice':>8}"]
    lines += [f"{name:<14}{value:>8.4f}" for name, value in summary["dice_per_class"].items()]
    lines += [f"{'mean':<14}{summary['mean_dice']:>8.4f}",
              f"{'mean/slice':<14}{summary['mean_dice_per_slice']:>8.4f}  ({summary['slices']} slices)"]
    return "\n".join(lines)


def test_volumes(run_dir: Path, data_dir: Path, out_dir: Path, log=print, label_suffix: str = LABEL_SUFFIX,
                 mapping: str | None = None, overrides: tuple[str, ...] = ()) -> dict:
    """`test_run` on a folder of 3D scans with labels (`<scan>_T1w<label_suffix>.nii[.gz]`, codes by `mapping` as
    prepare's): Dice per tissue of each scan and over every voxel of the folder, on the scans' own voxels, as
    `predict` writes them."""
    from . import volumes
    from .predict import _save_nifti, save_views, segment_volume, trained_rule

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
            _save_nifti(tmp / "predictions" / f"{scan.scan}_prediction.nii.gz", seg.labels, seg.source, classes)
            grid_truth = volumes.resample(truth, seg.source.affine, seg.cut.grid.affine, seg.cut.grid.shape, order=0)
            save_views(tmp / "png" / f"{scan.scan}.png", seg.cut.image, seg.slices, grid_truth)
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
