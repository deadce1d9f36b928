"""Preconditioned sharpness: the pieces against dense references, and the measurement in real runs
on ZeRO 0, 1 and 3 and on 1 and 2 ranks (torchrun, gloo)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.func import functional_call

from configs import load_config
from model import GPT
from model.config import ModelConfig
from monitor.sharpness import (
    hessian_vector_product,
    lanczos_max,
    preconditioner,
    stability_threshold,
    top_eigenvalues,
)
from optim.config import OptimConfig
from optim.schedule import lr_at
from tests.helpers import tiny_overrides

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def problem():
    """The tiny problem and its dense Hessian (float64), built once."""
    model, params, batches, v = tiny_problem()
    return model, params, batches, v, dense_hessian(model, params, batches)


def tiny_problem():
    """A 1-layer GPT small enough for a dense Hessian, one fixed batch, and Adam-like v."""
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=1, n_head=2, n_embd=8, block_size=4, vocab_size=16)
    model = GPT(cfg).eval()
    params = list(model.parameters())
    x = torch.randint(0, 16, (3, 4))
    y = torch.randint(0, 16, (3, 4))
    v = torch.rand(sum(p.numel() for p in params), dtype=torch.float32) * 1e-3 + 1e-6
    return model, params, [(x, y)], v


def dense_hessian(model, params, batches) -> torch.Tensor:
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in params]
    sizes = [p.numel() for p in params]
    ((x, y),) = batches

    def loss(flat: torch.Tensor) -> torch.Tensor:
        chunks = [c.view(s) for c, s in zip(flat.split(sizes), shapes, strict=True)]
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
            return functional_call(model, dict(zip(names, chunks, strict=True)), (x, y)).loss

    flat = torch.cat([p.detach().reshape(-1) for p in params]).double()
    model.double()
    try:
        return torch.autograd.functional.hessian(loss, flat)
    finally:
        model.float()


def test_hvp_matches_the_dense_hessian(problem):
    model, params, batches, _, H = problem
    vec = torch.randn(H.shape[0])
    hvp = hessian_vector_product(model, params, batches, vec)
    torch.testing.assert_close(hvp.double(), H @ vec.double(), rtol=1e-4, atol=1e-5)


def test_lanczos_gives_the_dense_top_eigenvalues(problem):
    model, params, batches, v, H = problem
    num_steps, betas, eps = 7, (0.9, 0.95), 1e-8
    P = preconditioner(v, num_steps, betas, eps).double()
    inv_sqrt_p = P.rsqrt()
    reference_s = torch.linalg.eigvalsh(inv_sqrt_p[:, None] * H * inv_sqrt_p[None, :])[-1]
    # P^-1 H has the same spectrum (it is similar to the symmetric form)
    eig = torch.linalg.eigvals(H / P[:, None])
    assert eig.real.max().item() == pytest.approx(reference_s.item(), rel=1e-6)
    reference_h = torch.linalg.eigvalsh(H)[-1]

    p32 = inv_sqrt_p.float()

    def hvp(vec):
        return hessian_vector_product(model, params, batches, vec)

    sharpness, used = lanczos_max(lambda vec: p32 * hvp(p32 * vec), H.shape[0], 200)
    assert sharpness == pytest.approx(reference_s.item(), rel=2e-3)
    assert used < 200
    hessian_max, _ = lanczos_max(hvp, H.shape[0], 200)
    assert hessian_max == pytest.approx(reference_h.item(), rel=2e-3)

    # the known bug: the non-symmetric P^-1 H handed to Lanczos gives another number
    inv_p = (1 / P).float()
    wrong, _ = lanczos_max(lambda vec: inv_p * hvp(vec), H.shape[0], 200)
    assert abs(wrong - reference_s.item()) > 0.02 * reference_s.item()


def test_lanczos_on_a_known_spectrum_stops_early_and_is_exact():
    torch.manual_seed(1)
    q, _ = torch.linalg.qr(torch.randn(300, 300, dtype=torch.float64))
    spectrum = torch.linspace(-5.0, 2.0, 300, dtype=torch.float64)
    spectrum[-1] = 10.0  # a clear gap, as the top of a Hessian has
    A = (q * spectrum) @ q.T
    top, used = lanczos_max(lambda vec: (A @ vec.double()).float(), 300, 60)
    assert top == pytest.approx(10.0, rel=2e-3)
    assert used < 60


def test_preconditioner_is_what_torch_adam_divides_by():
    """theta_{t+1} - theta_t = -lr P_t^-1 m_t with m unnormalised: the bias factor of m is in P."""
    torch.manual_seed(2)
    param = torch.nn.Parameter(torch.randn(50, dtype=torch.float64))
    betas, eps, lr = (0.9, 0.95), 1e-8, 0.01
    adam = torch.optim.Adam([param], lr=lr, betas=betas, eps=eps)
    m = torch.zeros(50, dtype=torch.float64)
    for t in range(1, 6):
        grad = torch.randn(50, dtype=torch.float64)
        m = betas[0] * m + (1 - betas[0]) * grad
        before = param.detach().clone()
        param.grad = grad
        adam.step()
        v = adam.state[param]["exp_avg_sq"]
        P = preconditioner(v, t, betas, eps)
        torch.testing.assert_close(param.detach() - before, -lr * m / P, rtol=1e-9, atol=0.0)


def test_stability_threshold():
    assert stability_threshold(0.9, 1e-3) == pytest.approx(38_000)
    # decoupled decay d_t: (1 + b1)(2 - d_t) / ((1 - b1) lr)
    assert stability_threshold(0.9, 1e-3, 1e-4) == pytest.approx(1.9 * (2 - 1e-4) / 1e-4)


@pytest.mark.parametrize(
    "name, shrink",
    [("adamw", 1e-4 * 0.1), ("adamp", 1e-4 * 0.1), ("adamw_indep", 0.5 * 0.1), ("adam_l2", 0.0)],
)
def test_each_decay_form_has_its_own_decoupled_shrink(name, shrink):
    """At lr_t = 1e-4 of lr_max = 2e-4 with wd 0.1: torch's form lr_t * wd, the paper's
    (lr_t / lr_max) * wd, and none for the coupled form (it adds curvature instead)."""
    o = OptimConfig(name=name, lr=2e-4, weight_decay=0.1)
    assert o.shrink_per_step(1e-4) == pytest.approx(shrink)


# --- real runs ---------------------------------------------------------------------------------

RENDEZVOUS = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}
ENV = {k: v for k, v in os.environ.items() if k not in RENDEZVOUS}
ENV.update(WANDB_MODE="disabled", OMP_NUM_THREADS="1")
STEPS = 6


def train_run(out_dir: Path, name: str, ranks: int, **extra) -> dict[int, dict]:
    """A 6-step run measuring sharpness at steps 3 and 6; its metrics lines by step."""
    args = tiny_overrides(
        **{
            "data.dataset": "builtin-compact",
            "model.vocab_size": 10240,
            "train.max_steps": STEPS,
            "train.micro_batch_size": 4 // ranks,
            "train.grad_accum_steps": 1,
            "train.log_interval": 1,
            "train.eval_interval": 0,
            "checkpoint.interval": 0,
            "optim.warmup_steps": 2,
            "telemetry.sharpness_interval": 3,
            "telemetry.sharpness_batch_size": 4,
            "telemetry.sharpness_iters": 30,
            "run.out_dir": out_dir,
            "run.name": name,
            **extra,
        }
    )
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd = [*launcher, f"--nproc-per-node={ranks}", "train.py", *args]
    if ranks == 1:
        cmd = [sys.executable, "train.py", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(s) for s in (out_dir / name / "metrics.jsonl").read_text().splitlines()]
    return {m["step"]: m for m in lines if "loss" in m}


@pytest.mark.slow
def test_sharpness_is_the_same_on_every_zero_stage_and_world_size(tmp_path):
    runs = {
        (stage, ranks): train_run(tmp_path, f"z{stage}r{ranks}", ranks, zero_stage=stage)
        for stage, ranks in [(0, 1), (1, 1), (3, 1), (1, 2), (3, 2)]
    }
    reference = runs[(0, 1)]
    cfg = load_config(None, ["optim.warmup_steps=2", f"train.max_steps={STEPS}"])
    for step in (3, 6):
        line = reference[step]
        s, h = line["sharpness"], line["hessian_max_eig"]
        assert math.isfinite(s) and s > 0 and h > 0
        assert line["sharpness_ratio"] == pytest.approx(s / line["sharpness_threshold"])
        assert line["sharpness_batch"] == 4
        # at the lr of the next update, with AdamW's per-step shrink lr * wd
        lr = lr_at(step, cfg.optim, STEPS)
        threshold = stability_threshold(0.9, lr, lr * cfg.optim.weight_decay)
        assert line["sharpness_threshold"] == pytest.approx(threshold, rel=1e-12)
    for key, run in runs.items():
        assert "sharpness" not in run[1] and "sharpness" not in run[2], key
        for step in (3, 6):
            for field in ("sharpness", "hessian_max_eig", "sharpness_threshold"):
                assert run[step][field] == pytest.approx(reference[step][field], rel=1e-3), (
                    key,
                    step,
                    field,
                )


def test_top_eigenvalues_with_adam_l2_curvature(problem):
    """Adam+L2 preconditions H + wd on the decayed weights: S moves, lambda_max(H) does not."""
    model, params, batches, v, H = problem
    P = preconditioner(v, 3, (0.9, 0.999), 1e-8).double()
    inv_sqrt_p = P.rsqrt()
    decayed = torch.cat([torch.full((p.numel(),), float(p.dim() >= 2)) for p in params])
    l2 = 0.5 * decayed.double()
    reference = torch.linalg.eigvalsh(inv_sqrt_p[:, None] * (H + torch.diag(l2)) * inv_sqrt_p)[-1]
    plain = torch.linalg.eigvalsh(inv_sqrt_p[:, None] * H * inv_sqrt_p[None, :])[-1]
    assert abs(reference - plain) > 1e-2 * plain  # the test can tell the two apart
    s, h, used = top_eigenvalues(model, params, batches, inv_sqrt_p.float(), 200, 0, l2.float())
    assert s == pytest.approx(reference.item(), rel=2e-3)
    assert h == pytest.approx(torch.linalg.eigvalsh(H)[-1].item(), rel=2e-3)
    assert 2 < used < 400


def test_probe_is_off_between_intervals_and_refuses_an_uneven_batch(dist_env, corpus):
    """`read` measures only at multiples of the interval; a batch the ranks cannot share evenly
    is a config error naming the key."""
    from configs import ConfigError
    from monitor.sharpness import SharpnessProbe
    from optim.engine import initialize

    cfg = load_config(
        None,
        tiny_overrides(
            **{
                "model.vocab_size": 256,
                "data.dataset": corpus,
                "telemetry.sharpness_interval": 4,
                "telemetry.sharpness_batch_size": 4,
            }
        ),
    )
    engine, _ = initialize(GPT(cfg.model), cfg, 1, dist_env.device)
    probe = SharpnessProbe(cfg, engine, corpus / "train.bin", 0, 1, dist_env.device)
    assert [probe.due(step) for step in (1, 3, 4, 8)] == [False, False, True, True]
    assert probe.read(3) == {}
    assert probe.read(4) == {}  # no Adam step taken yet: P does not exist
    with pytest.raises(ConfigError, match="telemetry.sharpness_batch_size=4 must be a multiple"):
        SharpnessProbe(cfg, engine, corpus / "train.bin", 0, 3, dist_env.device)
