"""Networks, the skip weight, inference scores and checkpoints."""

import io

import pytest
import torch
import torch.nn.functional as F

from medad_fast.checkpoint import CHECKPOINT_FORMAT, checkpoint_bytes, load_checkpoint
from medad_fast.inference import load_method
from medad_fast.methods import config_from_dict, create_method, resolve_config
from medad_fast.models import (FrequencyAwareModel, ReconstructionNetwork, SegmentationNetwork, image_scores,
                               msgms_anomaly_map, score_filter_size)
from medad_fast.ops import ButterworthHighpass, SkipMerge


def tiny_config(**overrides):
    values = dict(image_size=32, recon_width=2, seg_width=2)
    values.update(overrides)
    return resolve_config("frequency_aware", "small", **values)


def tiny_model(**overrides):
    m = tiny_config(**overrides).method
    return FrequencyAwareModel(m.recon_width, m.seg_width, m.seg_depth, m.mode, m.highpass, m.d0, m.butterworth_order)


def tiny_method(**overrides):
    return create_method(tiny_config(**overrides))


@pytest.mark.parametrize("shape", [(2, 1, 32, 32), (1, 1, 50, 70), (3, 1, 17, 33)])
def test_networks_keep_any_size(shape):
    torch.manual_seed(0)
    recon = ReconstructionNetwork(1, 1, base_width=2)
    seg = SegmentationNetwork(2, 2, base_width=2)
    x = torch.rand(shape)
    assert recon(x).shape == shape
    assert seg(torch.cat([x, x], 1)).shape == (shape[0], 2, *shape[2:])


def test_reconstruction_layout_is_draem_without_skips():
    net = ReconstructionNetwork(1, 1, base_width=4)
    widths = [block[1][0].out_channels for block in net.encoder]
    assert widths == [4, 8, 16, 32, 32]
    assert not any(isinstance(m, SkipMerge) for m in net.modules())
    assert net.final.out_channels == 1 and net.encoder[0][0][0].in_channels == 1


def test_segmentation_skips_see_equal_channels_at_every_level():
    net = SegmentationNetwork(2, 2, base_width=3)
    shapes = []
    hooks = [skip.register_forward_hook(lambda m, args, out: shapes.append((args[0].shape, args[1].shape, out.shape)))
             for skip in net.skips]
    net(torch.rand(1, 2, 64, 64))
    for hook in hooks:
        hook.remove()
    assert len(shapes) == 5
    for encoder_shape, decoder_shape, merged in shapes:
        assert encoder_shape == decoder_shape  # WDMT layout: E_i and D_i have the same channels
        assert merged[1] == 2 * encoder_shape[1]
    assert [s[0][1] for s in shapes] == [24, 24, 12, 6, 3]


def _skip_gradients(alpha: float):
    """Gradients reaching E_0 and D_0 through the last (full-resolution) skip of the model's S.

    (At alpha = 1 the deeper skips see no gradient at all: everything above level 0 reaches
    the output only through the detached/(1 - alpha)-weighted D_i, as the method intends.)"""
    torch.manual_seed(0)
    model = tiny_model()
    model.alpha = alpha
    leaves = {}

    def swap_in_leaves(module, args):
        encoder, decoder = (a.detach().requires_grad_(True) for a in args)
        leaves["E"], leaves["D"] = encoder, decoder
        return encoder, decoder

    hook = model.segmentation.skips[-1].register_forward_pre_hook(swap_in_leaves)
    out = model(torch.rand(2, 1, 32, 32))
    (out.logits ** 2).sum().backward()
    hook.remove()
    return leaves["E"].grad, leaves["D"].grad


def test_skip_gradient_at_alpha_one_goes_to_the_encoder_only():
    grad_e, grad_d = _skip_gradients(1.0)
    assert float(grad_e.abs().sum()) > 0
    assert float(grad_d.abs().sum()) == 0.0  # the detached copy and (1 - alpha) = 0 block it


def test_skip_gradient_at_alpha_zero_goes_to_the_decoder_only():
    grad_e, grad_d = _skip_gradients(0.0)
    assert float(grad_e.abs().sum()) == 0.0
    assert float(grad_d.abs().sum()) > 0


def test_skip_gradient_at_half_alpha_is_split_equally():
    grad_e, grad_d = _skip_gradients(0.5)
    assert torch.allclose(grad_e, grad_d)
    assert float(grad_e.abs().sum()) > 0


def test_alpha_propagates_and_is_checked():
    model = tiny_model()
    model.alpha = 0.25
    assert all(skip.alpha == 0.25 for skip in model.segmentation.skips)
    assert model.alpha == 0.25
    with pytest.raises(ValueError, match="alpha"):
        model.alpha = 1.5


