"""Alpha schedule (per-iteration linear decay to 0) and lr milestones."""

import pytest
import torch

from medad_fast.schedules import alpha_at, lr_milestone_epochs


def test_alpha_starts_at_one_and_decays_linearly_per_iteration():
    # 10 steps per epoch, decay over 2 epochs = 20 iterations
    values = [alpha_at(step, 10, 2) for step in range(25)]
    assert values[0] == 1.0
    assert values[5] == pytest.approx(0.75)
    assert values[10] == pytest.approx(0.5)  # one epoch in: half way
    assert values[19] == pytest.approx(0.05)
    assert values[20] == 0.0
    assert values[24] == 0.0  # stays 0 after the decay
    steps = torch.tensor(values[:21])
    assert torch.allclose(steps[1:] - steps[:-1], torch.full((20,), -0.05, dtype=steps.dtype))


def test_alpha_default_paper_setting():
    # paper: 20 decay epochs; with 1000 steps/epoch alpha hits 0 after 20000 iterations
    assert alpha_at(10_000, 1000, 20) == pytest.approx(0.5)
    assert alpha_at(20_000, 1000, 20) == 0.0
    assert alpha_at(19_999, 1000, 20) == pytest.approx(1 / 20_000)


def test_alpha_fractional_epochs_and_zero_decay():
    assert alpha_at(3, 4, 1.5) == pytest.approx(0.5)  # 6 decay steps
    assert alpha_at(0, 4, 0) == 0.0  # no decay phase: decoder features from the start


@pytest.mark.parametrize("args", [(-1, 10, 2), (0, 0, 2), (0, 10, -1)])
def test_alpha_bad_arguments(args):
    with pytest.raises(ValueError):
        alpha_at(*args)


def test_lr_milestones_match_multisteplr_of_draem():
    assert lr_milestone_epochs(230) == [184, 207]
    assert lr_milestone_epochs(10) == [8, 9]
    assert lr_milestone_epochs(1) == [1]  # both fractions collapse to epoch 1
    with pytest.raises(ValueError):
        lr_milestone_epochs(0)
    # the scheduler built from them multiplies the lr by 0.2 at 80 % and 90 %
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, lr_milestone_epochs(10), gamma=0.2)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:8] == [1.0] * 8
    assert lrs[8] == pytest.approx(0.2) and lrs[9] == pytest.approx(0.04)
