"""Output folders, checked before any work is done: one that a file stands in the way of is refused up front.

Without the check, `mkdir` fails only when the results are written: after the training, the inference or the copy.
"""

from __future__ import annotations

import os
from pathlib import Path


def blocked(folder: Path | str) -> str | None:
    """Why `folder` cannot be an output folder, as `"<path>: <problem>"`, or None where it can: it, or the nearest of
    its parents that exists, is not a folder."""
    folder = Path(folder).absolute()
    for path in (folder, *folder.parents):
        if os.path.lexists(path):
            if path.is_dir():
                return None
            if path == folder:
                return f"{folder}: exists and is not a folder"
            return f"{folder}: cannot be created, {path} is not a folder"
    return None
