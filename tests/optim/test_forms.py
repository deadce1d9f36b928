"""The decay forms against their references (the AdamW paper's rule, PyPI `adamp`, SPD's rule
written out per tensor), and the same numbers on every ZeRO stage on 1 and 2 ranks."""

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from configs import ConfigError, load_config
from optim.engine import build_optimizer
from optim.forms import FormAdam
from optim.groups import param_groups
from optim.schedule import lr_at
from tests.helpers import tiny_overrides
from tests.optim.test_distributed import ENV

ROOT = Path(__file__).resolve().parents[2]


def regression() -> nn.Module:
    """A dense model for the reference comparisons: a GPT's embedding rows get near-zero
    gradients, on which Adam turns one-ulp differences in rounding into 1e-6 ones."""
    return nn.Sequential(
        nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1)
    )


def regression_batches(steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(64, 16, generator=gen) for _ in range(steps)]
    return [(x, x[:, :1] * 2 - x[:, 1:2]) for x in xs]


def test_adamw_indep_is_the_papers_form_over_warmup_and_cosine():
    """p <- p (1 - (lr_t / lr_max) wd) then the Adam step (Loshchilov & Hutter, Algorithm 2),
    written out here, against `optim.name=adamw_indep` over 100 steps of warmup + cosine."""
    steps = 100
    overrides = {
        "optim.name": "adamw_indep",
        "optim.lr": 3e-3,
        "optim.min_lr": 3e-4,
        "optim.warmup_steps": 10,
        "optim.weight_decay": 0.1,
    }
    cfg = load_config(None, tiny_overrides(**overrides))
    o = cfg.optim
    torch.manual_seed(0)
    ours, theirs = regression(), regression()
    theirs.load_state_dict(ours.state_dict())
    opt = build_optimizer(param_groups(ours, o.weight_decay), cfg, torch.device("cpu"))
    decay = {id(p) for p in param_groups(theirs, o.weight_decay)[0]["params"]}
    moments = {id(p): (torch.zeros_like(p), torch.zeros_like(p)) for p in theirs.parameters()}
    beta1, beta2 = o.betas
    for step, (x, y) in enumerate(regression_batches(steps)):
        lr = lr_at(step, o, steps)
        for group in opt.param_groups:
            group["lr"] = lr
        nn.functional.mse_loss(ours(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        nn.functional.mse_loss(theirs(x), y).backward()
        with torch.no_grad():
            for p in theirs.parameters():
                m, v = moments[id(p)]
                m.mul_(beta1).add_(p.grad, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                if id(p) in decay:
                    p.mul_(1 - (lr / o.lr) * o.weight_decay)
                m_hat = m / (1 - beta1 ** (step + 1))
                v_hat = v / (1 - beta2 ** (step + 1))
                p.sub_(lr * m_hat / (v_hat.sqrt() + o.eps))
                p.grad = None
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=0, msg=name)
    # what it is in torch's terms: AdamW at wd / lr_max
    assert opt.param_groups[0]["weight_decay"] == pytest.approx(0.1 / 3e-3)


def scale_invariant_model() -> nn.Module:
    """Rows of the first matrix are scale-invariant (per-channel BatchNorm follows: AdamP's row
    test fires), the second matrix as a whole (LayerNorm follows: the whole-tensor test fires),
    the head is not (no projection)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(8, 16, bias=False),
        nn.BatchNorm1d(16, affine=False),
        nn.ReLU(),
        nn.Linear(16, 16, bias=False),
        nn.LayerNorm(16, elementwise_affine=False),
        nn.ReLU(),
        nn.Linear(16, 4),
    )


def test_adamp_matches_the_pypi_package_and_counts_its_projections():
    adamp = pytest.importorskip("adamp")  # the dev extra pins 0.3.0
    gen = torch.Generator().manual_seed(1)
    data = [(torch.randn(32, 8, generator=gen), torch.randint(0, 4, (32,), generator=gen))]
    data *= 20
    kwargs = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
    weights = []
    for make in (
        lambda ps: adamp.AdamP(ps, delta=0.1, wd_ratio=0.1, **kwargs),
        lambda ps: FormAdam(ps, "adamp", delta=0.1, wd_ratio=0.1, **kwargs),
    ):
        model = scale_invariant_model()
        opt = make(model.parameters())
        for x, y in data:
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        weights.append([p.detach().clone() for p in model.parameters()])
    for ref, got in zip(*weights, strict=True):
        torch.testing.assert_close(got, ref, atol=1e-6, rtol=0)
    # 3 matrices x 20 steps: the first by rows every step, the second whole every step
    fired = opt.read_counts()
    assert fired["adamp_proj_row"] == pytest.approx(20 / 60)
    assert 20 / 60 <= fired["adamp_proj_tensor"] < 40 / 60
    assert opt.read_counts() == {"adamp_proj_row": 0.0, "adamp_proj_tensor": 0.0}  # reset


def test_adam_spd_follows_the_papers_rule_per_tensor():
    """Against SPD written out per tensor (Tian et al. 2024): Adam, then theta~ - lambda r
    (theta~ - theta_0) where -g.(theta - theta_0) < 0; lambda not scaled by lr."""
    lam, lr, betas, eps = 0.5, 1e-2, (0.9, 0.95), 1e-8
    torch.manual_seed(0)
    ours, theirs = regression(), regression()
    theirs.load_state_dict(ours.state_dict())
    opt = FormAdam(
        param_groups(ours, lam), "adam_spd", lr=lr, betas=betas, eps=eps, weight_decay=lam
    )
    opt.set_anchor()
    decay = param_groups(theirs, lam)[0]["params"]
    anchors = [p.detach().clone() for p in decay]
    moments = {id(p): (torch.zeros_like(p), torch.zeros_like(p)) for p in theirs.parameters()}
    decayed = 0
    for step, (x, y) in enumerate(regression_batches(20)):
        nn.functional.mse_loss(ours(x), y).backward()
        opt.step()
        nn.functional.mse_loss(theirs(x), y).backward()
        with torch.no_grad():
            before = [p.detach().clone() for p in decay]
            pulls = [-(p.grad * (p - a)).sum() for p, a in zip(decay, anchors, strict=True)]
            for p in theirs.parameters():  # Adam, in the order of operations torch uses
                m, v = moments[id(p)]
                m.mul_(betas[0]).add_(p.grad, alpha=1 - betas[0])
                v.mul_(betas[1]).addcmul_(p.grad, p.grad, value=1 - betas[1])
                denom = v.sqrt() / math.sqrt(1 - betas[1] ** (step + 1)) + eps
                p.addcdiv_(m, denom, value=-lr / (1 - betas[0] ** (step + 1)))
            for p, a, b, pull in zip(decay, anchors, before, pulls, strict=True):
                if pull < 0:
                    r = ((p - a).norm() - (b - a).norm()) / (p - a).norm()
                    p.sub_(lam * r.clamp(0, 1) * (p - a))
                    decayed += 1
        opt.zero_grad(set_to_none=True)
        theirs.zero_grad(set_to_none=True)
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=name)
    fraction = opt.read_counts()["spd_decay_frac"]
    assert fraction == pytest.approx(decayed / (20 * len(decay)))
    assert 0 < fraction < 1


def test_adam_spd_needs_init_from_and_its_anchor():
    with pytest.raises(ConfigError, match="set checkpoint.init_from") as err:
        load_config(None, tiny_overrides(**{"optim.name": "adam_spd"}))
    assert "\n" not in str(err.value)
    model = nn.Linear(4, 4)
    opt = FormAdam(
        model.parameters(), "adam_spd", lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1
    )
    model(torch.ones(1, 4)).sum().backward()
    with pytest.raises(RuntimeError, match="no starting weights"):
        opt.step()


@pytest.fixture(scope="module")
def zero_runs(tmp_path_factory) -> dict[int, dict]:
    """`tests/optim/zero_forms.py` on one rank and under torchrun on two: every form on ZeRO 0-3."""
    out = tmp_path_factory.mktemp("zero_forms")
    results = {}
    for ranks in (1, 2):
        launcher = [sys.executable]
        if ranks > 1:
            launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
        path = out / f"ranks{ranks}.pt"
        cmd = [*launcher, "-m", "tests.optim.zero_forms", str(path)]
        proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[ranks] = torch.load(path, weights_only=False)["results"]
    return results


def max_diff(a: dict, b: dict) -> tuple[float, float]:
    """(max |loss difference| over steps, max |weight difference|) of two runs."""
    loss = max(abs(x - y) for x, y in zip(a["losses"], b["losses"], strict=True))
    weight = max((a["weights"][k] - b["weights"][k]).abs().max().item() for k in a["weights"])
    return loss, weight


@pytest.mark.slow
@pytest.mark.parametrize("name", ["adamw_indep", "adamp", "adam_spd", "adam_l2_loss"])
def test_every_zero_stage_and_rank_count_gives_the_same_run(zero_runs, name):
    reference = zero_runs[1][name, 0]
    for ranks in (1, 2):
        for stage in (0, 1, 2, 3):
            run = zero_runs[ranks][name, stage]
            loss, weight = max_diff(run, reference)
            assert loss < 1e-6 and weight < 1e-6, (ranks, stage, loss, weight)
            assert run["fired"] == reference["fired"], (ranks, stage)  # decided from reduced sums


@pytest.mark.slow
def test_the_forms_fire_where_they_should_and_differ_from_plain_adam(zero_runs):
    runs = zero_runs[1]
    plain = {
        "adamw_indep": "adamw",
        "adamp": "adamw",
        "adam_spd": "adam_l2",
        "adam_l2_loss": "adam_l2",
    }
    for name, other in plain.items():
        assert max_diff(runs[name, 0], runs[other, 0])[1] > 1e-3, name
    adamp = runs["adamp", 0]["fired"]
    # over the run some matrices are projected by rows, some whole, and some not at all
    assert any(f["adamp_proj_row"] > 0 for f in adamp)
    assert any(f["adamp_proj_tensor"] > 0 for f in adamp)
    assert any(f["adamp_proj_row"] + f["adamp_proj_tensor"] < 1 for f in adamp)
    spd = [f["spd_decay_frac"] for f in runs["adam_spd", 0]["fired"]]
    assert spd[0] == 0  # theta = theta_0 at the first step: nothing pulls back yet
    assert any(0 < f < 1 for f in spd)
