"""The run's settings and results as TensorBoard's HParams summary, so that `tensorboard --logdir
<scratch>/<experiment>` lists the experiment's runs in its HPARAMS tab, their curves beside them.

Each run folder is one session, named by its run id: the event file `events.out.tfevents.hparams` in the run
folder holds the session's settings (the job keys that differ between the experiment's runs, plus batch, lr,
precision, GPUs and the fold) and its results as scalars under `results/` (best validation Dice per tissue and
mean, test Dice, epochs, wall time); the training curves in its `tb/` (train.py's) are the session's too, as the
metric group `tb`. No experiment summary is written: TensorBoard then builds the experiment from all sessions, so
runs submitted apart still line up. The file is replaced whole on each write (after training, again after the
job's test): TensorBoard keeps the first session record of a run it reads.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .cluster.runs import RUN_RECORD
from .results import ALWAYS, RunResult, differing_keys, load_result

#: The event file of the session record, in the run folder (`tb/` below it holds the training's own).
EVENT_FILE = "events.out.tfevents.hparams"
#: Sibling runs compared for differing settings, at most (the newest ones).
MAX_SIBLINGS = 1000


def _siblings(result: RunResult) -> list[RunResult]:
    """The other runs of a submitted run's experiment folder (foreground runs have none)."""
    if not (result.path / RUN_RECORD).exists():
        return []
    try:
        folders = sorted(p for p in result.path.parent.iterdir() if p != result.path and not p.name.startswith(".")
                         and not p.is_symlink() and (p / RUN_RECORD).is_file())
    except OSError:
        return []
    return [load_result(p) for p in folders[-MAX_SIBLINGS:]]


def _hparam_value(value):
    """A value TensorBoard's HParams can hold: a number, a string or a bool (a list as its text)."""
    if isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def session(result: RunResult, others: list[RunResult]) -> tuple[dict, dict]:
    """(settings, results) of the run, as the HParams summary holds them."""
    keys = list(dict.fromkeys([*differing_keys([result, *others]), *ALWAYS]))
    settings = {k: _hparam_value(result.setting(k)) for k in keys if result.setting(k) is not None}
    if result.fold is not None:
        settings.pop(result.fold_key or "fold", None)
        settings["fold"] = _hparam_value(result.fold)
    metrics = {f"results/best_val_dice_{k}": v for k, v in result.best_dice.items()}
    metrics.update((f"results/test_dice_{k}", v) for k, v in result.test_dice.items() if v == v)  # NaN: no tissue
    if result.epochs_done is not None:
        metrics["results/epochs"] = result.epochs_done
    if result.wall_s is not None:
        metrics["results/wall_time_s"] = result.wall_s
    return settings, metrics


def write_hparams(run_dir: Path) -> Path:
    """Write (or replace) the run's HParams session record in `run_dir`; returns the event file."""
    from torch.utils.tensorboard.summary import hparams, scalar
    from torch.utils.tensorboard.writer import FileWriter

    result = load_result(Path(run_dir))
    settings, metrics = session(result, _siblings(result))
    run_dir = Path(run_dir)
    step = result.epochs_done or 0
    with tempfile.TemporaryDirectory(prefix=".hparams-", dir=run_dir) as tmp:  # the writer names its file itself
        writer = FileWriter(tmp)
        _, start, end = hparams(settings, metrics)  # the experiment summary is left out (see above)
        writer.add_summary(start, step)
        writer.add_summary(end, step)
        for tag, value in metrics.items():
            writer.add_summary(scalar(tag, float(value)), step)
        writer.close()
        (written,) = Path(tmp).iterdir()
        os.replace(written, run_dir / EVENT_FILE)
    return run_dir / EVENT_FILE
