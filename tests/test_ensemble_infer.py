"""The inference core of ensembles and test-time mirroring: probabilities averaged over models x mirrors."""

from __future__ import annotations

import pytest
import torch
from monai.inferers import sliding_window_inference

from hpcseg.infer import ensemble_labels, predict_labels, predict_probabilities
from hpcseg.jobfile import Job
from hpcseg.model import build_model

TINY = Job().replace(**{"model.features": [4, 4, 8, 8, 16, 4], "model.dropout": 0.0, "infer.roi": [48, 48],
                        "infer.batch_size": 4})


def model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(TINY).eval()


@pytest.fixture
def images():
    return torch.rand(5, 1, 48, 40, generator=torch.Generator().manual_seed(0))


def test_flip_tta_is_the_mean_of_the_mirrors_predicted_and_flipped_back(images):
    m = model(0)
    cfg = TINY.replace(**{"infer.tta": "flip"}).infer
    got = torch.cat(list(predict_probabilities([m], images, cfg)))
    with torch.no_grad():
        manual = sum(m(images.flip(axes)).softmax(1).flip(axes) if axes else m(images).softmax(1)
                     for axes in [(), (-1,), (-2,), (-2, -1)]) / 4
    torch.testing.assert_close(got, manual, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got, m(images).softmax(1).detach(), atol=1e-4)  # the mirrors changed something


def test_an_ensemble_of_copies_of_one_model_is_that_model(images):
    m = model(1)
    cfg = TINY.infer
    single = predict_labels(m, images, cfg)
    assert torch.equal(ensemble_labels([m], images, cfg), single)  # one model, no mirrors: today's argmax of logits
    copies = [model(1) for _ in range(3)]
    probs = torch.cat(list(predict_probabilities(copies, images, cfg)))
    with torch.no_grad():
        torch.testing.assert_close(probs, m(images).softmax(1), rtol=1e-5, atol=1e-6)
    assert torch.equal(ensemble_labels(copies, images, cfg), single)


def test_an_ensemble_averages_the_models_probabilities(images):
    models = [model(2), model(3)]
    probs = torch.cat(list(predict_probabilities(models, images, TINY.infer)))
    with torch.no_grad():
        manual = (models[0](images).softmax(1) + models[1](images).softmax(1)) / 2
    torch.testing.assert_close(probs, manual, rtol=1e-5, atol=1e-6)
    assert torch.equal(ensemble_labels(models, images, TINY.infer), manual.argmax(1, keepdim=True))


def test_gaussian_windows_are_monais_sliding_window_with_gaussian_weights():
    m = model(4)
    big = torch.rand(2, 1, 80, 72, generator=torch.Generator().manual_seed(1))  # larger than the 48 x 48 window
    cfg = TINY.replace(**{"infer.sw_mode": "gaussian", "infer.overlap": 0.5}).infer
    got = torch.cat(list(predict_probabilities([m, m], big, cfg)))
    with torch.no_grad():
        expected = sliding_window_inference(big, (48, 48), cfg.sw_batch_size, m, overlap=0.5, mode="gaussian")
        constant = sliding_window_inference(big, (48, 48), cfg.sw_batch_size, m, overlap=0.5, mode="constant")
    torch.testing.assert_close(got, expected.softmax(1), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(expected, constant, atol=1e-4)
