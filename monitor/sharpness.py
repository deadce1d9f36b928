"""Adam's preconditioned sharpness (Cohen et al. 2022, "Adaptive gradient methods at the edge
of stability"), measured every `telemetry.sharpness_interval` steps on a fixed batch.

Adam is preconditioned momentum: theta <- theta - lr_t P_t^-1 m_t with
P_t = (1 - beta1^t) diag(sqrt(v_t / (1 - beta2^t)) + eps), which is torch's m_hat / (sqrt(v_hat) +
eps) with m's bias correction folded into P. With P frozen, the update is stable along the top
eigenvector of P^-1 H while S = lambda_max(P^-1 H) < (2 + 2 beta1) / ((1 - beta1) lr_t)
(38 / lr_t at beta1 = 0.9); full-batch Adam drives S up to that line and keeps it there (the
"adaptive edge of stability"). P^-1 H has the spectrum of the symmetric P^-1/2 H P^-1/2, and only
the symmetric form may be handed to Lanczos: Lanczos on P^-1 H itself computes a different,
meaningless number.

How it is measured, and why:
- Hessian-vector products by double backward on a separate fp32 copy of the model, refreshed from
  the engine's weights before each measurement: DeepSpeed's gradient hooks (and bf16) must not see
  the create_graph backward, and the flash/efficient SDPA kernels have no double backward, so the
  copy runs SDPA's math path. Dropout is off (the Hessian of one fixed function).
- The fixed batch is the first `sharpness_batch_size` sequences of the run's data order, split
  over the ranks like a training batch; each rank's HVP of its share's mean loss is averaged over
  the ranks, so any world size measures the Hessian of the same loss.
- v is read per parameter through DeepSpeed's accessor (ZeRO 1-3 hold it flattened per group and
  rank; the accessor is collective) and from the optimizer's own state on ZeRO 0.
- The top eigenvalue comes from Lanczos with full reorthogonalization, stopped when the residual
  bound of the top Ritz pair is below `RESIDUAL_TOL` of the Ritz value; its start vector is seeded,
  so every rank runs the identical iteration on identical all-reduced products.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from configs import ConfigError
from configs.schema import TrainConfig
from data.loader import BatchLoader
from model import GPT
from optim.schedule import lr_at

# Lanczos stops when ||A y - theta y|| <= RESIDUAL_TOL * |theta| for the top Ritz pair.
RESIDUAL_TOL = 1e-3

Batch = tuple[torch.Tensor, torch.Tensor]
MatVec = Callable[[torch.Tensor], torch.Tensor]


def hessian_vector_product(
    model: nn.Module, params: Sequence[nn.Parameter], batches: Sequence[Batch], vec: torch.Tensor
) -> torch.Tensor:
    """H @ vec for the mean loss over this rank's `batches`, averaged over ranks; flat in and out.

    Double backward: the gradient with its graph, its dot product with `vec`, differentiated again.
    """
    chunks = _unflatten(vec, params)
    total = torch.zeros_like(vec)
    with sdpa_kernel(SDPBackend.MATH):
        for x, y in batches:
            loss = model(x, y).loss
            grads = torch.autograd.grad(loss, params, create_graph=True)
            dot = sum((g * c).sum() for g, c in zip(grads, chunks, strict=True))
            hvp = torch.autograd.grad(dot, params)
            total += torch.cat([h.reshape(-1) for h in hvp])
    total /= len(batches)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(total, op=dist.ReduceOp.AVG)
    return total


def _unflatten(vec: torch.Tensor, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    out, start = [], 0
    for p in params:
        out.append(vec[start : start + p.numel()].view_as(p))
        start += p.numel()
    return out


def lanczos_max(
    matvec: MatVec, dim: int, max_iters: int, device: torch.device | str = "cpu", seed: int = 0
) -> tuple[float, int]:
    """(largest eigenvalue, products used) of the symmetric operator `matvec` on R^dim.

    Lanczos with full reorthogonalization (stored basis: `max_iters` x `dim` floats), the
    tridiagonal in float64; stops early once the top Ritz pair's residual bound
    |beta_k * s_k| is within `RESIDUAL_TOL` of its value, or the Krylov space is exhausted.
    """
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(dim, generator=generator, dtype=torch.float64).to(device, torch.float32)
    q /= q.norm()
    basis = [q]
    alphas: list[float] = []
    betas: list[float] = []
    theta = math.nan
    for k in range(min(max_iters, dim)):
        w = matvec(basis[k])
        alpha = float(torch.dot(w, basis[k]))
        alphas.append(alpha)
        stacked = torch.stack(basis)
        for _ in range(2):  # twice is enough (Kahan-Parlett "twice is enough")
            w -= stacked.T @ (stacked @ w)
        beta = float(w.norm())
        values, vectors = np.linalg.eigh(_tridiagonal(alphas, betas))
        theta = float(values[-1])
        if beta * abs(vectors[-1, -1]) <= RESIDUAL_TOL * abs(theta) or beta <= 1e-12 * abs(theta):
            return theta, k + 1
        betas.append(beta)
        basis.append(w / beta)
    return theta, len(alphas)


def top_eigenvalues(
    model: nn.Module,
    params: Sequence[nn.Parameter],
    batches: Sequence[Batch],
    inv_sqrt_p: torch.Tensor,
    max_iters: int,
    seed: int,
    l2_diag: torch.Tensor | None = None,
) -> tuple[float, float, int]:
    """(S, lambda_max(H), products used): S = lambda_max(P^-1/2 (H + diag(l2_diag)) P^-1/2),
    with `inv_sqrt_p` = P^-1/2 flat; `l2_diag` is Adam+L2's curvature (wd on decayed weights)."""
    dim = inv_sqrt_p.numel()

    def hvp(vec: torch.Tensor) -> torch.Tensor:
        return hessian_vector_product(model, params, batches, vec)

    def preconditioned(vec: torch.Tensor) -> torch.Tensor:
        x = inv_sqrt_p * vec
        hx = hvp(x) if l2_diag is None else hvp(x) + l2_diag * x
        return inv_sqrt_p * hx

    device = inv_sqrt_p.device
    sharpness, used_s = lanczos_max(preconditioned, dim, max_iters, device, seed)
    hessian_max, used_h = lanczos_max(hvp, dim, max_iters, device, seed)
    return sharpness, hessian_max, used_s + used_h


