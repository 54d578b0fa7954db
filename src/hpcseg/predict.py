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
from pathlib import Path
from typing import Iterator

import numpy as np

from . import volumes
from .atomic import writing
from .data import load_images
from .infer import predict_slices
from .outdir import check_replaceable, replacing
from .segment import save_nifti, segment_volume
from .trained import inference_line, inference_record, load_best_model, trained_rule
from .views import save_views

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
                save_nifti(tmp / f"{slice_id}_prediction.nii.gz", predictions[i], nifti[i], classes)
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
            save_nifti(tmp / f"{scan.scan}_prediction.nii.gz", seg.labels, seg.source, classes)
            save_views(tmp / f"{scan.scan}_views.png", seg.cut.image, seg.slices, scan_id=scan.scan)
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
