"""Losses against hand-computed values."""

import math

import pytest
import torch

from medad_fast.losses import (focal_loss, gaussian_window, reconstruction_loss, segmentation_loss, ssim)


def test_gaussian_window_is_normalised_and_symmetric():
    w = gaussian_window(11, 1.5)[0, 0].double()
    assert w.shape == (11, 11)
    assert float(w.sum()) == pytest.approx(1.0, abs=1e-6)
    assert torch.allclose(w, w.t()) and torch.allclose(w, w.flip(0))
    # ratio centre / neighbour = exp(1 / (2 sigma^2)) along one axis
    assert float(w[5, 5] / w[5, 6]) == pytest.approx(math.exp(1 / (2 * 1.5 ** 2)), rel=1e-5)


def test_ssim_identical_images_is_one():
    x = torch.rand(2, 1, 32, 40, generator=torch.Generator().manual_seed(0))
    assert float(ssim(x, x)) == pytest.approx(1.0, abs=1e-6)
    assert torch.allclose(ssim(x, x, reduction="none"), torch.ones_like(x), atol=1e-5)


def test_ssim_of_constant_images_by_hand():
    # constant a and b: variances 0, so per pixel SSIM = (2 mu_a mu_b + C1) / (mu_a^2 + mu_b^2 + C1),
    # with mu = the blurred constant (the zero padding lowers mu near the border, so use the centre)
    a, b = 0.2, 0.6
    x = torch.full((1, 1, 31, 31), a)
    y = torch.full((1, 1, 31, 31), b)
    c1 = 0.01 ** 2
    expected = (2 * a * b + c1) / (a * a + b * b + c1)
    centre = ssim(x, y, reduction="none")[0, 0, 15, 15]
    assert float(centre) == pytest.approx(expected, rel=1e-4)


def test_reconstruction_loss_is_mse_plus_lambda_one_minus_ssim():
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(2, 1, 24, 24, generator=g), torch.rand(2, 1, 24, 24, generator=g)
    total, mse, ssim_term = reconstruction_loss(x, y, ssim_weight=1.0)
    assert float(mse) == pytest.approx(float(((x - y) ** 2).mean()), rel=1e-6)
    assert float(ssim_term) == pytest.approx(1 - float(ssim(x, y)), rel=1e-6)
    assert float(total) == pytest.approx(float(mse + ssim_term), rel=1e-6)
    total3, _, _ = reconstruction_loss(x, y, ssim_weight=3.0)
    assert float(total3) == pytest.approx(float(mse + 3 * ssim_term), rel=1e-6)
    zero, _, _ = reconstruction_loss(x, x)
    assert float(zero) == pytest.approx(0.0, abs=1e-6)


def test_focal_loss_by_hand():
    p = torch.tensor([0.9, 0.2, 0.6, 0.3]).view(1, 1, 2, 2)
    m = torch.tensor([1.0, 0.0, 0.0, 1.0]).view(1, 1, 2, 2)
    # p_t = 0.9, 0.8, 0.4, 0.3; loss_i = -(1 - p_t)^2 log p_t
    by_hand = [-(0.1 ** 2) * math.log(0.9), -(0.2 ** 2) * math.log(0.8),
               -(0.6 ** 2) * math.log(0.4), -(0.7 ** 2) * math.log(0.3)]
    assert float(focal_loss(p, m, gamma=2)) == pytest.approx(sum(by_hand) / 4, rel=1e-6)
    # gamma = 0 is the cross-entropy
    ce = -(math.log(0.9) + math.log(0.8) + math.log(0.4) + math.log(0.3)) / 4
    assert float(focal_loss(p, m, gamma=0)) == pytest.approx(ce, rel=1e-6)


def test_segmentation_loss_l1_plus_focal_on_softmax():
    # logits chosen so softmax gives p = sigmoid(l1 - l0)
    logits = torch.zeros(1, 2, 1, 2)
    logits[0, 1, 0, 0] = math.log(4.0)  # p = 4 / 5 = 0.8
    logits[0, 1, 0, 1] = math.log(0.25)  # p = 0.2
    mask = torch.tensor([[[[1.0, 1.0]]]])
    total, l1, focal = segmentation_loss(logits, mask, gamma=2)
    assert float(l1) == pytest.approx((0.2 + 0.8) / 2, rel=1e-6)
    expected_focal = (-(0.2 ** 2) * math.log(0.8) - (0.8 ** 2) * math.log(0.2)) / 2
    assert float(focal) == pytest.approx(expected_focal, rel=1e-5)
    assert float(total) == pytest.approx(float(l1) + expected_focal, rel=1e-5)


def test_segmentation_loss_gradient_flows_and_perfect_prediction_is_near_zero():
    mask = torch.zeros(2, 1, 8, 8)
    mask[:, :, 2:5, 2:5] = 1
    logits = torch.cat([(1 - mask) * 20, mask * 20], dim=1).requires_grad_(True)
    total, _, _ = segmentation_loss(logits, mask)
    assert float(total.detach()) < 1e-6
    random_logits = torch.randn(2, 2, 8, 8, requires_grad=True)
    segmentation_loss(random_logits, mask)[0].backward()
    assert random_logits.grad is not None and float(random_logits.grad.abs().sum()) > 0


def test_segmentation_loss_shape_errors():
    with pytest.raises(ValueError, match="logits"):
        segmentation_loss(torch.zeros(1, 3, 4, 4), torch.zeros(1, 1, 4, 4))
    with pytest.raises(ValueError, match="mask"):
        segmentation_loss(torch.zeros(1, 2, 4, 4), torch.zeros(1, 1, 4, 5))
    with pytest.raises(ValueError, match="same shape"):
        ssim(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 5))


def test_losses_are_float32_under_half_inputs():
    x = torch.rand(1, 1, 16, 16).to(torch.bfloat16)
    total, _, _ = reconstruction_loss(x, x.float())
    assert total.dtype == torch.float32
    logits = torch.randn(1, 2, 16, 16).to(torch.bfloat16)
    assert segmentation_loss(logits, torch.zeros(1, 1, 16, 16))[0].dtype == torch.float32
