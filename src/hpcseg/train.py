"""`hpcseg train`: the training loop, top to bottom.

Both splits are read and checked once, held in memory as tensors on the training device, and each batch is
cropped and augmented there in one go. The loop keeps the losses on the device and reads them once per epoch.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from . import __version__, volumes
from .atomic import append_jsonl, atomic_write_text, remove_stale_temporaries, writing
from .augment import AugmentParams, augment_batch, crop_batch
from .batches import (
    MAPPED, HostBatches, Placement, held_bytes_estimate, host_room, place, rank_folder, read_spill, release,
    slices_home, split_bytes, training_tensors, validation_groups)
from .checkpoint import CheckpointError, load_checkpoint, load_weights, save_checkpoint
from .data import Spill, join_splits, load_splits
from .dataparallel import add_rank_states, rank_batch, restore_rank_states, seed_ranks, steps_per_epoch, wrap_model
from .device import pick_device, set_threads
from .distributed import Group, Ranks, process_group, ranks_from_env, stop_every_steps
from .errors import UserError
from .folds import fold_of
from .infer import autocast, predict_labels
from .jobfile import Job, JobError, job_from_dict
from .metrics import FolderDice, named, nanmean
from .model import MIN_SIZE, build_loss, build_model, build_optimizer
from .outdir import blocked
from .phases import Phases
from .precision import choose_precision, make_scaler, restore_scaler, scaler_state
from .preempt import DeferredSignal, Preempted
from .progress import EpochProgress
from .runfiles import BEST, LAST, RECORD, RunDirError, recorded_data  # noqa: F401 - recorded_data: also from here

#: What training writes into a run folder, atomically (a kill during a write leaves a temporary beside it).
WRITTEN = (LAST, BEST, "job.toml", "progress.json", "metrics.jsonl", RECORD)


class DivergedError(UserError):
    """The training loss stopped being finite: going on would spend the job's hours on NaN weights."""


@dataclass
class LoopState:
    """What early stopping and best-checkpoint selection remember between epochs (saved in `last`)."""

    epoch: int = 0
    best_dice: float = -1.0
    best_epoch: int = 0
    stale_rounds: int = 0
    stopped_early: bool = False


@dataclass
class Run:
    """One attempt at a run, fixed once it starts: the job, its folder, the process group, how it reports, and what
    train.json records of it."""

    job: Job
    run_dir: Path
    group: Group
    log: Callable[..., None] = print
    progress: bool | None = None
    warning: DeferredSignal | None = None  # the scheduler's signal: stop after a step, save `last`, requeue
    phases: Phases = field(default_factory=Phases)
    resumed: bool = False  # this attempt continues from `last`
    train_dirs: list[Path] = field(default_factory=list)  # the training folders: several for a cross-validation fold
    #: train.json: the data folders, the device, the precision, the data's normalisation rule; at the end, phases
    record: dict = field(default_factory=dict)
    precision: str = field(init=False)  # job.toml keeps "auto"; train.json the choice

    def __post_init__(self) -> None:
        self.precision = choose_precision(self.job.train.precision, self.group.device)

    @property
    def leader(self) -> bool:
        return self.group.ranks.leader


@dataclass
class Learner:
    """What training changes and `last` saves: the weights, the optimiser and fp16's scaler, the random streams (the
    epochs' order; this rank's crops, augmentation and dropout), the loop's state and an epoch stopped part-way."""

    model: torch.nn.Module  # what is saved; `step_model` is what steps (DDP with several ranks, compiled if asked)
    optimizer: torch.optim.Optimizer
    loss_fn: Callable
    scaler: torch.amp.GradScaler | None
    generator: torch.Generator
    augment_rng: torch.Generator
    augment: AugmentParams | None
    step_model: torch.nn.Module | None = None
    state: LoopState = field(default_factory=LoopState)
    partial: dict | None = None  # new_epoch's dict of the epoch under way


@dataclass
class Placed:
    """The splits where the loop reads them (batches.place): the training tensors and the validation groups."""

    placement: Placement
    images: torch.Tensor
    labels: torch.Tensor
    sizes: torch.Tensor
    val_groups: list
    val_slices: int

    @property
    def n(self) -> int:
        return self.images.shape[0]


