"""Inference on whole slices: batched where a slice fits the window, MONAI's sliding window where it does not."""

from __future__ import annotations

from typing import Iterator

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


@torch.no_grad()
def predict_logits(model: nn.Module, images: torch.Tensor, cfg: InferConfig, precision: str = "fp32") -> Iterator[torch.Tensor]:
    """Yields float32 logits for consecutive chunks of `images` (N, 1, H, W), all slices of one shape."""
    height, width = images.shape[-2:]
    pad_h, pad_w = max(0, MIN_SIZE - height), max(0, MIN_SIZE - width)
    if pad_h or pad_w:  # too small for the U-Net's four poolings: pad, predict, crop back
        padded = torch.nn.functional.pad(images, (0, pad_w, 0, pad_h))
        for logits in predict_logits(model, padded, cfg, precision):
            yield logits[..., :height, :width]
        return
    roi_h, roi_w = cfg.roi
    fits = height <= roi_h and width <= roi_w
    chunk = cfg.batch_size if fits else cfg.sw_batch_size
    with autocast(images.device, precision):
        for start in range(0, images.shape[0], chunk):
            batch = images[start : start + chunk]
            if fits:
                logits = model(batch)
            else:
                logits = sliding_window_inference(batch, tuple(cfg.roi), cfg.sw_batch_size, model, overlap=cfg.overlap)
            yield logits.float()


def predict_labels(model: nn.Module, images: torch.Tensor, cfg: InferConfig, precision: str = "fp32") -> torch.Tensor:
    """(N, 1, H, W) images -> (N, 1, H, W) int64 class maps (softmax + argmax is argmax of the logits)."""
    was_training = model.training
    model.eval()
    try:
        return torch.cat([lg.argmax(dim=1, keepdim=True) for lg in predict_logits(model, images, cfg, precision)])
    finally:
        model.train(was_training)


def predict_slices(model: nn.Module, images: list[np.ndarray], job: Job,
                   device: torch.device) -> Iterator[tuple[list[int], torch.Tensor]]:
    """Class maps of slices of any sizes, as the job's [infer] settings ask: yields, per group of same-shaped slices,
    their indices into `images` and their (n, 1, H, W) int64 class maps on `device`."""
    for group in shape_groups(images):
        yield group, predict_labels(model, stack(images, group, torch.float32, device), job.infer, job.train.precision)
