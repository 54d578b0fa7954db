"""`hpcseg predict`: a trained run's best checkpoint on new scans, slices without labels.

Inference is `hpcseg test`'s (same model loading, same batching, sliding window and padding); what it writes is
only the class maps: `<id>_prediction.npy` for a `.npy` image, `<id>_prediction.nii.gz` with the image's affine and
header for a NIfTI image (so it overlays the scan in a viewer), and `predict.json`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .data import load_images
from .evaluate import load_best_model
from .infer import predict_slices
from .outdir import check_replaceable, replacing

#: What a predict output folder holds, and nothing else; `--out` is replaced as a whole, so only such a folder may be.
SUMMARY = "predict.json"
PREDICTION_SUFFIXES = ("_prediction.npy", "_prediction.nii.gz")


def is_output(name: str) -> bool:
    return name == SUMMARY or name.endswith(PREDICTION_SUFFIXES)


def predict_run(run_dir: Path, data_dir: Path, out_dir: Path, log=print) -> dict:
    """Predict every image of `data_dir` (labels there are ignored) with `run_dir`'s best checkpoint into `out_dir`."""
    run_dir, data_dir, out_dir = Path(run_dir), Path(data_dir), Path(out_dir).absolute()
    check_replaceable(out_dir, "predict", is_output, SUMMARY)
    scans = load_images(data_dir)
    nifti = {i: _nifti_source(path) for i, path in enumerate(scans.paths) if not path.name.lower().endswith(".npy")}
    best = load_best_model(run_dir)

    predictions: dict[int, np.ndarray] = {}
    for group, pred in predict_slices(best.model, scans.images, best.job, best.device):
        for i, p in zip(group, pred.cpu()):
            predictions[i] = p[0].numpy().astype(np.uint8)

    classes = best.job.data.num_classes
    counts = {slice_id: np.bincount(predictions[i].ravel(), minlength=classes).tolist()  # by label value
              for i, slice_id in enumerate(scans.ids)}
    summary = {"run": str(run_dir), "checkpoint": str(best.path), "checkpoint_epoch": best.epoch, "data": str(data_dir),
               "slices": len(scans), "voxels_per_class": counts}
    with replacing(out_dir) as tmp:
        for i, slice_id in enumerate(scans.ids):
            if i in nifti:
                _save_nifti(tmp / f"{slice_id}_prediction.nii.gz", predictions[i], nifti[i], classes)
            else:
                np.save(tmp / f"{slice_id}_prediction.npy", predictions[i])
        (tmp / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
    log(f"predicted {len(scans)} slice(s) with {best.path} (epoch {best.epoch})")
    log(f"wrote {out_dir}")
    return summary


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
