"""Batched random crop and augmentation on the data's device, following MONAI's transforms.

The recipe's per-sample MONAI dictionary transforms (``RandSpatialCropd``, ``RandFlipd`` on axis 0 and 1,
``RandAffined``, ``RandGaussianNoised``, ``RandShiftIntensityd``) are applied here to a whole batch at once:
every random number comes from one ``torch.Generator`` living on the data's device, tensors of fixed shape are
drawn whatever the outcome, and per-sample decisions are applied with ``torch.where``. Nothing synchronises with
the host, so the functions can be queued on a GPU stream, and saving ``generator.get_state()`` makes a run
resumable bit for bit.

Conventions (all checked against MONAI 1.6.1):

* Spatial axis 0 is the rows (dim -2), axis 1 the columns (dim -1), as MONAI's ``spatial_axis``.
* The affine maps each output pixel's coordinates, centred on the image centre ``((h-1)/2, (w-1)/2)`` and in
  pixels, to input coordinates ``R(theta) @ (S @ c + t)``: MONAI's ``AffineGrid`` product
  rotate @ translate @ scale. ``R = [[cos, -sin], [sin, cos]]`` acts on (row, column); ``t`` is in pixels per
  axis; ``S = diag(1 + uniform(-scale, scale))`` per axis, so a factor above 1 samples a larger area (the content
  shrinks), as MONAI's ``scale_range``.
* Sampling is ``grid_sample`` with ``align_corners=False`` and ``padding_mode="reflection"``, the default of
  ``RandAffine``/``RandAffined``; labels use ``mode="nearest"`` so their values stay in the input's class set.
* Gaussian noise follows ``RandGaussianNoise(sample_std=True)``: each noisy sample draws its standard deviation
  uniformly from ``[0, noise_std)`` and then zero-mean normal noise with it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class AugmentParams:
    """Probabilities and ranges of the recipe's augmentation (defaults: the improved recipe)."""

    flip_prob: tuple[float, float] = (0.5, 0.5)  # per spatial axis (0 = rows, 1 = columns), as RandFlip
    affine_prob: float = 0.7
    rotate: float = 0.1  # radians, uniform in [-rotate, rotate]
    translate: float = 10.0  # pixels, uniform in [-translate, translate] per axis
    scale: float = 0.1  # factor 1 + uniform(-scale, scale) per axis, as MONAI's scale_range
    noise_prob: float = 0.2
    noise_std: float = 0.1  # each noisy sample draws its std uniformly in [0, noise_std), as sample_std=True
    shift_prob: float = 0.5
    shift: float = 0.1  # intensity offset uniform in [-shift, shift]


def _uniform(u: Tensor, half_range: float) -> Tensor:
    """Map uniform [0, 1) draws to [-half_range, half_range)."""
    return (2.0 * u - 1.0) * half_range


def crop_batch(
    images: Tensor,
    labels: Tensor,
    sizes: Tensor,
    index: Tensor,
    crop: tuple[int, int],
    generator: torch.Generator,
) -> tuple[Tensor, Tensor]:
    """Random crops of the slices ``index`` from zero-padded stacks, as ``RandSpatialCrop`` per sample.

    ``images`` (N, 1, H, W) and ``labels`` (N, 1, H, W) hold every slice padded bottom/right to a common size;
    ``sizes`` (N, 2) the real (h, w) of each. The crop is ``min(crop, (H, W))`` per axis; its origin is uniform
    over the positions that keep it inside the slice's real extent, and 0 along an axis where the slice is
    smaller than the crop (the crop then includes the padding). Returns (B, 1, ch, cw) image and label crops.
    """
    height, width = images.shape[-2:]
    ch, cw = min(crop[0], height), min(crop[1], width)
    device = images.device
    real = sizes.to(device)[index]  # (B, 2); keep ``sizes`` on the device to avoid a copy
    room = torch.stack([real[:, 0] - ch, real[:, 1] - cw], 1).clamp(min=0)
    u = torch.rand(room.shape, generator=generator, device=device, dtype=torch.float64)
    origin = torch.minimum((u * (room + 1)).long(), room)  # uniform integer in [0, room]
    rows = origin[:, 0, None] + torch.arange(ch, device=device)  # (B, ch)
    cols = origin[:, 1, None] + torch.arange(cw, device=device)  # (B, cw)
    at = (index[:, None, None], 0, rows[:, :, None], cols[:, None, :])
    return images[at].unsqueeze(1), labels[at].unsqueeze(1)


