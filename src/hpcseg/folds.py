"""K-fold cross-validation by subject: dealing subjects into folds, and reading the folds a data folder holds.

`hpcseg prepare --folds K` writes each fold's slices into `DATA/fold<k>/` (a subject's slices in one fold only) and
lists them in `DATA/folds.json`; training on fold k reads the other fold folders as its training data and validates
on `fold<k>/`, so that no slice is copied K times. The test subjects stay in `DATA/test_data/`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import UserError

RECORD = "folds.json"
FOLDER = re.compile(r"fold(\d+)")


def folder_name(k: int) -> str:
    return f"fold{k}"


def deal(slices: dict[str, int], k: int, seed: int = 0) -> dict[str, int]:
    """Subject -> fold: the subjects in a seeded order, the largest first (by slice count), each to the fold with the
    fewest slices so far (ties: the fewest subjects, then the lowest fold), so the folds hold about as many slices."""
    subjects = sorted(slices)
    if k < 2:
        raise UserError(f"--folds {k}: cross-validation needs at least 2 folds")
    if k > len(subjects):
        raise UserError(f"--folds {k}: only {len(subjects)} subject(s) outside the test set "
                        f"({', '.join(subjects[:8])}{', ...' if len(subjects) > 8 else ''}): a subject never spans "
                        f"two folds, so at most {len(subjects)} folds")
    shuffled = [subjects[i] for i in np.random.default_rng(seed).permutation(len(subjects))]
    order = sorted(shuffled, key=lambda s: -slices[s])  # stable: the seed orders subjects of equal size
    load, members = [0] * k, [0] * k
    fold_of = {}
    for subject in order:
        fold = min(range(k), key=lambda f: (load[f], members[f], f))
        fold_of[subject] = fold
        load[fold] += slices[subject]
        members[fold] += 1
    return fold_of


@dataclass(frozen=True)
class Folds:
    """The folds of a prepared data folder: `folders[k]` holds fold k's slices."""

    data: Path
    folders: list[Path]
    record: dict

    def __len__(self) -> int:
        return len(self.folders)

    def split(self, k: int) -> tuple[list[Path], Path]:
        """(training folders, validation folder) of fold k: train on the other folds, validate on fold k."""
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < len(self):
            raise UserError(f"--fold {k}: {self.data / RECORD} has {len(self)} folds: expected 0..{len(self) - 1}")
        return [f for j, f in enumerate(self.folders) if j != k], self.folders[k]


def read_folds(data: Path | str) -> Folds:
    """The folds of `data` (its folds.json), or UserError naming the file and what is wrong."""
    data = Path(data)
    path = data / RECORD
    if not path.is_file():
        raise UserError(f"{path}: not found: {data} has no folds (prepare it with hpcseg prepare VOLUMES --out "
                        f"{data} --folds K)")
    try:
        record = json.loads(path.read_text())
        folders = [data / entry["folder"] for entry in record["folds"]]
        ok = all(FOLDER.fullmatch(f.name) and f.parent == data for f in folders) and len(folders) >= 2
    except (OSError, ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        raise UserError(f"{path}: damaged (expected folds: a list of at least 2 {{folder: fold<k>}}); prepare the "
                        f"data again")
    missing = [str(f) for f in folders if not f.is_dir()]
    if missing:
        raise UserError(f"{missing[0]}: fold folder listed in {path} does not exist")
    return Folds(data, folders, record)


def fold_of(val_dir: Path | str) -> dict | None:
    """{"fold": k, "folds": K, "data": DATA} when `val_dir` is fold k of a folds.json, else None: what a run records."""
    val_dir = Path(val_dir).absolute()
    if not FOLDER.fullmatch(val_dir.name) or not (val_dir.parent / RECORD).is_file():
        return None
    try:
        folds = read_folds(val_dir.parent)
    except UserError:
        return None
    names = [f.name for f in folds.folders]
    if val_dir.name not in names:
        return None
    return {"fold": names.index(val_dir.name), "folds": len(folds), "data": str(val_dir.parent)}
