"""A whole 3D scan through a trained model, as `test` and `predict` both do it: cut into coronal slices and
normalised as `hpcseg prepare` did, predicted in batches, the class maps put back on the scan's own voxels; and class
maps written as NIfTI like the image they label."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import volumes
from .infer import predict_slices
from .trained import BestModel


@dataclass
class Segmented:
    """A scan's prediction: `labels` on the scan's voxels (uint8), and the slices and their class maps."""

    image: np.ndarray
    labels: np.ndarray
    cut: volumes.Cut
    slices: np.ndarray
    source: object  # the nibabel image of the scan


def segment_volume(best: BestModel, path: Path, percentile: float = volumes.PERCENTILE) -> Segmented:
    """Check one 3D scan, cut and normalise it by the rule of `percentile`, predict its slices in batches (every
    model of an ensemble), map them back."""
    scan, img = volumes.read_volume(path, "scan")
    volumes.check_skull_stripped(path, scan)
    cut = volumes.cut_scan(path, scan, img.affine, percentile)
    slices = np.zeros(cut.image.shape, dtype=np.uint8)
    for group, pred in predict_slices(best.models, list(cut.image), best.job, best.device):
        slices[group] = pred[:, 0].cpu().numpy()
    return Segmented(scan, volumes.to_scan(slices, cut.grid, img), cut, slices, img)


def save_nifti(path: Path, labels: np.ndarray, source, classes: int) -> None:
    """`labels` as uint8 NIfTI in the stored shape of `source` (its singleton axes back), with its affine and header."""
    image = type(source)(labels.reshape(source.shape), source.affine, source.header)
    image.set_data_dtype(np.uint8)
    image.header.set_slope_inter(1, 0)  # the scan's intensity scaling does not apply to labels
    image.header["cal_min"], image.header["cal_max"] = 0, classes - 1
    image.header["descrip"] = b"hpcseg predict: tissue labels"
    image.to_filename(path)