def _tridiagonal(alphas: Sequence[float], betas: Sequence[float]) -> np.ndarray:
    return np.diag(alphas) + np.diag(betas, 1) + np.diag(betas, -1)


def preconditioner(
    exp_avg_sq: torch.Tensor, num_steps: int, betas: tuple[float, float], eps: float
) -> torch.Tensor:
    """Adam's diagonal P_t = (1 - beta1^t) (sqrt(v_t / (1 - beta2^t)) + eps), elementwise."""
    beta1, beta2 = betas
    return (1 - beta1**num_steps) * ((exp_avg_sq / (1 - beta2**num_steps)).sqrt() + eps)


def stability_threshold(beta1: float, lr: float, decay_per_step: float = 0.0) -> float:
    """The largest stable S of momentum with step `lr` and per-step shrink d_t: (1 + beta1)
    (2 - d_t) / ((1 - beta1) lr); with d_t = 0 it is (2 + 2 beta1) / ((1 - beta1) lr)."""
    return (1 + beta1) * (2 - decay_per_step) / ((1 - beta1) * lr)


def read_exp_avg_sq(optimizer: torch.optim.Optimizer, param: nn.Parameter) -> torch.Tensor:
    """Adam's v of one model parameter, whole, on every rank.

    ZeRO 1-3 flatten the state per group and rank: DeepSpeed's accessor assembles it (a
    collective: every rank calls it, in the same order). ZeRO 0 keeps torch's state per parameter
    (`optimizer` is then the torch optimizer itself).
    """
    from deepspeed.utils import safe_get_full_optimizer_state

    full = safe_get_full_optimizer_state(param, "exp_avg_sq")
    if full is not None:
        return full.float()
    if hasattr(param, "ds_id") or hasattr(param, "_hp_mapping"):
        raise RuntimeError("DeepSpeed holds this parameter's state but returned none")
    return optimizer.state[param]["exp_avg_sq"].float()


def link_optimizer_state(zero_optimizer: Any) -> None:
    """Point every ZeRO 1/2 parameter's fragment mapping at its slice of the Adam state.

    DeepSpeed links them once, right after the first group's first step; ZeRO 1/2 step one group
    at a time, so the groups after the first are linked while their state is still empty, and
    the accessor then finds no `exp_avg_sq` for them. Linking again (views, no copies) fixes it.
    """
    from deepspeed.utils import lazy_init_hp_params_optimizer_state

    lp_groups = getattr(zero_optimizer, "bit16_groups", None)
    hp_groups = getattr(zero_optimizer, "single_partition_of_fp32_groups", None)
    if lp_groups is None or hp_groups is None:
        return  # ZeRO 0 (torch's own state) or ZeRO 3 (its accessor reads the state directly)
    for lp_params, hp_partition in zip(lp_groups, hp_groups, strict=True):
        lazy_init_hp_params_optimizer_state(lp_params, hp_partition, zero_optimizer.optimizer.state)


def read_full_param(param: nn.Parameter) -> torch.Tensor:
    """A parameter's full fp32 value: gathered from ZeRO-3 shards (collective), else its data."""
    if hasattr(param, "ds_id"):
        from deepspeed.utils import safe_get_full_fp32_param

        return safe_get_full_fp32_param(param).float()
    return param.detach().float()


