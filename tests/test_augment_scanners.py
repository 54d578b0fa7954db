"""Scanner augmentation (hpcseg.augment: bias field, blur, low resolution, brightness, contrast, gamma) against the
MONAI transforms it mirrors: the same image for the same drawn parameters, the same distribution of the draws."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from fixtures_cluster import TINY
from monai.transforms import (
    AdjustContrast,
    GaussianSmooth,
    RandAdjustContrast,
    RandBiasField,
    RandGaussianSmooth,
    RandScaleIntensity,
    RandScaleIntensityFixedMean,
    RandSimulateLowResolution,
    ScaleIntensity,
    ScaleIntensityFixedMean,
)
from scipy.stats import ks_2samp
from test_augment import NONE, gen, phantom

from hpcseg.augment import AugmentParams, _draw, _draw_scanner, augment_batch
from hpcseg.checkpoint import load_checkpoint
from hpcseg.cli import main
from hpcseg.jobfile import JobError, job_from_dict

DRAWS = 3000
JOB = Path(__file__).resolve().parents[1] / "jobs" / "exercise-improved.toml"
SCANNER = {"bias_prob": 0.3, "blur_prob": 0.3, "lowres_prob": 0.3, "brightness_prob": 0.3, "contrast_prob": 0.3,
           "gamma_prob": 0.3}


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def only(**kw) -> AugmentParams:
    """The recipe's transforms off, the named scanner settings on."""
    return replace(NONE, **kw)


def drawn(params: AugmentParams, batch: int, shape, seed: int) -> dict[str, torch.Tensor]:
    """The scanner parameters augment_batch draws with generator `seed` (after the recipe's draws, as it does)."""
    g = gen(seed)
    _draw(batch, params, g, torch.device("cpu"))
    torch.randn(shape, generator=g)
    return _draw_scanner(batch, params, g, torch.device("cpu"))


def run(params: AugmentParams, hw=(57, 83), batch=6, seed=4):
    images, labels = phantom(batch, *hw)
    out, out_l = augment_batch(images, labels, params, gen(seed))
    assert torch.equal(out_l, labels.long())  # intensity and resolution only: labels untouched
    return images, out, drawn(params, batch, images.shape, seed)


# ---------------------------------------------------------------- the same image for the same draw


def test_off_by_default_draws_exactly_what_the_recipe_drew():
    """Scanner ranges set but probabilities 0 (the default): the output and the generator's state are the recipe's."""
    images, labels = phantom(8, 40, 44)
    a, b = gen(3), gen(3)
    plain = augment_batch(images, labels, AugmentParams(), a)
    ranged = augment_batch(images, labels, AugmentParams(gamma=(0.2, 3.0), blur_sigma=(1.0, 2.0)), b)
    assert all(torch.equal(x, y) for x, y in zip(plain, ranged))
    assert torch.equal(a.get_state(), b.get_state())
    assert not AugmentParams().scanner and only(gamma_prob=0.1).scanner


