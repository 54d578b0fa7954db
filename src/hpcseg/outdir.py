"""Output folders, checked before any work is done: one that a file stands in the way of is refused up front.

Without the check, `mkdir` fails only when the results are written: after the training, the inference or the copy.

`hpcseg test` and `hpcseg predict` replace their `--out` as a whole: :func:`check_replaceable` refuses a folder that
holds anything but an earlier output of the same command, and :func:`replacing` writes the new output beside it and
swaps it in with one rename, so it is never half-written.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator

from .errors import UserError


class OutputDirError(UserError):
    """An output folder that the command must not replace."""


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


def check_replaceable(out_dir: Path, what: str, is_output: Callable[[str], bool], marker: str) -> None:
    """Refuse (OutputDirError) an output folder that cannot be made, or a non-empty one that is not an earlier
    output: it lacks `marker` (the file every output has) or holds an entry `is_output` does not accept, which
    replacing the folder would delete."""
    problem = blocked(out_dir)
    if problem:
        raise OutputDirError(problem)
    if not out_dir.exists():
        return
    entries = [p.name for p in out_dir.iterdir()]
    others = sorted(name for name in entries if not is_output(name))
    if entries and not others and marker not in entries:
        raise OutputDirError(f"{out_dir}: looks like part of a {what} output but has no {marker}; choose another --out")
    if others:
        raise OutputDirError(f"{out_dir}: holds more than a {what} output ({', '.join(others[:3])}"
                             f"{', ...' if len(others) > 3 else ''}), which the output would replace; "
                             f"choose another --out")


@contextlib.contextmanager
def replacing(out_dir: Path) -> Iterator[Path]:
    """Yields an empty temporary folder beside `out_dir`; on success it replaces `out_dir` in one rename, on error it
    is removed and `out_dir` is left as it was."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        yield tmp
        old = out_dir.with_name(f".{out_dir.name}.old")
        if out_dir.exists():
            out_dir.rename(old)
        tmp.rename(out_dir)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
