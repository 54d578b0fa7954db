"""3D scans: read and check them, cut them into coronal slices as brain2d's, and map slices back onto the scan.

The slices (brain2d's geometry): 1 mm pixels, rows from the top of the head down, columns from the subject's left
to right, whatever the scan's voxel order, voxel size or orientation. They are the planes of a *slice grid*, a
1 mm grid in the scan's world (RAS, mm) coordinates: index (j, r, c) lies at world (left + c, y0 + j, top - r).

- Columns and rows: the brain2d window, MNI x -88 .. 87 and z 95 .. -80, when the brain lies inside it (a scan
  registered to MNI space, as the templates brain2d is cut from); else a window of at least 176 x 176 centred on
  the brain. Planes: one per mm along y over the brain (posterior to anterior).
- A scan whose voxels are 1 mm and lie on the grid's axes is read voxel by voxel (no interpolation: the slices
  are exactly its voxels, flipped and transposed); any other is resampled, images linearly, labels by nearest
  neighbour. A prediction goes back onto the scan's own voxels by nearest neighbour (exactly, in the first case).
- Intensity (``rule()``, recorded by ``hpcseg prepare`` in prepare.json and applied again by predict and test to a
  run trained on it): the brain is where the scan is non-zero (a skull-stripped scan is exactly 0 outside it); the
  image is the scan divided by its 99th percentile (``prepare --percentile``) over the brain, on its own voxels; a
  resampled image is 0 where the nearest scan voxel is outside the brain, so the background stays exactly 0.

Files: ``<scan>_T1w.nii[.gz]`` with labels ``<scan>_T1w<label suffix>.nii[.gz]`` (suffix
``_tissue_segmentation`` unless told; ``_seg`` for FSL FAST). The subject of a scan is its BIDS ``sub-<label>``
when the name has one (two sessions of one subject are one subject), else the scan's name.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .data import DataError, _describe

IMAGE_SUFFIX = "_T1w"
LABEL_SUFFIX = "_tissue_segmentation"
PERCENTILE = 99.0
#: The brain2d window in world mm (MNI): columns x = -88 .. 87 (left to right), rows z = 95 .. -80 (top down).
MNI_LEFT_X, MNI_TOP_Z, SIZE = -88, 95, 176
#: Margin (mm) around the brain of a window centred on it.
MARGIN = 4
#: Above these fractions a scan is taken for one that is not skull-stripped (see check_skull_stripped).
MAX_BORDER, MAX_OUTSIDE = 0.10, 0.10
#: FSL FAST's codes (0 background, 1 CSF, 2 GM, 3 WM) are hpcseg's; other tools are mapped with --map.
IDENTITY = {0: 0, 1: 1, 2: 2, 3: 3}
#: Where `hpcseg prepare` records what it did, the normalisation rule included, in its output folder.
PREPARED = "prepare.json"


def rule(percentile: float = PERCENTILE) -> dict:
    """The normalisation rule dividing by the scan's `percentile` over the brain, as prepare.json records it."""
    return {
        "version": 1,
        "brain": "voxels where the scan is non-zero (the scan is skull-stripped: exactly 0 outside the brain)",
        "image": f"scan / its {percentile:g}th percentile over the brain (on the scan's own voxels), resampled "
                 f"linearly, 0 where the nearest scan voxel is outside the brain",
        "percentile": percentile,
        "slices": "coronal, 1 mm pixels, rows top of head down, columns subject's left to right",
        "spacing_mm": 1.0,
    }


#: The built-in rule: what predict and test apply to a run that recorded none.
RULE = rule()


def rule_percentile(recorded: object, source: str) -> float:
    """The percentile of a recorded rule; UserError naming `source` for a rule this hpcseg cannot apply."""
    from .errors import UserError

    version = recorded.get("version") if isinstance(recorded, dict) else None
    value = recorded.get("percentile") if isinstance(recorded, dict) else None
    if version != 1 or isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 100:
        raise UserError(f"{source}: normalisation rule {str(recorded)[:120]} is not one this hpcseg applies "
                        f"(version 1, percentile in (0, 100]); a newer hpcseg prepared the data?")
    return float(value)


