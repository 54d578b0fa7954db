"""Loss and metric against hand-computed cases, including the exercise's two defects."""

import math

import pytest
import torch
import torch.nn.functional as F
from monai.metrics import DiceMetric

from hpcseg.jobfile import Job, LossConfig
from hpcseg.metrics import FolderDice, named, nanmean, per_slice_dice
from hpcseg.model import build_loss

LABEL = torch.tensor([[[[0, 1, 2, 3], [0, 1, 2, 3]]]])  # (1, 1, 2, 4): two pixels of each class


def test_dice_of_each_tissue_by_hand():
    pred = torch.tensor([[[[0, 1, 2, 2], [0, 1, 1, 3]]]])
    # csf: tp 2, fp 1 -> 4/5; grey: tp 1, fp 1, fn 1 -> 2/4; white: tp 1, fn 1 -> 2/3
    expected = [4 / 5, 2 / 4, 2 / 3]
    assert per_slice_dice(pred, LABEL, 4)[0].tolist() == pytest.approx(expected)
    folder = FolderDice(4)
    folder.update(pred, LABEL)
    assert folder.dice().tolist() == pytest.approx(expected)


def test_metric_defect_swapped_tissues_do_not_score_one():
    """Defect 2: DiceMetric on argmax maps without num_classes scores class 1 alone."""
    swapped = torch.tensor([[[[0, 1, 3, 2], [0, 1, 3, 2]]]])  # CSF perfect, grey and white swapped
    assert DiceMetric(include_background=False)(swapped, LABEL).item() == 1.0  # the exercise's number
    dice = per_slice_dice(swapped, LABEL, 4)[0].tolist()
    assert dice == [1.0, 0.0, 0.0]
    assert nanmean(dice) == pytest.approx(1 / 3)
    folder = FolderDice(4)
    folder.update(swapped, LABEL)
    assert folder.dice().tolist() == [1.0, 0.0, 0.0]


def test_folder_dice_counts_pixels_not_slices():
    a = torch.zeros(1, 1, 10, 10, dtype=torch.long)
    a[..., :5, :] = 2  # 50 grey pixels, all right
    b = torch.zeros(1, 1, 10, 10, dtype=torch.long)
    b[..., 0, 0] = 2  # 1 grey pixel, predicted as background
    folder = FolderDice(4)
    folder.update(a, a)
    folder.update(torch.zeros_like(b), b)
    grey = folder.dice()[1].item()
    assert grey == pytest.approx(2 * 50 / (2 * 50 + 1))  # not the mean of 1.0 and 0.0
    assert math.isnan(folder.dice()[0].item())  # CSF absent everywhere


def test_per_slice_dice_marks_absent_classes_nan_and_false_positives_zero():
    label = torch.zeros(1, 1, 4, 4, dtype=torch.long)
    pred = label.clone()
    pred[..., 0, 0] = 1  # CSF predicted where there is none
    dice = per_slice_dice(pred, label, 4)[0]
    assert dice[0].item() == 0.0 and math.isnan(dice[1].item()) and math.isnan(dice[2].item())


def test_named_and_nanmean():
    assert named([0.5, 0.6, 0.7]) == {"csf": 0.5, "grey_matter": 0.6, "white_matter": 0.7}
    assert nanmean([1.0, float("nan"), 0.0]) == 0.5


def test_cross_entropy_defect_target_is_the_label_channel():
    """Defect 1: argmax over the single label channel is all zeros; the CE term must use the labels themselves."""
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 8, 8)
    labels = torch.randint(0, 4, (2, 1, 8, 8))
    loss = build_loss(LossConfig(name="dice_ce", dice_weight=0.0, ce_weight=1.0))
    right = F.cross_entropy(logits, labels[:, 0])
    wrong = F.cross_entropy(logits, torch.argmax(labels, dim=1))  # the exercise's target: every pixel background
    assert torch.argmax(labels, dim=1).max() == 0
    assert loss(logits, labels).item() == pytest.approx(right.item(), rel=1e-5)
    assert loss(logits, labels).item() != pytest.approx(wrong.item(), rel=1e-3)


def test_dice_ce_is_the_weighted_sum():
    torch.manual_seed(1)
    logits = torch.randn(2, 4, 8, 8)
    labels = torch.randint(0, 4, (2, 1, 8, 8))
    dice_only = build_loss(LossConfig(name="dice"))(logits, labels)
    ce = F.cross_entropy(logits, labels[:, 0])
    combined = build_loss(LossConfig(name="dice_ce", dice_weight=0.8, ce_weight=0.2))(logits, labels)
    assert combined.item() == pytest.approx(0.8 * dice_only.item() + 0.2 * ce.item(), rel=1e-5)


def test_perfect_logits_give_near_zero_loss():
    labels = torch.randint(0, 4, (1, 1, 8, 8))
    logits = F.one_hot(labels[:, 0], 4).permute(0, 3, 1, 2).float() * 50
    assert build_loss(Job().loss)(logits, labels).item() < 1e-3
