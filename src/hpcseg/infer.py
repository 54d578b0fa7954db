"""Inference on whole slices: batched where a slice fits the window, MONAI's sliding window where it does not.

Several models (a cross-validation ensemble) and test-time mirroring (`infer.tta = "flip"`) average softmax
probabilities: each chunk of slices is stacked with its mirrors into one batch that every model predicts once.
One model without mirroring takes the argmax of its logits, as it always has."""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from torch import nn

from .jobfile import InferConfig, Job
from .model import MIN_SIZE
from .precision import autocast  # noqa: F401 - also imported from here by train and the benchmarks


def shape_groups(images: list[np.ndarray]) -> list[list[int]]:
    """Indices of the slices grouped by shape, so each group stacks into one tensor without padding."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, image in enumerate(images):
        groups.setdefault(tuple(image.shape), []).append(i)
    return list(groups.values())


def stack(arrays: list[np.ndarray], index: list[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.stack([arrays[i] for i in index])[:, None]).to(device=device, dtype=dtype)


#: The mirrors of `infer.tta`: the flipped axes of each copy of a batch (none: the image itself).
FLIPS = {"none": [()], "flip": [(), (-1,), (-2,), (-2, -1)]}


def _fits(images: torch.Tensor, cfg: InferConfig) -> bool:
    height, width = (max(MIN_SIZE, n) for n in images.shape[-2:])
    return height <= cfg.roi[0] and width <= cfg.roi[1]


def _chunk(images: torch.Tensor, cfg: InferConfig) -> int:
    """Slices per chunk: whole slices in batches of infer.batch_size, sliding windows infer.sw_batch_size at once."""
    return cfg.batch_size if _fits(images, cfg) else cfg.sw_batch_size


def _logits(model: nn.Module, batch: torch.Tensor, cfg: InferConfig, precision: str) -> torch.Tensor:
    """float32 logits of one batch: one forward pass where its slices fit the window, else MONAI's sliding window
    (infer.sw_mode blends the windows: constant or Gaussian weights)."""
    height, width = batch.shape[-2:]
    pad_h, pad_w = max(0, MIN_SIZE - height), max(0, MIN_SIZE - width)
    if pad_h or pad_w:  # too small for the U-Net's four poolings: pad, predict, crop back
        batch = torch.nn.functional.pad(batch, (0, pad_w, 0, pad_h))
    with autocast(batch.device, precision):
        if _fits(batch, cfg):
            logits = model(batch)
        else:
            logits = sliding_window_inference(batch, tuple(cfg.roi), cfg.sw_batch_size, model, overlap=cfg.overlap,
                                              mode=cfg.sw_mode)
    return logits.float()[..., :height, :width]


@torch.no_grad()
def predict_logits(model: nn.Module, images: torch.Tensor, cfg: InferConfig, precision: str = "fp32") -> Iterator[torch.Tensor]:
    """Yields float32 logits for consecutive chunks of `images` (N, 1, H, W), all slices of one shape."""
    chunk = _chunk(images, cfg)
    for start in range(0, images.shape[0], chunk):
        yield _logits(model, images[start : start + chunk], cfg, precision)


@torch.no_grad()
def predict_probabilities(models: Sequence[nn.Module], images: torch.Tensor, cfg: InferConfig,
                          precision: str = "fp32") -> Iterator[torch.Tensor]:
    """Yields, for consecutive chunks of `images` (N, 1, H, W), the softmax probabilities (float32) averaged over
    `models` and the mirrors of `cfg.tta`. A chunk and its mirrors go through each model as one stacked batch of
    about the chunk's size (the chunk is cut by the number of mirrors), so memory stays as without mirroring."""
    flips = FLIPS[cfg.tta]
    chunk = max(1, _chunk(images, cfg) // len(flips))
    for start in range(0, images.shape[0], chunk):
        batch = images[start : start + chunk]
        stacked = torch.cat([batch.flip(f) if f else batch for f in flips]) if len(flips) > 1 else batch
        total = None
        for model in models:
            probs = _logits(model, stacked, cfg, precision).softmax(dim=1)
            for part, f in zip(probs.split(batch.shape[0]), flips):  # each mirror's prediction flipped back
                part = part.flip(f) if f else part
                total = part if total is None else total + part
        yield total / (len(models) * len(flips))


def predict_labels(model: nn.Module, images: torch.Tensor, cfg: InferConfig, precision: str = "fp32") -> torch.Tensor:
    """(N, 1, H, W) images -> (N, 1, H, W) int64 class maps (softmax + argmax is argmax of the logits)."""
    was_training = model.training
    model.eval()
    try:
        return torch.cat([lg.argmax(dim=1, keepdim=True) for lg in predict_logits(model, images, cfg, precision)])
    finally:
        model.train(was_training)


def ensemble_labels(models: Sequence[nn.Module], images: torch.Tensor, cfg: InferConfig,
                    precision: str = "fp32") -> torch.Tensor:
    """(N, 1, H, W) images -> int64 class maps: the argmax of the probabilities averaged over `models` and the
    mirrors of `cfg.tta`; with one model and no mirrors, predict_labels' (the argmax of its logits)."""
    models = list(models)
    if len(models) == 1 and cfg.tta == "none":
        return predict_labels(models[0], images, cfg, precision)
    training = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        return torch.cat([p.argmax(dim=1, keepdim=True) for p in predict_probabilities(models, images, cfg, precision)])
    finally:
        for m, was in zip(models, training):
            m.train(was)


def predict_slices(models: nn.Module | Sequence[nn.Module], images: list[np.ndarray], job: Job,
                   device: torch.device) -> Iterator[tuple[list[int], torch.Tensor]]:
    """Class maps of slices of any sizes, as the job's [infer] settings ask, by one model or the average of several:
    yields, per group of same-shaped slices, their indices into `images` and their (n, 1, H, W) int64 class maps
    on `device`."""
    models = [models] if isinstance(models, nn.Module) else list(models)
    for group in shape_groups(images):
        yield group, ensemble_labels(models, stack(images, group, torch.float32, device), job.infer,
                                     job.train.precision)
