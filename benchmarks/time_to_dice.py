"""Validation Dice against training time: the exercise loop and hpcseg, one after the other in one process.

Each loop trains from scratch on brain2d for its own wall-clock budget of *training* time (``--minutes`` for the
exercise loop, ``--hpcseg-minutes`` for each hpcseg variant) and is scored on the validation split with hpcseg's
per-tissue folder Dice (mean over CSF, grey and white matter) for both.

Clock: the budget counts training only (for the exercise loop: its epochs including the DataLoader worker
start-up; for hpcseg: ``train_one_epoch``). Validation, checkpoints and logging are excluded from the budget;
each point also records the total wall seconds since the loop started (everything included, at the end of the
point's validation) and the CPU seconds of the process and its reaped children up to the start of that
validation (earlier validations included), which a busy machine disturbs less than wall time.

* The exercise loop (``exercise_loop.py``) validates every ``--ex-val-interval`` epochs with MONAI's sliding
  window, per slice through a DataLoader, and once more when its budget ends (mid-epoch: it stops at the step
  that crosses the budget).
* hpcseg runs the real ``hpcseg.train.train()`` (``--hpcseg-impl train``; needs tensorboard) on the improved job
  with ``train.val_interval=1``, ``train.early_stop=0`` and each variant's overrides; it only starts an epoch
  that is expected (from the last epoch's time) to end within its budget, so it never uses more than its
  budget except for a first epoch longer than the budget. ``--hpcseg-impl loop`` runs the same
  ``train_one_epoch`` + ``validate`` without train()'s checkpoints and TensorBoard (for machines without
  tensorboard).
* ``--epochs N`` trains every loop for exactly N epochs instead (the budgets still cap them): the
  same-epochs comparison.

Variants: ``--hpcseg NAME:KEY=VALUE,KEY=VALUE`` (repeatable; job keys as in ``hpcseg train --set``). Default:
``fast:model.dropout=0.0``. Writes ``<out>.json`` and ``<out>.png`` and appends to RESULTS.md.

Quick check:  python benchmarks/time_to_dice.py --minutes 1 --hpcseg-minutes 0.5 --out /tmp/ttd --no-append
Full run:     python benchmarks/time_to_dice.py --hpcseg recipe: --hpcseg fast:model.dropout=0.0
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
import exercise_loop as ex  # noqa: E402

import hpcseg.train as T  # noqa: E402
from hpcseg.jobfile import load_job, parse_override  # noqa: E402
from hpcseg.metrics import named, nanmean  # noqa: E402
from hpcseg.model import scaled_lr  # noqa: E402

JOB = C.REPO / "jobs" / "exercise-improved.toml"
DEFAULT_VARIANT = "fast:model.dropout=0.0"


class BudgetSpent(Exception):
    """Raised by the wrapped train_one_epoch instead of starting an epoch that would not fit the budget."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=None)
    p.add_argument("--minutes", type=float, default=30.0, help="training budget of the exercise loop")
    p.add_argument("--hpcseg-minutes", type=float, default=10.0, help="training budget of each hpcseg variant")
    p.add_argument("--epochs", type=int, default=None, help="train every loop exactly this many epochs (budgets still cap)")
    p.add_argument("--ex-val-interval", type=int, default=2, help="exercise loop: validate every N epochs (and at the end)")
    p.add_argument("--hpcseg", action="append", default=None, metavar="NAME:KEY=VALUE,...",
                   help=f"an hpcseg variant (repeatable); default {DEFAULT_VARIANT}")
    p.add_argument("--hpcseg-impl", choices=("auto", "train", "loop"), default="auto",
                   help="train: hpcseg.train.train(); loop: train_one_epoch + validate; auto: train if tensorboard imports")
    p.add_argument("--skip-exercise", action="store_true", help="run only the hpcseg variants")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=C.REPO / "benchmarks" / "time_to_dice", help="writes OUT.json, OUT.png")
    p.add_argument("--results", type=Path, default=C.RESULTS)
    p.add_argument("--no-append", action="store_true")
    return p.parse_args(argv)


def parse_variant(text: str) -> tuple[str, dict]:
    name, _, rest = text.partition(":")
    if not name:
        raise SystemExit(f"--hpcseg {text!r}: expected NAME:KEY=VALUE,...")
    overrides = dict(parse_override(item) for item in re.split(r",(?=[\w.]+=)", rest) if item.strip())
    return name, overrides