@dataclass
class Epochs:
    """What the epoch loop keeps for itself: where it reports, its last epoch, what stops it, when `last` was saved."""

    writer: object  # TensorBoard's SummaryWriter on rank 0
    bar: object  # EpochProgress on rank 0
    last_epoch: int
    stop: Callable[[], bool] | None  # whether the scheduler's warning reached any rank
    saved_at: float  # time.monotonic() of the last save of `last`, for train.checkpoint_every_s
    stop_every: int = 1  # steps between the ranks' agreements on the warning (distributed.stop_every_steps)


class _Silent:
    """TensorBoard's writer and the progress bar on ranks other than 0: they write nothing."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def augment_params(job: Job) -> AugmentParams | None:
    a = job.augment
    if not a.enabled:
        return None
    return AugmentParams.from_config(a)


def folder_list(train_dir) -> list[Path]:
    """The training folders: one, or several (the other folds of a cross-validation fold)."""
    return [Path(d) for d in train_dir] if isinstance(train_dir, (list, tuple)) else [Path(train_dir)]


def train(job: Job, train_dir: Path | list[Path], val_dir: Path, run_dir: Path, *, resume: bool = False,
          progress: bool | None = None, log=print, warning: DeferredSignal | None = None) -> dict:
    """Train `job` on the two folders into `run_dir`; with `resume`, continue from `run_dir/checkpoints/last.pt`.

    With `warning` (a scheduler's signal), the loop stops after the step in which the signal came, saves `last`
    mid-epoch and raises `Preempted`; resuming continues that epoch exactly where it stopped. A signal during an
    epoch's records and saves waits for them: the loop stops once `last` holds the epoch.

    Started as several processes (torchrun's or submitit's environment: see distributed.py), each rank trains its
    share of every batch of one DistributedDataParallel model, and rank 0 alone logs and writes the run folder.
    """
    run_dir = Path(run_dir)
    phases = Phases()
    ranks = ranks_from_env()
    if not ranks.leader:
        log, progress = (lambda *args, **kwargs: None), False
    # the checkpoint to resume from, read once; rank 0 checks the folder (a job's rank 0 may be clearing it)
    last = _check_run_dir(job, run_dir, resume) if ranks.leader else _resume_point(run_dir, resume)
    # both splits checked before anything is written, every bad file of either named at once
    with phases("data"):  # slices beyond the host memory for data go to files as they are read
        # .slices/ on the job's local disk where it fits (twice: what loading spills, and training's stacked copy)
        home = slices_home(run_dir, 2 * held_bytes_estimate([*folder_list(train_dir), Path(val_dir)]))
        if home != run_dir:  # what a killed attempt left in the run folder
            release(Placement("mapped", "", rank_folder(run_dir, ranks.rank)))
        spill = Spill(read_spill(home, ranks.rank), host_room(job.data.host_memory_gb, ranks.local_world))
        *train_splits, val_split = load_splits([*folder_list(train_dir), Path(val_dir)], job.data.num_classes, spill)
        train_split = join_splits(train_splits)  # a cross-validation fold: the other folds' slices as one split
    if resume and last is None:
        log(f"{run_dir}: the run stopped before its first {LAST}: starting it over from epoch 1")
    # every rank has checked the run folder and the data when the group forms, before rank 0 writes anything
    try:
        with process_group(ranks, pick_device(ranks)) as group, \
                writing(run_dir, "writing the run; once there is space, continue it with --resume"):
            run = Run(job, run_dir, group, log, progress, warning, phases, resumed=last is not None,
                      train_dirs=[split.folder for split in train_splits])
            return _train(run, train_split, val_split, last, spill.spilled, home)
    finally:  # training moved the slices to its own copy (or stopped): what loading spilled goes
        shutil.rmtree(spill.folder, ignore_errors=True)
        if home != run_dir:  # the folder in $TMPDIR, once no rank's files are left in it
            for folder in (home / MAPPED, home):
                with contextlib.suppress(OSError):
                    folder.rmdir()


def _train(run: Run, train_split, val_split, last: dict | None, spilled: bool = False,
           slices_at: Path | None = None) -> dict:
    """One attempt, step by step: set up the run, restore `last`, place the data, the epoch loop, finish."""
    setup_started = time.perf_counter()
    _tidy_run_dir(run)
    learner = _set_up(run)
    if last is not None:
        _restore(run, learner, last)
    _write_record(run, train_split, val_split)
    learner.step_model = maybe_compile(wrap_model(learner.model, run.group), run.job, run.log)  # DDP: several ranks
    data = _place(run, train_split, val_split, spilled, slices_at or run.run_dir)
    run.phases.seconds["setup"] += time.perf_counter() - setup_started
    _epochs(run, learner, data)
    return _finish(run, learner)


def _tidy_run_dir(run: Run) -> None:
    """Rank 0 removes what earlier attempts left: a kill's half-saved temporaries, and all that an attempt which
    saved no `last` wrote (this one starts over)."""
    if run.leader:
        remove_stale_temporaries(*(run.run_dir / name for name in WRITTEN))
    if run.leader and not run.resumed:
        _clear_attempt(run.run_dir)


def _set_up(run: Run) -> Learner:
    """The model, its optimiser, loss and fp16's scaler, and the random streams: the same start on every rank."""
    job, device, ranks = run.job, run.group.device, run.group.ranks
    scaler = make_scaler(run.precision, device)
    set_threads(job.train.threads, ranks.local_world)
    torch.manual_seed(job.train.seed)  # the same initial weights on every rank
    generator = torch.Generator(device=device).manual_seed(job.train.seed)  # the epochs' order: the same on all
    model = build_model(job).to(device)
    augment_rng = seed_ranks(job.train.seed, ranks, generator)  # crops and augmentation (and dropout): per rank
    if job.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    # the learning-rate rule holds for the global batch, all ranks' batches together
    optimizer = build_optimizer(job.optim, model, job.train.batch_size * ranks.world, device)
    return Learner(model, optimizer, build_loss(job.loss), scaler, generator, augment_rng, augment_params(job))


def _restore(run: Run, learner: Learner, last: dict) -> None:
    """Continue from `last`: weights, optimiser, scaler, every random state, the loop's state and a part-done epoch;
    metrics.jsonl loses the epochs after it (an attempt killed mid-epoch wrote them, this one redoes them)."""
    path, group = run.run_dir / LAST, run.group
    learner.state, learner.partial = _load_state(last, learner.model, learner.optimizer, learner.generator,
                                                 group.device, path)
    restore_scaler(learner.scaler, (last.get("amp") or {}).get("scaler"))
    restore_rank_states(last, group, learner.augment_rng, path, run.log)
    if learner.partial is not None and not run.leader:  # rank 0's part-done epoch holds the loss summed over ranks
        learner.partial["loss_sum"] = torch.zeros_like(learner.partial["loss_sum"])
    if run.leader:
        _truncate_metrics(run.run_dir / "metrics.jsonl", learner.state.epoch)


def _write_record(run: Run, train_split, val_split) -> None:
    """train.json (the data folders, so that `--resume` needs no `--data`) and job.toml, written by rank 0."""
    device = run.group.device
    run.record = {"train_dir": str(train_split.folder.absolute()), "val_dir": str(val_split.folder.absolute()),
                  "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                  "precision": run.precision,
                  # the scans' intensity rule of data from `hpcseg prepare`: predict and test apply it to new scans
                  "normalisation": volumes.prepared_rule(train_split.folder.parent)}
    if len(run.train_dirs) > 1:  # a cross-validation fold: the other folds train, and the fold is recorded
        run.record["train_dirs"] = [str(Path(d).absolute()) for d in run.train_dirs]
    fold = fold_of(val_split.folder)
    if fold is not None:
        run.record["fold"] = fold
    if run.leader:
        run.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run.run_dir / "job.toml", run.job.to_toml(), "job file")
        atomic_write_text(run.run_dir / RECORD, json.dumps(run.record, indent=2) + "\n", "data record")


