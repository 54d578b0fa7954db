"""Where the training and validation slices live during training, and how each batch reaches the model.

Splits that fit stay resident on the training device (the fast path: batches are cropped there, no copies). Splits
that do not stay in host memory, or in memory-mapped .npy files when they exceed the host's memory too (under the
job's local $TMPDIR where they fit, else in the run folder: `slices_home`); each batch's whole slices are gathered
there, staged in pinned memory and copied asynchronously (non_blocking, on a side stream, the next batch while the
model trains on this one), then cropped and augmented on the device. The crop draws the same random numbers from the
same generator, so both paths train the same weights.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import memlimit
from .data import Split

GB = 1e9
#: Without a job's cap, splits stay on the device while they take at most this share of its free memory (the rest is
#: the model's, its activations' and the optimiser's), and in host memory while they take at most this share of it.
DEVICE_SHARE, HOST_SHARE = 0.5, 0.5
#: The run folder's memory-mapped splits, removed when training ends (and when it starts: a killed attempt's).
MAPPED = ".slices"


@dataclass
class Placement:
    """Where the splits live: `where` is "device", "host" or "mapped"; `line` says so once in the training log."""

    where: str
    line: str
    folder: Path | None = None  # this rank's memory-mapped files (used where == "mapped"; a killed attempt's go)

    @property
    def resident(self) -> bool:
        return self.where == "device"


def split_bytes(train_split: Split, val_split: Split, min_size: tuple[int, int]) -> int:
    """Bytes of both splits as training holds them: stacked and padded images (float32) and labels (uint8)."""
    n, _, h, w = train_split.stacked_shape(min_size)
    return n * h * w * 5 + sum(image.size * 5 for image in val_split.images)


def host_memory_available() -> int:
    """Bytes this process may still use: the host's available memory, or less under the job's memory limit (what it
    asked for, its cgroup v1/v2, its rlimits: memlimit.py)."""
    try:
        available = next(int(line.split()[1]) * 1024 for line in open("/proc/meminfo")
                         if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError, IndexError):
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    job_room = memlimit.room()
    return available if job_room is None else min(available, job_room)


def host_room(host_cap_gb: float, local_ranks: int = 1) -> float:
    """Bytes of host memory the splits may take: `host_cap_gb` (0: half the memory available, shared by the node's
    `local_ranks` processes, each holding its copy)."""
    return host_cap_gb * GB if host_cap_gb else HOST_SHARE * host_memory_available() / local_ranks


def slices_home(run_dir: Path, need_bytes: float, environ=None) -> Path:
    """The folder that holds .slices/: the job's own $TMPDIR (LSF's job-specific TMPDIR, a node-local disk) where
    `need_bytes` fit in 90% of its free space, else the run folder. The mapped slices are written once and read by
    page faults every batch, again after each requeue: on a network scratch (/work3) every batch would cross it."""
    tmp = (os.environ if environ is None else environ).get("TMPDIR", "")
    if tmp and os.path.isdir(tmp) and os.access(tmp, os.W_OK | os.X_OK):
        try:
            free = shutil.disk_usage(tmp).free
        except OSError:
            free = 0
        if need_bytes <= 0.9 * free:
            return Path(tmp) / f"hpcseg-{Path(run_dir).name}"
    return Path(run_dir)


def held_bytes_estimate(folders) -> int:
    """What the slices of `folders` may take as training holds them, from their files' sizes alone (before reading
    them): .npy as large, compressed NIfTI 8 times (float32 images, uint8 labels)."""
    from .data import DataError, find_pairs

    total = 0
    for folder in folders:
        try:
            pairs = find_pairs(folder)
        except DataError:
            continue  # reported when the folder is read
        for pair in pairs:
            for path in (pair.image, pair.label):
                with contextlib.suppress(OSError):
                    total += path.stat().st_size * (8 if path.name.lower().endswith(".gz") else 1)
    return total


def rank_folder(run_dir: Path, rank: int = 0) -> Path:
    """This rank's memory-mapped files in the run folder: training's copy of the splits, and what loading spilled."""
    return run_dir / MAPPED / f"rank{rank}"


def read_spill(run_dir: Path, rank: int = 0) -> Path:
    """Where loading puts this rank's slices beyond the host's room (data.Spill); removed with the mapped copy."""
    return rank_folder(run_dir, rank) / "read"


def place(nbytes: int, device: torch.device, device_cap_gb: float, host_cap_gb: float, run_dir: Path,
          rank: int = 0, local_ranks: int = 1, spilled: bool = False) -> Placement:
    """Where splits of `nbytes` go: the device while they fit `device_cap_gb` (0: half its free memory), else host
    memory while they fit `host_room(host_cap_gb, local_ranks)` and loading did not already have to put them in
    files (`spilled`), else memory-mapped files in `run_dir`, one folder per rank."""
    size = f"{nbytes / GB:.2g} GB"
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        budget, of = (device_cap_gb * GB, f"cap data.device_memory_gb = {device_cap_gb:g}") if device_cap_gb else \
            (DEVICE_SHARE * free, f"{total / GB:.3g} GB, {free / GB:.3g} GB free")
    else:  # the CPU trains on host memory: resident unless a cap says otherwise
        budget, of = (device_cap_gb * GB, f"cap data.device_memory_gb = {device_cap_gb:g}") if device_cap_gb else \
            (float("inf"), "host memory")
    folder = rank_folder(run_dir, rank)
    if nbytes <= budget:
        return Placement("device", f"data: resident on {device.type} ({size}; {of})", folder)
    staged = "batches staged in pinned memory" if device.type == "cuda" else "batches copied to the device"
    room = host_room(host_cap_gb, local_ranks)
    if nbytes <= room and not spilled:
        return Placement("host", f"data: host memory, {size} (more than the device's {budget / GB:.2g} GB for data; "
                                 f"{staged})", folder)
    host = "the host's room for data as they were read" if spilled else f"the host's {room / GB:.2g} GB for data"
    return Placement("mapped", f"data: memory-mapped .npy files in {folder}, {size} (more than the device's "
                               f"{budget / GB:.2g} GB and {host}; {staged})", folder)


def training_tensors(split: Split, placement: Placement, device: torch.device,
                     min_size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The training split's images, labels and sizes (Split.stacked) where `placement` keeps them."""
    release(placement)  # what a killed attempt mapped
    if placement.resident:
        return tuple(t.to(device) for t in split.stacked(min_size=min_size))
    mapped = placement.where == "mapped"
    images, labels, sizes = split.stacked(min_size=min_size, folder=placement.folder / "training" if mapped else None)
    _share(split, list(range(len(split))), images.numpy(), labels.numpy())
    return images, labels, sizes


