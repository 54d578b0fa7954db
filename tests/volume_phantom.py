"""Synthetic 3D scans for the volume tests: one brain-like phantom defined in world mm, sampled on any voxel grid."""

from __future__ import annotations

from pathlib import Path

import numpy as np

#: Phantom centre and radii in world mm (RAS); the marker is a white-matter blob on the subject's right, near the top.
CENTRE = np.array([0.0, -10.0, 10.0])
RADII = np.array([40.0, 30.0, 35.0])
MARKER, MARKER_R = np.array([22.0, -10.0, 32.0]), 6.0


def world(affine: np.ndarray, shape) -> np.ndarray:
    index = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1).astype(np.float64)
    return index @ affine[:3, :3].T + affine[:3, 3]


def phantom(points: np.ndarray, centre=CENTRE) -> tuple[np.ndarray, np.ndarray]:
    """(image float32, labels uint8) at world points (..., 3): WM core, GM shell, CSF rim, 0 outside."""
    r = np.sqrt((((points - centre) / RADII) ** 2).sum(-1))
    labels = np.select([r <= 0.55, r <= 0.85, r <= 1.0], [3, 2, 1], 0).astype(np.uint8)
    labels[(np.linalg.norm(points - (MARKER + centre - CENTRE), axis=-1) <= MARKER_R) & (labels > 0)] = 3
    shade = 1 + 0.002 * (points[..., 2] - centre[2])  # a gentle gradient, so voxels of a class differ
    image = np.choose(labels, [0.0, 30.0, 60.0, 100.0]) * shade
    return image.astype(np.float32), labels


def scan(affine: np.ndarray, shape, centre=CENTRE) -> tuple[np.ndarray, np.ndarray]:
    return phantom(world(affine, shape), centre)


def save(folder: Path, name: str, affine, shape, centre=CENTRE, suffix="_tissue_segmentation", label_dtype=np.uint8):
    """Write `<name>_T1w.nii.gz` and its label volume; returns (image, labels)."""
    import nibabel as nib

    folder.mkdir(parents=True, exist_ok=True)
    image, labels = scan(affine, shape, centre)
    nib.save(nib.Nifti1Image(image, affine), folder / f"{name}_T1w.nii.gz")
    nib.save(nib.Nifti1Image(labels.astype(label_dtype), affine), folder / f"{name}_T1w{suffix}.nii.gz")
    return image, labels


#: 1 mm, RAS voxel order, covering the phantom with a margin.
RAS = np.array([[1.0, 0, 0, -48], [0, 1, 0, -48], [0, 0, 1, -33], [0, 0, 0, 1]]), (97, 77, 87)
#: The same 1 mm lattice, voxel axes (z down, x towards the left, y forwards): another order and two flips.
PERMUTED = np.array([[0, -1.0, 0, 48], [0, 0, 1, -48], [-1, 0, 0, 53], [0, 0, 0, 1]]), (87, 97, 77)
#: Anisotropic voxels (1 x 2 x 1.5 mm), x flipped.
ANISO = np.array([[-1.0, 0, 0, 48], [0, 2, 0, -48], [0, 0, 1.5, -33], [0, 0, 0, 1]]), (97, 39, 58)