def _place(run: Run, train_split, val_split, spilled: bool, slices_at: Path) -> Placed:
    """The splits on the device where they fit, else in host memory (or memory-mapped files), batches copied over."""
    job, device, ranks = run.job, run.group.device, run.group.ranks
    placement = place(split_bytes(train_split, val_split, (MIN_SIZE, MIN_SIZE)), device, job.data.device_memory_gb,
                      job.data.host_memory_gb, slices_at, ranks.rank, ranks.local_world, spilled)
    run.log(placement.line)
    images, labels, sizes = training_tensors(train_split, placement, device, (MIN_SIZE, MIN_SIZE))
    val_groups = validation_groups(val_split, placement, device, job.infer.batch_size * job.infer.sw_batch_size)
    return Placed(placement, images, labels, sizes, val_groups, len(val_split.ids))


def _epochs(run: Run, learner: Learner, data: Placed) -> None:
    """The epochs from the one after `last` to the job's last, or to an early stop. However the loop ends (Ctrl-C, a
    full disk, a divergence, the scheduler's warning), the progress bar's line ends, TensorBoard is flushed and the
    data's mapped files go."""
    loop = _start_epochs(run, learner, data)
    try:
        # the warning only stops the loop where `last` holds the state: after a step, or after an epoch's saves
        with run.warning.deferred() if run.warning else contextlib.nullcontext():
            for epoch in range(learner.state.epoch + 1, loop.last_epoch + 1):
                _epoch(run, learner, data, loop, epoch)
                if learner.state.stopped_early:
                    break
    except BaseException:
        with contextlib.suppress(Exception):  # a full disk fails this too; the error above is the one to show
            loop.writer.close()
        loop.bar.close()
        release(data.placement)
        raise
    with run.phases("tensorboard"):
        loop.writer.close()
    loop.bar.close()
    release(data.placement)