def prepared_rule(data_dir: Path) -> dict | None:
    """The normalisation rule in `data_dir`/prepare.json (a folder `hpcseg prepare` wrote), else None."""
    import json

    try:
        recorded = json.loads((Path(data_dir) / PREPARED).read_text())["normalisation"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return recorded if isinstance(recorded, dict) else None

_IMAGE = re.compile(r"^(?P<scan>.+)_T1w\.nii(\.gz)?$", re.IGNORECASE)
_SUBJECT = re.compile(r"(?:^|_)(sub-[A-Za-z0-9]+)(?:_|$)")


@dataclass(frozen=True)
class Volume:
    scan: str  # the name before _T1w
    subject: str
    image: Path
    label: Path | None


@dataclass(frozen=True)
class SliceGrid:
    """Coronal 1 mm slices in world space: index (j, r, c) -> world mm by `affine`; `shape` is (planes, rows, cols)."""

    affine: np.ndarray
    shape: tuple[int, int, int]

    def y_mm(self, j: int) -> float:
        return float(self.affine[1, 3] + j)


@dataclass
class Cut:
    """A scan cut into slices: `image` float32 (planes, rows, cols) normalised by RULE, its grid and scale."""

    image: np.ndarray
    grid: SliceGrid
    scale: float


# ----------------------------------------------------------------------------------------------------- files


def subject_of(scan: str) -> str:
    match = _SUBJECT.search(scan)
    return match.group(1) if match else scan


def _header_shape(path: Path) -> tuple[int, ...] | None:
    import nibabel as nib

    try:
        return tuple(nib.load(path).shape)
    except Exception:  # noqa: BLE001 - an unreadable file is reported when it is read
        return None


def is_volume_folder(folder: Path) -> bool:
    """True when a `<scan>_T1w.nii[.gz]` in `folder` has three or more axes longer than 1 (a 3D or 4D scan)."""
    folder = Path(folder)
    if not folder.is_dir():
        return False
    for path in sorted(folder.iterdir()):
        if _IMAGE.match(path.name) and path.is_file():
            shape = _header_shape(path)
            if shape is not None and sum(n > 1 for n in shape) >= 3:
                return True
    return False


def find_volumes(folder: Path | str, label_suffix: str | None = LABEL_SUFFIX) -> list[Volume]:
    """The scans of a folder, sorted by name, each with its label file (None when `label_suffix` is None: labels
    not wanted). Other files (FAST's _pve_*, README, ...) are ignored. DataError lists every naming problem."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError([f"{folder}: {'folder does not exist' if not folder.exists() else 'is not a folder'}"])
    names = {p.name: p for p in folder.iterdir() if not p.name.startswith(".")}
    problems: list[str] = []
    found: dict[str, Path] = {}
    for name, path in sorted(names.items()):
        match = _IMAGE.match(name)
        if not match:
            continue
        scan = match["scan"]
        if scan in found:
            problems.append(f"{path}: a second scan named '{scan}' (also {found[scan].name})")
            continue
        found[scan] = path
    volumes = []
    for scan, path in found.items():
        label = None
        if label_suffix is not None:
            candidates = [names[n] for n in (f"{scan}{IMAGE_SUFFIX}{label_suffix}.nii.gz",
                                             f"{scan}{IMAGE_SUFFIX}{label_suffix}.nii") if n in names]
            if not candidates:
                problems.append(f"{path}: scan without labels (expected {scan}{IMAGE_SUFFIX}{label_suffix}.nii.gz "
                                f"or .nii; see --label-suffix)")
                continue
            label = candidates[0]
        volumes.append(Volume(scan, subject_of(scan), path, label))
    if not volumes and not problems:
        problems.append(f"{folder}: no scans (<scan>{IMAGE_SUFFIX}.nii.gz or .nii)")
    if problems:
        raise DataError(problems)
    return volumes


def read_volume(path: Path, what: str = "scan"):
    """(3D array, nibabel image) of a NIfTI scan or label volume; DataError naming the file if it cannot be read, is
    not 3D (a 4D file included), is not numeric or holds a non-finite voxel."""
    import nibabel as nib

    try:
        img = nib.load(path)
        shape = tuple(img.shape)
        if len(shape) < 3 or any(n != 1 for n in shape[3:]):
            kind = f"{len(shape)}D" if len(shape) < 4 else f"4D ({shape[3]} volumes)"
            hint = ("; hpcseg takes one 3D scan per file: pick one volume (fslroi) or split them (fslsplit)"
                    if len(shape) >= 4 else "")
            raise DataError([f"{path}: {what} is {kind}, shape {'x'.join(map(str, shape))}{hint}"])
        data = np.asanyarray(img.dataobj).reshape(shape[:3])
    except DataError:
        raise
    except Exception as error:  # noqa: BLE001 - any failure to read is one reported problem
        raise DataError([f"{path}: cannot read {what} ({_describe(error, path)})"]) from None
    if data.dtype.kind not in "biuf":
        raise DataError([f"{path}: {what} has non-numeric dtype {data.dtype}"])
    if data.dtype.kind == "f":
        bad = ~np.isfinite(data)
        if bad.any():
            first = tuple(int(v) for v in np.argwhere(bad)[0])
            raise DataError([f"{path}: {what} has {int(np.count_nonzero(bad))} non-finite voxel(s) (NaN or inf; "
                             f"first at voxel {first})"])
    return data, img


def check_same_grid(label_path: Path, label_img, scan_path: Path, scan_img) -> None:
    """A label volume must lie on its scan's voxels: same shape, same affine (to 1e-3 mm)."""
    if tuple(label_img.shape[:3]) != tuple(scan_img.shape[:3]):
        raise DataError([f"{label_path}: shape {'x'.join(map(str, label_img.shape[:3]))} differs from its scan "
                         f"{scan_path.name} ({'x'.join(map(str, scan_img.shape[:3]))})"])
    if not np.allclose(label_img.affine, scan_img.affine, atol=1e-3):
        worst = float(np.abs(label_img.affine - scan_img.affine).max())
        raise DataError([f"{label_path}: affine differs from its scan {scan_path.name}'s (by up to {worst:.3g}): "
                         f"the labels do not lie on the scan's voxels; resample them onto the scan first"])


# ----------------------------------------------------------------------------------------------------- labels


def parse_mapping(text: str | None) -> dict[int, int]:
    """`"1=1,2=2,3=3"` -> {0: 0, 1: 1, 2: 2, 3: 3} (0 stays background unless mapped); None -> IDENTITY."""
    if not text:
        return dict(IDENTITY)
    mapping = {0: 0}
    for item in text.split(","):
        code, sep, cls = item.strip().partition("=")
        try:
            source, target = int(code), int(cls)
        except ValueError:
            source = target = None
        if not sep or source is None or not 0 <= target <= 3:
            raise DataError([f"--map {text}: '{item.strip()}' is not CODE=CLASS with a whole-number CODE and a CLASS "
                             f"in 0..3 (0 background, 1 CSF, 2 grey matter, 3 white matter)"])
        mapping[source] = target
    return mapping


def map_labels(path: Path, codes: np.ndarray, mapping: dict[int, int]) -> np.ndarray:
    """Label codes -> hpcseg classes (uint8); DataError naming the file for non-integer codes or codes outside
    the mapping."""
    if codes.dtype.kind == "f":
        bad = codes != np.round(codes)
        if bad.any():
            first = tuple(int(v) for v in np.argwhere(bad)[0])
            raise DataError([f"{path}: label has {int(np.count_nonzero(bad))} non-integer voxel(s) (e.g. "
                             f"{codes[first]} at voxel {first}): expected tissue codes, not probabilities"])
    values, inverse = np.unique(codes, return_inverse=True)
    unknown = [v for v in values.tolist() if int(v) not in mapping]
    if unknown:
        outside = np.isin(codes, unknown)
        first = tuple(int(v) for v in np.argwhere(outside)[0])
        shown = ", ".join(str(int(v)) for v in unknown[:5]) + (", ..." if len(unknown) > 5 else "")
        known = ",".join(f"{k}={v}" for k, v in sorted(mapping.items()))
        raise DataError([f"{path}: label codes outside the mapping {known}: {shown} "
                         f"({int(np.count_nonzero(outside))} voxel(s), first at voxel {first}); map them with --map"])
    lut = np.array([mapping[int(v)] for v in values.tolist()], dtype=np.uint8)
    return lut[inverse.reshape(codes.shape)]


# ----------------------------------------------------------------------------------------------------- checks


def check_skull_stripped(path: Path, scan: np.ndarray, brain_label: np.ndarray | None = None,
                         label_path: Path | None = None) -> None:
    """Refuse a scan that is not skull-stripped: more than 10% of the voxels on the volume's six faces non-zero (a
    stripped scan is 0 outside the brain, which seldom reaches the edge of the field of view), or, with labels,
    more than 10% of its non-zero voxels outside the labelled brain."""
    hint = ("run a brain extraction first (FSL bet, SynthStrip or HD-BET) and give hpcseg the extracted brain, "
            "0 outside it")
    faces = [scan[0], scan[-1], scan[:, 0], scan[:, -1], scan[:, :, 0], scan[:, :, -1]]
    border = sum(np.count_nonzero(f) for f in faces) / sum(f.size for f in faces)
    if border > MAX_BORDER:
        raise DataError([f"{path}: scan does not look skull-stripped: {border:.0%} of the voxels on the volume's "
                         f"faces are non-zero (a skull-stripped scan is 0 outside the brain); {hint}"])
    if brain_label is not None:
        nonzero = scan != 0
        outside = np.count_nonzero(nonzero & ~brain_label) / max(1, np.count_nonzero(nonzero))
        if outside > MAX_OUTSIDE:
            raise DataError([f"{path}: scan does not look skull-stripped: {outside:.0%} of its non-zero voxels lie "
                             f"outside the brain labelled in {label_path.name if label_path else 'its labels'}; "
                             f"{hint}"])


def check_scans(scans: list[Volume], mapping: dict[int, int] | None = None, percentile: float = PERCENTILE) -> None:
    """Read and check every scan (and its labels, where it has them, mapped by `mapping`) before any inference;
    DataError with the first problem of each scan, one line each."""
    problems = []
    for scan in scans:
        try:
            image, img = read_volume(scan.image, "scan")
            if min(image.shape) < 2:
                raise DataError([f"{scan.image}: a 2D slice (shape {'x'.join(map(str, img.shape))}) among 3D scans; "
                                 f"keep slices and scans in separate folders"])
            brain = None
            if scan.label is not None:
                raw, label_img = read_volume(scan.label, "label")
                check_same_grid(scan.label, label_img, scan.image, img)
                brain = map_labels(scan.label, raw, mapping or IDENTITY) > 0
            check_skull_stripped(scan.image, image, brain, scan.label)
            brain_scale(scan.image, image, percentile)
        except DataError as error:
            problems += error.problems
    if problems:
        raise DataError(problems)


# ----------------------------------------------------------------------------------------------------- geometry


def _signed_permutation(matrix: np.ndarray, tol: float = 1e-4) -> bool:
    """True when `matrix` has one entry +-1 per row and column and zeros elsewhere."""
    rounded = np.rint(matrix)
    return bool(np.allclose(matrix, rounded, atol=tol) and (np.abs(rounded).sum(0) == 1).all()
                and (np.abs(rounded).sum(1) == 1).all())


def _snap(value: float, phase: float) -> float:
    """The lattice point phase + k (k whole) nearest to `value`."""
    return phase + round(value - phase)


def slice_grid(brain: np.ndarray, affine: np.ndarray) -> SliceGrid:
    """The slice grid of a scan with brain mask `brain` (voxel space) and voxel-to-world `affine`."""
    axes = [np.flatnonzero(brain.any(axis=tuple(a for a in range(3) if a != k))) for k in range(3)]
    corners = np.array(np.meshgrid(*[[ax[0], ax[-1]] for ax in axes], indexing="ij")).reshape(3, -1)
    world = affine[:3, :3] @ corners + affine[:3, 3:4]
    lo, hi = world.min(axis=1), world.max(axis=1)
    # A 1 mm axis-aligned scan: put the grid on its voxel centres, so that its slices are exactly its voxels.
    phase = np.mod(affine[:3, 3], 1.0) if _signed_permutation(affine[:3, :3]) else np.zeros(3)
    inside = (lo[0] >= MNI_LEFT_X - 0.5 and hi[0] <= MNI_LEFT_X + SIZE - 0.5
              and lo[2] >= MNI_TOP_Z - SIZE + 0.5 and hi[2] <= MNI_TOP_Z + 0.5)
    if inside:
        cols = rows = SIZE
        left, top = _snap(MNI_LEFT_X, phase[0]), _snap(MNI_TOP_Z, phase[2])
    else:
        cols = max(SIZE, math.ceil(hi[0] - lo[0]) + 1 + 2 * MARGIN)
        rows = max(SIZE, math.ceil(hi[2] - lo[2]) + 1 + 2 * MARGIN)
        left = _snap((lo[0] + hi[0]) / 2 - (cols - 1) / 2, phase[0])
        top = _snap((lo[2] + hi[2]) / 2 + (rows - 1) / 2, phase[2])
    y0 = phase[1] + math.ceil(lo[1] - phase[1] - 1e-6)
    planes = math.floor(hi[1] - y0 + 1e-6) + 1
    grid_affine = np.array([[0, 0, 1, left], [1, 0, 0, y0], [0, -1, 0, top], [0, 0, 0, 1]], dtype=np.float64)
    return SliceGrid(grid_affine, (planes, rows, cols))


def resample(data: np.ndarray, src_affine: np.ndarray, dst_affine: np.ndarray, dst_shape: tuple[int, int, int],
             order: int) -> np.ndarray:
    """`data` (on the voxels of `src_affine`) sampled at the voxels of `dst_affine`, 0 outside it: linearly
    (order 1, float32) or by nearest neighbour (order 0, `data`'s dtype). Where the two grids share voxel centres
    (same 1 mm lattice up to axis order and direction), the voxels are copied, not interpolated."""
    to_src = np.linalg.solve(src_affine, dst_affine)  # destination index -> source index
    rot, shift = to_src[:3, :3], to_src[:3, 3]
    if _signed_permutation(rot) and np.allclose(shift, np.rint(shift), atol=1e-4):
        out = _copy_voxels(data, np.rint(rot).astype(int), np.rint(shift).astype(int), dst_shape)
        return out.astype(np.float32) if order else out
    return _interpolate(data, rot, shift, dst_shape, order)


def _copy_voxels(data, rot, shift, dst_shape):
    src_axis = np.abs(rot).argmax(axis=0)  # destination axis k reads source axis src_axis[k]
    index = [shift[src_axis[k]] + rot[src_axis[k], k] * np.arange(dst_shape[k]) for k in range(3)]
    valid = [(i >= 0) & (i < data.shape[src_axis[k]]) for k, i in enumerate(index)]
    dst_of = np.argsort(src_axis)  # source axis p is destination axis dst_of[p]
    block = data[np.ix_(*[index[dst_of[p]][valid[dst_of[p]]] for p in range(3)])]
    out = np.zeros(dst_shape, dtype=data.dtype)
    out[np.ix_(*valid)] = block.transpose(src_axis)
    return out


def _interpolate(data, rot, shift, dst_shape, order):
    import torch
    import torch.nn.functional as F

    # Padded by one zero voxel on every side: outside the scan reads 0, and no axis is shorter than 3.
    src = F.pad(torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))[None, None], (1,) * 6)
    size = torch.tensor(src.shape[2:], dtype=torch.float32)
    rot_t, shift_t = torch.from_numpy(rot).float(), torch.from_numpy(shift).float() + 1
    out = np.empty(dst_shape, dtype=np.float32)
    step = max(1, 2_000_000 // (dst_shape[1] * dst_shape[2]))  # bounds the coordinate arrays' memory
    for start in range(0, dst_shape[0], step):
        stop = min(start + step, dst_shape[0])
        index = torch.stack(torch.meshgrid(torch.arange(start, stop), torch.arange(dst_shape[1]),
                                           torch.arange(dst_shape[2]), indexing="ij"), dim=-1).float()
        coords = index @ rot_t.T + shift_t
        grid = (2 * coords / (size - 1) - 1).flip(-1)  # grid_sample wants (W, H, D) order, in -1 .. 1
        sampled = F.grid_sample(src, grid[None], mode="bilinear" if order else "nearest", padding_mode="zeros",
                                align_corners=True)
        out[start:stop] = sampled[0, 0].numpy()
    return out if order else np.rint(out).astype(data.dtype)


# ----------------------------------------------------------------------------------------------------- slices


def brain_scale(path: Path, scan: np.ndarray, percentile: float = PERCENTILE) -> float:
    """The rule's divisor: the scan's `percentile` over its non-zero voxels; DataError for an empty brain."""
    brain = scan != 0
    if not brain.any():
        raise DataError([f"{path}: scan is 0 everywhere: no brain to segment (empty mask)"])
    scale = float(np.percentile(scan[brain].astype(np.float64), percentile))
    if not scale > 0:
        raise DataError([f"{path}: the {percentile:g}th percentile of the brain's intensities is {scale:g}, not "
                         f"positive: expected a T1-weighted scan, bright tissue positive"])
    return scale


def cut_scan(path: Path, scan: np.ndarray, affine: np.ndarray, percentile: float = PERCENTILE) -> Cut:
    """The scan as coronal slices normalised by the rule of `percentile` (float32, 0 outside the brain), with its
    grid and scale."""
    scale = brain_scale(path, scan, percentile)
    brain = scan != 0
    grid = slice_grid(brain, affine)
    image = resample(scan, affine, grid.affine, grid.shape, order=1)
    # Outside the brain stays exactly 0, as in brain2d: no halo of interpolated voxels taken for CSF.
    inside = resample(brain.view(np.uint8), affine, grid.affine, grid.shape, order=0) > 0
    return Cut(np.where(inside, image.astype(np.float32) / np.float32(scale), np.float32(0)), grid, scale)


def to_scan(slices: np.ndarray, grid: SliceGrid, scan_img) -> np.ndarray:
    """Class maps on the slice grid -> the scan's own voxels (shape and affine), by nearest neighbour."""
    return resample(slices, grid.affine, scan_img.affine, tuple(scan_img.shape[:3]), order=0)
