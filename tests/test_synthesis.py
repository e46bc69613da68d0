"""AnomalySynthesizer: seeded, liver-aware, retries on the failed samples only."""

import math

import pytest
import torch

from medad_fast import ops
from medad_fast.synthesis import AnomalySynthesizer


def liver_images(batch: int, size: int = 32, liver: int = 12, seed: int = 0) -> torch.Tensor:
    """Images that are 0 outside a centred ``liver x liver`` square, textured inside."""
    g = torch.Generator().manual_seed(seed)
    images = torch.zeros(batch, 1, size, size)
    lo = (size - liver) // 2
    images[:, :, lo:lo + liver, lo:lo + liver] = 0.3 + 0.4 * torch.rand(batch, 1, liver, liver, generator=g)
    return images


def source_pool(n: int = 8, size: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 1, size, size, generator=torch.Generator().manual_seed(seed))


class RecordingOp:
    """Wraps ops.synthesize_anomalies and records each call's inputs and outputs."""

    def __init__(self):
        self.calls = []
        self.real = ops.synthesize_anomalies

    def __call__(self, images, sources, angles, res, rotation, beta, anomalous, threshold, roi_threshold,
                 **options):
        out = self.real(images, sources, angles, res, rotation, beta, anomalous, threshold, roi_threshold, **options)
        self.calls.append(dict(images=images.clone(), angles=angles, res=res, rotation=rotation, beta=beta,
                               anomalous=anomalous.clone(), augmented=out[0].clone(), mask=out[1].clone(),
                               options=options))
        return out


def test_same_seed_same_batch_different_seed_different_batch():
    synth = AnomalySynthesizer(source_pool(), p_anomaly=0.5)
    images = liver_images(16, liver=24)
    a1, m1 = synth(images, torch.Generator().manual_seed(7))
    a2, m2 = synth(images, torch.Generator().manual_seed(7))
    assert torch.equal(a1, a2) and torch.equal(m1, m2)
    a3, m3 = synth(images, torch.Generator().manual_seed(8))
    assert not torch.equal(m1, m3)
    assert m1.sum() > 0  # something was synthesized


def test_outside_the_liver_is_unchanged_and_unmasked():
    synth = AnomalySynthesizer(source_pool(), p_anomaly=1.0)
    images = liver_images(32, liver=16)
    augmented, mask = synth(images, torch.Generator().manual_seed(3))
    outside = images <= 0
    assert torch.equal(augmented[outside], images[outside])
    assert float(mask[outside].abs().sum()) == 0.0
    # outside the mask nothing changes either; inside, the pixels moved towards the source
    assert torch.equal(augmented[mask == 0], images[mask == 0])
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    assert int((mask.flatten(1).amax(1) > 0).sum()) >= 30  # retries fill nearly all


def test_no_roi_lets_the_mask_leave_the_liver():
    synth = AnomalySynthesizer(source_pool(), p_anomaly=1.0, roi_threshold=-math.inf)
    images = liver_images(32, liver=8)
    _, mask = synth(images, torch.Generator().manual_seed(4))
    assert float(mask[images <= 0].sum()) > 0


def test_blend_is_image_plus_beta_times_source_minus_image():
    # constant image 0.5 and constant source 1.0: inside the mask I_a = 0.5 + beta * 0.5
    images = torch.full((64, 1, 24, 24), 0.5)
    synth = AnomalySynthesizer(torch.ones(4, 1, 24, 24), p_anomaly=1.0)
    augmented, mask = synth(images, torch.Generator().manual_seed(5))
    for b in range(64):
        inside = augmented[b][mask[b] > 0]
        if inside.numel() == 0:
            continue
        beta = (inside - 0.5) / 0.5
        assert torch.allclose(beta, beta[0].expand_as(beta), atol=1e-6)  # one opacity per sample
        assert 0.1 - 1e-6 <= float(beta[0]) <= 1.0 + 1e-6