def _start_epochs(run: Run, learner: Learner, data: Placed) -> Epochs:
    """Rank 0's TensorBoard writer and progress bar, the last epoch to train, and the log line that says what is to
    do."""
    job, state, group = run.job, learner.state, run.group
    with run.phases("tensorboard"):
        from torch.utils.tensorboard import SummaryWriter  # imported late: it is slow to import

        writer = SummaryWriter(str(run.run_dir / "tb"), purge_step=state.epoch + 1 if run.resumed else None) \
            if run.leader else _Silent()
    bar = EpochProgress(job.train.epochs, state.epoch, enabled=run.progress) if run.leader else _Silent()
    last_epoch = state.epoch if state.stopped_early else job.train.epochs  # a resumed early stop stays stopped
    to_go = (f"epochs {state.epoch + 1}..{last_epoch}" if state.epoch < last_epoch else
             f"nothing to do: stopped early at epoch {state.epoch}" if state.stopped_early else
             f"nothing to do: {state.epoch} of {job.train.epochs} epochs done (raise train.epochs to go on)")
    per_rank = f" per rank x {group.ranks.world} ranks" if group.active else ""
    run.log(f"training {job.name}: {data.n} training / {data.val_slices} validation slices on {group.device}, "
            f"{to_go}, batch {job.train.batch_size}{per_rank}, precision {run.precision}"
            + (" with a gradient scaler" if learner.scaler is not None else ""))
    warning = run.warning
    stop = (lambda: group.any(warning.requested())) if warning else None  # all ranks stop at the same step
    stop_every = stop_every_steps() if group.active else 1  # a collective: agreed every K steps, not each one
    return Epochs(writer, bar, last_epoch, stop, time.monotonic(), stop_every)


