"""The engine's update math against plain torch, on every ZeRO stage, and the update gate."""

import math

import pytest
import torch

from configs import ConfigError, load_config
from model import GPT
from model.tensor_core import TensorCoreBF16
from optim import engine as engine_module
from optim.engine import (
    UpdateGate,
    adam_choice,
    build_optimizer,
    deepspeed_config,
    initialize,
    set_lr,
    with_global_batch,
)
from optim.groups import param_groups
from tests.helpers import tiny_overrides

STEPS = 4
LR = 1e-2


def batches(num: int, vocab: int = 128, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randint(0, vocab, (4, 16), generator=gen),
            torch.randint(0, vocab, (4, 16), generator=gen),
        )
        for _ in range(num)
    ]


def engine_run(cfg, env, data, hook=None):
    """Train with our engine; returns (losses, final fp32 weights by name, engine)."""
    torch.manual_seed(cfg.run.seed)
    model = GPT(cfg.model)
    engine, optimizer = initialize(model, cfg, 1, env.device)
    gate = UpdateGate(engine, optimizer, cfg)
    losses = []
    for step, (x, y) in enumerate(data):
        set_lr(engine.optimizer, LR)
        loss = engine(x, y).loss
        if hook is not None:
            loss = hook(step, engine, loss)
        engine.backward(loss)
        gate.begin(step, loss.detach())
        engine.step()
        losses.append(gate.finish())
    return losses, fp32_weights(engine, cfg.zero_stage), engine


def fp32_weights(engine, zero_stage: int) -> dict[str, torch.Tensor]:
    if zero_stage == 3:
        import deepspeed

        params = list(engine.module.parameters())
        with deepspeed.zero.GatheredParameters(params):
            return {n: p.detach().clone().float() for n, p in engine.module.named_parameters()}
    return {n: p.detach().clone().float() for n, p in engine.module.named_parameters()}


