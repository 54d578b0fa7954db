"""The network, its loss and its optimiser, built from a job's sections."""

from __future__ import annotations

import torch
from monai.losses import DiceCELoss, DiceLoss
from monai.networks.nets import BasicUNet
from torch import nn

from .jobfile import Job, LossConfig, OptimConfig


#: BasicUNet halves the image four times and instance norm needs more than one pixel at the bottom:
#: smaller slices are zero-padded up to this size.
MIN_SIZE = 32


class FastDropout(nn.Module):
    """Inverted dropout with its mask drawn as `rand < keep` on CPU, and PyTorch's own dropout elsewhere.

    Same distribution as `nn.Dropout`. On CPU `bernoulli_` was 19 % of a training step of the improved model and
    drawing the mask this way costs a third of that (recipe.md; benchmarks/train_throughput.py measures it). On a
    GPU `nn.Dropout` is one fused kernel (`native_dropout`) against five for the mask (random numbers, compare,
    cast, two products), each a launch and a pass over the activations, so there it is used as it is
    (`mask_everywhere=True` keeps the mask on every device, for benchmarks).
    """

    def __init__(self, p: float, mask_everywhere: bool = False) -> None:
        super().__init__()
        self.p = float(p)
        self.mask_everywhere = mask_everywhere

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if x.device.type != "cpu" and not self.mask_everywhere:
            return nn.functional.dropout(x, self.p, training=True)
        keep = 1.0 - self.p
        return x * (torch.rand_like(x) < keep).to(x.dtype) * (1.0 / keep)

    def extra_repr(self) -> str:
        return f"p={self.p}" + (", mask_everywhere=True" if self.mask_everywhere else "")


def _swap_dropout(module: nn.Module, mask_everywhere: bool) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.Dropout):
            setattr(module, name, FastDropout(child.p, mask_everywhere))
        else:
            _swap_dropout(child, mask_everywhere)


def build_model(job: Job, mask_everywhere: bool = False) -> nn.Module:
    """MONAI's BasicUNet as the job describes it, with the fast dropout mask."""
    net = BasicUNet(
        spatial_dims=2,
        in_channels=1,
        out_channels=job.data.num_classes,
        features=tuple(job.model.features),
        act=job.model.act,
        norm=job.model.norm,
        dropout=job.model.dropout,
    )
    _swap_dropout(net, mask_everywhere)
    return net


def build_loss(cfg: LossConfig) -> nn.Module:
    """Dice (+ cross-entropy) on softmax logits against (B, 1, H, W) class-index labels.

    MONAI one-hot encodes the label for the Dice term and gives the cross-entropy the label channel as class
    indices: the exercise's `argmax` over a single label channel (always 0) is not repeated.
    """
    if cfg.name == "dice":
        return DiceLoss(to_onehot_y=True, softmax=True)
    return DiceCELoss(to_onehot_y=True, softmax=True, lambda_dice=cfg.dice_weight, lambda_ce=cfg.ce_weight)


def scaled_lr(cfg: OptimConfig, batch_size: int) -> float:
    """The learning rate for `batch_size`: lr x (batch_size / base_batch_size) ** {none: 0, sqrt: 1/2, linear: 1}."""
    power = {"none": 0.0, "sqrt": 0.5, "linear": 1.0}[cfg.lr_scaling]
    return cfg.lr * (batch_size / cfg.base_batch_size) ** power


def build_optimizer(cfg: OptimConfig, model: nn.Module, batch_size: int, device: torch.device) -> torch.optim.Optimizer:
    lr = scaled_lr(cfg, batch_size)
    params = model.parameters()
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    fused = device.type == "cuda"  # fused Adam: one kernel for all parameters
    cls = torch.optim.AdamW if cfg.name == "adamw" else torch.optim.Adam
    return cls(params, lr=lr, weight_decay=cfg.weight_decay, fused=fused)