def _epoch(run: Run, learner: Learner, data: Placed, loop: Epochs, epoch: int) -> None:
    """One epoch: its steps (on the scheduler's warning: `last` saved mid-epoch, `Preempted`), validation and `best`
    when due, the epoch's records, `last` when due, and the warning's stop after the epoch."""
    job, group, state, phases = run.job, run.group, learner.state, run.phases
    started = time.perf_counter()
    partial = learner.partial = learner.partial or new_epoch(data.n, group.device, learner.generator)
    with phases("train"):
        stopped = train_one_epoch(learner.step_model, learner.optimizer, learner.loss_fn, data.images, data.labels,
                                  data.sizes, job, learner.augment, learner.augment_rng, partial, stop=loop.stop,
                                  scaler=learner.scaler, ranks=group.ranks, resident=data.placement.resident,
                                  stop_every=loop.stop_every)
        loss_sum = group.sum(partial["loss_sum"]).item()  # the one host synchronisation of the epoch
    if stopped:  # the scheduler's warning: save the epoch so far, let the caller requeue
        _save_last(run, learner, state.epoch, partial)
        group.wait_for_leader()  # no rank ends before `last` is saved (a launcher would stop rank 0)
        run.log(f"warning signal: saved epoch {epoch} at step {partial['step']}, stopping to be requeued")
        raise Preempted(f"stopped in epoch {epoch} after step {partial['step']}")
    learner.partial = None
    train_loss = loss_sum / data.n
    if not math.isfinite(train_loss):  # stop before this epoch's weights reach a checkpoint or metrics
        raise DivergedError(f"{run.run_dir}: training diverged in epoch {epoch} (training loss {train_loss}); "
                            f"{LAST} still holds epoch {state.epoch}: lower optim.lr or set "
                            f"train.precision = \"fp32\"")
    train_seconds = time.perf_counter() - started
    record = {"epoch": epoch, "train_loss": train_loss, "lr": learner.optimizer.param_groups[0]["lr"],
              "samples_per_s": data.n / train_seconds}
    if epoch % job.train.val_interval == 0 or epoch == job.train.epochs:
        _validate(run, learner, data, loop, record)

    state.epoch = epoch
    record["seconds"] = time.perf_counter() - started
    # the epoch's line first, its checkpoint last: a kill in between leaves a line that resume drops
    if run.leader:
        with phases("records"):
            _append_jsonl(run.run_dir / "metrics.jsonl", record)
            _write_progress(run.run_dir, job, state, record["seconds"], finished=False)
    # by default every epoch; a GPU epoch (and its validation) can take less than writing ~100 MB of weights and
    # Adam state, so a job may save by the clock instead: a resume replays the epochs since (validation and `best`
    # included) exactly; the warning signal still saves, mid-epoch, above; the ranks agree, as the save gathers
    # their random states
    group.wait_for_leader()  # rank 0's writes above (best, records) stay out of the collective's window
    saving = group.any(epoch == loop.last_epoch or state.stopped_early
                       or time.monotonic() - loop.saved_at >= job.train.checkpoint_every_s)
    if saving:
        with phases("checkpoint"):
            _save_last(run, learner, epoch)
        loop.saved_at = time.monotonic()
    with phases("tensorboard"):
        loop.writer.add_scalar("loss/train", train_loss, epoch)
        loop.writer.add_scalar("lr", record["lr"], epoch)
    loop.bar.update(record, state)
    group.wait_for_leader()  # and `last` and TensorBoard's, out of the next collective's (the warning's or the next
    # epoch's first step)
    if loop.stop is not None and loop.stop():  # the warning came after the epoch's last step: save it, requeue
        if not saving:
            _save_last(run, learner, epoch)
        group.wait_for_leader()
        run.log(f"warning signal: saved epoch {epoch}, stopping to be requeued")
        raise Preempted(f"stopped after epoch {epoch}")
    if state.stopped_early:
        run.log(f"early stop at epoch {epoch}: no better validation Dice in {state.stale_rounds} rounds")


def _validate(run: Run, learner: Learner, data: Placed, loop: Epochs, record: dict) -> None:
    """The validation Dice into the epoch's `record`; a better mean is saved as `best` (by rank 0), and early
    stopping counts the rounds without one."""
    job, state, epoch = run.job, learner.state, record["epoch"]
    with run.phases("validate"):
        dice, example = validate(learner.model, data.val_groups, job, run.group)
        record["val_dice"], record["val_mean_dice"] = named(dice), nanmean(dice.tolist())
    improved = record["val_mean_dice"] > state.best_dice
    state.stale_rounds = 0 if improved else state.stale_rounds + 1
    if improved:
        state.best_dice, state.best_epoch = record["val_mean_dice"], epoch
        if run.leader:
            with run.phases("checkpoint"):
                save_checkpoint({**_checkpoint(job, learner.model, None, None, state, epoch),
                                 "normalisation": run.record["normalisation"]}, run.run_dir / BEST)
    state.stopped_early = bool(job.train.early_stop) and state.stale_rounds >= job.train.early_stop
    with run.phases("tensorboard"):
        _log_validation(loop.writer, record, example, epoch, job)


def _save_last(run: Run, learner: Learner, epoch: int, partial: dict | None = None) -> None:
    """`last`, written by rank 0; with several ranks a collective (it gathers their random states)."""
    ckpt = _checkpoint(run.job, learner.model, learner.optimizer, learner.generator, learner.state, epoch, partial,
                       scaler=learner.scaler)
    add_rank_states(ckpt, run.group, learner.augment_rng)
    if run.leader:
        save_checkpoint(ckpt, run.run_dir / LAST)


