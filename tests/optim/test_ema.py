"""The weight EMA: its recurrence, the swap in and out of the model, the same EMA on ZeRO 0-2."""

import pytest
import torch
from torch import nn

from configs import ConfigError, load_config
from model import GPT
from optim.ema import WeightEMA
from optim.engine import UpdateGate, initialize, set_lr
from tests.helpers import tiny_overrides
from tests.optim.test_engine import LR, batches


def test_ema_recurrence_and_swap():
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    start = [p.detach().clone() for p in model.parameters()]
    ema = WeightEMA(model, 0.9)
    expected = [s.clone() for s in start]
    for step in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(step + 1.0)
        ema.update()
        expected = [
            0.9 * e + 0.1 * p.detach() for e, p in zip(expected, model.parameters(), strict=True)
        ]
    for e, want in zip(ema.shadow, expected, strict=True):
        torch.testing.assert_close(e, want, atol=1e-6, rtol=0)
    weights = [p.detach().clone() for p in model.parameters()]
    x = torch.randn(2, 4)
    with ema.swapped_in():
        inside = model(x)
        assert all(torch.equal(p, e) for p, e in zip(model.parameters(), ema.shadow, strict=True))
    assert all(
        torch.equal(p, w) for p, w in zip(model.parameters(), weights, strict=True)
    )  # bitwise back
    torch.testing.assert_close(inside, x @ ema.shadow[0].T + ema.shadow[1])
    # a checkpoint without an EMA restarts it from the weights; one with it restores it
    saved = {k: [t.clone() for t in v] if k == "shadow" else v for k, v in ema.state_dict().items()}
    ema.load_state_dict(None)
    assert all(torch.equal(e, w) for e, w in zip(ema.shadow, weights, strict=True))
    ema.load_state_dict(saved)
    assert all(torch.equal(e, s) for e, s in zip(ema.shadow, saved["shadow"], strict=True))


def ema_run(stage: int, env) -> list[torch.Tensor]:
    cfg = load_config(None, tiny_overrides(zero_stage=stage, **{"train.ema": 0.5}))
    torch.manual_seed(cfg.run.seed)
    engine, optimizer = initialize(GPT(cfg.model), cfg, 1, env.device)
    gate, ema = UpdateGate(engine, optimizer, cfg), WeightEMA(engine.module, cfg.train.ema)
    for step, (x, y) in enumerate(batches(4)):
        set_lr(engine.optimizer, LR)
        loss = engine(x, y).loss
        engine.backward(loss)
        gate.begin(step, loss.detach())
        engine.step()
        ema.update()
    return ema.shadow


@pytest.mark.parametrize("stage", [1, 2])
def test_ema_is_the_same_on_zero_0_to_2(dist_env, stage):
    reference, shadow = ema_run(0, dist_env), ema_run(stage, dist_env)
    for e, ref in zip(shadow, reference, strict=True):
        torch.testing.assert_close(e, ref, atol=1e-6, rtol=0)


def test_ema_refuses_zero_3():
    with pytest.raises(ConfigError, match="train.ema keeps a full copy"):
        load_config(None, ["train.ema=0.99", "zero_stage=3"])
