"""`optim.l2_form=loss` (the paper's L2 loss term) against Adam on g + 2λw before clipping, and
the same run on every ZeRO stage."""

import pytest
import torch

from configs import ConfigError, load_config
from model import GPT
from optim.engine import UpdateGate, initialize, set_lr
from optim.groups import param_groups
from tests.helpers import tiny_overrides
from tests.optim.test_engine import LR, batches, fp32_weights

STEPS, ACCUM, WD, CLIP = 4, 2, 0.05, 0.5


def config(stage: int, form: str = "loss"):
    overrides = {
        "zero_stage": stage,
        "optim.name": "adam_l2",
        "optim.l2_form": form,
        "optim.weight_decay": WD,
        "optim.grad_clip": CLIP,
        "train.grad_accum_steps": ACCUM,
    }
    return load_config(None, tiny_overrides(**overrides))


def engine_run(cfg, env):
    """Steps of ACCUM micro-batches through our engine: (gate scalars, final weights)."""
    torch.manual_seed(cfg.run.seed)
    engine, optimizer = initialize(GPT(cfg.model), cfg, 1, env.device)
    gate = UpdateGate(engine, optimizer, cfg)
    data, scalars = batches(STEPS * ACCUM), []
    for step in range(STEPS):
        set_lr(engine.optimizer, LR)
        for micro, (x, y) in enumerate(data[step * ACCUM : (step + 1) * ACCUM]):
            loss = engine(x, y).loss
            engine.backward(loss)
            if micro == ACCUM - 1:
                gate.begin(step, loss.detach())
            engine.step()
        scalars.append(gate.finish())
    return scalars, fp32_weights(engine, cfg.zero_stage)


def reference_run(cfg):
    """The paper's code: each micro-batch's (loss + λ||w||^2 of the decay group) / accum
    backpropagated, then the clip, then torch's Adam with weight_decay 0."""
    torch.manual_seed(cfg.run.seed)
    model = GPT(cfg.model)
    groups = param_groups(model, 0.0)
    opt = torch.optim.Adam(groups, lr=LR, betas=cfg.optim.betas, eps=cfg.optim.eps)
    data, norms = batches(STEPS * ACCUM), []
    for step in range(STEPS):
        for x, y in data[step * ACCUM : (step + 1) * ACCUM]:
            penalty = WD * sum(p.pow(2).sum() for p in groups[0]["params"])
            ((model(x, y).loss + penalty) / ACCUM).backward()
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP).item())
        opt.step()
        opt.zero_grad(set_to_none=True)
    return norms, {n: p.detach().clone() for n, p in model.named_parameters()}


def test_loss_form_is_adam_on_the_penalised_loss_clipped(dist_env):
    scalars, weights = engine_run(config(0), dist_env)
    norms, ref = reference_run(config(0))
    for got, norm in zip(scalars, norms, strict=True):
        assert got.applied and got.clipped
        assert got.grad_norm == pytest.approx(norm, rel=1e-5)
    for key, value in ref.items():
        torch.testing.assert_close(weights[key], value, atol=1e-6, rtol=0, msg=key)
    # the other form, at the same coefficient, is another run
    _, grad_form = engine_run(config(0, "grad"), dist_env)
    key = "transformer.h.0.mlp.c_fc.weight"
    assert (grad_form[key] - ref[key]).abs().max() > 1e-4


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_loss_form_is_the_same_on_every_zero_stage(dist_env, stage):
    """1e-5: DeepSpeed's ZeRO 1-3 clip factor differs from torch's by an ulp (test_engine)."""
    ref_scalars, ref = engine_run(config(0), dist_env)
    scalars, weights = engine_run(config(stage), dist_env)
    for got, want in zip(scalars, ref_scalars, strict=True):
        assert got.grad_norm == pytest.approx(want.grad_norm, rel=1e-5)
    for key, value in ref.items():
        torch.testing.assert_close(weights[key], value, atol=1e-5, rtol=0, msg=key)


def test_loss_form_belongs_to_adam_l2():
    assert config(0).optim.l2_grad_coef == 2 * WD  # what the sharpness probe adds to H
    assert config(0, "grad").optim.l2_grad_coef == WD
    with pytest.raises(ConfigError, match="l2_form=loss is a form of adam_l2"):
        load_config(None, ["optim.l2_form=loss"])