def _affine_grid(rotate: Tensor, translate: Tensor, scale: Tensor, height: int, width: int) -> Tensor:
    """Sampling grid (B, H, W, 2) of MONAI's ``AffineGrid`` + ``Resample`` for per-sample parameters.

    ``rotate`` (B,) radians, ``translate`` (B, 2) pixels and ``scale`` (B, 2) factors, all in (row, column)
    order. Output pixel centres, centred on the image, map to ``R @ (S @ c + t)``; the result is normalised for
    ``grid_sample(align_corners=False)`` exactly as MONAI's ``Resample`` does (``2 / max(2, size)``).
    """
    cos, sin = torch.cos(rotate), torch.sin(rotate)
    rot = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)  # (B, 2, 2)
    matrix = rot * scale[:, None, :]  # R @ diag(S)
    offset = (rot @ translate[:, :, None])[..., 0]  # R @ t, (B, 2)
    kw = {"device": rotate.device, "dtype": rotate.dtype}
    r = torch.arange(height, **kw) - (height - 1) / 2
    c = torch.arange(width, **kw) - (width - 1) / 2
    centred = torch.stack(torch.meshgrid(r, c, indexing="ij"), -1)  # (H, W, 2) as (row, col)
    points = torch.einsum("bij,hwj->bhwi", matrix, centred) + offset[:, None, None, :]  # (B, H, W, 2)
    # grid_sample wants (x = column, y = row); no torch.tensor() here, which would copy from the host
    return torch.stack([points[..., 1] * (2.0 / max(2, width)), points[..., 0] * (2.0 / max(2, height))], -1)


def _affine(images: Tensor, labels: Tensor, grid: Tensor, do: Tensor) -> tuple[Tensor, Tensor]:
    """Warp images (bilinear) and labels (nearest) with one ``grid_sample`` each; keep samples not in ``do``."""
    common = {"padding_mode": "reflection", "align_corners": False}
    warped = F.grid_sample(images.float(), grid, mode="bilinear", **common).to(images.dtype)
    warped_labels = F.grid_sample(labels.float(), grid, mode="nearest", **common).to(labels.dtype)
    return _where(do, warped, images), _where(do, warped_labels, labels)


def _draw(
    batch: int, params: AugmentParams, generator: torch.Generator, device: torch.device
) -> dict[str, Tensor]:
    """Every per-sample decision and parameter of one batch, from one fixed-shape draw (B, 12)."""
    u = torch.rand(batch, 12, generator=generator, device=device)
    return {
        "flip0": u[:, 0] < params.flip_prob[0],
        "flip1": u[:, 1] < params.flip_prob[1],
        "affine": u[:, 2] < params.affine_prob,
        "rotate": _uniform(u[:, 3], params.rotate),
        "translate": _uniform(u[:, 4:6], params.translate),
        "scale": 1.0 + _uniform(u[:, 6:8], params.scale),
        "noise": u[:, 8] < params.noise_prob,
        "noise_std": u[:, 9] * params.noise_std,
        "shift": u[:, 10] < params.shift_prob,
        "offset": _uniform(u[:, 11], params.shift),
    }


def _where(do: Tensor, changed: Tensor, x: Tensor) -> Tensor:
    """Per sample: ``changed`` where ``do`` (B,), else ``x`` unchanged (bit for bit)."""
    return torch.where(do[:, None, None, None], changed, x)


def augment_batch(
    images: Tensor, labels: Tensor, params: AugmentParams, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """The recipe's augmentation for a batch: flip rows, flip columns, affine, Gaussian noise, intensity shift.

    ``images`` (B, 1, h, w) float32 or bfloat16, ``labels`` (B, 1, h, w) integer. Each sample draws each
    transform independently with its probability. Returns the image in its dtype and the labels as int64.
    Noise and shift are added in float32 (MONAI adds float32 noise) and rounded back to the image's dtype.
    """
    d = _draw(images.shape[0], params, generator, images.device)
    noise = torch.randn(images.shape, generator=generator, device=images.device)
    labels = labels.long()
    for flip, dim in (("flip0", -2), ("flip1", -1)):
        images = _where(d[flip], images.flip(dim), images)
        labels = _where(d[flip], labels.flip(dim), labels)
    grid = _affine_grid(d["rotate"], d["translate"], d["scale"], *images.shape[-2:])
    images, labels = _affine(images, labels, grid, d["affine"])
    std = d["noise_std"][:, None, None, None]
    images = _where(d["noise"], (images.float() + noise * std).to(images.dtype), images)
    offset = d["offset"][:, None, None, None]
    images = _where(d["shift"], (images.float() + offset).to(images.dtype), images)
    return images, labels


__all__ = ["AugmentParams", "augment_batch", "crop_batch"]
