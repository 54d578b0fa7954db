"""Demo data: coronal slices of the MNI152 2009a symmetric template that the nilearn wheel ships.

No network: the three files (T1, grey- and white-matter probability maps, 1 mm, 197x233x189) are read with nibabel
straight from nilearn's package data; nilearn itself is never imported, so none of its fetchers can download.

How a slice is made (the same recipe as ``brain2d/training_data``; the demo slices are identical, bit for bit, to
the brain2d training slices of the same id):

- Brain mask: the voxels where the T1 is non-zero. The template nilearn ships is already brain-extracted
  (exactly 0 outside the brain, skull and scalp removed), so its non-zero support *is* the template's brain mask;
  it contains the ventricles and the CSF around the cortex. Thresholding the GM+WM maps instead would leak
  (they are non-zero far outside the brain) or cut off the CSF.
- Labels inside the mask: the most likely of CSF (= 1 - GM - WM), GM and WM; 0 outside. Computed in float32 on
  the maps divided by 255, like brain2d: exact ties in the stored 0..255 values (about 0.05 % of brain pixels)
  fall as the float32 rounding goes, which is what makes the slices identical to brain2d's.
- Image: T1 divided by its 99th percentile over the brain mask of the whole volume (white matter about 0.9-1.0),
  exactly 0 outside the mask.
- Geometry: rows from the top of the head down (MNI z from +95 to -80 mm), columns from the subject's left to
  right (MNI x from -88 to +87 mm): 176x176 pixels of 1 mm, zero where the window leaves the volume.
- Ids: ``mni2009sym-corNNN`` with NNN = y + 110 (MNI y in mm), as in brain2d's manifest.csv; ``manifest.csv``
  beside the split folders lists each slice's split, y and pixel count per class.

Splits are blocks of consecutive coronal slices, interleaved (train, validation, test, train, ...) with gaps
between blocks so that neighbouring slices, which are nearly identical, never sit in two splits. Only slices with
at least ``min_tissue`` of the frame in both GM and WM are used (about y = -100 .. +66 mm); the blocks and gaps
are spread over that whole range.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import os
import shutil
import uuid
from pathlib import Path
from typing import Literal

import numpy as np

from hpcseg import volumes
from hpcseg.data import DataError, save_slice
from hpcseg.outdir import blocked

SPLITS = ("training_data", "validation_data", "test_data")
MANIFEST = "manifest.csv"
SOURCE = "mni2009sym"
TEMPLATE_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}
NILEARN_MISSING = "demo data needs nilearn: pip install 'hpcseg[demo]'"


def template_dir() -> Path:
    """nilearn's package-data folder, found without importing nilearn; DataError if nilearn is not installed."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise DataError([NILEARN_MISSING])
    return Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"


def _load_template() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """T1, GM, WM as arrays in RAS+ voxel order, and the (RAS) affine they share."""
    import nibabel as nib

    folder = template_dir()
    arrays, affine = {}, None
    for key, name in TEMPLATE_FILES.items():
        path = folder / name
        if not path.is_file():
            raise DataError([f"{path}: not found; this nilearn does not ship the MNI152 2009 template (needs >= 0.10)"])
        try:
            img = nib.as_closest_canonical(nib.load(path))
            arrays[key] = np.asanyarray(img.dataobj)
        except Exception as error:  # noqa: BLE001
            raise DataError([f"{path}: cannot read ({type(error).__name__}: {error})"]) from None
        if affine is None:
            affine = img.affine
        elif not np.allclose(img.affine, affine) or arrays[key].shape != arrays["t1"].shape:
            raise DataError([f"{path}: grid differs from the T1's"])
    if not np.allclose(np.diag(affine)[:3], 1.0) or not np.allclose(affine[:3, :3], np.diag(np.diag(affine)[:3])):
        raise DataError([f"{folder / TEMPLATE_FILES['t1']}: expected 1 mm voxels aligned with MNI axes"])
    return arrays["t1"], arrays["gm"], arrays["wm"], affine


def _block_sizes(n: int, blocks: int) -> list[int]:
    return [len(part) for part in np.array_split(np.arange(n), blocks)]


def plan_layout(
    usable: list[int], n_train: int, n_val: int, n_test: int, blocks: int, min_gap: int
) -> dict[str, list[int]]:
    """Slice positions per split: blocks interleaved train, val, test, ... with the spare slices as even gaps."""
    sizes = {name: _block_sizes(n, blocks) for name, n in zip(SPLITS, (n_train, n_val, n_test))}
    sequence = [(name, sizes[name][b]) for b in range(blocks) for name in SPLITS if sizes[name][b] > 0]
    used = n_train + n_val + n_test
    n_gaps = len(sequence) - 1
    spare = len(usable) - used
    if spare < n_gaps * min_gap:
        raise DataError(
            [
                f"demo data: {n_train}+{n_val}+{n_test} slices in {len(sequence)} blocks with gaps of at least "
                f"{min_gap} need {used + n_gaps * min_gap} coronal positions, the template has {len(usable)}"
            ]
        )
    gaps = _block_sizes(spare, n_gaps) if n_gaps else []
    layout: dict[str, list[int]] = {name: [] for name in SPLITS}
    k = 0
    for i, (name, size) in enumerate(sequence):
        layout[name] += usable[k : k + size]
        k += size + (gaps[i] if i < n_gaps else 0)
    return layout


