"""Batched crop + augmentation (hpcseg.augment) against MONAI's transforms with the same parameters."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.transforms import (
    Affine,
    Flip,
    RandAffine,
    RandFlip,
    RandGaussianNoise,
    RandShiftIntensity,
)
from scipy.stats import ks_2samp

from hpcseg.augment import AugmentParams, _affine, _affine_grid, _draw, augment_batch, crop_batch

NONE = AugmentParams(flip_prob=(0.0, 0.0), affine_prob=0.0, noise_prob=0.0, shift_prob=0.0)
DRAWS = 3000  # parameter samples per side in the distribution tests


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def phantom(batch: int, h: int, w: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Smooth brain-like images (B, 1, h, w) in [0, 1] and their 4-class label maps (uint8)."""
    g = gen(seed)
    r = torch.linspace(-1, 1, h)[:, None]
    c = torch.linspace(-1, 1, w)[None, :]
    images, labels = [], []
    for _ in range(batch):
        cy, cx, ay, ax = (0.2 * torch.rand(4, generator=g) + torch.tensor([-0.1, -0.1, 0.7, 0.6])).tolist()
        rad = (((r - cy) / ay) ** 2 + ((c - cx) / ax) ** 2).sqrt() + 0.05 * torch.sin(7 * r + 5 * c)
        lab = torch.bucketize(-rad, torch.tensor([-1.0, -0.8, -0.5])).to(torch.uint8)  # 0 outside .. 3 centre
        images.append(lab.float() / 3 + 0.05 * torch.cos(9 * r) * torch.sin(11 * c))
        labels.append(lab)
    return torch.stack(images)[:, None], torch.stack(labels)[:, None]


