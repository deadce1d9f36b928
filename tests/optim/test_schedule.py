"""The learning-rate schedule at its endpoints and in a table."""

import math

import pytest

from optim.config import OptimConfig
from optim.schedule import lr_at

CFG = OptimConfig(lr=6e-4, min_lr=6e-5, warmup_steps=400)


@pytest.mark.parametrize(
    ("step", "expected"),
    [
        (0, 6e-4 / 400),  # the first update is not wasted at lr 0
        (199, 6e-4 * 200 / 400),
        (399, 6e-4),  # warmup ends exactly at the peak
        (400, 6e-4),  # the cosine starts at the peak
        (400 + 49_600 // 2, (6e-4 + 6e-5) / 2),  # half way down
        (50_000, 6e-5),  # ends at min_lr
        (60_000, 6e-5),  # and stays there
    ],
)
def test_cosine_table(step, expected):
    assert lr_at(step, CFG, 50_000) == pytest.approx(expected, rel=1e-12)


def test_constant_after_warmup():
    cfg = CFG.model_copy(update={"schedule": "constant"})
    assert lr_at(10, cfg, 1000) == pytest.approx(6e-4 * 11 / 400)
    assert [lr_at(s, cfg, 1000) for s in (400, 999, 5000)] == [6e-4] * 3


def test_no_warmup_and_monotone_decay():
    cfg = CFG.model_copy(update={"warmup_steps": 0})
    lrs = [lr_at(s, cfg, 100) for s in range(101)]
    assert lrs[0] == 6e-4 and lrs[-1] == pytest.approx(6e-5)
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))
    assert all(math.isfinite(x) for x in lrs)
