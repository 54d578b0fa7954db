"""What a training run keeps in its run folder, by name: `train` writes them, the job runner resumes from `LAST`,
`test`, `predict` and `collect` take `BEST`, and `--resume` (and predict's normalisation rule) read `RECORD`."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import UserError

LAST = "checkpoints/last.pt"  # the state to resume from (every epoch, and on a scheduler's warning)
BEST = "checkpoints/best.pt"  # the weights with the best validation Dice
#: The data folders a run was started with, so that `--resume` needs no `--data`.
RECORD = "train.json"


class RunDirError(UserError):
    """A run folder that cannot be started or resumed as asked."""


def recorded_data(run_dir: Path) -> tuple[Path | list[Path], Path] | None:
    """The training folder (a list of them for a cross-validation fold) and the validation folder `run_dir` was
    trained with (from its train.json), or None."""
    path = Path(run_dir) / RECORD
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        folders = record["train_dir"], record["val_dir"]
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise RunDirError(f"{path}: damaged ({type(err).__name__}); pass --data") from None
    if not all(isinstance(f, str) and f for f in folders):
        raise RunDirError(f"{path}: damaged (folders are not strings); pass --data")
    several = record.get("train_dirs")  # a cross-validation fold trained on the other folds
    if isinstance(several, list) and several and all(isinstance(f, str) and f for f in several):
        return [Path(f) for f in several], Path(folders[1])
    return Path(folders[0]), Path(folders[1])
