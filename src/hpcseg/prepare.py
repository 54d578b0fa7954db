"""`hpcseg prepare`: a folder of 3D scans with tissue labels -> the slice data set that `hpcseg train` reads.

Each scan is checked (see volumes), cut into coronal 1 mm slices as brain2d's (volumes.cut_scan, its labels on the
same grid by nearest neighbour), and slices without labelled brain are dropped. Scans are split by subject, never
by slice: every slice of a subject (all its sessions) lands in one of training_data / validation_data / test_data.
The output (split folders, manifest.csv, prepare.json with the normalisation rule) appears in one rename.

With `folds` (K), the subjects that are not test subjects are dealt into K folds instead of training and validation
(see folds.py): their slices land in `fold<k>/`, the manifest's `fold` column and folds.json say which.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

import numpy as np

from . import TISSUES, __version__, folds as kfold, volumes
from .data import DataError, save_slice
from .errors import UserError
from .outdir import check_replaceable, replacing

SPLITS = ("training_data", "validation_data", "test_data")
MANIFEST, RECORD = "manifest.csv", volumes.PREPARED
OUTPUTS = {*SPLITS, MANIFEST, RECORD, kfold.RECORD}
#: Where the slices of the subjects to be dealt into folds wait until every scan is cut (their counts known).
POOL = ".pool"


def is_output(name: str) -> bool:
    return name in OUTPUTS or bool(kfold.FOLDER.fullmatch(name))


def parse_fractions(text: str) -> tuple[float, float, float]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3 or min(values) < 0 or abs(sum(values) - 1) > 1e-6:
        raise UserError(f"--fractions {text}: expected three fractions TRAIN,VAL,TEST, each >= 0, summing to 1")
    return values  # type: ignore[return-value]


def assign_splits(subjects: list[str], fractions=(0.6, 0.2, 0.2), val=(), test=(), seed: int = 0) -> dict[str, str]:
    """Subject -> split folder. Listed subjects (`val`, `test`) go where listed and the rest to training; without
    lists, the subjects are shuffled with `seed` and cut by `fractions` (rounded, the remainder to training)."""
    known = set(subjects)
    listed = {"validation_data": list(val), "test_data": list(test)}
    for split, names in listed.items():
        unknown = [n for n in names if n not in known]
        if unknown:
            raise UserError(f"--{'val' if split == 'validation_data' else 'test'}: no scan of subject "
                            f"{', '.join(unknown)} (subjects: {', '.join(sorted(known)[:8])}"
                            f"{', ...' if len(known) > 8 else ''})")
    both = sorted(set(val) & set(test))
    if both:
        raise UserError(f"subject {', '.join(both)} is listed for validation and for test: a subject's slices "
                        f"must sit in one split only, or its own slices would be tested")
    if val or test:
        return {s: next((k for k, names in listed.items() if s in names), "training_data") for s in subjects}
    order = [subjects[i] for i in np.random.default_rng(seed).permutation(len(subjects))]
    n_val, n_test = (int(round(f * len(subjects))) for f in fractions[1:])
    n_test = min(n_test, len(subjects) - n_val)
    splits = ["validation_data"] * n_val + ["test_data"] * n_test
    splits += ["training_data"] * (len(subjects) - len(splits))
    return dict(zip(order, splits))


def prepare(volumes_dir: Path, out_dir: Path, *, label_suffix: str = volumes.LABEL_SUFFIX, mapping: str | None = None,
            fractions=(0.6, 0.2, 0.2), val=(), test=(), seed: int = 0, percentile: float = volumes.PERCENTILE,
            folds: int | None = None, log=print) -> dict[str, int]:
    """Write the slice data set of the scans in `volumes_dir` into `out_dir`, each scan divided by its `percentile`
    over the brain; returns the slice count per split (per fold folder with `folds`)."""
    volumes_dir, out_dir = Path(volumes_dir), Path(out_dir).absolute()
    if not 0 < percentile <= 100:
        raise UserError(f"--percentile {percentile:g}: expected a percentile in (0, 100]")
    if folds is not None and val:
        raise UserError(f"--val {','.join(val)}: with --folds every fold validates in turn; give --test only")
    check_replaceable(out_dir, "prepare", is_output, RECORD)
    codes = volumes.parse_mapping(mapping)
    if folds is not None:
        _check_subjects(volumes_dir)
    scans = volumes.find_volumes(volumes_dir, label_suffix)
    subjects = sorted({v.subject for v in scans})
    if folds is not None:  # only the test share of --fractions applies: every other subject is dealt into a fold
        fractions = (1 - fractions[2], 0.0, fractions[2])
    split_of = assign_splits(subjects, fractions, val, test, seed)
    if folds is not None:
        split_of = {s: POOL if split != "test_data" else split for s, split in split_of.items()}
        kfold.deal(dict.fromkeys([s for s, split in split_of.items() if split == POOL], 1), folds)  # K vs subjects
    rows, record, problems = [], {}, []
    with replacing(out_dir) as tmp:
        for split in (SPLITS if folds is None else ("test_data", POOL)):
            (tmp / split).mkdir()
        for scan in scans:
            split = split_of[scan.subject]
            try:
                made, record[scan.scan] = _prepare_scan(scan, codes, tmp / split, percentile)
            except DataError as error:  # every scan is checked; the first problem of each is reported
                problems += error.problems
                continue
            rows += [[slice_id, scan.subject, scan.scan, split, y, *shape, *counts]
                     for slice_id, y, shape, counts in made]
            log(f"{scan.scan}: {len(made)} slices -> {split if split != POOL else 'a fold (dealt below)'}")
        if problems:
            raise DataError(problems)
        dealt = None
        if folds is not None:
            dealt = _deal_pool(tmp, rows, split_of, folds, seed)
            log("folds: " + ", ".join(f"{f['folder']} {len(f['subjects'])} subject(s) {f['slices']} slices"
                                      for f in dealt["folds"]))
        text = io.StringIO()
        writer = csv.writer(text, lineterminator="\n")
        writer.writerow(["id", "subject", "scan", "split", "fold", "y_mm", "H", "W", "background", *TISSUES])
        writer.writerows([*row[:4], kfold.FOLDER.fullmatch(row[3])[1] if kfold.FOLDER.fullmatch(row[3]) else "",
                          *row[4:]] for row in rows)
        (tmp / MANIFEST).write_text(text.getvalue())
        summary = {"hpcseg": __version__, "volumes": str(volumes_dir), "normalisation": volumes.rule(percentile),
                   "label_suffix": label_suffix, "mapping": {str(k): v for k, v in sorted(codes.items())},
                   "split": {"seed": seed, "fractions": list(fractions), "val": list(val), "test": list(test),
                             "folds": folds},
                   "subjects": split_of, "scans": record}
        (tmp / RECORD).write_text(json.dumps(summary, indent=2) + "\n")
        if dealt is not None:
            (tmp / kfold.RECORD).write_text(json.dumps(dealt, indent=2) + "\n")
    names = SPLITS if folds is None else [*(kfold.folder_name(k) for k in range(folds)), "test_data"]
    counts = {split: sum(r[3] == split for r in rows) for split in names}
    log(f"wrote {out_dir}: " + ", ".join(f"{n} {split}" for split, n in counts.items()))
    return counts


def _check_subjects(folder: Path) -> None:
    """Folds are dealt by subject: a folder of 2D slices (which carry no subject) cannot be."""
    from .data import _index

    tables, _ = _index(Path(folder), (volumes.IMAGE_SUFFIX,))
    if any(tables.values()) and not volumes.is_volume_folder(folder):
        raise UserError(f"{folder}: holds 2D slices, not 3D scans: slices carry no subject, and folds are dealt by "
                        f"subject; give --folds the subjects' 3D scans (<scan>_T1w.nii.gz with labels)")


def _deal_pool(tmp: Path, rows: list[list], split_of: dict[str, str], k: int, seed: int) -> dict:
    """Deal the pooled subjects into k folds by their slice counts, move their slices into fold<k>/ (renames, no
    copies), set each manifest row's split to its fold folder (in place), and return folds.json's content."""
    from .data import _NAME

    slices = {s: 0 for s, split in split_of.items() if split == POOL}
    for row in rows:
        if row[3] == POOL:
            slices[row[1]] += 1
    fold_of = kfold.deal(slices, k, seed)
    for f in range(k):
        (tmp / kfold.folder_name(f)).mkdir()
    subject_of = {row[0]: row[1] for row in rows}
    for name in os.listdir(tmp / POOL):
        subject = subject_of[_NAME.match(name)["id"]]
        os.rename(tmp / POOL / name, tmp / kfold.folder_name(fold_of[subject]) / name)
    (tmp / POOL).rmdir()
    for row in rows:
        if row[3] == POOL:
            row[3] = kfold.folder_name(fold_of[row[1]])
    for subject, fold in fold_of.items():
        split_of[subject] = kfold.folder_name(fold)
    test = sorted(s for s, split in split_of.items() if split == "test_data")
    return {"k": k, "seed": seed, "dealt": "by subject, balanced by slice count",
            "folds": [{"fold": f, "folder": kfold.folder_name(f),
                       "subjects": sorted(s for s, g in fold_of.items() if g == f),
                       "slices": sum(slices[s] for s, g in fold_of.items() if g == f)} for f in range(k)],
            "test": {"folder": "test_data", "subjects": test, "slices": sum(r[3] == "test_data" for r in rows)}}


def _prepare_scan(scan: volumes.Volume, codes: dict[int, int], folder: Path, percentile: float):
    """Check and cut one scan and its labels, writing its slices into `folder`; returns the manifest's (id, y_mm,
    shape, pixels per class) per slice and the scan's record for prepare.json."""
    image, img = volumes.read_volume(scan.image, "scan")
    raw, label_img = volumes.read_volume(scan.label, "label")
    volumes.check_same_grid(scan.label, label_img, scan.image, img)
    labels = volumes.map_labels(scan.label, raw, codes)
    brain = labels > 0
    if not brain.any():
        raise DataError([f"{scan.label}: no brain labelled (every voxel maps to background): empty mask"])
    volumes.check_skull_stripped(scan.image, image, brain, scan.label)
    cut = volumes.cut_scan(scan.image, image, img.affine, percentile)
    sliced = volumes.resample(labels, img.affine, cut.grid.affine, cut.grid.shape, order=0)
    made = []
    for j in range(cut.grid.shape[0]):
        if not sliced[j].any():
            continue  # no labelled brain in this plane
        slice_id = f"{scan.scan}-cor{j:03d}"
        save_slice(folder, slice_id, cut.image[j], sliced[j])
        made.append((slice_id, round(cut.grid.y_mm(j), 3), sliced[j].shape,
                     np.bincount(sliced[j].ravel(), minlength=4).tolist()))
    record = {"subject": scan.subject, "image": scan.image.name, "label": scan.label.name, "scale": cut.scale,
              "grid_affine": cut.grid.affine.tolist(), "grid_shape": list(cut.grid.shape), "slices": len(made),
              "dropped": cut.grid.shape[0] - len(made)}
    return made, record