def test_image_score_is_max_of_avg_pool_21_with_zero_padding():
    g = torch.Generator().manual_seed(0)
    maps = torch.rand(4, 40, 56, generator=g) ** 4
    expected = F.avg_pool2d(maps.unsqueeze(1), 21, 1, 10).flatten(1).max(1).values
    assert torch.allclose(image_scores(maps), expected)
    # by hand: one hot pixel in a corner; the padded zeros count, so the mean is 1 / 441
    corner = torch.zeros(1, 30, 30)
    corner[0, 0, 0] = 1.0
    assert float(image_scores(corner)) == pytest.approx(1 / 441)
    full = torch.ones(1, 30, 30)
    assert float(image_scores(full)) == pytest.approx(1.0)  # interior windows are full
    with pytest.raises(ValueError):
        image_scores(torch.zeros(1, 1, 8, 8))


def test_score_filter_scales_with_the_image_side():
    assert create_method(resolve_config("frequency_aware", "paper", recon_width=1, seg_width=1)).score_filter == 21
    sides = {256: 21, 128: 11, 96: 9, 64: 5, 512: 43, 8: 1}  # DRAEM's 21 at 256
    for side, expected in sides.items():
        assert score_filter_size(side) == expected
    assert tiny_method(score_filter=21).score_filter == 21
    with pytest.raises(ValueError, match="score_filter"):
        resolve_config("frequency_aware", "small", score_filter=4)


def test_full_model_trains_the_reconstruction_through_the_segmentation_loss():
    torch.manual_seed(0)
    model = tiny_model()
    assert isinstance(model.highpass, ButterworthHighpass)
    out = model(torch.rand(2, 1, 32, 32))
    assert out.reconstruction.shape == (2, 1, 32, 32) and out.logits.shape == (2, 2, 32, 32)
    out.logits.sum().backward()  # segmentation output only
    grads = [p.grad for p in model.reconstruction.parameters()]
    assert any(g is not None and float(g.abs().sum()) > 0 for g in grads), "I_r must not be detached"


def test_predict_maps_scores_and_mode_restored():
    method = tiny_method()
    method.train()
    images = torch.rand(3, 1, 32, 32)
    maps, scores = method.predict(images)
    assert method.training
    assert maps.shape == (3, 32, 32) and scores.shape == (3,)
    assert float(maps.min()) >= 0 and float(maps.max()) <= 1
    assert torch.allclose(scores, image_scores(maps, score_filter_size(32)))
    # inference segments concat(I_r, I): the same as a manual eval forward pass
    method.eval()
    with torch.no_grad():
        manual = torch.softmax(method.model(images).logits, 1)[:, 1]
    assert torch.allclose(maps, manual)


def test_ablation_modes_build_the_right_networks():
    recon_only = tiny_model(mode="recon_only")
    assert recon_only.segmentation is None and recon_only.reconstruction is not None
    maps, scores = tiny_method(mode="recon_only").predict(torch.rand(2, 1, 32, 32))
    assert maps.shape == (2, 32, 32) and scores.shape == (2,)
    seg_only = tiny_model(mode="seg_only")
    assert seg_only.reconstruction is None and seg_only.segmentation.encoder[0][0][0].in_channels == 1
    assert seg_only(torch.rand(2, 1, 32, 32)).logits.shape == (2, 2, 32, 32)
    no_highpass = tiny_model(highpass=False)
    assert isinstance(no_highpass.highpass, torch.nn.Identity)
    order_one = tiny_model(butterworth_order=1)
    assert order_one.highpass.order == 1 and order_one.highpass.d0 == 30.0