def test_drawn_parameters_follow_the_method(monkeypatch):
    recorder = RecordingOp()
    monkeypatch.setattr(ops, "synthesize_anomalies", recorder)
    synth = AnomalySynthesizer(source_pool(), p_anomaly=0.5, max_retries=0)
    synth(liver_images(512, liver=24), torch.Generator().manual_seed(6))
    (call,) = recorder.calls
    assert call["angles"].shape == (512, 33, 33)
    assert float(call["angles"].min()) >= 0 and float(call["angles"].max()) < 2 * math.pi
    res = call["res"]
    assert set(res.unique().tolist()) == {1, 2, 4, 8, 16, 32}  # 2^k, k in 0..5
    assert not torch.equal(res[:, 0], res[:, 1])  # drawn independently per axis
    assert call["options"] == {"res_bounds": (1, 32)}  # the range res is drawn from: not read back
    assert float(call["rotation"].abs().max()) <= math.pi / 2
    assert float(call["rotation"].min()) < -1.0 and float(call["rotation"].max()) > 1.0
    assert 0.1 <= float(call["beta"].min()) and float(call["beta"].max()) <= 1.0


def test_retries_touch_only_the_failed_samples(monkeypatch):
    recorder = RecordingOp()
    monkeypatch.setattr(ops, "synthesize_anomalies", recorder)
    # a tiny liver makes many first draws miss it
    images = liver_images(64, size=32, liver=5)
    synth = AnomalySynthesizer(source_pool(), p_anomaly=1.0, max_retries=10)
    augmented, mask = synth(images, torch.Generator().manual_seed(9))
    assert len(recorder.calls) >= 2, "the test needs at least one retry"
    assert synth.last_retries == len(recorder.calls) - 1

    first = recorder.calls[0]
    failed = first["anomalous"] & (first["mask"].flatten(1).amax(1) == 0)
    succeeded = ~failed
    # samples that succeeded at once keep their first result
    assert torch.equal(augmented[succeeded], first["augmented"][succeeded])
    assert torch.equal(mask[succeeded], first["mask"][succeeded])
    # each retry runs on exactly the still-failed samples
    for retry in recorder.calls[1:]:
        index = failed.nonzero().squeeze(1)
        assert retry["images"].shape[0] == index.numel()
        assert torch.equal(retry["images"], images[index])
        assert bool(retry["anomalous"].all())
        still_empty = retry["mask"].flatten(1).amax(1) == 0
        failed[index[~still_empty]] = False
    # the final result: every sample that got a mask on some try has it
    assert torch.equal(mask.flatten(1).amax(1) == 0, failed)


def test_retry_limit_leaves_samples_normal(monkeypatch):
    recorder = RecordingOp()
    monkeypatch.setattr(ops, "synthesize_anomalies", recorder)
    images = torch.zeros(4, 1, 16, 16)  # no liver at all: every draw fails
    synth = AnomalySynthesizer(source_pool(size=16), p_anomaly=1.0, max_retries=3)
    augmented, mask = synth(images, torch.Generator().manual_seed(0))
    assert len(recorder.calls) == 4  # first try + 3 retries
    assert float(mask.sum()) == 0.0 and torch.equal(augmented, images)


@pytest.mark.parametrize("p_anomaly", [0.0, 0.2, 0.5, 1.0])
def test_p_anomaly_is_respected_statistically(p_anomaly):
    n = 2000
    images = torch.full((n, 1, 16, 16), 0.5)  # liver everywhere: retries nearly always succeed
    synth = AnomalySynthesizer(source_pool(size=16), p_anomaly=p_anomaly)
    _, mask = synth(images, torch.Generator().manual_seed(11))
    fraction = float((mask.flatten(1).amax(1) > 0).float().mean())
    if p_anomaly in (0.0, 1.0):
        assert fraction == pytest.approx(p_anomaly, abs=0.005)
    else:
        sd = math.sqrt(p_anomaly * (1 - p_anomaly) / n)
        assert abs(fraction - p_anomaly) < 4 * sd


def test_bad_arguments_give_clear_errors():
    with pytest.raises(ValueError, match="sources"):
        AnomalySynthesizer(torch.rand(4, 3, 8, 8))
    with pytest.raises(ValueError, match="p_anomaly"):
        AnomalySynthesizer(source_pool(), p_anomaly=1.5)
    synth = AnomalySynthesizer(source_pool(size=32))
    with pytest.raises(ValueError, match="anomaly sources"):
        synth(torch.rand(2, 1, 16, 16), torch.Generator())
    with pytest.raises(ValueError, match="images"):
        synth(torch.rand(2, 16, 16), torch.Generator())
    with pytest.raises(ValueError, match="generator"):
        synth(torch.rand(2, 1, 32, 32), None)