def _finish(run: Run, learner: Learner) -> dict:
    """progress.json marked finished, this attempt's wall time by phase in train.json, and the run's summary."""
    state, job = learner.state, run.job
    if run.leader:
        _write_progress(run.run_dir, job, state, None, finished=True)
        # this attempt's wall time by phase, for the user and the benchmarks
        run.record["phases_s"] = run.phases.summary()
        atomic_write_text(run.run_dir / RECORD, json.dumps(run.record, indent=2) + "\n", "data record")
        from .hparams import write_hparams  # TensorBoard's HPARAMS tab: the run's settings and results

        write_hparams(run.run_dir)
    run.log(run.phases.line())
    summary = {"epoch": state.epoch, "epochs": job.train.epochs, "best_dice": state.best_dice,
               "best_epoch": state.best_epoch, "stopped_early": state.stopped_early}
    run.log(f"done: {state.epoch} epoch{'s' if state.epoch != 1 else ''}, best validation mean Dice "
            f"{state.best_dice:.4f} at epoch {state.best_epoch}")
    return summary


def new_epoch(n: int, device: torch.device, generator: torch.Generator) -> dict:
    """An epoch's progress: a random order of the n slices, the steps done, the summed loss (on the device)."""
    return {"order": torch.randperm(n, device=device, generator=generator), "step": 0,
            "loss_sum": torch.zeros((), device=device)}


def train_one_epoch(model, optimizer, loss_fn, images, labels, sizes, job: Job, params, generator, epoch: dict,
                    stop=None, scaler=None, ranks: Ranks = Ranks(), resident: bool = True, stop_every: int = 1) -> bool:
    """One pass over the training tensors in the order `epoch["order"]`, from step `epoch["step"]`: resident on the
    device, or (not `resident`) on the host, each batch's slices copied over as batches.HostBatches does.

    Adds each step's loss to `epoch["loss_sum"]` (on the device: no host synchronisation) and advances
    `epoch["step"]`. Returns True if `stop()` asked to stop before the epoch's end; it is asked after every
    `stop_every`-th step of the epoch (the same steps on every rank: with several ranks each ask is a collective and
    a host synchronisation). With `scaler` (fp16), the loss
    is scaled before backward and a step whose gradients overflowed is skipped, as torch's GradScaler does. With
    several `ranks`, a step is one global batch and this rank trains its part of it (dataparallel.rank_batch).
    """
    model.train()
    n, batch = images.shape[0], job.train.batch_size
    order, steps = epoch["order"], steps_per_epoch(n, batch, ranks.world)
    host = None if resident else HostBatches((images, labels, sizes), order,
                                             lambda order, step: rank_batch(order, step, batch, ranks)[0], steps)
    while epoch["step"] < steps:
        step = epoch["step"]
        index, counted = rank_batch(order, step, batch, ranks)
        x, y = crop_batch(*(host(step) if host else (images, labels, sizes, index)), tuple(job.train.crop), generator)
        if params is not None:
            x, y = augment_batch(x, y, params, generator)
        if job.train.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(x.device, job.train.precision):
            logits = model(x)
        loss = loss_fn(logits.float(), y.long())
        optimizer.zero_grad(set_to_none=True)
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        epoch["loss_sum"] = epoch["loss_sum"] + loss.detach() * counted
        epoch["step"] = step + 1
        if stop is not None and epoch["step"] < steps and epoch["step"] % stop_every == 0 and stop():
            return True
    return False


@torch.no_grad()
def validate(model, val_groups, job: Job, group: Group | None = None) -> tuple[torch.Tensor, tuple]:
    """Dice of each tissue over all validation pixels, and the first slice's (image, label, prediction). With
    several ranks each predicts every N-th slice and their counts are summed: each slice is predicted once."""
    device = next(model.parameters()).device
    folder_dice = FolderDice(job.data.num_classes, device=device)
    example = None
    sharded = group is not None and group.active
    for images, labels in val_groups:
        if sharded:
            share = slice(group.ranks.rank, None, group.ranks.world)
            images, labels = images[share], labels[share]
            if images.shape[0] == 0:
                continue
        # groups kept in host memory come over one at a time (a no-op for resident ones)
        images, labels = images.to(device), labels.to(device)
        pred = predict_labels(model, images, job.infer, job.train.precision)
        folder_dice.update(pred, labels)
        if example is None:
            example = (images[0], labels[0], pred[0])
    if sharded:
        folder_dice.counts = group.sum(folder_dice.counts)
    return folder_dice.dice(), example