def _refuse_or_prepare(out: Path, overwrite: bool) -> None:
    problem = blocked(out)
    if problem:
        raise DataError([problem])
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise DataError([f"{out}: folder exists and is not empty; choose another or pass --overwrite"])


def build_demo_data(
    out: Path | str,
    *,
    n_train: int = 60,
    n_val: int = 20,
    n_test: int = 20,
    blocks: int = 4,
    min_gap: int = 3,
    min_tissue: float = 0.01,
    fmt: Literal["npy", "nifti"] = "npy",
    overwrite: bool = False,
) -> dict[str, int]:
    """Write ``training_data/``, ``validation_data/``, ``test_data/`` and ``manifest.csv`` under ``out``.

    Each split has ``blocks`` blocks of consecutive coronal slices (sizes as even as possible), interleaved
    train/val/test along the y axis with gaps of at least ``min_gap`` slices (1 mm each) between blocks. Only
    slices where GM and WM each cover at least ``min_tissue`` of the 176x176 frame are used.

    Everything is built in a temporary folder beside ``out`` and renamed into place, so a failure leaves nothing
    behind. A non-empty ``out`` is refused unless ``overwrite``; then only the three split folders and
    ``manifest.csv`` are replaced, other files in ``out`` are left alone. Deterministic. Returns the slice
    count per split folder name. Problems (nilearn missing, sizes that do not fit, ``out`` not empty) raise
    :class:`~hpcseg.data.DataError`.
    """
    out = Path(out)
    for name, value, low in (("n_train", n_train, 1), ("n_val", n_val, 0), ("n_test", n_test, 0),
                             ("blocks", blocks, 1), ("min_gap", min_gap, 0)):
        if int(value) != value or value < low:
            raise DataError([f"demo data: {name} must be a whole number >= {low}, got {value}"])
    if not 0 <= min_tissue < 1:
        raise DataError([f"demo data: min_tissue must be in [0, 1), got {min_tissue}"])
    if fmt not in ("npy", "nifti"):
        raise DataError([f"demo data: fmt must be 'npy' or 'nifti', got {fmt!r}"])
    _refuse_or_prepare(out, overwrite)

    t1, gm, wm, affine = _load_template()
    # The template lies in MNI space: volumes cuts it in brain2d's window, voxel for voxel, with its image rule.
    cut = volumes.cut_scan(template_dir() / TEMPLATE_FILES["t1"], t1, affine)
    gm, wm = (volumes.resample(v, affine, cut.grid.affine, cut.grid.shape, order=0) for v in (gm, wm))
    # Probability 1 as stored: 255 in the uint8 maps nilearn ships, else 1.0.
    full = np.float32(255 if gm.dtype.kind in "iu" else 1)

    # Every coronal plane: labels, and which planes have enough of both GM and WM.
    slices: dict[int, tuple[int, np.ndarray]] = {}
    usable: list[int] = []
    min_pixels = min_tissue * volumes.SIZE * volumes.SIZE
    for j in range(cut.grid.shape[0]):
        mask = cut.image[j] > 0
        if not mask.any():
            continue
        g = gm[j].astype(np.float32) / full
        w = wm[j].astype(np.float32) / full
        csf = np.clip(1 - g - w, 0, None)
        label = np.where(mask, np.argmax(np.stack([csf, g, w]), axis=0) + 1, 0).astype(np.uint8)
        counts = np.bincount(label.ravel(), minlength=4)
        if counts[2] >= min_pixels and counts[3] >= min_pixels:
            usable.append(j)
        slices[j] = (int(round(cut.grid.y_mm(j))), label)
    # Planes with both tissues form one run along y; use it from first to last.
    if usable:
        usable = list(range(usable[0], usable[-1] + 1))
    layout = plan_layout(usable, int(n_train), int(n_val), int(n_test), int(blocks), int(min_gap))

    out.parent.mkdir(parents=True, exist_ok=True)
    # Not mkdtemp: its 0700 mode would stick to `out` after the rename; mkdir honours the umask.
    tmp = out.parent / f".{out.name}.demo-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        rows = []
        for split in SPLITS:
            (tmp / split).mkdir()
            for j in layout[split]:
                y_mm, label = slices[j]
                slice_id = f"{SOURCE}-cor{y_mm + 110:03d}"
                save_slice(tmp / split, slice_id, cut.image[j], label, fmt=fmt)
                counts = np.bincount(label.ravel(), minlength=4)
                rows.append([slice_id, split, SOURCE, y_mm, *label.shape, *counts.tolist()])
        text = io.StringIO()
        writer = csv.writer(text, lineterminator="\n")
        writer.writerow(["id", "split", "source", "y_mm", "H", "W", "background", "csf", "grey_matter", "white_matter"])
        writer.writerows(rows)
        (tmp / MANIFEST).write_text(text.getvalue())
        _install(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {split: len(layout[split]) for split in SPLITS}


def _install(tmp: Path, out: Path) -> None:
    """Move the built products from ``tmp`` into ``out``; old products end up in ``tmp`` (deleted by the caller)."""
    products = [*SPLITS, MANIFEST]
    if not out.exists():
        os.rename(tmp, out)
        tmp.mkdir()  # so the caller's clean-up has something to remove
        return
    old = tmp / ".old"
    old.mkdir()
    for name in products:
        if (out / name).exists() or (out / name).is_symlink():
            os.rename(out / name, old / name)
    for name in products:
        os.rename(tmp / name, out / name)
