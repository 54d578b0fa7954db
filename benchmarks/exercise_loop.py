"""The exercise's training loop as written, rebuilt as the baseline of the benchmarks.

What it does (recipe.md, "Improved recipe"), step by step as the exercise did it:

* a MONAI ``Dataset`` of ``{"image": path, "label": path}`` dicts, read per sample from ``.npy`` files by
  ``LoadImaged`` and transformed per sample by MONAI dictionary transforms in two ``DataLoader`` worker processes
  (``num_workers=2, batch_size=2, shuffle=True``);
* MONAI's ``BasicUNet`` (features 32..512, LeakyReLU, instance norm, ``nn.Dropout(0.4)``), Adam 1e-3;
* ``DiceCELoss(lambda_dice=0.8, lambda_ce=0.2)`` with the *correct* target (the exercise's argmax defect is not
  reproduced: the benchmarks compare speed, not the defect);
* ``loss.item()`` after every step, as the exercise logged the loss per step;
* validation per slice through a ``DataLoader`` with ``sliding_window_inference`` (roi 200, window batch 4),
  scored with hpcseg's correct per-tissue folder Dice (``hpcseg.metrics.FolderDice``) so that both loops are
  judged the same way.

Slices are paired by id with ``hpcseg.data.find_pairs`` (the exercise zipped two sorted globs; on brain2d that
gives the same pairs).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from monai.data import DataLoader, Dataset
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss
from monai.networks.nets import BasicUNet
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    LoadImaged,
    RandAffined,
    RandFlipd,
    RandGaussianNoised,
    RandShiftIntensityd,
    RandSpatialCropd,
)

from hpcseg.data import find_pairs
from hpcseg.metrics import FolderDice

KEYS = ("image", "label")
FEATURES = (32, 64, 128, 256, 512, 32)
NUM_CLASSES = 4


def file_dicts(folder: Path | str) -> list[dict[str, str]]:
    return [{"image": str(p.image), "label": str(p.label)} for p in find_pairs(folder)]


def train_transforms(crop: int = 200) -> Compose:
    return Compose([
        LoadImaged(keys=KEYS),
        EnsureChannelFirstd(keys=KEYS, channel_dim="no_channel"),
        RandSpatialCropd(keys=KEYS, roi_size=(crop, crop), random_size=False),
        RandFlipd(keys=KEYS, prob=0.5, spatial_axis=0),
        RandFlipd(keys=KEYS, prob=0.5, spatial_axis=1),
        RandAffined(keys=KEYS, prob=0.7, rotate_range=0.1, translate_range=(10, 10), scale_range=(0.1, 0.1),
                    mode=("bilinear", "nearest")),
        RandGaussianNoised(keys="image", prob=0.2, std=0.1),
        RandShiftIntensityd(keys="image", offsets=0.1, prob=0.5),
    ])


def val_transforms() -> Compose:
    return Compose([LoadImaged(keys=KEYS), EnsureChannelFirstd(keys=KEYS, channel_dim="no_channel")])


def train_loader(folder, *, batch_size: int = 2, num_workers: int = 2, crop: int = 200, seed: int = 0) -> DataLoader:
    ds = Dataset(data=file_dicts(folder), transform=train_transforms(crop))
    ds_gen = torch.Generator().manual_seed(seed)
    return DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=num_workers, generator=ds_gen)


def val_loader(folder, *, num_workers: int = 2) -> DataLoader:
    return DataLoader(Dataset(data=file_dicts(folder), transform=val_transforms()), batch_size=1,
                      num_workers=num_workers)


def build_model(dropout: float = 0.4) -> torch.nn.Module:
    """MONAI's BasicUNet with the improved recipe's arguments (plain ``nn.Dropout``, as the exercise had it)."""
    return BasicUNet(spatial_dims=2, in_channels=1, out_channels=NUM_CLASSES, features=FEATURES,
                     act="LeakyReLU", norm="instance", dropout=dropout)


def build_loss() -> torch.nn.Module:
    return DiceCELoss(to_onehot_y=True, softmax=True, lambda_dice=0.8, lambda_ce=0.2)


def build_optimizer(model: torch.nn.Module, lr: float = 1e-3) -> torch.optim.Optimizer:
    return torch.optim.Adam(model.parameters(), lr=lr)


def train_steps(model, optimizer, loss_fn, loader, device, *, max_steps: int | None = None,
                deadline: float | None = None, probe=None) -> dict:
    """Iterate ``loader`` once (a fresh iterator: worker start-up included, as every epoch of the exercise).

    Stops after ``max_steps`` steps or once ``time.perf_counter() >= deadline``; ``probe(iterator)`` is called
    after the last step, while the workers are still alive (memory readings). Returns steps, samples, summed
    loss (read with ``loss.item()`` every step, as the exercise did), seconds, and the seconds to the first batch.
    """
    model.train()
    started = time.perf_counter()
    first_batch_s = None
    steps = samples = 0
    epoch_loss = 0.0
    iterator = iter(loader)
    for batch_data in iterator:
        if first_batch_s is None:
            first_batch_s = time.perf_counter() - started
        inputs, labels = batch_data["image"].to(device), batch_data["label"].to(device)
        optimizer.zero_grad()
        outputs = model(inputs)
        loss = loss_fn(outputs, labels)
        loss.backward()
        optimizer.step()
        epoch_loss += loss.item()
        steps += 1
        samples += inputs.shape[0]
        if (max_steps is not None and steps >= max_steps) or (deadline is not None and time.perf_counter() >= deadline):
            break
    if probe is not None:
        probe(iterator)
    return {"steps": steps, "samples": samples, "loss_sum": epoch_loss, "seconds": time.perf_counter() - started,
            "first_batch_s": first_batch_s}


@torch.no_grad()
def validate(model, loader, device, *, roi: int = 200, sw_batch_size: int = 4) -> torch.Tensor:
    """Per-tissue Dice over every validation pixel (hpcseg's FolderDice), slice by slice with a sliding window."""
    model.eval()
    dice = FolderDice(NUM_CLASSES, device=device)
    for batch_data in loader:
        inputs, labels = batch_data["image"].to(device), batch_data["label"].to(device)
        outputs = sliding_window_inference(inputs, (roi, roi), sw_batch_size, model)
        dice.update(torch.as_tensor(outputs).argmax(dim=1, keepdim=True), torch.as_tensor(labels))
    model.train()
    return dice.dice()
