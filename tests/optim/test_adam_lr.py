"""`optim.adam_lr`: the paper's Adam effective LR, the same on every ZeRO stage."""

import math

import pytest
import torch

from configs import load_config
from optim.adam_lr import adam_effective_lr
from tests.helpers import tiny_overrides
from tests.optim.test_engine import LR, STEPS, batches, engine_run


def base_optimizer(engine) -> torch.optim.Optimizer:
    """Our optimizer: DeepSpeed's ZeRO 1-3 wrap it, ZeRO 0 on the CPU uses it as it is."""
    return getattr(engine.optimizer, "optimizer", engine.optimizer)


def by_hand(optimizer: torch.optim.Optimizer) -> float:
    v = torch.cat([s["exp_avg_sq"].flatten() for s in optimizer.state.values()]).double()
    return float((LR / (v.sqrt() + 1e-8)).mean())


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_every_zero_stage_gives_the_plain_value(dist_env, stage):
    data = batches(STEPS)
    cfg0 = load_config(None, tiny_overrides(zero_stage=0))
    _, _, engine0 = engine_run(cfg0, dist_env, data)
    expected = by_hand(base_optimizer(engine0))
    assert adam_effective_lr(base_optimizer(engine0)) == pytest.approx(expected, rel=1e-12)
    # Adam after a few steps: lr / sqrt(v) is far above lr, and finite
    assert LR * 10 < expected < LR / 1e-8
    cfg = load_config(None, tiny_overrides(zero_stage=stage))
    _, _, engine = engine_run(cfg, dist_env, data)
    assert adam_effective_lr(base_optimizer(engine)) == pytest.approx(expected, rel=1e-5)


def test_before_any_step_there_is_no_value():
    param = torch.nn.Parameter(torch.ones(3))
    assert math.isnan(adam_effective_lr(torch.optim.Adam([param], lr=LR)))
