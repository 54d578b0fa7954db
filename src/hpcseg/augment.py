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

Scanner augmentation (intensity and resolution of other scanners; every one off unless its probability is set, and
then drawn after everything above, so jobs without it draw exactly the numbers they drew before):

* Bias field: ``RandBiasField``: the image times ``exp(sum c_ij P_i(row) P_j(col))``, Legendre polynomials of total
  degree <= ``bias_degree`` on ``linspace(-1, 1)`` per axis, each coefficient uniform in ``bias_coeff``.
* Blur: ``RandGaussianSmooth``/``GaussianSmooth``: sigma per axis uniform in ``blur_sigma`` (pixels), MONAI's
  ``erf`` kernel truncated at 4 sigma, zero padding, rows filtered first.
* Low resolution: ``RandSimulateLowResolution`` (nearest down, bilinear up, ``align_corners=False``): one zoom per
  sample uniform in ``lowres_zoom``, the low-resolution size ``round(size * zoom)`` per axis.
* Brightness: ``RandScaleIntensity``: ``x * (1 + f)``, f uniform in ``[-brightness, brightness]``.
* Contrast: ``RandScaleIntensityFixedMean(preserve_range=True)``: ``(x - mean) * (1 + f) + mean`` clipped to the
  sample's own range, f uniform in ``[-contrast, contrast]``.
* Gamma: ``RandAdjustContrast``/``AdjustContrast``: ``((x - min) / (range + 1e-7)) ** g * range + min``, g uniform
  in ``gamma``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

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
    # Scanner augmentation: probabilities 0 (off), so that the recipe draws what it always drew.
    bias_prob: float = 0.0
    bias_degree: int = 3  # Legendre polynomials of total degree <= this, as RandBiasField's degree
    bias_coeff: tuple[float, float] = (0.0, 0.1)  # each coefficient uniform in [low, high), as coeff_range
    blur_prob: float = 0.0
    blur_sigma: tuple[float, float] = (0.5, 1.0)  # pixels, uniform per axis, as RandGaussianSmooth's sigma_x/y
    lowres_prob: float = 0.0
    lowres_zoom: tuple[float, float] = (0.5, 1.0)  # one zoom per sample, as zoom_range
    brightness_prob: float = 0.0
    brightness: float = 0.25  # factor 1 + uniform(-brightness, brightness), as RandScaleIntensity's factors
    contrast_prob: float = 0.0
    contrast: float = 0.25  # about the mean, 1 + uniform(-contrast, contrast), as RandScaleIntensityFixedMean
    gamma_prob: float = 0.0
    gamma: tuple[float, float] = (0.7, 1.5)  # exponent uniform in [low, high), as RandAdjustContrast's gamma

    @classmethod
    def from_config(cls, config) -> "AugmentParams":
        """The parameters of a job's [augment] section (every field of the same name; lists as tuples)."""
        values = {f.name: getattr(config, f.name) for f in fields(cls)}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})

    @property
    def scanner(self) -> bool:
        """Whether any scanner augmentation is on (only then are its random numbers drawn)."""
        return any(p > 0 for p in (self.bias_prob, self.blur_prob, self.lowres_prob, self.brightness_prob,
                                   self.contrast_prob, self.gamma_prob))


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


def _between(u: Tensor, bounds: tuple[float, float]) -> Tensor:
    """Map uniform [0, 1) draws to [low, high)."""
    return bounds[0] + u * (bounds[1] - bounds[0])


def bias_terms(degree: int) -> tuple[list[int], list[int]]:
    """The (row, column) polynomial degrees of the bias field's coefficients, in RandBiasField's order (2D)."""
    return [i for i in range(degree + 1) for _ in range(i + 1)], [j for i in range(degree + 1) for j in range(i + 1)]


def _draw_scanner(
    batch: int, params: AugmentParams, generator: torch.Generator, device: torch.device
) -> dict[str, Tensor]:
    """The scanner augmentation's decisions and parameters of one batch, from one fixed-shape draw."""
    n_coeff = len(bias_terms(params.bias_degree)[0])
    u = torch.rand(batch, 12 + n_coeff, generator=generator, device=device)
    return {
        "bias": u[:, 0] < params.bias_prob,
        "blur": u[:, 1] < params.blur_prob,
        "sigma": _between(u[:, 2:4], params.blur_sigma),
        "lowres": u[:, 4] < params.lowres_prob,
        "zoom": _between(u[:, 5], params.lowres_zoom),
        "brightness": u[:, 6] < params.brightness_prob,
        "brightness_factor": _uniform(u[:, 7], params.brightness),
        "contrast": u[:, 8] < params.contrast_prob,
        "contrast_factor": _uniform(u[:, 9], params.contrast),
        "gamma": u[:, 10] < params.gamma_prob,
        "gamma_value": _between(u[:, 11], params.gamma),
        "coeff": _between(u[:, 12:], params.bias_coeff),
    }