def coded_stack(sizes: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Zero-padded stack whose pixel values encode (slice, row, col): value = 1 + (n*300 + r)*300 + c."""
    height, width = max(s[0] for s in sizes), max(s[1] for s in sizes)
    images = torch.zeros(len(sizes), 1, height, width)
    labels = torch.zeros(len(sizes), 1, height, width, dtype=torch.uint8)
    for n, (h, w) in enumerate(sizes):
        r, c = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        images[n, 0, :h, :w] = 1 + (n * 300 + r) * 300 + c
        labels[n, 0, :h, :w] = ((r + 2 * c) % 4).to(torch.uint8)
    return images, labels, torch.tensor(sizes)


def decode(crop: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    v = crop.long() - 1
    return v // 90_000, (v // 300) % 300, v % 300


# ---------------------------------------------------------------- crops


def test_crop_shapes_and_inside_real_extent():
    sizes = [(176, 176), (201, 230), (233, 207), (210, 250)]
    images, labels, size_t = coded_stack(sizes)
    index = torch.tensor([0, 1, 2, 3, 3, 2, 1, 1])
    ci, cl = crop_batch(images, labels, size_t, index, (200, 200), gen())
    assert ci.shape == cl.shape == (8, 1, 200, 200) and cl.dtype == torch.uint8
    for b, n in enumerate(index.tolist()):
        h, w = sizes[n]
        if h >= 200 and w >= 200:  # fully inside the real slice: a contiguous window of it
            slice_, r, c = decode(ci[b, 0])
            assert (slice_ == n).all()
            r0, c0 = int(r[0, 0]), int(c[0, 0])
            assert 0 <= r0 <= h - 200 and 0 <= c0 <= w - 200
            assert torch.equal(r, r0 + torch.arange(200)[:, None].expand(200, 200))
            assert torch.equal(c, c0 + torch.arange(200)[None, :].expand(200, 200))
            assert torch.equal(cl[b, 0].long(), (r + 2 * c) % 4)
        else:  # slice 0 (176x176) is smaller than the crop: origin 0, whole slice plus padding
            assert torch.equal(ci[b, 0, :h, :w], images[n, 0, :h, :w])
            assert (ci[b, 0, h:] == 0).all() and (ci[b, 0, :, w:] == 0).all()


def test_crop_origins_cover_every_valid_position():
    images, labels, sizes = coded_stack([(13, 11)])  # odd sizes, room 3 x 2 for a 10x9 crop
    index = torch.zeros(400, dtype=torch.long)
    ci, _ = crop_batch(images, labels, sizes, index, (10, 9), gen(3))
    _, r, c = decode(ci[:, 0, 0, 0])
    assert set(r.tolist()) == {0, 1, 2, 3} and set(c.tolist()) == {0, 1, 2}  # as MONAI's randint(0, h-ch+1)
    counts = torch.bincount(r * 3 + c, minlength=12).float()
    assert counts.min() > 400 / 12 * 0.4  # roughly uniform


def test_crop_larger_than_stack_returns_whole_image():
    images, labels, sizes = coded_stack([(57, 83), (57, 83)])
    ci, cl = crop_batch(images, labels, sizes, torch.tensor([1, 0]), (200, 200), gen())
    assert ci.shape == (2, 1, 57, 83)  # as RandSpatialCrop with roi > image
    assert torch.equal(ci, images[[1, 0]]) and torch.equal(cl, labels[[1, 0]])


# ---------------------------------------------------------------- identity, flips


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hw", [(64, 64), (57, 83)])
def test_identity_parameters_bit_identical(dtype, hw):
    images, labels = phantom(4, *hw)
    images = images.to(dtype)
    out, out_l = augment_batch(images, labels, NONE, gen())
    assert out.dtype == dtype and out_l.dtype == torch.int64
    assert torch.equal(out, images) and torch.equal(out_l, labels.long())


@pytest.mark.parametrize("flip_prob, axes", [((1.0, 0.0), 0), ((0.0, 1.0), 1), ((1.0, 1.0), (0, 1))])
def test_flips_equal_monai(flip_prob, axes):
    images, labels = phantom(3, 41, 58)
    params = AugmentParams(flip_prob=flip_prob, affine_prob=0.0, noise_prob=0.0, shift_prob=0.0)
    out, out_l = augment_batch(images, labels, params, gen())
    flip = Flip(spatial_axis=axes)
    for b in range(3):
        assert torch.equal(out[b], flip(images[b]).as_tensor())
        assert torch.equal(out_l[b], flip(labels[b]).as_tensor().long())


# ---------------------------------------------------------------- affine


@pytest.mark.parametrize("hw", [(176, 176), (57, 83), (200, 199)])
def test_affine_matches_monai(hw):
    cases = [  # (rotate, (translate rows, cols), (scale rows, cols))
        (0.1, (10.0, -10.0), (1.1, 0.9)),
        (-0.07, (-3.3, 6.2), (0.93, 1.04)),
        (0.0, (0.0, 0.0), (1.0, 1.0)),
        (0.03, (9.5, 9.5), (1.1, 1.1)),
    ]
    images, labels = phantom(len(cases), *hw)
    grid = _affine_grid(
        torch.tensor([c[0] for c in cases]),
        torch.tensor([c[1] for c in cases]),
        torch.tensor([c[2] for c in cases]),
        *hw,
    )
    out, out_l = _affine(images, labels.long(), grid, torch.ones(len(cases), dtype=torch.bool))
    for b, (rot, trans, scale) in enumerate(cases):
        kw = {"rotate_params": rot, "translate_params": trans, "scale_params": scale, "image_only": True}
        padding = RandAffine().padding_mode  # the recipe uses RandAffined's default (reflection)
        ref = Affine(mode="bilinear", padding_mode=padding, **kw)(images[b]).as_tensor()
        ref_l = Affine(mode="nearest", padding_mode=padding, **kw)(labels[b].float()).as_tensor().long()
        torch.testing.assert_close(out[b], ref, atol=1e-4, rtol=0)
        assert (out_l[b] != ref_l).float().mean() < 1e-3
        assert set(out_l[b].unique().tolist()) <= set(labels[b].unique().tolist())


def test_affine_only_where_drawn_and_labels_stay_in_class_set():
    images, labels = phantom(64, 48, 37)
    labels = torch.where(labels == 1, 2, labels)  # class set {0, 2, 3}
    params = AugmentParams(flip_prob=(0.0, 0.0), affine_prob=0.5, noise_prob=0.0, shift_prob=0.0)
    out, out_l = augment_batch(images, labels, params, gen(1))
    same = (out == images).flatten(1).all(1)
    assert torch.equal(same, (out_l == labels.long()).flatten(1).all(1))  # image and label warped together
    assert 16 <= int(same.sum()) <= 48  # p 0.5 of 64: well inside +-4 sigma
    assert set(out_l.unique().tolist()) <= {0, 2, 3}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_full_recipe_runs_on_odd_sizes(dtype):
    images, labels = phantom(8, 45, 31)
    out, out_l = augment_batch(images.to(dtype), labels, AugmentParams(), gen(2))
    assert out.shape == images.shape and out.dtype == dtype and torch.isfinite(out.float()).all()
    assert out_l.shape == labels.shape and out_l.dtype == torch.int64
    assert set(out_l.unique().tolist()) <= {0, 1, 2, 3}


# ---------------------------------------------------------------- distributions against MONAI


class RecordingState(np.random.RandomState):
    """numpy RandomState that records what ``uniform`` returns (RandGaussianNoise draws its std with it)."""

    def __init__(self, seed):
        super().__init__(seed)
        self.uniforms = []

    def uniform(self, low=0.0, high=1.0, size=None):
        value = super().uniform(low, high, size)
        self.uniforms.append(value)
        return value


def monai_draws(params: AugmentParams) -> dict[str, np.ndarray]:
    """DRAWS randomize() calls of MONAI's random transforms configured like ``params``."""
    flip0 = RandFlip(prob=params.flip_prob[0], spatial_axis=0)
    flip1 = RandFlip(prob=params.flip_prob[1], spatial_axis=1)
    affine = RandAffine(
        prob=params.affine_prob,
        rotate_range=params.rotate,
        translate_range=(params.translate, params.translate),
        scale_range=(params.scale, params.scale),
    )
    noise = RandGaussianNoise(prob=params.noise_prob, std=params.noise_std)  # sample_std=True by default
    shift = RandShiftIntensity(offsets=params.shift, prob=params.shift_prob)
    for seed, t in enumerate((flip0, flip1, affine, shift)):
        t.set_random_state(seed)
    state = RecordingState(7)
    noise.set_random_state(state=state)
    out = {k: [] for k in ("flip0", "flip1", "affine", "rotate", "translate", "scale", "noise", "shift", "offset")}
    tiny = np.zeros((1, 1, 1), np.float32)
    for _ in range(DRAWS):
        for name, t in (("flip0", flip0), ("flip1", flip1), ("shift", shift)):
            t.randomize(None)
            out[name].append(t._do_transform)
        out["offset"] += [shift._offset] if shift._do_transform else []
        affine.randomize()
        out["affine"].append(affine._do_transform)
        if affine._do_transform:
            grid = affine.rand_affine_grid
            out["rotate"] += grid.rotate_params
            out["translate"].append(grid.translate_params)
            out["scale"].append(grid.scale_params)
        noise.randomize(tiny)
        out["noise"].append(noise._do_transform)
    out["noise_std"] = state.uniforms
    return {k: np.asarray(v, dtype=np.float64) for k, v in out.items()}


def ours_draws(params: AugmentParams) -> dict[str, np.ndarray]:
    d = {k: v.double().numpy() for k, v in _draw(DRAWS, params, gen(11), torch.device("cpu")).items()}
    for name, flag in (("rotate", "affine"), ("translate", "affine"), ("scale", "affine"),
                       ("noise_std", "noise"), ("offset", "shift")):
        d[name] = d[name][d[flag].astype(bool)]  # MONAI only draws parameters for applied transforms
    return d


@pytest.fixture(scope="module")
def draws():
    params = AugmentParams()
    return params, monai_draws(params), ours_draws(params)


@pytest.mark.parametrize(
    "name, prob",
    [("flip0", 0.5), ("flip1", 0.5), ("affine", 0.7), ("noise", 0.2), ("shift", 0.5)],
)
def test_application_rates_match_monai(draws, name, prob):
    _, monai, ours = draws
    sigma = np.sqrt(prob * (1 - prob) / DRAWS)
    for rate in (monai[name].mean(), ours[name].mean()):
        assert abs(rate - prob) < 4.5 * sigma


@pytest.mark.parametrize(
    "name, column",
    [("rotate", None), ("translate", 0), ("translate", 1), ("scale", 0), ("scale", 1), ("noise_std", None),
     ("offset", None)],
)
def test_parameter_distributions_match_monai(draws, name, column):
    _, monai, ours = draws
    a, b = monai[name], ours[name]
    if column is not None:
        a, b = a[:, column], b[:, column]
    assert len(a) > 300 and len(b) > 300
    assert ks_2samp(a, b).pvalue > 1e-3


def test_noise_and_shift_applied_as_drawn():
    images, labels = phantom(32, 64, 64)
    params = AugmentParams(flip_prob=(0.0, 0.0), affine_prob=0.0, noise_prob=1.0, shift_prob=0.0, noise_std=0.1)
    out, _ = augment_batch(images, labels, params, gen(5))
    d = _draw(32, params, gen(5), torch.device("cpu"))
    residual_std = (out - images).flatten(1).std(1)
    torch.testing.assert_close(residual_std, d["noise_std"], atol=3e-3, rtol=0.03)
    params = AugmentParams(flip_prob=(0.0, 0.0), affine_prob=0.0, noise_prob=0.0, shift_prob=1.0)
    out, _ = augment_batch(images, labels, params, gen(6))
    d = _draw(32, params, gen(6), torch.device("cpu"))
    torch.testing.assert_close(out - images, d["offset"][:, None, None, None].expand_as(out), atol=1e-6, rtol=0)


# ---------------------------------------------------------------- reproducibility


def pipeline(images, labels, sizes, g):
    index = torch.randint(0, images.shape[0], (6,), generator=g)
    crops = crop_batch(images, labels, sizes, index, (40, 40), g)
    return augment_batch(*crops, AugmentParams(), g)


def test_same_seed_same_output_and_resume_from_saved_state():
    images, labels = phantom(5, 51, 47)
    sizes = torch.tensor([[51, 47], [45, 47], [51, 40], [51, 47], [42, 42]])
    a, b = pipeline(images, labels, sizes, gen(9)), pipeline(images, labels, sizes, gen(9))
    assert all(torch.equal(x, y) for x, y in zip(a, b))

    g = gen(9)
    pipeline(images, labels, sizes, g)
    state = g.get_state()
    second = pipeline(images, labels, sizes, g)
    third = pipeline(images, labels, sizes, g)
    resumed = torch.Generator()
    resumed.set_state(state)
    assert all(torch.equal(x, y) for x, y in zip(second, pipeline(images, labels, sizes, resumed)))
    assert all(torch.equal(x, y) for x, y in zip(third, pipeline(images, labels, sizes, resumed)))
    assert not torch.equal(second[0], third[0])
