"""Validation Dice after fixed wall times: one training loop per process, scored when its clock passes each point.

The clock is wall time since this process started: interpreter and imports, data loading, model set-up, cuDNN's
autotuning and training all count; the validations this benchmark makes at the points do not (the clock is paused
for them, so a point's measurement does not slow the next). Training stops at the first step that ends past a
point (hpcseg: the step's loss is waited for; the exercise loop reads it every step anyway), the model is scored
on the validation split with hpcseg's per-tissue folder Dice (mean of CSF, grey and white matter), and training
goes on to the next point. One line per point is printed (flushed) as soon as it is measured.

Loops (``--loop``):

* ``ex``: the exercise loop as written (``exercise_loop.py``: DataLoader workers, batch 2, validated with its
  per-slice sliding window);
* ``hpcseg``: ``hpcseg.train.train_one_epoch`` on resident tensors with the job ``--job`` (default
  ``jobs/exercise-improved.toml``, the shipped batch-2 job; ``jobs/gpu.toml`` is the GPU default) and ``--set``
  overrides, validated as ``hpcseg train`` validates.

Several of these can run at once on one GPU (``benchmarks/gpu_run.sh`` does, to fit a few minutes): they then
share it, and each one's Dice at a point is what it reached while sharing.

Example:  python benchmarks/dice_at_wall.py --loop hpcseg --job jobs/gpu.toml --points 60,300 --json gpu.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
import exercise_loop as ex  # noqa: E402

import hpcseg.train as T  # noqa: E402
from hpcseg.jobfile import load_job  # noqa: E402
from hpcseg.metrics import named, nanmean  # noqa: E402
from hpcseg.phases import process_age_s  # noqa: E402
from hpcseg.precision import choose_precision, make_scaler  # noqa: E402

JOB = C.REPO / "jobs" / "exercise-improved.toml"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--loop", choices=("ex", "hpcseg"), required=True)
    p.add_argument("--job", type=Path, default=JOB, help="hpcseg's job file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--name", default=None, help="the loop's name in the output (default: ex, or the job's name)")
    p.add_argument("--points", default="60,300", help="wall seconds since process start at which to validate")
    p.add_argument("--data", type=Path, default=None)
    p.add_argument("--val-slices", type=int, default=0,
                   help="score on the first N validation slices only (0: all; a small N checks the plumbing on a CPU)")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--crop", type=int, default=200, help="the exercise loop's training crop (hpcseg: train.crop)")
    p.add_argument("--json", type=Path, default=None, help="write the result here (rewritten after every point)")
    args = p.parse_args(argv)
    args.points = sorted(float(x) for x in args.points.split(",") if x.strip())
    return args


class Clock:
    """Wall seconds since process start, less the seconds spent in this benchmark's own validations."""

    def __init__(self) -> None:
        self.offset = (process_age_s() or 0.0) - time.perf_counter()
        self.paused = 0.0

    def now(self) -> float:
        return time.perf_counter() + self.offset - self.paused

    def outside(self, work):
        """`work()`'s result, its seconds left off the clock."""
        started = time.perf_counter()
        try:
            return work()
        finally:
            self.paused += time.perf_counter() - started


def exercise(args, device, clock: Clock, report) -> None:
    torch.manual_seed(args.seed)
    model = ex.build_model().to(device)
    optimizer, loss_fn = ex.build_optimizer(model), ex.build_loss()
    loader = ex.train_loader(args.data / "training_data", crop=args.crop, seed=args.seed)
    files = ex.file_dicts(args.data / "validation_data")
    val_loader = ex.DataLoader(ex.Dataset(data=files[: args.val_slices or None], transform=ex.val_transforms()),
                               batch_size=1, num_workers=2)  # ex.val_loader's, of the slices asked for
    samples = 0
    for point in args.points:
        while clock.now() < point:  # epochs as the exercise runs them, the last one cut at the point
            deadline = time.perf_counter() + (point - clock.now())
            samples += ex.train_steps(model, optimizer, loss_fn, loader, device, deadline=deadline)["samples"]
        at = clock.now()
        report(point, at, clock.outside(lambda: ex.validate(model, val_loader, device).tolist()), samples)


def hpcseg(args, device, clock: Clock, report) -> None:
    from hpcseg.data import load_split
    from hpcseg.infer import shape_groups, stack
    from hpcseg.model import MIN_SIZE, build_loss, build_model, build_optimizer

    job = load_job(args.job, args.overrides)
    train_split = load_split(args.data / "training_data", job.data.num_classes)
    val_split = load_split(args.data / "validation_data", job.data.num_classes)
    val_images, val_labels = val_split.images[: args.val_slices or None], val_split.labels[: args.val_slices or None]
    torch.manual_seed(job.train.seed)
    generator = torch.Generator(device=device).manual_seed(job.train.seed)
    model = build_model(job).to(device)
    optimizer = build_optimizer(job.optim, model, job.train.batch_size, device)
    scaler = make_scaler(choose_precision(job.train.precision, device), device)
    loss_fn, params = build_loss(job.loss), T.augment_params(job)
    images, labels, sizes = (t.to(device) for t in train_split.stacked(min_size=(MIN_SIZE, MIN_SIZE)))
    val_groups = [(stack(val_images, g, torch.float32, device), stack(val_labels, g, torch.uint8, device))
                  for g in shape_groups(val_images)]
    n, samples, epoch = images.shape[0], 0, None
    for point in args.points:
        while clock.now() < point:
            epoch = epoch or T.new_epoch(n, device, generator)
            before = epoch["step"]
            T.train_one_epoch(model, optimizer, loss_fn, images, labels, sizes, job, params, generator, epoch,
                              stop=lambda: clock.now() >= point, scaler=scaler)
            epoch["loss_sum"].item()  # the steps are done when the clock is read again
            samples += min(n, epoch["step"] * job.train.batch_size) - min(n, before * job.train.batch_size)
            if epoch["step"] * job.train.batch_size >= n:
                epoch = None  # a whole epoch: the next starts a new order
        at = clock.now()
        report(point, at, clock.outside(lambda: T.validate(model, val_groups, job)[0].tolist()), samples)


def main(argv=None) -> dict:
    clock = Clock()
    args = parse_args(argv)
    args.data = Path(args.data or C.default_data())
    device = C.device(args.device)
    T.set_threads(0)
    name = args.name or ("ex" if args.loop == "ex" else load_job(args.job, args.overrides).name)
    result = {"benchmark": "dice_at_wall", "date": C.now(), "command": C.command_line(), "machine": C.machine(),
              "device": str(device), "loop": args.loop, "name": name, "job": str(args.job) if args.loop == "hpcseg" else None,
              "overrides": args.overrides, "val_slices": args.val_slices or "all", "clock": "wall seconds since process start, this benchmark's validations excluded",
              "points": []}

    def report(point: float, at: float, dice: list[float], samples: int) -> None:
        entry = {"point_s": point, "at_s": round(at, 2), "samples": samples, "mean_dice": round(nanmean(dice), 4),
                 "dice": {k: round(v, 4) for k, v in named(dice).items()}}
        result["points"].append(entry)
        print(f"{name}: Dice {entry['mean_dice']:.4f} at {at:.1f} s wall (point {point:g} s, {samples} training samples)",
              file=sys.stderr, flush=True)
        if args.json:
            clock.outside(lambda: args.json.write_text(json.dumps(result, indent=1) + "\n"))

    (exercise if args.loop == "ex" else hpcseg)(args, device, clock, report)
    return result


if __name__ == "__main__":
    main()