class Clock:
    """Training seconds (budgeted), wall seconds since start and CPU seconds (self + reaped children)."""

    def __init__(self) -> None:
        self.wall0, self.cpu0, self.train_s = time.perf_counter(), self._cpu(), 0.0

    @staticmethod
    def _cpu() -> float:
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system

    def point(self, **extra) -> dict:
        return {"train_s": round(self.train_s, 2), "wall_s": round(time.perf_counter() - self.wall0, 2),
                "cpu_s": round(self._cpu() - self.cpu0, 2)} | extra


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_exercise(args, device, budget_s: float, log) -> dict:
    torch.manual_seed(args.seed)
    model = ex.build_model().to(device)
    optimizer, loss_fn = ex.build_optimizer(model), ex.build_loss()
    train_loader = ex.train_loader(args.data / "training_data", seed=args.seed)
    val_loader = ex.val_loader(args.data / "validation_data")
    n = len(train_loader.dataset)
    clock, points, epoch, samples = Clock(), [], 0, 0
    while clock.train_s < budget_s and (args.epochs is None or epoch < args.epochs):
        epoch += 1
        deadline = time.perf_counter() + (budget_s - clock.train_s)
        out = ex.train_steps(model, optimizer, loss_fn, train_loader, device, deadline=deadline)
        sync(device)
        clock.train_s += out["seconds"]
        samples += out["samples"]
        last = clock.train_s >= budget_s or (args.epochs is not None and epoch == args.epochs)
        if epoch % args.ex_val_interval == 0 or last:
            started, cpu_s = time.perf_counter(), clock.point()["cpu_s"]  # CPU up to here, as hpcseg's points
            dice = ex.validate(model, val_loader, device).tolist()
            point = clock.point(cpu_s=cpu_s, epoch=round(epoch - 1 + out["samples"] / n, 3), samples=samples,
                                mean_dice=round(nanmean(dice), 4), dice={k: round(v, 4) for k, v in named(dice).items()},
                                val_s=round(time.perf_counter() - started, 2), train_loss=round(out["loss_sum"] / out["steps"], 4))
            points.append(point)
            log(f"exercise  epoch {point['epoch']:7.2f}  train {point['train_s']:8.1f} s  mean Dice {point['mean_dice']:.4f}"
                f"  (validation {point['val_s']:.1f} s)")
    return {"name": "exercise", "settings": "exercise loop as written (improved recipe, batch 2, nn.Dropout 0.4, Adam 1e-3)",
            "budget_s": budget_s, "epochs_run": epoch, "samples": samples, "points": points,
            "total_wall_s": clock.point()["wall_s"], "train_s": round(clock.train_s, 2)}


def run_hpcseg(args, device, name: str, overrides: dict, budget_s: float, impl: str, log) -> dict:
    base = {"train.val_interval": 1, "train.early_stop": 0, "train.epochs": args.epochs or 1_000_000,
            "train.seed": args.seed}
    job = load_job(JOB).replace(**{**base, **overrides})
    clock, epochs = Clock(), []
    original = T.train_one_epoch

    def budgeted(*a, **k):
        expected = epochs[-1]["epoch_train_s"] if epochs else 0.0
        if epochs:
            epochs[-1]["wall_after_s"] = round(time.perf_counter() - clock.wall0, 2)
        if clock.train_s + expected > budget_s:
            raise BudgetSpent
        started = time.perf_counter()
        out = original(*a, **k)
        sync(device)
        seconds = time.perf_counter() - started
        clock.train_s += seconds
        epochs.append(clock.point(epoch=len(epochs) + 1, epoch_train_s=round(seconds, 2)))
        return out

    records: list[dict] = []
    run_dir = Path(tempfile.mkdtemp(prefix=f"hpcseg-ttd-{name}-"))
    T.train_one_epoch = budgeted
    try:
        if impl == "train":
            try:
                T.train(job, args.data / "training_data", args.data / "validation_data", run_dir / "run",
                        progress=False, log=lambda msg: log(f"hpcseg[{name}] {msg}"))
            except BudgetSpent:
                pass
            metrics = run_dir / "run" / "metrics.jsonl"
            records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        else:
            records = _loop(job, args, device, budgeted, epochs, clock)
    finally:
        T.train_one_epoch = original
        shutil.rmtree(run_dir, ignore_errors=True)
    if epochs and "wall_after_s" not in epochs[-1]:
        epochs[-1]["wall_after_s"] = round(time.perf_counter() - clock.wall0, 2)
    n = len(list((args.data / "training_data").glob("*_T1w.npy")))
    points = []
    for rec in records:
        if "val_mean_dice" not in rec or rec["epoch"] > len(epochs):
            continue
        e = epochs[rec["epoch"] - 1]
        points.append({"train_s": e["train_s"], "wall_s": e["wall_after_s"], "cpu_s": e["cpu_s"], "epoch": rec["epoch"],
                       "samples": rec["epoch"] * n, "mean_dice": round(rec["val_mean_dice"], 4),
                       "dice": {k: round(v, 4) for k, v in rec["val_dice"].items()},
                       "train_loss": round(rec["train_loss"], 4)})
        log(f"hpcseg[{name}] epoch {rec['epoch']:4d}  train {e['train_s']:8.1f} s  mean Dice {rec['val_mean_dice']:.4f}")
    settings = {k: v for k, v in job.to_dict()["train"].items() if k in ("batch_size", "crop", "precision", "val_interval", "threads")}
    settings.update({"overrides": overrides, "dropout": job.model.dropout, "lr_at_batch": scaled_lr(job.optim, job.train.batch_size),
        "lr_scaling": job.optim.lr_scaling, "base_batch_size": job.optim.base_batch_size})
    return {"name": f"hpcseg[{name}]", "impl": impl, "settings": settings, "budget_s": budget_s,
            "epochs_run": len(epochs), "points": points, "train_s": round(clock.train_s, 2),
            "total_wall_s": round(time.perf_counter() - clock.wall0, 2),
            "epoch_train_s": [e["epoch_train_s"] for e in epochs]}


