"""Learning-rate schedules: pure functions of the step."""

import math

import pytest
import torch

from sparsekern.training import Constant, StepDecay, WarmupCosine, set_lr


def test_warmup_cosine():
    s = WarmupCosine(0.1, total=110, warmup=10)
    assert s(0) == pytest.approx(0.01) and s(9) == pytest.approx(0.1)
    assert s(10) == pytest.approx(0.1) and s(60) == pytest.approx(0.05) and s(110) == 0.0
    assert WarmupCosine(0.2, total=4)(2) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="warmup <= total"):
        WarmupCosine(0.1, total=5, warmup=6)
    with pytest.raises(ValueError, match="lr > 0"):
        WarmupCosine(math.nan, total=5)


def test_step_decay_constant_and_set_lr():
    s = StepDecay(0.01, every=30, gamma=0.1)
    assert [s(t) for t in (0, 29, 30, 60)] == pytest.approx([0.01, 0.01, 0.001, 0.0001])
    assert Constant(0.5)(10**6) == 0.5
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    set_lr(opt, 0.25)
    assert opt.param_groups[0]["lr"] == 0.25
    with pytest.raises(ValueError, match="every >= 1"):
        StepDecay(0.1, every=0)
