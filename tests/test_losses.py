import math

import pytest
import torch
import torch.nn.functional as F

from models.losses import FocalLoss, depth_loss


def test_focal_gamma0_is_cross_entropy():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7, 9)
    target = torch.randint(0, 5, (2, 7, 9))
    target[0, :2] = 255
    expected = F.cross_entropy(logits, target, ignore_index=255)
    assert torch.allclose(FocalLoss(gamma=0.0)(logits, target), expected, atol=1e-6)


def test_focal_gamma2_hand_computed():
    # two pixels, two classes; softmax([0, ln 3]) = [0.25, 0.75]
    logits = torch.tensor([[0.0, 0.0], [math.log(3), math.log(3)]]).view(1, 2, 1, 2)
    target = torch.tensor([[[1, 0]]])
    p1, p0 = 0.75, 0.25  # p_t of pixel 0 (class 1) and pixel 1 (class 0)
    expected = (-((1 - p1) ** 2) * math.log(p1) - ((1 - p0) ** 2) * math.log(p0)) / 2
    assert FocalLoss(gamma=2.0)(logits, target).item() == pytest.approx(expected, rel=1e-6)


def test_focal_ignored_pixels_change_nothing():
    torch.manual_seed(1)
    logits = torch.randn(1, 3, 4, 4)
    target = torch.randint(0, 3, (1, 4, 4))
    target[0, 0] = 255
    base = FocalLoss()(logits, target)
    noisy = logits.clone()
    noisy[:, :, 0] = torch.randn(1, 3, 4) * 100  # anything at ignored pixels
    assert torch.equal(FocalLoss()(noisy, target), base)
    # and the ignored pixels get no gradient
    noisy.requires_grad_(True)
    FocalLoss()(noisy, target).backward()
    assert torch.count_nonzero(noisy.grad[:, :, 0]) == 0


def test_focal_all_ignored_is_zero_not_nan():
    loss = FocalLoss()(torch.randn(1, 3, 2, 2), torch.full((1, 2, 2), 255))
    assert loss.item() == 0.0


def test_focal_alpha_weights_classes():
    logits = torch.zeros(1, 2, 1, 2)
    target = torch.tensor([[[0, 1]]])
    plain = FocalLoss(gamma=0.0)(logits, target)
    weighted = FocalLoss(gamma=0.0, alpha=torch.tensor([1.0, 3.0]))(logits, target)
    assert weighted.item() == pytest.approx(plain.item() * 2, rel=1e-6)


def test_depth_loss_ignores_invalid_pixels():
    pred = torch.tensor([0.5, 0.0, 1.0, 9.0]).view(1, 1, 2, 2)
    target = torch.tensor([0.0, 0.0, 0.5, float("nan")]).view(1, 1, 2, 2)
    assert depth_loss(pred, target).item() == pytest.approx((0.25 + 0 + 0.25) / 3)
    pred.requires_grad_(True)
    depth_loss(pred, target).backward()
    assert pred.grad.view(-1)[3] == 0