def _log_validation(writer, record: dict, example: tuple, epoch: int, job: Job) -> None:
    writer.add_scalar("dice/mean", record["val_mean_dice"], epoch)
    for tissue, value in record["val_dice"].items():
        writer.add_scalar(f"dice/{tissue}", value, epoch)
    rounds = epoch // job.train.val_interval
    if job.train.images_every and rounds % job.train.images_every == 0:
        image, label, pred = example
        scale = float(job.data.num_classes - 1)
        span = (image.max() - image.min()).clamp(min=1e-6)
        writer.add_image("val/input", ((image - image.min()) / span).float().cpu(), epoch)
        writer.add_image("val/label", (label.float() / scale).cpu(), epoch)
        writer.add_image("val/prediction", (pred.float() / scale).cpu(), epoch)


def _checkpoint(job: Job, model, optimizer, generator, state: LoopState, epoch: int, partial: dict | None = None,
                scaler=None) -> dict:
    """`best` holds the weights and what they scored; `last` also the optimiser, every random state, fp16's
    gradient scaler, and `partial` an epoch stopped part-way (its order, steps done and loss so far)."""
    ckpt = {"model": model.state_dict(), "job": job.to_dict(), "epoch": epoch, "loop": asdict(state),
            "hpcseg_version": __version__}
    if partial is not None:
        ckpt["partial"] = dict(partial)
    if optimizer is not None:
        ckpt["optimizer"] = optimizer.state_dict()
        ckpt["rng"] = {"torch": torch.get_rng_state(), "generator": generator.get_state()}
        if scaler is not None:  # plain floats and ints: the scale and its growth count, so resume stays exact
            ckpt["amp"] = {"precision": "fp16", "scaler": scaler_state(scaler)}
        if torch.cuda.is_available():
            ckpt["rng"]["cuda"] = torch.cuda.get_rng_state()
    return ckpt


def _load_state(ckpt: dict, model, optimizer, generator, device, path: Path) -> tuple[LoopState, dict | None]:
    load_weights(model, ckpt, path)
    try:
        optimizer.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["rng"]["torch"].cpu())
        generator.set_state(ckpt["rng"]["generator"].cpu())
        if "cuda" in ckpt["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"].cpu())
        partial = ckpt.get("partial")
        if partial is not None:
            partial = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in partial.items()}
        return LoopState(**ckpt["loop"]), partial
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as err:  # a damaged or foreign `last`
        detail = " ".join(str(err).split())[:200]
        raise CheckpointError(f"{path}: cannot resume from it ({type(err).__name__}: {detail})") from None


def _check_run_dir(job: Job, run_dir: Path, resume: bool) -> dict | None:
    """Refuse to train over an existing run, or to resume one with a different job (only epochs may grow).
    Returns the `last` checkpoint when resuming."""
    problem = blocked(run_dir)
    if problem:
        raise RunDirError(problem)
    if not resume:  # a folder prepared by `hpcseg submit` (job.toml, run.json) is fine; one that trained is not
        if (run_dir / LAST).exists() or (run_dir / "metrics.jsonl").exists():
            raise RunDirError(f"{run_dir}: already holds a run; pass --resume to continue it, or choose another --out")
        return None
    if not (run_dir / LAST).exists():
        if _started(run_dir):  # a first attempt killed before its first checkpoint: `train` starts it over
            return None
        raise RunDirError(f"{run_dir / LAST}: nothing to resume from")
    ckpt = load_checkpoint(run_dir / LAST, resume=True)
    ckpt_job = job_from_dict(ckpt["job"], source=str(run_dir / LAST))
    # where the data lives changes nothing that is trained: a resumed run may land on a GPU of another size
    free = {"train.epochs": job.train.epochs, "data.device_memory_gb": job.data.device_memory_gb,
            "data.host_memory_gb": job.data.host_memory_gb}
    if ckpt_job.replace(**free) != job:
        raise JobError(f"{run_dir}: the job differs from the run's job.toml (only train.epochs and the data memory "
                       f"caps may change on resume)")
    return ckpt