def _loop(job, args, device, train_one_epoch, epochs, clock) -> list[dict]:
    """train() without checkpoints and TensorBoard: the same setup, train_one_epoch and validate."""
    from hpcseg.data import load_split
    from hpcseg.infer import shape_groups, stack
    from hpcseg.model import build_loss, build_model, build_optimizer

    train_split = load_split(args.data / "training_data", job.data.num_classes)
    val_split = load_split(args.data / "validation_data", job.data.num_classes)
    T.set_threads(job.train.threads)
    torch.manual_seed(job.train.seed)
    generator = torch.Generator(device=device).manual_seed(job.train.seed)
    model = build_model(job).to(device)
    optimizer = build_optimizer(job.optim, model, job.train.batch_size, device)
    loss_fn = build_loss(job.loss)
    images, labels, sizes = (t.to(device) for t in train_split.stacked())
    val_groups = [(stack(val_split.images, g, torch.float32, device), stack(val_split.labels, g, torch.uint8, device))
                  for g in shape_groups(val_split.images)]
    params, records = T.augment_params(job), []
    for epoch in range(1, job.train.epochs + 1):
        try:
            progress = T.new_epoch(images.shape[0], device, generator)
            train_one_epoch(model, optimizer, loss_fn, images, labels, sizes, job, params, generator, progress)
        except BudgetSpent:
            break
        record = {"epoch": epoch, "train_loss": progress["loss_sum"].item() / images.shape[0]}
        if epoch % job.train.val_interval == 0 or epoch == job.train.epochs:
            dice, _ = T.validate(model, val_groups, job)
            record["val_dice"], record["val_mean_dice"] = named(dice), nanmean(dice.tolist())
        records.append(record)
    return records


def summarise(exercise: dict | None, variants: list[dict]) -> dict:
    out = {}
    if exercise and exercise["points"]:
        target = max(p["mean_dice"] for p in exercise["points"])
        out["exercise_best_dice"] = target
        out["exercise_final_dice"] = exercise["points"][-1]["mean_dice"]
        out["exercise_train_s"] = exercise["train_s"]
        best = max(exercise["points"], key=lambda p: p["mean_dice"])
        out["exercise_best_at"] = {k: best[k] for k in ("train_s", "wall_s", "cpu_s", "epoch")}
        for v in variants:
            reach = next((p for p in v["points"] if p["mean_dice"] >= target), None)
            out[v["name"]] = {
                "best_dice": max((p["mean_dice"] for p in v["points"]), default=None),
                "final_dice": v["points"][-1]["mean_dice"] if v["points"] else None,
                "train_s": v["train_s"],
                "reaches_exercise_best_at_train_s": reach["train_s"] if reach else None,
                "reaches_exercise_best_at_wall_s": reach["wall_s"] if reach else None,
                "reaches_exercise_best_at_cpu_s": reach["cpu_s"] if reach else None,
                "reaches_within_budget": bool(reach and reach["train_s"] <= v["budget_s"]),
            }
    return out


