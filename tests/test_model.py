"""The network: MONAI's BasicUNet as the job says, with the fast dropout mask in place of nn.Dropout."""

import pytest
import torch
from torch import nn

from hpcseg.jobfile import Job, OptimConfig
from hpcseg.model import FastDropout, build_model, build_optimizer, scaled_lr


def test_build_model_replaces_every_dropout_and_keeps_shapes():
    job = Job().replace(**{"model.features": [4, 4, 8, 8, 16, 4], "model.dropout": 0.3})
    model = build_model(job)
    assert not any(type(m) is nn.Dropout for m in model.modules())
    drops = [m for m in model.modules() if isinstance(m, FastDropout)]
    assert drops and all(m.p == 0.3 for m in drops)
    for shape in [(1, 1, 32, 32), (2, 1, 37, 29), (1, 1, 17, 203)]:
        assert model(torch.zeros(shape)).shape == (shape[0], 4, *shape[2:])


def test_fast_dropout_matches_nn_dropout_in_distribution():
    torch.manual_seed(0)
    x = torch.ones(400_000)
    fast = FastDropout(0.4).train()(x)
    ref = nn.Dropout(0.4).train()(x)
    assert (fast == 0).float().mean().item() == pytest.approx(0.4, abs=0.005)
    assert fast.mean().item() == pytest.approx(ref.mean().item(), abs=0.01)
    assert sorted(torch.unique(fast).tolist()) == [0.0, pytest.approx(1 / 0.6)]
    assert torch.equal(FastDropout(0.4).eval()(x), x)


def test_fast_dropout_uses_the_mask_on_cpu_and_torch_s_fused_dropout_elsewhere():
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.__name__)
            return func(*args, **(kwargs or {}))

    def ops(module, x):
        with Ops() as seen:
            module.train()(x)
        return seen.names

    assert ops(FastDropout(0.3), torch.ones(8)) == ["rand_like.default", "lt.Scalar", "_to_copy.default", "mul.Tensor", "mul.Tensor"]
    # a device other than the CPU ("meta" here, a GPU in a job) gets exactly what nn.Dropout does there (on CUDA
    # one fused native_dropout kernel)
    meta = torch.ones(8, device="meta")
    assert ops(FastDropout(0.3), meta) == ops(nn.Dropout(0.3), meta) and "rand_like.default" not in ops(nn.Dropout(0.3), meta)
    assert ops(FastDropout(0.3, mask_everywhere=True), torch.ones(8, device="meta"))[0] == "rand_like.default"


def test_learning_rate_rule():
    cfg = OptimConfig(lr=1e-3, base_batch_size=2, lr_scaling="sqrt")
    assert scaled_lr(cfg, 8) == pytest.approx(2e-3)
    assert scaled_lr(OptimConfig(lr=1e-3, base_batch_size=2, lr_scaling="linear"), 8) == pytest.approx(4e-3)
    assert scaled_lr(OptimConfig(lr=1e-3, lr_scaling="none"), 32) == pytest.approx(1e-3)
    model = nn.Linear(2, 2)
    opt = build_optimizer(cfg, model, 8, torch.device("cpu"))
    assert isinstance(opt, torch.optim.Adam) and opt.param_groups[0]["lr"] == pytest.approx(2e-3)
    sgd = build_optimizer(OptimConfig(name="sgd", lr=0.01, momentum=0.9, lr_scaling="none"), model, 2, torch.device("cpu"))
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["momentum"] == 0.9