def _resume_point(run_dir: Path, resume: bool) -> dict | None:
    """`last` for a rank other than 0, which leaves checking the run folder to rank 0."""
    return load_checkpoint(run_dir / LAST, resume=True) if resume and (run_dir / LAST).exists() else None


def _started(run_dir: Path) -> bool:
    """Whether training started in `run_dir` and has not finished (its `last` may not be saved yet)."""
    if not any((run_dir / name).exists() for name in (RECORD, "metrics.jsonl", "progress.json")):
        return False
    try:  # a finished run whose `last` is gone (deleted to save space) is not trained again from scratch
        return json.loads((run_dir / "progress.json").read_text()).get("finished") is not True
    except (OSError, ValueError, AttributeError):
        return True


def _clear_attempt(run_dir: Path) -> None:
    """Remove what an attempt that saved no `last` wrote (its metrics, progress, TensorBoard events, `best`), so that
    a run started over does not mix with it."""
    for name in ("metrics.jsonl", "progress.json", BEST):
        (run_dir / name).unlink(missing_ok=True)
    shutil.rmtree(run_dir / "tb", ignore_errors=True)


def _truncate_metrics(path: Path, last_epoch: int) -> None:
    """Drop lines of epochs after the checkpoint: an attempt killed mid-epoch wrote them, the resumed one redoes them.
    A line that is no epoch record goes too: an attempt killed while appending leaves half a line."""
    if not path.exists():
        return
    kept = [line for line in path.read_text(errors="replace").splitlines()
            if (epoch := _epoch_of(line)) is not None and epoch <= last_epoch]
    atomic_write_text(path, "".join(line + "\n" for line in kept))


def _epoch_of(line: str) -> int | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    epoch = record.get("epoch") if isinstance(record, dict) else None
    return epoch if isinstance(epoch, int) and not isinstance(epoch, bool) else None


def _append_jsonl(path: Path, record: dict) -> None:
    # a full disk may leave half a line, which resume drops (see _truncate_metrics)
    with writing(path, f"appending epoch {record['epoch']}'s line; resume with --resume once there is space"):
        append_jsonl(path, record)


def _write_progress(run_dir: Path, job: Job, state: LoopState, seconds: float | None, finished: bool) -> None:
    path = run_dir / "progress.json"
    try:
        previous = json.loads(path.read_text())
    except (OSError, ValueError):  # none yet, or damaged: it only smooths the estimate, and is rewritten here
        previous = {}
    per_epoch = previous.get("seconds_per_epoch") if isinstance(previous, dict) else None
    if not isinstance(per_epoch, (int, float)):
        per_epoch = None
    if seconds is not None:  # smoothed, so one validation epoch does not swing the estimate
        per_epoch = seconds if per_epoch is None else 0.8 * per_epoch + 0.2 * seconds
    progress = {"epoch": state.epoch, "epochs": job.train.epochs,
                "best_dice": state.best_dice if state.best_epoch else None, "best_epoch": state.best_epoch or None,
                "seconds_per_epoch": per_epoch, "updated": time.time(),
                "finished": finished, "stopped_early": state.stopped_early}
    atomic_write_text(path, json.dumps(progress) + "\n", "progress file")


def maybe_compile(model, job: Job, log):
    """`torch.compile` the model if the job asks; where compiling or its first backward fails, fall back."""
    if not job.train.compile:
        return model
    device = next(model.parameters()).device
    try:
        # static shapes: training sees one batch shape (and a smaller last batch), each compiled for itself; with
        # dynamic shapes the second one would recompile the model for any shape, slower for the first one too
        compiled = torch.compile(model, mode=job.train.compile_mode, dynamic=False)
        probe = torch.zeros(job.train.batch_size, 1, *job.train.crop, device=device)  # the training shape, once
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # the probe's dropout
            compiled(probe).sum().backward()
        model.zero_grad(set_to_none=True)
        return compiled
    except Exception as err:  # noqa: BLE001 - any compiler failure means: run eagerly
        first = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        log(f"torch.compile failed here, training without it ({type(err).__name__}: {first})")
        return model
