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


def by_hand(optimizer: torch.optim.Optimizer) -> tuple[float, float]:
    """The mean and the exact median of lr / (sqrt(v) + eps), in fp64."""
    v = torch.cat([s["exp_avg_sq"].flatten() for s in optimizer.state.values()]).double()
    rates = LR / (v[v > 0].sqrt() + 1e-8)
    return float(rates.mean()), float(rates.median())


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_every_zero_stage_gives_the_plain_value(dist_env, stage):
    data = batches(STEPS)
    cfg0 = load_config(None, tiny_overrides(zero_stage=0))
    _, _, engine0 = engine_run(cfg0, dist_env, data)
    mean, median = by_hand(base_optimizer(engine0))
    found = adam_effective_lr(base_optimizer(engine0))
    assert found["adam_eff_lr"] == pytest.approx(mean, rel=1e-6)  # fp32 rates, fp64 sums
    bin_ratio = 10 ** (16 / 1600)  # a bin is 1/100 decade: the median is within half of one
    assert median / bin_ratio**0.5 <= found["adam_eff_lr_median"] <= median * bin_ratio**0.5
    # Adam after a few steps: lr / sqrt(v) is far above lr, and finite
    assert LR * 10 < mean < LR / 1e-8
    cfg = load_config(None, tiny_overrides(zero_stage=stage))
    _, _, engine = engine_run(cfg, dist_env, data)
    assert adam_effective_lr(base_optimizer(engine)) == pytest.approx(found, rel=1e-5)


def test_chunks_and_the_median_of_a_known_state(monkeypatch):
    """Rates 10^k for k in -5..3 (each once) and never-stepped zeros: the mean over the stepped
    ones, the median 10^-1, whatever the chunk size."""
    rates = torch.tensor([10.0**k for k in range(-5, 4)])
    v = ((LR / rates) - 1e-8).square()  # lr / (sqrt(v) + eps) = rate
    param = torch.nn.Parameter(torch.zeros(11))
    optimizer = torch.optim.Adam([param], lr=LR, eps=1e-8)
    optimizer.state[param] = {"exp_avg_sq": torch.cat([v, torch.zeros(2)]).float()}
    monkeypatch.setattr("optim.adam_lr.CHUNK", 4)
    found = adam_effective_lr(optimizer)
    assert found["adam_eff_lr"] == pytest.approx(float(rates.double().mean()), rel=1e-5)
    assert found["adam_eff_lr_median"] == pytest.approx(0.1, rel=0.012)


def test_before_any_step_there_is_no_value():
    param = torch.nn.Parameter(torch.ones(3))
    found = adam_effective_lr(torch.optim.Adam([param], lr=LR))
    assert math.isnan(found["adam_eff_lr"]) and math.isnan(found["adam_eff_lr_median"])
