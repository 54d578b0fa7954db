"""Slice folders: find image/label pairs by id, read them, check them, stack them.

A split folder holds 2D coronal slices, one pair per id:

- ``<id>_T1w.npy`` (image) and ``<id>_T1w_tissue_segmentation.npy`` (labels), or
- ``<id>_T1w.nii.gz`` / ``<id>_T1w.nii`` and ``<id>_T1w_tissue_segmentation.nii.gz`` / ``.nii``.

The two files of a pair may use different formats. A NIfTI file may be 2D or have extra axes of size 1
(``(H, W, 1)``); a ``.npy`` file must be exactly 2D. NIfTI arrays are taken as stored (first axis = rows), with no
reorientation. Files that are neither ``.npy`` nor ``.nii``/``.nii.gz`` (README, manifest.csv) and hidden files are
ignored.

Images and labels are paired by ``<id>``, never by position in a sorted listing: an image without its label is
reported, not silently matched with the next slice's label. :func:`load_split` reads and checks every file and
raises one :class:`DataError` that lists every problem found, one line per problem, each naming its file.
:func:`load_images` does the same for the images of a folder alone (new scans, labels ignored).
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Sequence

import numpy as np

if TYPE_CHECKING:  # imported where tensors are made: `submit` checks data without paying for torch
    import torch

from .errors import UserError

IMAGE_SUFFIX = "_T1w"
LABEL_SUFFIX = "_T1w_tissue_segmentation"
#: File extensions that hold slices, longest first so ``.nii.gz`` wins over ``.gz``.
EXTENSIONS = (".nii.gz", ".nii", ".npy")
#: How every .npy file starts.
NPY_MAGIC = b"\x93NUMPY"

_NAME = re.compile(r"^(?P<id>.+?)(?P<kind>_T1w_tissue_segmentation|_T1w)(?P<ext>\.nii\.gz|\.nii|\.npy)$", re.IGNORECASE)


class DataError(UserError):
    """One or more problems with slice data; ``problems`` holds one line each, ``"<path>: <problem>"``."""

    def __init__(self, problems: Sequence[str] | str):
        if isinstance(problems, str):
            problems = [problems]
        self.problems: list[str] = list(problems)
        super().__init__(self.problems)

    def __str__(self) -> str:
        return "\n".join(self.problems)


@dataclass(frozen=True)
class SlicePair:
    id: str
    image: Path
    label: Path


@dataclass
class Split:
    """The slices of one folder, sorted by id: images float32 (H, W), labels uint8 (H, W); sizes may differ."""

    folder: Path
    ids: list[str]
    images: list[np.ndarray]
    labels: list[np.ndarray]

    def __len__(self) -> int:
        return len(self.ids)

    def stacked_shape(self, min_size: tuple[int, int] = (1, 1)) -> tuple[int, int, int, int]:
        """The shape (N, 1, Hm, Wm) of :meth:`stacked`'s images and labels."""
        min_h, min_w = (int(v) for v in min_size)
        return (len(self.ids), 1, max([min_h, *(img.shape[0] for img in self.images)]),
                max([min_w, *(img.shape[1] for img in self.images)]))

    def stacked(self, min_size: tuple[int, int] = (1, 1),
                folder: Path | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """All slices in three tensors: images float32 (N, 1, Hm, Wm), labels uint8 (N, 1, Hm, Wm), sizes int64 (N, 2).

        Every slice is zero-padded at the bottom and right to the common size ``Hm, Wm``: the largest height and
        width over the slices, and at least ``min_size`` (e.g. the training crop). ``sizes`` holds each slice's
        own ``(H, W)``, so padding can be cut off again after inference. With ``folder``, images and labels are
        memory-mapped files there (``images.npy``, ``labels.npy``), for splits larger than the host's memory.
        """
        import torch

        n, _, hm, wm = shape = self.stacked_shape(min_size)
        sizes = np.array([img.shape for img in self.images], dtype=np.int64).reshape(n, 2)
        if folder is None:
            images = np.zeros(shape, dtype=np.float32)
            labels = np.zeros(shape, dtype=np.uint8)
        else:  # new files read back as zeros: only the slices are written
            folder.mkdir(parents=True, exist_ok=True)
            images = np.lib.format.open_memmap(folder / "images.npy", mode="w+", dtype=np.float32, shape=shape)
            labels = np.lib.format.open_memmap(folder / "labels.npy", mode="w+", dtype=np.uint8, shape=shape)
        for k, (img, lab) in enumerate(zip(self.images, self.labels)):
            h, w = img.shape
            images[k, 0, :h, :w] = img
            labels[k, 0, :h, :w] = lab
        if folder is not None:  # written to disk, then mapped copy-on-write: tensors need writable arrays
            images.flush(), labels.flush()
            del images, labels
            images = np.load(folder / "images.npy", mmap_mode="c")
            labels = np.load(folder / "labels.npy", mmap_mode="c")
        return torch.from_numpy(images), torch.from_numpy(labels), torch.from_numpy(sizes)


# ----------------------------------------------------------------------------------------------------- finding


def _index(folder: Path, kinds: tuple[str, ...]) -> tuple[dict[str, dict[str, Path]], list[str]]:
    """The files of each kind in `kinds` (IMAGE_SUFFIX, LABEL_SUFFIX) by id, plus one problem line per folder or
    naming problem; files of the other kind are skipped unchecked."""
    if not folder.exists():
        return {}, [f"{folder}: folder does not exist"]
    if not folder.is_dir():
        return {}, [f"{folder}: is not a folder"]
    problems: list[str] = []
    tables: dict[str, dict[str, Path]] = {kind: {} for kind in kinds}
    for path in sorted(folder.iterdir()):
        name = path.name
        if name.startswith(".") or not name.lower().endswith(EXTENSIONS):
            continue
        match = _NAME.match(name)
        if match is not None and match["kind"] in (IMAGE_SUFFIX, LABEL_SUFFIX) and match["kind"] not in kinds:
            continue
        if not path.is_file():
            problems.append(f"{path}: is not a regular file")
            continue
        if match is None or match["kind"] not in kinds:
            problems.append(
                f"{path}: name follows neither <id>{IMAGE_SUFFIX}.<ext> nor <id>{LABEL_SUFFIX}.<ext> "
                f"(ext .npy, .nii or .nii.gz)"
            )
            continue
        slice_id, table = match["id"], tables[match["kind"]]
        if slice_id in table:
            what = "label" if match["kind"] == LABEL_SUFFIX else "image"
            problems.append(f"{path}: a second {what} for id '{slice_id}' (also {table[slice_id].name})")
            continue
        table[slice_id] = path
    return tables, problems


def _scan(folder: Path) -> tuple[list[SlicePair], list[str]]:
    """Pairs by id, plus one problem line per folder/naming/pairing problem."""
    tables, problems = _index(folder, (IMAGE_SUFFIX, LABEL_SUFFIX))
    if not tables:
        return [], problems
    images, labels = tables[IMAGE_SUFFIX], tables[LABEL_SUFFIX]
    for slice_id in sorted(images.keys() - labels.keys()):
        problems.append(f"{images[slice_id]}: image without label (expected {slice_id}{LABEL_SUFFIX}.npy or .nii.gz)")
    for slice_id in sorted(labels.keys() - images.keys()):
        problems.append(f"{labels[slice_id]}: label without image (expected {slice_id}{IMAGE_SUFFIX}.npy or .nii.gz)")
    pairs = [SlicePair(i, images[i], labels[i]) for i in sorted(images.keys() & labels.keys())]
    if not pairs and not problems:
        inner = slice_subfolders(folder)  # a data folder given where one of its slice folders is expected
        hint = f"; it holds the slice folders {', '.join(f'{name}/' for name in inner)}: give one, e.g. " \
            f"{folder / ('test_data' if 'test_data' in inner else inner[0])}" if inner else ""
        problems.append(f"{folder}: no slices (<id>{IMAGE_SUFFIX}.npy + <id>{LABEL_SUFFIX}.npy, or .nii.gz){hint}")
    return pairs, problems


def holds_slices(folder: Path) -> bool:
    """Whether `folder` itself holds slice images (it is a training, validation or test folder)."""
    tables, _ = _index(folder, (IMAGE_SUFFIX,))
    return bool(tables.get(IMAGE_SUFFIX))


def slice_subfolders(folder: Path) -> list[str]:
    """The names of the subfolders of `folder` that hold slice images."""
    try:
        subfolders = sorted(p for p in folder.iterdir() if not p.name.startswith(".") and p.is_dir())
    except OSError:
        return []
    return [p.name for p in subfolders if holds_slices(p)]


def refuse_slice_folder(option: str, data: Path, train_dir: str, val_dir: str, test_dir: str = "") -> None:
    """Refuse `option` (--data) naming a slice folder where the folder holding `train_dir`/ and `val_dir`/ is
    expected: say which folder that is."""
    data = Path(data)
    if not data.is_dir() or (data / train_dir).is_dir():
        return
    role = {train_dir: "training", val_dir: "validation", test_dir or "test_data": "test"}.get(data.name)
    if role is None and not holds_slices(data):
        return
    raise DataError(f"{option} {data}: this is a {role or 'slice'} folder; give the folder that holds {train_dir}/ "
                    f"and {val_dir}/ ({data.parent})")


def find_pairs(folder: Path | str) -> list[SlicePair]:
    """The image/label pairs of a folder, sorted by id; raises DataError listing every naming or pairing problem."""
    pairs, problems = _scan(Path(folder))
    if problems:
        raise DataError(problems)
    return pairs


# ----------------------------------------------------------------------------------------------------- reading


def _read_array(path: Path) -> np.ndarray:
    """The array stored in a .npy or NIfTI file, with the extra singleton axes of a NIfTI file dropped."""
    if path.name.lower().endswith(".npy"):
        with open(path, "rb") as handle:  # else np.load takes the file for a pickle and suggests loading it unsafely
            if handle.read(len(NPY_MAGIC)) != NPY_MAGIC:
                raise ValueError("not a .npy file (no NumPy header)")
        return np.load(path, allow_pickle=False)
    import nibabel as nib

    array = np.asanyarray(nib.load(path).dataobj)
    if array.ndim > 2:
        keep = [n for n in array.shape if n != 1]
        if len(keep) == 2:
            array = array.reshape(keep)
    return array


def _describe(error: BaseException, path: Path) -> str:
    text = str(error).replace(f'"{path}"', "it").replace(str(path), "it").strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def _where(mask: np.ndarray) -> str:
    row, col = np.argwhere(mask)[0]
    return f"row {row}, col {col}"


def _read_checked(path: Path, what: str) -> tuple[np.ndarray | None, list[str]]:
    try:
        array = _read_array(path)
    except Exception as error:  # noqa: BLE001 - any failure to read is one reported problem
        return None, [f"{path}: cannot read {what} ({_describe(error, path)})"]
    if array.dtype.kind not in "biuf":
        return None, [f"{path}: {what} has non-numeric dtype {array.dtype}"]
    if array.ndim != 2:
        return None, [f"{path}: {what} is not 2D (shape {tuple(array.shape)})"]
    if 0 in array.shape:
        return None, [f"{path}: {what} is empty (shape {tuple(array.shape)})"]
    return np.asarray(array), []


def _read_image(path: Path) -> tuple[np.ndarray | None, list[str]]:
    """An image as float32 (None where it cannot be read as a 2D numeric array) and its problems, one line each."""
    array, problems = _read_checked(path, "image")
    if array is None:
        return None, problems
    with np.errstate(over="ignore", invalid="ignore"):
        image = np.ascontiguousarray(array, dtype=np.float32)
    finite = np.isfinite(image)
    if finite.all():
        return image, []
    bad = int(image.size - np.count_nonzero(finite))
    return image, [f"{path}: image has {bad} non-finite value(s) (NaN or inf as float32; first at {_where(~finite)})"]


def _check_label(path: Path, array: np.ndarray, num_classes: int) -> tuple[np.ndarray, list[str]]:
    if array.dtype.kind == "f":
        integral = np.isfinite(array) & (array == np.round(array))
        if not integral.all():
            bad = int(array.size - np.count_nonzero(integral))
            first = array[~integral].flat[0]
            return array, [f"{path}: label has {bad} non-integer value(s) (e.g. {first} at {_where(~integral)})"]
    low, high = array.min(), array.max()
    if low < 0 or high > num_classes - 1:
        outside = (array < 0) | (array > num_classes - 1)
        values = np.unique(array[outside])
        shown = ", ".join(str(v.item() if hasattr(v, "item") else v) for v in values[:5])
        more = ", ..." if values.size > 5 else ""
        return array, [
            f"{path}: label values outside 0..{num_classes - 1}: {shown}{more} "
            f"({int(np.count_nonzero(outside))} pixel(s), first at {_where(outside)})"
        ]
    return np.ascontiguousarray(array, dtype=np.uint8), []


class Spill:
    """Where :func:`load_splits` puts slices once they pass `budget_bytes` of host memory: two flat files per split in
    `folder` (images float32, labels uint8, slice after slice), written as the slices are read and mapped read-only at
    the end. Data larger than the host's memory is so read once without being held; `spilled` says it happened."""

    def __init__(self, folder: Path, budget_bytes: float) -> None:
        self.folder, self.room, self.spilled = Path(folder), float(budget_bytes), False


class _SliceStore:
    """One split's slices as `load_split` reads them: in memory while its Spill has room, else all in its files."""

    def __init__(self, spill: Spill | None, name: str) -> None:
        self.spill, self.name = spill, name
        self.kept: list[tuple[np.ndarray, np.ndarray]] = []
        self.files: tuple | None = None  # (images, labels) open for appending, once this split spills
        self.shapes: list[tuple[int, int]] = []

    def add(self, image: np.ndarray, label: np.ndarray) -> None:
        if self.files is None:
            if self.spill is None or self.spill.room >= image.nbytes + label.nbytes:
                if self.spill is not None:
                    self.spill.room -= image.nbytes + label.nbytes
                self.kept.append((image, label))
                return
            self._start_files()
        self.shapes.append(image.shape)
        self.files[0].write(image.tobytes())
        self.files[1].write(label.tobytes())

    def _start_files(self) -> None:
        self.spill.spilled = True
        self.spill.folder.mkdir(parents=True, exist_ok=True)
        self.files = tuple(open(self.spill.folder / f"{self.name}-{kind}.raw", "wb") for kind in ("images", "labels"))
        kept, self.kept = self.kept, []
        for image, label in kept:  # the split is held in one place, its files: its memory is free again
            self.spill.room += image.nbytes + label.nbytes
            self.add(image, label)

    def arrays(self) -> tuple[list[np.ndarray], list[np.ndarray]]:
        if self.files is None:
            return [image for image, _ in self.kept], [label for _, label in self.kept]
        for handle in self.files:
            handle.close()
        images = np.memmap(self.files[0].name, dtype=np.float32, mode="r")
        labels = np.memmap(self.files[1].name, dtype=np.uint8, mode="r")
        out_images, out_labels, at = [], [], 0
        for h, w in self.shapes:
            out_images.append(images[at:at + h * w].reshape(h, w))
            out_labels.append(labels[at:at + h * w].reshape(h, w))
            at += h * w
        return out_images, out_labels

    def discard(self) -> None:
        for handle in self.files or ():
            handle.close()
            Path(handle.name).unlink(missing_ok=True)


def load_split(folder: Path | str, num_classes: int, spill: Spill | None = None, name: str = "split") -> Split:
    """Read and check every slice of a folder; raise one DataError listing all problems, one line each. With `spill`,
    slices beyond its budget go to its files (named after `name`) as they are read (see Spill)."""
    if not 1 <= int(num_classes) <= 256:
        raise ValueError(f"num_classes must be in 1..256 (labels are stored as uint8), got {num_classes}")
    folder = Path(folder)
    pairs, problems = _scan(folder)
    ids: list[str] = []
    store = _SliceStore(spill, name)
    for pair in pairs:
        image, image_problems = _read_image(pair.image)
        raw_label, label_problems = _read_checked(pair.label, "label")
        if raw_label is not None:
            label, more = _check_label(pair.label, raw_label, num_classes)
            label_problems += more
        if image is not None and raw_label is not None and image.shape != raw_label.shape:
            label_problems.append(
                f"{pair.label}: shape {raw_label.shape[0]}x{raw_label.shape[1]} differs from its image "
                f"{pair.image.name} ({image.shape[0]}x{image.shape[1]})"
            )
        if image_problems or label_problems:
            problems += image_problems + label_problems
            continue
        ids.append(pair.id)
        if not problems:  # once a file is bad nothing is trained: the rest is only checked
            store.add(image, label)
    if problems:
        store.discard()
        raise DataError(problems)
    images, labels = store.arrays()
    return Split(folder=folder, ids=ids, images=images, labels=labels)


def load_splits(folders: Sequence[Path | str], num_classes: int, spill: Spill | None = None) -> list[Split]:
    """:func:`load_split` of each folder, every folder checked before any is refused: one DataError lists the
    problems of all of them (a bad validation file is named along with the bad training files). `spill` (shared by
    the folders) bounds the host memory the slices take."""
    splits: list[Split] = []
    problems: list[str] = []
    for k, folder in enumerate(folders):
        try:
            splits.append(load_split(folder, num_classes, spill if not problems else None, name=f"split{k}"))
        except DataError as err:
            problems += err.problems
    if problems:
        if spill is not None:
            shutil.rmtree(spill.folder, ignore_errors=True)
        raise DataError(problems)
    return splits


def join_splits(splits: Sequence[Split]) -> Split:
    """Several folders' slices as one split (the training folds of a cross-validation fold), named after the first
    folder, whose data folder (its parent) they share."""
    if len(splits) == 1:
        return splits[0]
    return Split(folder=splits[0].folder, ids=[i for s in splits for i in s.ids],
                 images=[a for s in splits for a in s.images], labels=[a for s in splits for a in s.labels])


@dataclass
class Images:
    """The images of one folder without labels (new scans), sorted by id: float32 (H, W), sizes may differ."""

    folder: Path
    ids: list[str]
    paths: list[Path]
    images: list[np.ndarray]

    def __len__(self) -> int:
        return len(self.ids)


def load_images(folder: Path | str) -> Images:
    """Read and check every image (``<id>_T1w.*``) of a folder, ignoring its label files, with the checks that
    :func:`load_split` makes of images; raise one DataError listing all problems, one line each."""
    folder = Path(folder)
    tables, problems = _index(folder, (IMAGE_SUFFIX,))
    found = sorted(tables.get(IMAGE_SUFFIX, {}).items())
    if tables and not found and not problems:
        problems.append(f"{folder}: no images (<id>{IMAGE_SUFFIX}.npy, .nii.gz or .nii)")
    ids: list[str] = []
    paths: list[Path] = []
    images: list[np.ndarray] = []
    for slice_id, path in found:
        image, more = _read_image(path)
        problems += more
        if not more:
            ids.append(slice_id)
            paths.append(path)
            images.append(image)
    if problems:
        raise DataError(problems)
    return Images(folder=folder, ids=ids, paths=paths, images=images)


# ----------------------------------------------------------------------------------------------------- writing


def slice_paths(folder: Path | str, id: str, fmt: Literal["npy", "nifti"] = "npy") -> tuple[Path, Path]:
    """Where :func:`save_slice` puts the image and label of ``id``."""
    ext = {"npy": ".npy", "nifti": ".nii.gz"}.get(fmt)
    if ext is None:
        raise ValueError(f"fmt must be 'npy' or 'nifti', got {fmt!r}")
    folder = Path(folder)
    return folder / f"{id}{IMAGE_SUFFIX}{ext}", folder / f"{id}{LABEL_SUFFIX}{ext}"


def save_slice(
    folder: Path | str,
    id: str,
    image: np.ndarray,
    label: np.ndarray,
    fmt: Literal["npy", "nifti"] = "npy",
) -> tuple[Path, Path]:
    """Write one slice pair (image as float32, label as uint8) and return the two paths.

    ``fmt="nifti"`` writes 2D ``.nii.gz`` files with 1 mm pixels and an identity affine. Refuses (ValueError)
    arrays that are not 2D, of different shapes, or labels that are not whole numbers in 0..255; it does not
    check the image values, so tests can write bad images with it.
    """
    if not id or "/" in id or "\\" in id or id.startswith("."):
        raise ValueError(f"bad slice id {id!r}: must be non-empty, not start with '.', and have no path separator")
    image = np.asarray(image)
    label = np.asarray(label)
    if image.ndim != 2 or image.shape != label.shape:
        raise ValueError(f"image and label must be 2D of the same shape, got {image.shape} and {label.shape}")
    if label.dtype.kind not in "biu" and not np.array_equal(label, np.round(label)):
        raise ValueError("label values must be whole numbers")
    if label.size and (label.min() < 0 or label.max() > 255):
        raise ValueError("label values must be in 0..255")
    image = image.astype(np.float32)
    label = label.astype(np.uint8)
    image_path, label_path = slice_paths(folder, id, fmt)
    image_path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "npy":
        np.save(image_path, image)
        np.save(label_path, label)
    else:
        import nibabel as nib

        for array, path in ((image, image_path), (label, label_path)):
            img = nib.Nifti1Image(array, np.eye(4))
            img.header.set_xyzt_units("mm")
            nib.save(img, path)
    return image_path, label_path