@pytest.mark.parametrize("hw", [(57, 83), (64, 64)])
@pytest.mark.parametrize("degree", [1, 3])
def test_bias_field_equals_monai(hw, degree):
    params = only(bias_prob=1.0, bias_degree=degree, bias_coeff=(-0.2, 0.3))
    images, out, d = run(params, hw)
    for b in range(len(images)):
        t = RandBiasField(degree=degree, coeff_range=params.bias_coeff, prob=1.0)
        t.randomize(img_size=hw)
        assert len(t._coeff) == d["coeff"].shape[1]
        t._coeff = d["coeff"][b].double().tolist()
        ref = torch.as_tensor(np.asarray(t(images[b], randomize=False)))
        torch.testing.assert_close(out[b], ref, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(out, images)


@pytest.mark.parametrize("sigma", [(0.5, 1.0), (0.3, 2.4)])
def test_blur_equals_monai(sigma):
    params = only(blur_prob=1.0, blur_sigma=sigma)
    images, out, d = run(params)
    for b in range(len(images)):
        sx, sy = d["sigma"][b].tolist()
        ref = GaussianSmooth(sigma=(sx, sy))(images[b]).as_tensor()
        torch.testing.assert_close(out[b], ref, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("hw", [(57, 83), (200, 200), (33, 31)])
def test_low_resolution_equals_monai(hw):
    params = only(lowres_prob=1.0, lowres_zoom=(0.3, 1.0))
    images, out, d = run(params, hw, batch=12)
    for b in range(len(images)):
        t = RandSimulateLowResolution(prob=1.0, upsample_mode="bilinear", zoom_range=params.lowres_zoom)
        t.randomize()
        t._do_transform, t.zoom_factor = True, float(d["zoom"][b])
        ref = torch.as_tensor(t(images[b], randomize=False))
        torch.testing.assert_close(out[b], ref, atol=2e-6, rtol=0)


def test_low_resolution_at_zoom_one_is_the_image():
    images, out, _ = run(only(lowres_prob=1.0, lowres_zoom=(1.0, 1.0)))
    torch.testing.assert_close(out, images, atol=1e-6, rtol=0)


@pytest.mark.parametrize("key, monai", [
    ("brightness", lambda f: ScaleIntensity(minv=None, maxv=None, factor=f)),
    ("contrast", lambda f: ScaleIntensityFixedMean(factor=f, fixed_mean=True, preserve_range=True)),
    ("gamma", AdjustContrast),
])
def test_brightness_contrast_gamma_equal_monai(key, monai):
    drawn_as = {"brightness": "brightness_factor", "contrast": "contrast_factor", "gamma": "gamma_value"}[key]
    images, out, d = run(only(**{f"{key}_prob": 1.0}), seed=len(key))
    for b in range(len(images)):
        ref = torch.as_tensor(np.asarray(monai(float(d[drawn_as][b]))(images[b])))
        torch.testing.assert_close(out[b], ref, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(out, images)


def test_each_transform_only_where_drawn_and_all_together_on_bfloat16():
    params = only(**SCANNER)
    images, out, d = run(params, batch=64, seed=8)
    changed = (out != images).flatten(1).any(1)
    assert torch.equal(changed, d["bias"] | d["blur"] | d["lowres"] | d["brightness"] | d["contrast"] | d["gamma"])
    for key in SCANNER:
        assert 6 <= int(d[key.removesuffix("_prob")].sum()) <= 34  # p 0.3 of 64: inside +-4 sigma
    low, _ = augment_batch(images.bfloat16(), phantom(64, 57, 83)[1], params, gen(8))
    assert low.dtype == torch.bfloat16 and torch.isfinite(low.float()).all()
    torch.testing.assert_close(low.float(), out, atol=0.05, rtol=0.02)


# ---------------------------------------------------------------- the same distribution of draws


def monai_draws(params: AugmentParams) -> dict[str, np.ndarray]:
    transforms = {
        "bias": RandBiasField(degree=params.bias_degree, coeff_range=params.bias_coeff, prob=params.bias_prob),
        "blur": RandGaussianSmooth(sigma_x=params.blur_sigma, sigma_y=params.blur_sigma, prob=params.blur_prob),
        "lowres": RandSimulateLowResolution(prob=params.lowres_prob, zoom_range=params.lowres_zoom),
        "brightness": RandScaleIntensity(factors=params.brightness, prob=params.brightness_prob),
        "contrast": RandScaleIntensityFixedMean(factors=params.contrast, prob=params.contrast_prob),
        "gamma": RandAdjustContrast(gamma=params.gamma, prob=params.gamma_prob),
    }
    for seed, t in enumerate(transforms.values()):
        t.set_random_state(seed)
    out = {k: [] for k in (*transforms, "coeff", "sigma", "zoom", "brightness_factor", "contrast_factor",
                           "gamma_value")}
    for _ in range(DRAWS):
        transforms["bias"].randomize(img_size=(8, 8))
        for name in ("blur", "lowres", "brightness", "contrast", "gamma"):
            transforms[name].randomize(None)
        for name, t in transforms.items():
            out[name].append(t._do_transform)
            if not t._do_transform:
                continue
            value = {"bias": lambda: ("coeff", t._coeff), "blur": lambda: ("sigma", [t.x, t.y]),
                     "lowres": lambda: ("zoom", t.zoom_factor), "brightness": lambda: ("brightness_factor", t.factor),
                     "contrast": lambda: ("contrast_factor", t.factor), "gamma": lambda: ("gamma_value", t.gamma_value)}
            key, v = value[name]()
            out[key].append(v)
    return {k: np.asarray(v, dtype=np.float64) for k, v in out.items()}


def ours_draws(params: AugmentParams) -> dict[str, np.ndarray]:
    d = {k: v.double().numpy() for k, v in _draw_scanner(DRAWS, params, gen(11), torch.device("cpu")).items()}
    for name, flag in (("coeff", "bias"), ("sigma", "blur"), ("zoom", "lowres"), ("brightness_factor", "brightness"),
                       ("contrast_factor", "contrast"), ("gamma_value", "gamma")):
        d[name] = d[name][d[flag].astype(bool)]  # MONAI draws parameters only for applied transforms
    return d


@pytest.fixture(scope="module")
def draws():
    params = AugmentParams(bias_prob=0.2, blur_prob=0.3, lowres_prob=0.4, brightness_prob=0.5, contrast_prob=0.6,
                           gamma_prob=0.7, bias_coeff=(-0.1, 0.2), gamma=(0.6, 1.8))
    return params, monai_draws(params), ours_draws(params)


@pytest.mark.parametrize("name", ["bias", "blur", "lowres", "brightness", "contrast", "gamma"])
def test_application_rates_match_monai(draws, name):
    params, monai, ours = draws
    prob = getattr(params, f"{name}_prob")
    sigma = np.sqrt(prob * (1 - prob) / DRAWS)
    for rate in (monai[name].mean(), ours[name].mean()):
        assert abs(rate - prob) < 4.5 * sigma


@pytest.mark.parametrize("name, column", [("coeff", 0), ("coeff", 9), ("sigma", 0), ("sigma", 1), ("zoom", None),
                                          ("brightness_factor", None), ("contrast_factor", None),
                                          ("gamma_value", None)])
def test_parameter_distributions_match_monai(draws, name, column):
    _, monai, ours = draws
    a, b = monai[name], ours[name]
    if column is not None:
        a, b = a[:, column], b[:, column]
    assert len(a) > 300 and len(b) > 300
    assert ks_2samp(a, b).pvalue > 1e-3


# ---------------------------------------------------------------- job keys


def test_job_keys_reach_the_parameters_and_ranges_are_checked():
    from hpcseg.train import augment_params

    job = job_from_dict({"augment": {"gamma_prob": 0.3, "gamma": [0.8, 1.25], "blur_sigma": [0.4, 0.9],
                                     "bias_degree": 2}})
    params = augment_params(job)
    assert params.gamma_prob == 0.3 and params.gamma == (0.8, 1.25) and params.blur_sigma == (0.4, 0.9)
    assert params.bias_degree == 2 and params.blur_prob == 0.0 and not job_from_dict({}).augment.gamma_prob
    with pytest.raises(JobError) as err:
        job_from_dict({"augment": {"gamma": [1.5, 0.7], "lowres_zoom": [0.9, 0.5], "blur_prob": 1.5}}, "j.toml")
    assert err.value.problems == ["j.toml: augment.blur_prob: 1.5 is above the maximum 1.0"]
    with pytest.raises(JobError) as err:
        job_from_dict({"augment": {"gamma": [1.5, 0.7], "lowres_zoom": [0.9, 0.5]}}, "j.toml")
    assert err.value.problems == [
        "j.toml: augment.lowres_zoom: [0.9, 0.5] is not a range [low, high]: low is above high",
        "j.toml: augment.gamma: [1.5, 0.7] is not a range [low, high]: low is above high",
    ]


def test_a_bad_key_on_the_command_line_is_one_line(tiny_data, tmp_path):
    result = CliRunner().invoke(main, ["train", str(JOB), "--data", str(tiny_data), "--out", str(tmp_path / "r"),
                                       "--set", "augment.gamma=[2.0, 1.0]"])
    assert result.exit_code == 2 and result.output.count("\n") == 1
    assert result.output.startswith("hpcseg: error: ") and "augment.gamma: [2.0, 1.0] is not a range" in result.output


# ---------------------------------------------------------------- resume


def test_resume_with_scanner_augmentation_gives_the_uninterrupted_weights(tiny_data, tmp_path):
    on = [f"augment.{k}=1.0" for k in SCANNER]

    def train(out, epochs, resume=False):
        args = ["train", str(JOB), "--data", str(tiny_data), "--out", str(out)]
        for s in [*TINY, *on, f"train.epochs={epochs}"]:
            args += ["--set", s]
        result = CliRunner().invoke(main, args + (["--resume"] if resume else []))
        assert result.exit_code == 0, result.output

    train(tmp_path / "once", 2)
    train(tmp_path / "twice", 1)
    train(tmp_path / "twice", 2, resume=True)
    a, b = (load_checkpoint(tmp_path / run / "checkpoints" / "last.pt") for run in ("once", "twice"))
    assert "gamma_prob = 1.0" in (tmp_path / "once" / "job.toml").read_text()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert torch.equal(a["rng"]["generator"], b["rng"]["generator"])
    losses = [[json.loads(x)["train_loss"] for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
              for run in ("once", "twice")]
    assert losses[0] == losses[1]