def test_msgms_map_zero_for_identical_and_positive_for_a_changed_region():
    x = torch.rand(1, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    assert float(msgms_anomaly_map(x, x).abs().max()) < 1e-5
    y = x.clone()
    y[:, :, 8:16, 8:16] = 0.5  # flattened patch: gradients disagree there
    anomaly = msgms_anomaly_map(x, y)
    assert float(anomaly[0, 8:16, 8:16].mean()) > float(anomaly[0, 24:, 24:].mean()) + 0.1


def test_conv_weights_are_initialised_normal_0_002():
    model = tiny_model(recon_width=8, seg_width=8)
    weights = torch.cat([m.weight.detach().flatten() for m in model.modules() if isinstance(m, torch.nn.Conv2d)])
    assert abs(float(weights.mean())) < 2e-3
    assert float(weights.std()) == pytest.approx(0.02, rel=0.05)


def _save(path, state):
    path.write_bytes(checkpoint_bytes(state))
    return path


def test_checkpoint_round_trip_restores_weights_and_alpha(tmp_path):
    from medad_fast.preprocessing import decide_preprocessing

    config = tiny_config()
    config = config.with_preprocessing(decide_preprocessing(config.run))  # as training saves it
    method = create_method(config)
    method.alpha = 0.3
    path = _save(tmp_path / "ckpt.pt", {"config": config.to_dict(), "model": method.state_dict(),
                                        "method_state": method.method_state()})
    loaded, state = load_method(path)
    assert loaded.config == config and loaded.alpha == pytest.approx(0.3)
    assert load_checkpoint(path, expected=config)["method_state"] == {"alpha": 0.3}
    x = torch.rand(1, 1, 32, 32)
    assert torch.equal(method.predict(x)[0], loaded.predict(x)[0])


def test_checkpoint_of_another_preset_is_refused(tmp_path):
    paper = resolve_config("frequency_aware", "paper")
    # the check runs on the stored config before any weight is touched
    path = _save(tmp_path / "paper.pt", {"config": paper.to_dict(), "model": {}})
    with pytest.raises(ValueError, match="preset 'paper'.*preset 'small'"):
        load_checkpoint(path, expected=resolve_config("frequency_aware", "small"))
    with pytest.raises(ValueError, match="trained as frequency_aware .*does not fit ae"):
        load_checkpoint(path, expected=resolve_config("ae", "paper"))
    assert load_checkpoint(path, expected=paper)["config"]["run"]["preset"] == "paper"


class NotAWeight:
    pass


def test_checkpoint_loading_is_weights_only_and_checks_the_format(tmp_path):
    unsafe = tmp_path / "unsafe.pt"
    buffer = io.BytesIO()
    torch.save({"format": CHECKPOINT_FORMAT, "config": tiny_config().to_dict(), "payload": NotAWeight()}, buffer)
    unsafe.write_bytes(buffer.getvalue())
    with pytest.raises(ValueError, match="not a readable"):
        load_checkpoint(unsafe)
    other = tmp_path / "other.pt"
    torch.save({"state_dict": {}}, other)
    with pytest.raises(ValueError, match="not a medad_fast checkpoint"):
        load_checkpoint(other)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pt")


def test_config_round_trip_presets_and_bad_values():
    small = resolve_config("frequency_aware", "small")
    assert config_from_dict(small.to_dict()) == small
    paper = resolve_config("frequency_aware", "paper")
    run, method = paper.run, paper.method
    assert (method.recon_width, method.seg_width, run.image_size, run.batch_size, run.epochs, run.lr,
            method.alpha_decay_epochs, method.butterworth_order, method.d0) == (128, 64, 256, 8, 230, 1e-4, 20.0, 2, 30.0)
    with pytest.raises(ValueError, match="unknown run config keys"):
        config_from_dict({**small.to_dict(), "run": {**small.to_dict()["run"], "bogus": 1}})
    # a saved config of a method this install does not have: named, with the known ones listed
    with pytest.raises(ValueError, match=r"unknown method 'nope'; choose one of \['frequency_aware', 'ae', "):
        config_from_dict({**small.to_dict(), "run": {**small.to_dict()["run"], "method": "nope"}})
    with pytest.raises(ValueError, match="unknown preset"):
        resolve_config("frequency_aware", "huge")
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        resolve_config("nope", "small")
    with pytest.raises(ValueError, match="method 'ae' has no setting roi"):
        resolve_config("ae", "small", roi=False)
    for field, value in (("lr", 0.0), ("mode", "both"), ("p_anomaly", 2.0), ("butterworth_order", 0)):
        with pytest.raises(ValueError, match=field):
            resolve_config("frequency_aware", "small", **{field: value})


def test_format_1_flat_config_reads_as_the_paper_method():
    flat = {"preset": "small", "image_size": 96, "recon_width": 16, "seg_width": 16, "seg_depth": 3, "epochs": 70,
            "lr": 1e-3, "mode": "seg_only", "roi": False, "extra": {}, "checkpoint_every": 1}
    config = config_from_dict(flat)
    assert config.run.method == "frequency_aware" and config.run.image_size == 96 and config.run.checkpoint_every == 1
    assert (config.method.mode, config.method.roi, config.method.recon_width) == ("seg_only", False, 16)


def test_config_variant_names_the_method_mode_and_the_ablations():
    assert resolve_config("frequency_aware", "small").variant == "frequency_aware (full)"
    assert (resolve_config("frequency_aware", "small", roi=False, synthesis=False).variant
            == "frequency_aware (full, no ROI, no synthesis)")
    assert (resolve_config("frequency_aware", "small", mode="seg_only", highpass=False).variant
            == "frequency_aware (seg_only, no high-pass)")
    assert resolve_config("ae", "small").variant == "ae"