def plot(result: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(8, 5))
    for loop in result["loops"]:
        pts = loop["points"]
        ax.plot([p["train_s"] / 60 for p in pts], [p["mean_dice"] for p in pts], "o-", label=loop["name"])
        ax.axvline(loop["budget_s"] / 60, color=ax.lines[-1].get_color(), ls=":", lw=1)
    if "exercise_best_dice" in result["summary"]:
        ax.axhline(result["summary"]["exercise_best_dice"], color="grey", ls="--", lw=1, label="exercise best")
    ax.set_xlabel("training minutes (validation excluded)")
    ax.set_ylabel("validation mean tissue Dice (hpcseg FolderDice)")
    ax.set_title(f"time to Dice on {result['machine']['gpu'] or result['machine']['cpu']} ({result['machine']['cores']} cores)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def main(argv=None) -> dict:
    args = parse_args(argv)
    args.data = Path(args.data or C.default_data())
    device = C.device(args.device)
    if device.type == "cpu" and args.device not in ("auto", "cpu"):
        raise SystemExit(f"--device {args.device}: not available")
    impl = args.hpcseg_impl
    if impl == "auto":
        try:
            importlib.import_module("torch.utils.tensorboard")
            impl = "train"
        except ImportError:
            impl = "loop"
    T.set_threads(0)
    info = C.machine()

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    variants = [parse_variant(v) for v in (args.hpcseg or [DEFAULT_VARIANT])]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    json_path, png_path = args.out.with_suffix(".json"), args.out.with_suffix(".png")
    loops, results, errors = [], [], []
    exercise = None
    result = {"benchmark": "time_to_dice", "date": C.now(), "command": C.command_line(), "machine": info,
              "device": str(device), "data": str(args.data), "epochs": args.epochs,
              "clock": "budget = training seconds only; validation/checkpoints excluded (wall_s includes them)",
              "loops": loops, "errors": errors, "summary": {}, "finished": False}

    def save(finished: bool = False) -> bool:  # after every loop, so a late failure keeps the earlier loops
        info["loadavg_end"] = C._loadavg()
        result.update(summary=summarise(exercise, results), finished=finished)
        json_path.write_text(json.dumps(result, indent=1) + "\n")
        return plot(result, png_path)

    if not args.skip_exercise:
        log(f"exercise loop: budget {args.minutes} min of training on {device}")
        exercise = run_exercise(args, device, args.minutes * 60, log)
        loops.append(exercise)
        save()
    for name, overrides in variants:
        log(f"hpcseg[{name}] ({impl}): budget {args.hpcseg_minutes} min, overrides {overrides}")
        try:
            results.append(run_hpcseg(args, device, name, overrides, args.hpcseg_minutes * 60, impl, log))
            loops.append(results[-1])
        except Exception as err:  # noqa: BLE001 - record it, keep the other loops' results
            log(f"hpcseg[{name}] failed: {type(err).__name__}: {err}")
            errors.append({"variant": name, "error": f"{type(err).__name__}: {err}"})
        save()
    plotted = save(finished=True)
    print(json.dumps(result["summary"], indent=1))
    if not args.no_append:
        s = result["summary"]
        lines = [f"- Device {device}; budgets: exercise {args.minutes} min, hpcseg {args.hpcseg_minutes} min of training "
                 f"each ({'exactly ' + str(args.epochs) + ' epochs each, ' if args.epochs else ''}validation excluded); "
                 f"load average at end {info['loadavg_end']}",
                 f"- Output: `{json_path.relative_to(C.REPO) if json_path.is_relative_to(C.REPO) else json_path}`"
                 + (f", plot `{png_path.relative_to(C.REPO) if png_path.is_relative_to(C.REPO) else png_path}`" if plotted else ""),
                 "", "| loop | settings | epochs | training s | best mean Dice | final mean Dice | reaches exercise best at training s |",
                 "|---|---|---|---|---|---|---|"]
        for loop in loops:
            pts = loop["points"]
            best = max((p["mean_dice"] for p in pts), default=None)
            reach = s.get(loop["name"], {}).get("reaches_exercise_best_at_train_s", "-") if loop is not exercise else "-"
            settings = loop["settings"] if isinstance(loop["settings"], str) else json.dumps(loop["settings"])
            lines.append(f"| {loop['name']} | {settings} | {loop['epochs_run']} | {loop['train_s']} | {best} | "
                         f"{pts[-1]['mean_dice'] if pts else None} | {reach} |")
        C.append_results("time_to_dice", info, result["command"], lines, result, args.results)
    return result


if __name__ == "__main__":
    main()
