"""`hpcseg predict`: a trained run's best checkpoint on new scans without labels: 2D slices or whole 3D scans.

Inference is `hpcseg test`'s (same model loading, same batching, sliding window and padding); what it writes is
only the class maps: `<id>_prediction.npy` for a `.npy` image, `<id>_prediction.nii.gz` with the image's affine and
header for a NIfTI image (so it overlays the scan in a viewer), and `predict.json`.

A folder of 3D scans (`<scan>_T1w.nii[.gz]`) is cut into coronal slices and normalised as `hpcseg prepare` did for
the run's training data (the rule its checkpoint or its data's prepare.json records; else volumes.RULE), segmented
slice by slice in batches, and the class maps are put back on the scan's own voxels:
`<scan>_prediction.nii.gz` (the scan's shape, affine and header) and `<scan>_views.png` (three orthogonal views).
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from . import volumes
from .atomic import writing
from .data import load_images
from .evaluate import inference_line, inference_record, load_best_model
from .infer import predict_slices
from .outdir import check_replaceable, replacing

#: What a predict output folder holds, and nothing else; `--out` is replaced as a whole, so only such a folder may be.
SUMMARY = "predict.json"
PREDICTION_SUFFIXES = ("_prediction.npy", "_prediction.nii.gz", "_views.png")


def is_output(name: str) -> bool:
    return name == SUMMARY or name.endswith(PREDICTION_SUFFIXES)


def predict_run(run_dir: Path, data_dir: Path, out_dir: Path, log=print, overrides: tuple[str, ...] = ()) -> dict:
    """Predict every image of `data_dir` (labels there are ignored) with `run_dir`'s best checkpoint (or an ensemble
    folder's models) into `out_dir`; `overrides` set infer.* keys."""
    run_dir, data_dir, out_dir = Path(run_dir), Path(data_dir), Path(out_dir).absolute()
    check_replaceable(out_dir, "predict", is_output, SUMMARY)
    if volumes.is_volume_folder(data_dir):
        return predict_volumes(run_dir, data_dir, out_dir, log, overrides)
    scans = load_images(data_dir)
    nifti = {i: _nifti_source(path) for i, path in enumerate(scans.paths) if not path.name.lower().endswith(".npy")}
    best = load_best_model(run_dir, overrides)

    predictions: dict[int, np.ndarray] = {}
    started = time.perf_counter()
    for group, pred in predict_slices(best.models, scans.images, best.job, best.device):
        for i, p in zip(group, pred.cpu()):
            predictions[i] = p[0].numpy().astype(np.uint8)
    wall = time.perf_counter() - started

    classes = best.job.data.num_classes
    counts = {slice_id: np.bincount(predictions[i].ravel(), minlength=classes).tolist()  # by label value
              for i, slice_id in enumerate(scans.ids)}
    summary = {"run": str(run_dir), "checkpoint": str(best.path), "checkpoint_epoch": best.epoch, "data": str(data_dir),
               "slices": len(scans), "voxels_per_class": counts, "inference": inference_record(best),
               "wall_s": round(wall, 3)}
    with _writing_output(out_dir) as tmp:
        for i, slice_id in enumerate(scans.ids):
            if i in nifti:
                _save_nifti(tmp / f"{slice_id}_prediction.nii.gz", predictions[i], nifti[i], classes)
            else:
                np.save(tmp / f"{slice_id}_prediction.npy", predictions[i])
        (tmp / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
    log(f"predicted {len(scans)} slice(s) with {best.path} (epoch {best.epoch})")
    log(inference_line(best, f"predicted {len(scans)} slice(s)", wall))
    log(f"wrote {out_dir}")
    return summary


@contextlib.contextmanager
def _writing_output(out_dir: Path) -> Iterator[Path]:
    """`replacing(out_dir)` with a full disk (or quota) as one line naming `out_dir`: never half-written."""
    intact = "the previous output is intact" if out_dir.exists() else "nothing was written"
    with writing(out_dir, f"writing the predictions; {intact}"), replacing(out_dir) as tmp:
        yield tmp


def _nifti_source(path: Path):
    """The NIfTI image (header and affine; its data stays on disk) that a prediction of `path` is written like."""
    import nibabel as nib

    return nib.load(path)


def _save_nifti(path: Path, labels: np.ndarray, source, classes: int) -> None:
    """`labels` as uint8 NIfTI in the stored shape of `source` (its singleton axes back), with its affine and header."""
    image = type(source)(labels.reshape(source.shape), source.affine, source.header)
    image.set_data_dtype(np.uint8)
    image.header.set_slope_inter(1, 0)  # the scan's intensity scaling does not apply to labels
    image.header["cal_min"], image.header["cal_max"] = 0, classes - 1
    image.header["descrip"] = b"hpcseg predict: tissue labels"
    image.to_filename(path)


@dataclass
class Segmented:
    """A scan's prediction: `labels` on the scan's voxels (uint8), and the slices and their class maps."""

    image: np.ndarray
    labels: np.ndarray
    cut: volumes.Cut
    slices: np.ndarray
    source: object  # the nibabel image of the scan


def segment_volume(best, path: Path, percentile: float = volumes.PERCENTILE) -> Segmented:
    """Check one 3D scan, cut and normalise it by the rule of `percentile`, predict its slices in batches, map them
    back."""
    scan, img = volumes.read_volume(path, "scan")
    volumes.check_skull_stripped(path, scan)
    cut = volumes.cut_scan(path, scan, img.affine, percentile)
    slices = np.zeros(cut.image.shape, dtype=np.uint8)
    for group, pred in predict_slices(best.models, list(cut.image), best.job, best.device):
        slices[group] = pred[:, 0].cpu().numpy()
    return Segmented(scan, volumes.to_scan(slices, cut.grid, img), cut, slices, img)


def predict_volumes(run_dir: Path, data_dir: Path, out_dir: Path, log=print, overrides: tuple[str, ...] = ()) -> dict:
    """Predict every 3D scan of `data_dir` into `<scan>_prediction.nii.gz` and `<scan>_views.png` under `out_dir`."""
    scans = volumes.find_volumes(data_dir, label_suffix=None)
    volumes.check_scans(scans)
    best = load_best_model(run_dir, overrides)
    rule = trained_rule(run_dir, best, log)
    percentile = volumes.rule_percentile(rule, str(best.path))
    classes = best.job.data.num_classes
    counts = {}
    with _writing_output(out_dir) as tmp:  # a bad scan met half-way leaves nothing written
        wall = 0.0
        for scan in scans:
            started = time.perf_counter()
            seg = segment_volume(best, scan.image, percentile)
            wall += time.perf_counter() - started
            _save_nifti(tmp / f"{scan.scan}_prediction.nii.gz", seg.labels, seg.source, classes)
            save_views(tmp / f"{scan.scan}_views.png", seg.cut.image, seg.slices)
            counts[scan.scan] = np.bincount(seg.labels.ravel(), minlength=classes).tolist()
            log(f"{scan.scan}: {seg.cut.grid.shape[0]} slices")
        summary = {"run": str(run_dir), "checkpoint": str(best.path), "checkpoint_epoch": best.epoch,
                   "data": str(data_dir), "scans": len(scans), "normalisation": rule,
                   "voxels_per_class": counts, "inference": inference_record(best), "wall_s": round(wall, 3)}
        (tmp / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
    log(f"predicted {len(scans)} scan(s) with {best.path} (epoch {best.epoch})")
    log(inference_line(best, f"predicted {len(scans)} scan(s)", wall))
    log(f"wrote {out_dir}")
    return summary


def trained_rule(run_dir: Path, best, log=print) -> dict:
    """The normalisation rule the run's training data was prepared with: recorded in its best checkpoint, or, for
    a checkpoint from before hpcseg recorded it, in the prepare.json of the data folder its train.json names; else
    the built-in volumes.RULE, with a one-line note."""
    from .train import RunDirError, recorded_data

    if best.says_normalisation:
        recorded = best.normalisation
    else:
        try:
            folders = recorded_data(run_dir)
        except RunDirError:
            folders = None
        first = (folders[0][0] if isinstance(folders[0], list) else folders[0]) if folders else None
        recorded = volumes.prepared_rule(first.parent) if first else None
    if recorded is not None:
        return recorded
    log(f"note: {run_dir}: no normalisation rule recorded for its training data (not made by hpcseg prepare, or "
        f"trained before hpcseg recorded it): scans are divided by their {volumes.PERCENTILE:g}th percentile over the "
        f"brain, prepare's default")
    return volumes.RULE


def save_views(path: Path, image: np.ndarray, classes: np.ndarray, truth: np.ndarray | None = None) -> None:
    """One PNG of three orthogonal views through the brain's centre (coronal, axial, sagittal) of slices (planes,
    rows, cols) with `classes` overlaid; with `truth`, a second row with it overlaid."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    from .evaluate import COLOURS

    centre = [int(np.mean(np.flatnonzero(image.any(axis=tuple(a for a in range(3) if a != k))))) for k in range(3)]
    lo, hi = np.percentile(image[image != 0], [0.5, 99.5]) if image.any() else (0, 1)

    def views(labels):
        cuts = [(image[centre[0]], labels[centre[0]]),  # coronal: top down, left to right
                (image[::-1, centre[1]], labels[::-1, centre[1]]),  # axial: anterior up, left to right
                (image[:, :, centre[2]].T, labels[:, :, centre[2]].T)]  # sagittal: top down, posterior to anterior
        height = max(c[0].shape[0] for c in cuts)
        panels = []
        for grey, lab in cuts:
            grey = np.clip((grey - lo) / max(hi - lo, 1e-6), 0, 1)[..., None].repeat(3, axis=-1)
            alpha = np.where(lab > 0, 0.45, 0.0)[..., None]
            rgb = grey * (1 - alpha) + COLOURS[np.clip(lab, 0, len(COLOURS) - 1)] * alpha
            panels += [np.pad(rgb, ((0, height - rgb.shape[0]), (0, 0), (0, 0))), np.ones((height, 4, 3))]
        return np.concatenate(panels[:-1], axis=1)

    rows = [views(classes)]
    if truth is not None:
        rows += [np.ones((4, rows[0].shape[1], 3)), views(truth)]
    plt.imsave(path, np.concatenate(rows, axis=0))
