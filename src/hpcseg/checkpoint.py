"""Checkpoints: tensors and plain metadata only, written atomically, loaded with `weights_only=True`.

A checkpoint is a dict of state dicts, numbers, strings and the job as a plain dict. Loading never unpickles
anything else: a file that holds another object is refused.
"""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path
from typing import Any

import torch

from .atomic import atomic_path
from .errors import UserError


class CheckpointError(UserError):
    """A checkpoint that is missing, unreadable, or holds more than tensors and plain metadata."""


#: What `last` holds beyond the weights and the job, so that training can resume from it (`best` does not).
RESUME_KEYS = ("optimizer", "rng", "loop")


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """Write `state` to `path` atomically: a kill at any moment leaves the previous file loadable."""
    with atomic_path(path, "checkpoint") as tmp:  # a full disk: one line, and the previous file stays
        torch.save(state, tmp)


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu", resume: bool = False) -> dict[str, Any]:
    """The checkpoint in `path`: weights and job (and, with `resume`, what training resumes from), or CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        with warnings.catch_warnings():  # torch's notes on an odd file: the one line below says what matters
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        # an object the weights-only unpickler will not build is named by its GLOBAL; anything else is damage
        reason = next((line.strip() for line in str(err).splitlines() if "GLOBAL" in line), None)
        if reason is None:
            raise CheckpointError(f"{path}: not a readable checkpoint (corrupt or not a torch file)") from None
        raise CheckpointError(f"{path}: refused: holds objects other than tensors and plain metadata ({reason})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: not a readable checkpoint ({_last_line(err)})") from None
    except Exception:  # noqa: BLE001 - the weights-only unpickler runs nothing from the file: anything else is damage
        raise CheckpointError(f"{path}: not a readable checkpoint (corrupt or not a torch file)") from None
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict) or not isinstance(state.get("job"), dict):
        raise CheckpointError(f"{path}: not an hpcseg checkpoint (no model weights and job)")
    if resume and not all(isinstance(state.get(key), dict) for key in RESUME_KEYS):
        raise CheckpointError(f"{path}: holds the weights but not the optimiser and random states that resuming "
                              f"needs (like checkpoints/best.pt)")
    return state


def load_weights(model: torch.nn.Module, state: dict[str, Any], path: Path) -> None:
    """Load the checkpoint's weights into `model` (built from its job); weights that do not fit are refused."""
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, TypeError, ValueError) as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        detail = (lines[1] if len(lines) > 1 else lines[0] if lines else type(err).__name__)[:160]
        raise CheckpointError(f"{path}: its weights do not fit the model of its job ({detail})") from None


def _last_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[-1] if lines else type(err).__name__