def _legendre(x: Tensor, degree: int) -> Tensor:
    """Legendre polynomials P_0 .. P_degree at ``x``, stacked (degree + 1, len(x)), by Bonnet's recursion."""
    p = [torch.ones_like(x), x]
    for n in range(1, degree):
        p.append(((2 * n + 1) * x * p[n] - n * p[n - 1]) / (n + 1))
    return torch.stack(p[: degree + 1])


def bias_field(coeff: Tensor, degree: int, height: int, width: int) -> Tensor:
    """Multiplicative fields (B, 1, h, w) ``exp(sum_k coeff[:, k] P_i(row) P_j(col))`` as RandBiasField draws."""
    kw = {"device": coeff.device, "dtype": torch.float32}
    rows, cols = (_legendre(torch.linspace(-1.0, 1.0, n, **kw), degree) for n in (height, width))
    i, j = bias_terms(degree)
    field = torch.einsum("bk,khw->bhw", coeff.float(), rows[i][:, :, None] * cols[j][:, None, :])
    return field.exp()[:, None]


def _gaussian_kernels(sigma: Tensor, max_sigma: float) -> Tensor:
    """MONAI's ``gaussian_1d(approx="erf", truncated=4)`` for each sigma (B,), zero-padded to the widest (B, K)."""
    widest = int(max(max_sigma * 4.0, 0.5) + 0.5)
    x = torch.arange(-widest, widest + 1, device=sigma.device, dtype=torch.float32)
    tail = torch.floor(torch.clamp(sigma * 4.0, min=0.5) + 0.5)  # int(max(4 sigma, 0.5) + 0.5) per sample
    t = 0.70710678 / sigma.abs()[:, None]
    kernel = (0.5 * ((t * (x + 0.5)).erf() - (t * (x - 0.5)).erf())).clamp(min=0)
    return torch.where(x.abs() <= tail[:, None], kernel, 0.0)


def gaussian_blur(images: Tensor, sigma: Tensor, max_sigma: float) -> Tensor:
    """Each sample (B, 1, h, w) float32 smoothed with its own (row, column) sigma (B, 2), as GaussianSmooth."""
    batch, _, height, width = images.shape
    x = images.reshape(1, batch, height, width)  # samples as channels: one grouped convolution per axis
    for axis in (0, 1):
        kernel = _gaussian_kernels(sigma[:, axis], max_sigma)
        pad = kernel.shape[1] // 2
        shape = (batch, 1, -1, 1) if axis == 0 else (batch, 1, 1, -1)
        padding = (0, 0, pad, pad) if axis == 0 else (pad, pad, 0, 0)
        x = F.conv2d(F.pad(x, padding), kernel.reshape(shape), groups=batch)
    return x.reshape(images.shape)


