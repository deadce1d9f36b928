"""Telemetry's per-group numbers against a direct computation from the full weights, on every
ZeRO stage (under ZeRO 3 each parameter is a `ds_tensor` shard that telemetry reads as such)."""

import math

import pytest
import torch

from configs import load_config
from model import GPT
from model.config import ModelConfig
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
    weights = full_weights(engine, zero_stage)  # the spectral norms read the gathered weights
    C, nh = cfg.model.n_embd, cfg.model.n_head
    for layer in range(cfg.model.n_layer):
        w = weights[f"transformer.h.{layer}.attn.c_attn.weight"].double()
        for key, rows in (("wq", w[:C]), ("wk", w[C : 2 * C])):
            norms = torch.linalg.matrix_norm(rows.view(nh, C // nh, C), ord=2).tolist()
            assert line[f"attn_{key}_norm/layer{layer}"] == pytest.approx(norms, rel=1e-5)
        assert 0 <= line[f"attn_tie_frac/layer{layer}"] <= 1
        assert -1 <= line[f"attn_delta_coherence/layer{layer}"] <= 1
        assert math.isfinite(line[f"attn_delta_bias/layer{layer}"])


def fa2_delta_reference(qkv: torch.Tensor, y_grad: torch.Tensor, n_head: int) -> float:
    """FA2's relative delta bias of one layer in fp64, from its c_attn output (B, T, 3C) and the
    gradient of its attention output (B, T, C): an independent path to the same number."""
    B, T, C3 = qkv.shape
    q, k, v = (
        t.view(B, T, n_head, -1).transpose(1, 2).bfloat16().double()
        for t in qkv.split(C3 // 3, dim=2)
    )  # (B, nh, T, hs)
    d_out = y_grad.view(B, T, n_head, -1).transpose(1, 2).bfloat16().double()
    s = (q @ k.transpose(-2, -1)) * q.size(-1) ** -0.5
    s = s.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), -torch.inf)
    p_bar = torch.exp(s - s.amax(-1, keepdim=True))
    out = (p_bar.float().bfloat16().double() @ v / p_bar.sum(-1, keepdim=True)).float()
    exact = torch.softmax(s, dim=-1) @ v
    delta = (d_out * exact).sum(-1)
    error = (d_out * out.bfloat16().double()).sum(-1) - delta
    return (error.mean() / delta.abs().mean()).item()


def test_flash_telemetry_on_a_constructed_case():
    """Layer 0 attends uniformly (W_Q = 0): every row past the first is a tie. Layer 1's heads
    have W_Q, W_K slices s * [I 0]: spectral norm s. delta against an fp64 computation."""
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64)
    model = GPT(cfg)
    C, hs = 32, 16
    scales = {"wq": (2.0, 3.0), "wk": (0.5, 4.0)}
    with torch.no_grad():
        model.transformer.h[0].attn.c_attn.weight[:C].zero_()
        w = model.transformer.h[1].attn.c_attn.weight
        w[: 2 * C].zero_()
        for offset, key in ((0, "wq"), (C, "wk")):
            for head, scale in enumerate(scales[key]):
                rows = range(offset + head * hs, offset + (head + 1) * hs)
                for i, row in enumerate(rows):
                    w[row, head * hs + i] = scale
    captured = {}
    attn = model.transformer.h[1].attn
    attn.c_attn.register_forward_hook(lambda m, i, o: captured.update(qkv=o.detach()))

    def keep_grad(module, inputs):
        inputs[0].register_hook(lambda g: captured.update(y_grad=g))

    attn.c_proj.register_forward_pre_hook(keep_grad)
    telemetry = Telemetry(model, grad_clip=1.0)
    idx, targets = torch.randint(0, 64, (2, 2, 16), generator=torch.Generator().manual_seed(1))
    sums = []
    for _ in range(2):
        out = model(idx, targets, telemetry=True)
        out.loss.backward()
        line = telemetry.read(1e-3, 1.0, out)
        sums.append(line["attn_delta_bias_sum/layer1"])
    assert line["attn_tie_frac/layer0"] == 15 / 16  # every row but the first (one key)
    for key, expected in scales.items():
        assert line[f"attn_{key}_norm/layer1"] == pytest.approx(expected, rel=1e-6)
    assert line["attn_wq_norm/layer0"] == [0.0, 0.0]
    bias = fa2_delta_reference(captured["qkv"], captured["y_grad"], 2)
    assert bias != 0 and line["attn_delta_bias/layer1"] == pytest.approx(bias, rel=0.05)
    assert sums[1] == pytest.approx(2 * sums[0])  # the same batch twice: the sum doubles
    off = telemetry.read(1e-3, 1.0, model(idx, targets))  # a forward without telemetry
    assert not [key for key in off if "tie" in key or "delta" in key or "_norm/layer" in key]
