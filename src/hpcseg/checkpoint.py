"""Checkpoints: tensors and plain metadata only, written atomically, loaded with `weights_only=True`.

A checkpoint is a dict of state dicts, numbers, strings and the job as a plain dict. Loading never unpickles
anything else: a file that holds another object is refused.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from .atomic import atomic_path
from .errors import UserError


class CheckpointError(UserError):
    """A checkpoint that is missing, unreadable, or holds more than tensors and plain metadata."""


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """Write `state` to `path` atomically: a kill at any moment leaves the previous file loadable."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        # an object the weights-only unpickler will not build is named by its GLOBAL; anything else is damage
        reason = next((line.strip() for line in str(err).splitlines() if "GLOBAL" in line), None)
        if reason is None:
            raise CheckpointError(f"{path}: not a readable checkpoint (corrupt or not a torch file)") from None
        raise CheckpointError(f"{path}: refused: holds objects other than tensors and plain metadata ({reason})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: not a readable checkpoint ({_last_line(err)})") from None
    if not isinstance(state, dict) or "model" not in state or "job" not in state:
        raise CheckpointError(f"{path}: not an hpcseg checkpoint (no model weights and job)")
    return state


def _last_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[-1] if lines else type(err).__name__