def adam_steps_taken(optimizer: torch.optim.Optimizer, device: torch.device) -> int:
    """Updates Adam has applied (its bias-correction t): skipped steps do not count."""
    counts = [0]
    for state in optimizer.state.values():
        if "step" in state:
            counts.append(int(state["step"]))
    for group in optimizer.param_groups:  # FusedAdam keeps t per group
        counts.append(int(group.get("step", 0)))
    t = torch.tensor(max(counts), device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)  # a rank may hold no state of its own
    return int(t)


class SharpnessProbe:
    """Measures S, its threshold and lambda_max(H) on log steps that are multiples of the interval.

    Args:
        cfg: the run's config (optimizer kind and hyperparameters, telemetry knobs, model).
        engine: the DeepSpeed engine (its module's parameters may be ZeRO-3 placeholders).
        train_tokens: the training token file; the fixed batch is read from its data order.
        rank, world_size, device: this process's place.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        engine: Any,
        train_tokens: Path | np.ndarray,
        rank: int,
        world_size: int,
        device: torch.device,
    ) -> None:
        t = cfg.telemetry
        self.cfg = cfg
        self.interval = t.sharpness_interval
        self.module = engine.module
        self.zero_optimizer = engine.optimizer  # ZeRO 1-3's wrapper, or the torch one on ZeRO 0
        # the gated torch/FusedAdam optimizer, holding Adam's step count
        self.optimizer = getattr(engine.optimizer, "optimizer", engine.optimizer)
        self.device = device
        self._copy: GPT | None = None
        self._batches: list[Batch] = []
        if not self.interval:
            return
        if t.sharpness_batch_size % world_size:
            raise ConfigError(
                f"telemetry.sharpness_batch_size={t.sharpness_batch_size} must be a multiple of "
                f"the {world_size} ranks; set it to one"
            )
        # the first sequences of the run's own data order: fixed, and the same on any world size
        self._batches = BatchLoader(
            train_tokens,
            block_size=cfg.model.block_size,
            micro_batch_size=t.sharpness_batch_size // world_size,
            rank=rank,
            world_size=world_size,
            seed=cfg.run.seed,
            vocab_size=cfg.model.vocab_size,
            device=device,
        ).next_step()

    def due(self, step: int) -> bool:
        """Whether the log step `step` measures."""
        return bool(self.interval) and step % self.interval == 0

    def read(self, step: int) -> dict[str, Any]:
        """The sharpness fields of the metrics line of log step `step` ({} when not due)."""
        if not self.due(step):
            return {}
        o = self.cfg.optim
        lr = lr_at(step, o, self.cfg.train.max_steps)  # the rate of the next update
        return self.measure(lr, o.shrink_per_step(lr), o.l2_grad_coef)

    def _refresh(self, num_steps: int) -> tuple[list[nn.Parameter], torch.Tensor, torch.Tensor]:
        """Copy the current weights into the fp32 copy; (its params, P^-1/2 flat, decay mask)."""
        if self._copy is None:
            with torch.random.fork_rng(devices=[]):  # its init must not move the run's RNG
                self._copy = GPT(self.cfg.model).to(self.device).float().eval()
        own = dict(self._copy.named_parameters())
        scales, mask = [], []
        o = self.cfg.optim
        link_optimizer_state(self.zero_optimizer)
        for name, param in self.module.named_parameters():  # same order on every rank
            target = own[name]
            with torch.no_grad():
                target.copy_(read_full_param(param).view_as(target))
            v = read_exp_avg_sq(self.zero_optimizer, param).view(-1).to(self.device)
            scales.append(preconditioner(v, num_steps, o.betas, o.eps).rsqrt())
            mask.append(torch.full_like(v, float(target.dim() >= 2)))
        params = [own[name] for name, _ in self.module.named_parameters()]
        return params, torch.cat(scales), torch.cat(mask)

    def measure(self, lr: float, decay_per_step: float = 0.0, l2: float = 0.0) -> dict[str, Any]:
        """S = lambda_max(P^-1/2 (H + l2 D) P^-1/2) (D: the decay group), lambda_max(H), the
        threshold for `lr` and per-step decoupled shrink `decay_per_step`, and their ratio."""
        start = time.perf_counter()
        num_steps = adam_steps_taken(self.optimizer, self.device)
        if num_steps == 0:
            return {}  # no second moment yet: P is undefined
        params, inv_sqrt_p, decay_mask = self._refresh(num_steps)
        assert self._copy is not None
        sharpness, hessian_max, hvps = top_eigenvalues(
            self._copy,
            params,
            self._batches,
            inv_sqrt_p,
            self.cfg.telemetry.sharpness_iters,
            self.cfg.run.seed,
            l2 * decay_mask if l2 else None,
        )
        threshold = stability_threshold(self.cfg.optim.betas[0], lr, decay_per_step)
        return {
            "sharpness": sharpness,
            "sharpness_threshold": threshold,
            "sharpness_ratio": sharpness / threshold,
            "hessian_max_eig": hessian_max,
            "sharpness_batch": self.cfg.telemetry.sharpness_batch_size,
            "sharpness_hvps": hvps,
            "sharpness_time_s": time.perf_counter() - start,
        }
