"""Telemetry's per-group numbers against a direct computation from the full weights, on every
ZeRO stage (under ZeRO 3 each parameter is a `ds_tensor` shard that telemetry reads as such)."""

import math

import pytest
import torch

from configs import load_config
from model import GPT
from monitor.telemetry import Telemetry
from optim.engine import UpdateGate, initialize, set_lr
from optim.groups import layer_type, split_decay
from tests.helpers import tiny_overrides
from trainer.step import train_step

pytestmark = pytest.mark.usefixtures("dist_env", "one_thread")
LR = 1e-2


def full_weights(engine, zero_stage: int) -> dict[str, torch.Tensor]:
    """Every parameter in full, by name (gathered from the shards under ZeRO 3)."""
    module = engine.module
    if zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters())):
            return {n: p.detach().clone().float() for n, p in module.named_parameters()}
    return {n: p.detach().clone().float() for n, p in module.named_parameters()}


def buckets(name: str, decay: set[str]) -> list[str]:
    block = name.split(".")[2] if name.startswith("transformer.h.") else None
    found = ["decay" if name in decay else "no_decay", layer_type(name)]
    if name == "transformer.wte.weight":  # tied to lm_head: the output layer
        found.append("output")
    return found + ([f"layer{block}"] if block is not None else [])


def direct(before: dict, after: dict, decay: set[str]) -> dict[str, float]:
    """Norms, effective LR and update ratios computed here, in float64, from full weights."""
    squares: dict[str, float] = {}
    deltas: dict[str, float] = {}
    for name, weight in after.items():
        for key in buckets(name, decay):
            squares[key] = squares.get(key, 0.0) + weight.double().pow(2).sum().item()
            delta = (weight.double() - before[name].double()).pow(2).sum().item()
            deltas[key] = deltas.get(key, 0.0) + delta
    line = {"param_norm": math.sqrt(squares["decay"] + squares["no_decay"])}
    for key, square in squares.items():
        line[f"param_norm/{key}"] = math.sqrt(square)
        line[f"update_ratio/{key}"] = math.sqrt(deltas[key]) / math.sqrt(square)
    for key in ("decay", "no_decay"):
        line[f"eff_lr/{key}"] = LR / line[f"param_norm/{key}"]
    return line


@pytest.mark.parametrize("zero_stage", [0, 1, 2, 3])
def test_norms_effective_lr_and_update_ratio_match_the_full_weights(dist_env, zero_stage):
    cfg = load_config(None, tiny_overrides(zero_stage=zero_stage))
    torch.manual_seed(cfg.run.seed)
    model = GPT(cfg.model)
    decay = set(split_decay(model)[0])  # before ZeRO 3 turns the parameters into placeholders
    engine, optimizer = initialize(model, cfg, 1, dist_env.device)
    gate = UpdateGate(engine, optimizer, cfg)
    telemetry = Telemetry(engine.module, cfg.optim.grad_clip, per_layer=True)
    gen = torch.Generator().manual_seed(0)
    shape = (cfg.train.micro_batch_size, cfg.model.block_size)
    for step in (1, 2):  # the second step has Adam state: a typical update
        set_lr(engine.optimizer, LR)
        batch = [
            tuple(torch.randint(0, cfg.model.vocab_size, shape, generator=gen) for _ in range(2))
        ]
        before = full_weights(engine, zero_stage)
        scalars, output = train_step(engine, gate, telemetry, batch, step, log_step=True)
        line = telemetry.read(LR, scalars.grad_norm, output)
    expected = direct(before, full_weights(engine, zero_stage), decay)

    numbers = {
        k: v for k, v in line.items() if k.split("/")[0] in ("param_norm", "eff_lr", "update_ratio")
    }
    assert numbers.keys() == expected.keys()
    for key, value in expected.items():
        assert numbers[key] == pytest.approx(value, rel=1e-5), key
    assert {"layer0", "layer1", "attn", "mlp", "embed", "norm"} <= {
        k.split("/")[1] for k in numbers if "/" in k
    }
    assert expected["update_ratio/decay"] > 0
    assert line["attn_logit_max/layers"] == output.attn_logit_max.tolist()
    assert line["attn_logit_max"] == max(line["attn_logit_max/layers"])
    assert line["log_z"] == output.log_z.item()
    assert [line["softmax_saturated"], line["zero_sum_residual"]] == pytest.approx(
        output.softmax_collapse.tolist(), rel=1e-6
    )
    norm_before = before["transformer.wte.weight"].double().norm().item()
    growth = line["param_norm/output"] / norm_before - 1  # one step between the two readings
    assert line["output_norm_growth"] == pytest.approx(growth, rel=1e-4, abs=1e-9)
    assert line["clip_frac"] == (1.0 if scalars.clipped else 0.0) and line["skipped_steps"] == 0