def torch_run(cfg, data):
    """The reference: the same model and batches with torch.optim and clip_grad_norm_."""
    torch.manual_seed(cfg.run.seed)
    model = GPT(cfg.model)
    groups = param_groups(model, cfg.optim.weight_decay)
    kwargs = dict(lr=LR, betas=cfg.optim.betas, eps=cfg.optim.eps)
    if cfg.optim.name == "adamw":
        opt = torch.optim.AdamW(groups, **kwargs)
    else:
        opt = torch.optim.Adam(groups, **kwargs)
    losses = []
    for x, y in data:
        loss = model(x, y).loss
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append((loss.item(), norm.item()))
    return losses, {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("name", ["adamw", "adam_l2"])
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize("grad_clip", [10.0, 0.5])
def test_engine_matches_torch(dist_env, stage, name, grad_clip):
    """1e-6 without clipping; with clipping, DeepSpeed's ZeRO 1-3 compute the clip factor as
    1/((norm + 1e-6)/clip) rather than torch's clip/(norm + 1e-6): one ulp, which Adam can
    amplify on a near-zero coordinate, so that case is held to 1e-5."""
    overrides = {"optim.name": name, "optim.weight_decay": 0.3, "optim.grad_clip": grad_clip}
    cfg = load_config(None, tiny_overrides(zero_stage=stage, **overrides))
    data = batches(STEPS)
    ours, weights, _ = engine_run(cfg, dist_env, data)
    ref_losses, ref_weights = torch_run(cfg, data)
    for got, (loss, norm) in zip(ours, ref_losses, strict=True):
        assert got.applied
        assert got.loss == pytest.approx(loss, abs=1e-6)
        assert got.grad_norm == pytest.approx(norm, rel=1e-5)
        assert got.clipped == (norm > grad_clip)
    assert any(got.clipped for got in ours) == (grad_clip < 1)
    atol = 1e-6 if grad_clip > 1 or stage == 0 else 1e-5
    for key, ref in ref_weights.items():
        torch.testing.assert_close(weights[key], ref, atol=atol, rtol=0)


def test_decay_kinds_agree_without_decay_and_differ_with_it(dist_env):
    data = batches(STEPS)
    weights = {}
    for name in ("adamw", "adam_l2"):
        for wd in (0.0, 0.3):
            cfg = load_config(
                None, tiny_overrides(**{"optim.name": name, "optim.weight_decay": wd})
            )
            weights[name, wd] = engine_run(cfg, dist_env, data)[1]
    for key in weights["adamw", 0.0]:
        assert torch.equal(weights["adamw", 0.0][key], weights["adam_l2", 0.0][key])
    differ = [
        k
        for k in weights["adamw", 0.3]
        if not torch.equal(weights["adamw", 0.3][k], weights["adam_l2", 0.3][k])
    ]
    assert "transformer.wte.weight" in differ


@pytest.mark.parametrize("stage", [0, 1, 3])
def test_bf16_keeps_fp32_master_weights_and_state(dist_env, stage):
    cfg = load_config(None, tiny_overrides(precision="bf16", zero_stage=stage))
    losses, weights, engine = engine_run(cfg, dist_env, batches(2))
    assert all(w.dtype == torch.float32 for w in weights.values())
    assert all(p.dtype == torch.float32 for p in engine.module.parameters())
    inner = engine.optimizer.optimizer if stage else engine.optimizer
    states = [s for s in inner.state.values() if "exp_avg" in s]
    assert states and all(s["exp_avg"].dtype == torch.float32 for s in states)
    x, y = batches(1)[0]
    assert engine(x, y).logits.dtype == torch.bfloat16  # the forward runs in bf16


@pytest.mark.parametrize("stage", [0, 3])
def test_emulated_bf16_rounds_in_fp32_kernels(dist_env, stage, torch_linear):
    """bf16_kernels=emulated: no autocast, the GEMMs' results are bf16 numbers held in fp32."""
    cfg = load_config(
        None, tiny_overrides(precision="bf16", bf16_kernels="emulated", zero_stage=stage)
    )
    assert not deepspeed_config(cfg, 1)["torch_autocast"]["enabled"]
    losses, weights, engine = engine_run(cfg, dist_env, batches(2))
    assert all(w.dtype == torch.float32 for w in weights.values())
    logits = engine(*batches(1)[0]).logits
    assert logits.dtype == torch.float32 and torch.equal(logits, logits.bfloat16().float())
    native = engine_run(load_config(None, tiny_overrides(precision="bf16")), dist_env, batches(2))
    assert [r.loss for r in losses] == pytest.approx([r.loss for r in native[0]], abs=0.02)


def test_bf16_flash_reaches_the_emulation(dist_env, torch_linear):
    """The engine's forward computes attention as `bf16_flash` says (model/flash.py)."""
    x, y = batches(1)[0]
    grads = {}
    for flash in ("fa2", "all_bf16"):
        cfg = load_config(
            None,
            tiny_overrides(
                precision="bf16", bf16_kernels="emulated", bf16_flash=flash, zero_stage=0
            ),
        )
        _, _, engine = engine_run(cfg, dist_env, [])
        torch.manual_seed(cfg.run.seed)
        model = GPT(cfg.model)
        with TensorCoreBF16(flash):
            model(x, y).loss.backward()
        engine(x, y).loss.backward()
        mine = [p.grad for p in engine.module.parameters()]
        assert all(torch.equal(a, b.grad) for a, b in zip(mine, model.parameters(), strict=True))
        grads[flash] = torch.cat([g.flatten() for g in mine])
    assert not torch.equal(grads["fa2"], grads["all_bf16"])


def test_emulated_bf16_needs_bf16():
    with pytest.raises(ConfigError, match="bf16_kernels=emulated .* needs precision=bf16"):
        load_config(None, ["bf16_kernels=emulated"])


def test_bf16_zero0_matches_zero1(dist_env):
    """Under bf16, ZeRO 0 and ZeRO 1 run the same autocast forward and the same fp32 update:
    DeepSpeed's bf16 ZeRO-0 optimizer (bf16 weights and gradients) is not in the path.

    What is asserted is what holds on every CPU. The first losses are the same forward of the
    same weights: equal to the last bit. After that the clip factor may differ in its last bit:
    ZeRO 0's gate takes clip / (norm + 1e-6) over per-tensor norms, ZeRO 1's DeepSpeed takes
    1 / ((norm + 1e-6) / clip) over its flat partition, summed in another order (measured on an
    AVX2 CPU: the norms differed by 1.2e-7 at step 3, and 14,003 fp32 weights by up to 1.2e-7). A
    weight within an ulp of a bf16 rounding midpoint then rounds the other way in the next
    forward, and the losses part by more than fp32 rounding (4.7e-5 at step 3 on an AVX-512 BF16
    CPU, issue 19). A different forward path would already show in the first loss; the later
    bf16 losses are held to bf16's own resolution, one ulp of the loss (2^-7 of it: 0.038 at
    4.85), and the fp32 runs, whose forward does not amplify an ulp, to 1e-6 on every step.
    """
    data = batches(STEPS)

    def losses(precision: str, stage: int) -> list[float]:
        cfg = load_config(None, tiny_overrides(precision=precision, zero_stage=stage))
        return [r.loss for r in engine_run(cfg, dist_env, data)[0]]

    fp32 = [losses("fp32", s) for s in (0, 1)]
    assert fp32[0] == pytest.approx(fp32[1], abs=1e-6)
    bf16 = [losses("bf16", s) for s in (0, 1)]
    assert bf16[0][0] == bf16[1][0]
    assert bf16[0] == pytest.approx(bf16[1], rel=2**-7)
    assert bf16[0] != pytest.approx(fp32[0], abs=1e-6)  # the bf16 runs did run in bf16


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_gate_withholds_nonfinite_update(dist_env, stage):
    """A NaN in the loss (hence every gradient) at step 2: no weight moves, training goes on."""
    cfg = load_config(None, tiny_overrides(zero_stage=stage))
    before = {}

    def poison(step, engine, loss):
        if step == 2:
            before.update(fp32_weights(engine, stage))
            return loss * float("nan")
        return loss

    scalars, weights, _ = engine_run(cfg, dist_env, batches(3), poison)
    assert [s.applied for s in scalars] == [True, True, False]
    assert not math.isfinite(scalars[2].grad_norm) and not math.isfinite(scalars[2].loss)
    for key, value in before.items():
        assert torch.equal(weights[key], value), key


def test_deepspeed_config_is_explicit_and_extra_keys_checked():
    cfg = load_config(None, tiny_overrides(zero_stage=2, **{"train.grad_accum_steps": 3}))
    ds = deepspeed_config(cfg, world_size=2)
    assert ds["train_batch_size"] == 4 * 3 * 2
    assert ds["gradient_clipping"] == cfg.optim.grad_clip
    assert ds["zero_optimization"] == {
        "stage": 2,
        "overlap_comm": True,
        "contiguous_gradients": True,
        "reduce_bucket_size": 50_000_000,
        "allgather_bucket_size": 50_000_000,
    }
    assert ds["torch_autocast"]["enabled"] is False
    # no device syncs of DeepSpeed's own timers at every forward and step
    assert ds["timers"] == {"throughput": {"enabled": False}}
    assert ds["wall_clock_breakdown"] is False
    cfg = load_config(None, tiny_overrides(**{"deepspeed.extra": {"gradient_clipping": 2.0}}))
    with pytest.raises(ConfigError, match="gradient_clipping"):
        deepspeed_config(cfg, 1)
    extra = {"deepspeed.extra": {"zero_optimization": {"round_robin_gradients": True}}}
    cfg = load_config(None, tiny_overrides(**extra))
    assert deepspeed_config(cfg, 1)["zero_optimization"]["round_robin_gradients"] is True
    extra = {"deepspeed.extra": {"zero_optimization": {"reduce_bucket_size": 1000}}}
    with pytest.raises(ConfigError, match="set it through the harness's own config key"):
        deepspeed_config(load_config(None, tiny_overrides(**extra)), 1)
    cfg = load_config(None, tiny_overrides(zero_stage=0))
    assert deepspeed_config(cfg, 1)["gradient_clipping"] == 0.0  # the gate clips on ZeRO 0
    assert deepspeed_config(cfg, 1)["zero_optimization"] == {"stage": 0}
    cfg = load_config(None, tiny_overrides(zero_stage=3, **{"deepspeed.bucket_elements": 4096}))
    zero3 = deepspeed_config(cfg, 2)["zero_optimization"]
    assert zero3["reduce_bucket_size"] == 4096 and "allgather_bucket_size" not in zero3


def test_global_batch_size_derives_accumulation_or_says_what_to_change():
    cfg = load_config(None, tiny_overrides(**{"train.global_batch_size": 32}))  # micro-batch 4
    assert [with_global_batch(cfg, n).train.grad_accum_steps for n in (1, 2, 8)] == [8, 4, 1]
    assert with_global_batch(load_config(None, tiny_overrides()), 2).train.grad_accum_steps == 1
    with pytest.raises(ConfigError) as err:
        with_global_batch(cfg, 3)
    assert str(err.value) == (
        "train.global_batch_size=32 is not a multiple of train.micro_batch_size x ranks = "
        "4 x 3: change one of them"
    )
    both = {"train.global_batch_size": 32, "train.grad_accum_steps": 2}
    with pytest.raises(ConfigError, match="grad_accum_steps=2 contradicts .* needs 4: leave"):
        with_global_batch(load_config(None, tiny_overrides(**both)), 2)
    assert (
        with_global_batch(load_config(None, tiny_overrides(**both)), 4).train.grad_accum_steps == 2
    )


@pytest.mark.parametrize("name", ["adamw", "adam_l2", "adamw_indep"])
def test_adam_choice_torch_by_default_fused_adam_when_asked(name, monkeypatch):
    """CPU: torch's foreach path (as before); CUDA: torch's fused kernel, no build; DeepSpeed's
    FusedAdam only with optim.fused_adam=deepspeed, in the same decay mode."""
    o = load_config(None, [f"optim.name={name}"]).optim
    torch_cls = torch.optim.Adam if name == "adam_l2" else torch.optim.AdamW
    assert adam_choice(o, "cpu") == (torch_cls, {"foreach": True})
    assert adam_choice(o, "cuda") == (torch_cls, {"fused": True})

    class FakeFusedAdam:
        pass

    monkeypatch.setattr(engine_module, "load_fused_adam", lambda: FakeFusedAdam)
    asked = load_config(None, [f"optim.name={name}", "optim.fused_adam=deepspeed"]).optim
    assert adam_choice(asked, "cuda") == (FakeFusedAdam, {"adam_w_mode": name != "adam_l2"})
    assert adam_choice(asked, "cpu") == (torch_cls, {"foreach": True})


def test_fused_adam_choice_is_validated():
    with pytest.raises(ConfigError, match="optim.fused_adam.*'torch' or 'deepspeed'"):
        load_config(None, ["optim.fused_adam=apex"])


@pytest.mark.parametrize("name", ["adamw", "adam_l2", "adamw_indep"])
def test_fused_adam_build_failure_falls_back_to_torch(name, monkeypatch, capsys):
    """A FusedAdam build that fails (no nvcc, say) costs one warning line, and the update is
    torch's fused one, the same as optim.fused_adam=torch's to the bit. (A CPU runs torch's
    fused kernel here; CUDA params are not needed to build or step it.)"""

    def no_toolkit():
        raise RuntimeError("Error building extension 'fused_adam'\nnvcc not found")

    monkeypatch.setattr(engine_module, "load_fused_adam", no_toolkit)
    overrides = tiny_overrides(**{"optim.name": name, "optim.weight_decay": 0.3})
    updated = {}
    for choice in ("deepspeed", "torch"):
        cfg = load_config(None, [*overrides, f"optim.fused_adam={choice}"])
        torch.manual_seed(0)
        model = GPT(cfg.model)
        optimizer = build_optimizer(
            param_groups(model, cfg.optim.weight_decay), cfg, torch.device("cuda")
        )
        x, y = batches(1)[0]
        model(x, y).loss.backward()
        optimizer.step()
        updated[choice] = [p.detach().clone() for p in model.parameters()]
        warned = capsys.readouterr().err.splitlines()
        if choice == "deepspeed":
            adam = "Adam" if name == "adam_l2" else "AdamW"
            assert warned == [
                "warning: DeepSpeed's FusedAdam did not build (RuntimeError: Error building "
                f"extension 'fused_adam'); using torch's fused {adam} "
                "(optim.fused_adam=torch avoids the build)"
            ]
        else:
            assert warned == []
    assert all(map(torch.equal, updated["deepspeed"], updated["torch"]))
