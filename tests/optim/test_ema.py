"""The weight EMA: its recurrence, the swap in and out of the model, the same EMA on ZeRO 0-3."""

import pytest
import torch
from torch import nn

from configs import load_config
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


def ema_run(stage: int, env, sharded: bool = False):
    """Four steps with the EMA: (the EMA, its whole tensors, the losses of a batch with the
    weights, the EMA swapped in, and the weights again). `sharded`: ZeRO 3 keeps no parameter
    gathered (persistence threshold 0), so every EMA tensor is a partition."""
    overrides = {"train.ema": 0.5}
    if sharded:
        overrides["deepspeed.extra"] = (
            "{zero_optimization: {stage3_param_persistence_threshold: 0}}"
        )
    cfg = load_config(None, tiny_overrides(zero_stage=stage, **overrides))
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
    x, y = batches(1, seed=1)[0]
    engine.module.eval()
    with torch.no_grad():
        losses = [engine(x, y).loss.item()]
        with ema.swapped_in():
            losses.append(engine(x, y).loss.item())
        losses.append(engine(x, y).loss.item())
    return ema, ema.state_dict()["shadow"], losses


@pytest.mark.parametrize(("stage", "sharded"), [(1, False), (2, False), (3, False), (3, True)])
def test_ema_is_the_same_on_every_zero_stage(dist_env, stage, sharded):
    _, reference, ref_losses = ema_run(0, dist_env)
    ema, whole, losses = ema_run(stage, dist_env, sharded)
    for e, ref in zip(whole, reference, strict=True):
        torch.testing.assert_close(e, ref, atol=1e-6, rtol=0)
    assert losses == pytest.approx(ref_losses, abs=1e-5)
    assert losses[0] == losses[2] != losses[1]  # the EMA's loss, then the model's own again
    if sharded:  # a partition each, back from the whole form a checkpoint holds
        assert all(e.dim() == 1 for e in ema.shadow)  # ZeRO 3's flat partitions
        assert any(e.dim() == 2 for e in whole)
        partitions = [e.clone() for e in ema.shadow]
        ema.load_state_dict(None)
        ema.load_state_dict({"shadow": whole})
        assert all(torch.equal(a, b) for a, b in zip(ema.shadow, partitions, strict=True))
