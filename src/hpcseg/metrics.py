"""Dice per tissue: per slice (MONAI's DiceMetric) and over every pixel of a folder (summed counts).

The exercise fed `DiceMetric(include_background=False)` one-channel argmax maps without `num_classes` and so
scored class 1 alone. Here the metric is told the number of classes, and the folder-level Dice counts true
positives, false positives and false negatives of each class over all pixels.
"""

from __future__ import annotations

import torch
from monai.metrics import DiceMetric

from . import TISSUES


def per_slice_dice(pred: torch.Tensor, label: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B, 1, H, W) class maps -> (B, num_classes - 1) Dice of each non-background class; NaN where a class is
    absent from both label and prediction."""
    metric = DiceMetric(include_background=False, reduction="none", num_classes=num_classes, ignore_empty=False)
    absent = _counts(pred, label, num_classes)[:, 1:].sum(dim=-1) == 0
    return metric(pred, label).masked_fill(absent, float("nan"))

def _counts(pred: torch.Tensor, label: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B, 1, H, W) maps -> (B, num_classes, 3) counts of true positives, false positives, false negatives."""
    pred = pred.reshape(pred.shape[0], -1).long()
    label = label.reshape(label.shape[0], -1).long()
    rows = []
    for c in range(num_classes):
        p, t = pred == c, label == c
        rows.append(torch.stack([(p & t).sum(1), (p & ~t).sum(1), (~p & t).sum(1)], dim=-1))
    return torch.stack(rows, dim=1)


class FolderDice:
    """Accumulates per-class counts over batches; `dice()` gives the Dice of each class over all pixels."""

    def __init__(self, num_classes: int, device: torch.device | str = "cpu") -> None:
        self.num_classes = num_classes
        self.counts = torch.zeros(num_classes, 3, dtype=torch.int64, device=device)

    def update(self, pred: torch.Tensor, label: torch.Tensor) -> None:
        self.counts += _counts(pred, label, self.num_classes).sum(0)

    def dice(self) -> torch.Tensor:
        """(num_classes - 1,) Dice of each non-background class; NaN for a class absent from labels and predictions."""
        tp, fp, fn = self.counts[1:].double().unbind(-1)
        denom = 2 * tp + fp + fn
        return torch.where(denom > 0, 2 * tp / denom.clamp(min=1), torch.full_like(denom, float("nan")))


def named(dice: torch.Tensor | list[float]) -> dict[str, float]:
    """Dice of classes 1..3 keyed by tissue name."""
    values = dice.tolist() if isinstance(dice, torch.Tensor) else list(dice)
    names = TISSUES if len(values) == len(TISSUES) else [f"class_{i + 1}" for i in range(len(values))]
    return {name: float(v) for name, v in zip(names, values)}


def nanmean(values: list[float]) -> float:
    finite = [v for v in values if v == v]
    return sum(finite) / len(finite) if finite else float("nan")