def _down_up(size: int, zoom: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per sample, along an axis of ``size``: where each output pixel reads after torch's nearest downsampling to
    ``round(size * zoom)`` and bilinear upsampling back (``align_corners=False``): two source indices (B, size)
    and the weight of the second."""
    low = torch.round(size * zoom.double()).clamp(min=1).float()[:, None]  # as MONAI: round in double
    full = torch.full_like(low, size)  # tensor / tensor: a correctly rounded quotient, as torch's kernels compute
    out = torch.arange(size, device=zoom.device, dtype=torch.float32)[None]
    src = ((low / full) * (out + 0.5) - 0.5).clamp(min=0)  # bilinear up: source position on the low grid
    i0 = torch.minimum(src.floor(), low - 1)
    lam = (src - i0).clamp(0, 1)
    i1 = torch.where(i0 < low - 1, i0 + 1, i0)
    near = lambda k: torch.clamp(torch.floor(k * (full / low)), max=size - 1).long()  # noqa: E731 nearest down
    return near(i0), near(i1), lam


def low_resolution(images: Tensor, zoom: Tensor) -> Tensor:
    """Each sample (B, 1, h, w) float32 down- and upsampled at its own zoom (B,), as RandSimulateLowResolution."""
    batch, _, height, width = images.shape
    r0, r1, wr = _down_up(height, zoom)
    c0, c1, wc = _down_up(width, zoom)
    rows = lambda i: images.gather(2, i[:, None, :, None].expand(batch, 1, height, width))  # noqa: E731
    x = rows(r0) * (1 - wr)[:, None, :, None] + rows(r1) * wr[:, None, :, None]
    cols = lambda i: x.gather(3, i[:, None, None, :].expand(batch, 1, height, width))  # noqa: E731
    return cols(c0) * (1 - wc)[:, None, None, :] + cols(c1) * wc[:, None, None, :]


def _per_sample(x: Tensor, reduce) -> Tensor:
    """A per-sample reduction of (B, 1, h, w), shaped (B, 1, 1, 1) to broadcast."""
    return reduce(x.flatten(1), 1)[:, None, None, None]


def _scanner(images: Tensor, params: AugmentParams, d: dict[str, Tensor]) -> Tensor:
    """Bias field, blur and low resolution, in float32 (the image's dtype is restored by the caller)."""
    x = images.float()
    if params.bias_prob > 0:
        x = _where(d["bias"], x * bias_field(d["coeff"], params.bias_degree, *x.shape[-2:]), x)
    if params.blur_prob > 0:
        x = _where(d["blur"], gaussian_blur(x, d["sigma"], max(params.blur_sigma)), x)
    if params.lowres_prob > 0:
        x = _where(d["lowres"], low_resolution(x, d["zoom"]), x)
    return x


def _intensity(images: Tensor, params: AugmentParams, d: dict[str, Tensor]) -> Tensor:
    """Brightness, contrast and gamma, in float32."""
    x = images.float()
    if params.brightness_prob > 0:
        x = _where(d["brightness"], x * (1 + d["brightness_factor"][:, None, None, None]), x)
    if params.contrast_prob > 0:
        low, high, mean = (_per_sample(x, f) for f in (torch.amin, torch.amax, torch.mean))
        scaled = (x - mean) * (1 + d["contrast_factor"][:, None, None, None]) + mean
        x = _where(d["contrast"], torch.minimum(torch.maximum(scaled, low), high), x)
    if params.gamma_prob > 0:
        low = _per_sample(x, torch.amin)
        span = _per_sample(x, torch.amax) - low
        curved = ((x - low) / (span + 1e-7)) ** d["gamma_value"][:, None, None, None] * span + low
        x = _where(d["gamma"], curved, x)
    return x


def _where(do: Tensor, changed: Tensor, x: Tensor) -> Tensor:
    """Per sample: ``changed`` where ``do`` (B,), else ``x`` unchanged (bit for bit)."""
    return torch.where(do[:, None, None, None], changed, x)


def augment_batch(
    images: Tensor, labels: Tensor, params: AugmentParams, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """The recipe's augmentation for a batch: flip rows, flip columns, affine, [bias field, blur, low resolution],
    Gaussian noise, [brightness, contrast, gamma], intensity shift (bracketed: the scanner augmentation, where on).

    ``images`` (B, 1, h, w) float32 or bfloat16, ``labels`` (B, 1, h, w) integer. Each sample draws each
    transform independently with its probability. Returns the image in its dtype and the labels as int64.
    Noise and shift are added in float32 (MONAI adds float32 noise) and rounded back to the image's dtype; the
    scanner steps compute in float32 too.
    """
    d = _draw(images.shape[0], params, generator, images.device)
    noise = torch.randn(images.shape, generator=generator, device=images.device)
    labels = labels.long()
    for flip, dim in (("flip0", -2), ("flip1", -1)):
        images = _where(d[flip], images.flip(dim), images)
        labels = _where(d[flip], labels.flip(dim), labels)
    grid = _affine_grid(d["rotate"], d["translate"], d["scale"], *images.shape[-2:])
    images, labels = _affine(images, labels, grid, d["affine"])
    scanner = _draw_scanner(images.shape[0], params, generator, images.device) if params.scanner else None
    if scanner is not None:
        images = _scanner(images, params, scanner).to(images.dtype)
    std = d["noise_std"][:, None, None, None]
    images = _where(d["noise"], (images.float() + noise * std).to(images.dtype), images)
    if scanner is not None:
        images = _intensity(images, params, scanner).to(images.dtype)
    offset = d["offset"][:, None, None, None]
    images = _where(d["shift"], (images.float() + offset).to(images.dtype), images)
    return images, labels


__all__ = ["AugmentParams", "augment_batch", "bias_field", "crop_batch", "gaussian_blur", "low_resolution"]
