import math

import pytest
import torch

from finetune.schedule import lr_multiplier


def test_warmup_is_linear_and_reaches_peak():
    assert lr_multiplier(0, 100, 4, 0.1) == pytest.approx(1 / 5)
    assert lr_multiplier(3, 100, 4, 0.1) == pytest.approx(4 / 5)
    assert lr_multiplier(4, 100, 4, 0.1) == pytest.approx(1.0)


def test_cosine_midpoint_and_end():
    total, warm, floor = 101, 0, 0.1  # decay over steps 0..100
    assert lr_multiplier(50, total, warm, floor) == pytest.approx(floor + (1 - floor) * 0.5)
    quarter = floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi / 4))
    assert lr_multiplier(25, total, warm, floor) == pytest.approx(quarter)
    assert lr_multiplier(100, total, warm, floor) == pytest.approx(floor)
    assert lr_multiplier(500, total, warm, floor) == pytest.approx(floor)  # stays at the floor, no restart


def test_monotone_after_warmup():
    values = [lr_multiplier(s, 60, 10, 0.0) for s in range(60)]
    assert all(a >= b for a, b in zip(values[10:], values[11:], strict=False))
    assert values[-1] == pytest.approx(0.0)


def test_lambda_lr_follows_the_function():
    from functools import partial

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, partial(lr_multiplier, total_steps=10, warmup_steps=2,
                                                           min_ratio=0.2))
    seen = []
    for _ in range(10):
        seen.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert seen == pytest.approx([2.0 * lr_multiplier(s, 10, 2, 0.2) for s in range(10)])
    assert seen[-1] == pytest.approx(0.4)


def test_linear_and_constant_shapes():
    total, warm, floor = 21, 4, 0.1  # warmup over steps 0..3, decay over steps 4..20
    linear = [lr_multiplier(s, total, warm, floor, "linear") for s in range(total + 5)]
    assert linear[:warm] == [lr_multiplier(s, total, warm, floor) for s in range(warm)]  # the same warmup
    assert linear[warm] == pytest.approx(1.0) and linear[20] == pytest.approx(floor) and linear[25] == linear[20]
    assert linear[12] == pytest.approx(floor + (1 - floor) * 0.5)  # halfway down a straight line
    assert [b - a for a, b in zip(linear[warm:20], linear[warm + 1:21], strict=True)] == pytest.approx(
        [-(1 - floor) / 16] * 16)
    constant = [lr_multiplier(s, total, warm, floor, "constant") for s in range(total)]
    assert constant[:warm] == linear[:warm] and constant[warm:] == [1.0] * (total - warm)
