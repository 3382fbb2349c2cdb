import math

import pytest
import torch

from finetune.schedule import warmup_cosine


def test_warmup_is_linear_and_reaches_peak():
    assert warmup_cosine(0, 100, 4, 0.1) == pytest.approx(1 / 5)
    assert warmup_cosine(3, 100, 4, 0.1) == pytest.approx(4 / 5)
    assert warmup_cosine(4, 100, 4, 0.1) == pytest.approx(1.0)


def test_cosine_midpoint_and_end():
    total, warm, floor = 101, 0, 0.1  # decay over steps 0..100
    assert warmup_cosine(50, total, warm, floor) == pytest.approx(floor + (1 - floor) * 0.5)
    quarter = floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi / 4))
    assert warmup_cosine(25, total, warm, floor) == pytest.approx(quarter)
    assert warmup_cosine(100, total, warm, floor) == pytest.approx(floor)
    assert warmup_cosine(500, total, warm, floor) == pytest.approx(floor)  # stays at the floor, no restart


def test_monotone_after_warmup():
    values = [warmup_cosine(s, 60, 10, 0.0) for s in range(60)]
    assert all(a >= b for a, b in zip(values[10:], values[11:], strict=False))
    assert values[-1] == pytest.approx(0.0)


def test_lambda_lr_follows_the_function():
    from functools import partial

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, partial(warmup_cosine, total_steps=10, warmup_steps=2,
                                                           min_ratio=0.2))
    seen = []
    for _ in range(10):
        seen.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert seen == pytest.approx([2.0 * warmup_cosine(s, 10, 2, 0.2) for s in range(10)])
    assert seen[-1] == pytest.approx(0.4)