def _share(split: Split, index: list[int], images: np.ndarray, labels: np.ndarray) -> None:
    """Make the slices `index` of `split` views of their stacked copies (N, 1, H, W): the data is held once, in
    host memory or in the mapped files, not also as the slices that were read."""
    for row, k in enumerate(index):
        h, w = split.images[k].shape
        split.images[k], split.labels[k] = images[row, 0, :h, :w], labels[row, 0, :h, :w]


def validation_groups(split: Split, placement: Placement, device: torch.device,
                      chunk: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The validation slices as (images float32, labels uint8) of one shape each: whole shape groups on the device,
    else chunks of `chunk` slices (a multiple of the inference batch, so the model sees the same batches) that
    validation copies to the device one at a time."""
    from .infer import shape_groups, stack

    groups = []
    for k, group in enumerate(shape_groups(split.images)):
        if placement.resident:
            groups.append((stack(split.images, group, torch.float32, device),
                           stack(split.labels, group, torch.uint8, device)))
            continue
        images, labels = _stack_host(split.images, group, np.float32), _stack_host(split.labels, group, np.uint8)
        if placement.where == "mapped":
            images, labels = (_mapped(array, placement.folder / f"validation-{k}-{name}.npy")
                              for array, name in ((images, "images"), (labels, "labels")))
        _share(split, group, images, labels)
        images, labels = torch.from_numpy(images), torch.from_numpy(labels)
        groups += [(images[i : i + chunk], labels[i : i + chunk]) for i in range(0, len(group), chunk)]
    return groups


def _stack_host(arrays: list[np.ndarray], index: list[int], dtype) -> np.ndarray:
    return np.stack([arrays[i] for i in index]).astype(dtype, copy=False)[:, None]


def _mapped(array: np.ndarray, path: Path) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, array)
    return np.load(path, mmap_mode="c")


def release(placement: Placement) -> None:
    """Remove the memory-mapped files of a finished (or stopped) training."""
    if placement.folder is not None:
        shutil.rmtree(placement.folder, ignore_errors=True)
        with contextlib.suppress(OSError):  # other ranks' folders may still be there
            placement.folder.parent.rmdir()


class HostBatches:
    """Batches of host-resident slices for `crop_batch`: each step's whole slices gathered on the host into pinned
    memory and copied to the device asynchronously, on a side stream, one step ahead.

    `index_of(order, step)` picks a step's slices from the epoch's order; it is applied to a host copy of the order
    (made once per epoch), so no step waits for the device. `batches(step)` returns (images, labels, sizes, index)
    on the device, index being 0..B-1 into the gathered slices: `crop_batch` then draws exactly what it draws from
    the resident split, and crops the same pixels."""

    def __init__(self, tensors: tuple[torch.Tensor, ...], order: torch.Tensor, index_of, steps: int):
        self.tensors, self.index_of, self.steps, self.device = tensors, index_of, steps, order.device
        self.order = order.cpu()  # the epoch's one copy to the host
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.pending: dict[int, tuple[torch.Tensor, ...]] = {}

    def _start(self, step: int) -> tuple[torch.Tensor, ...]:
        index = self.index_of(self.order, step)
        pinned = self.stream is not None
        staged = [torch.index_select(t, 0, index, out=torch.empty((len(index), *t.shape[1:]), dtype=t.dtype,
                                                                    pin_memory=pinned)) for t in self.tensors]
        if self.stream is None:
            return tuple(t.to(self.device) for t in staged)
        # a pinned buffer goes back to torch's host cache only once its copy is done: reusing it is safe
        with torch.cuda.stream(self.stream):
            return tuple(t.to(self.device, non_blocking=True) for t in staged)

    def __call__(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        on_device = self.pending.pop(step, None) or self._start(step)
        if self.stream is not None:  # the training stream waits for the copy, and owns its result from here
            current = torch.cuda.current_stream(self.device)
            current.wait_stream(self.stream)
            for t in on_device:
                t.record_stream(current)
        if step + 1 < self.steps:
            self.pending = {step + 1: self._start(step + 1)}
        return (*on_device, torch.arange(len(on_device[0]), device=self.device))
