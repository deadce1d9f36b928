"""The DeepSpeed engine: its config generated from ours, and an update gate every ZeRO stage obeys.

Why a gate: in fp32 DeepSpeed applies whatever gradient it is given, and in every precision the
decision to withhold an update (non-finite loss or grad norm, or a policy veto after a spike)
must be taken before the optimizer touches the weights and identically on every rank. ZeRO 1-3
call the wrapped optimizer's `step` once per parameter group after computing the global grad
norm; ZeRO 0 calls it once. The gate sits in that `step`, decides once per optimizer step from
the all-reduced loss and the global pre-clip grad norm, and either runs the real step or not.
Reading those two numbers is the one host sync per step that the harness makes.
"""

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from configs import ConfigError
from configs.schema import TrainConfig
from model.tensor_core import emulate_tensor_cores
from optim.config import OptimConfig
from optim.forms import FORMS, FormAdam
from optim.groups import param_groups
from optim.l2 import add_l2_loss_grad

# Decides whether the update of `step` is applied, given its loss and pre-clip grad norm.
Veto = Callable[[int, float, float], bool]


def deepspeed_config(
    cfg: TrainConfig, world_size: int, load_universal: bool = False
) -> dict[str, Any]:
    """The complete DeepSpeed config; nothing is left to DeepSpeed's silent defaults.

    `load_universal`: the checkpoint to resume is loaded in DeepSpeed's universal form (another
    world size); DeepSpeed reads this only at `initialize`, so the checkpointer decides it first.
    """
    micro, accum = cfg.train.micro_batch_size, cfg.train.grad_accum_steps
    config: dict[str, Any] = {
        "train_batch_size": micro * accum * world_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        # ZeRO 0 hands the optimizer already-clipped grads without reporting the norm, so there
        # the gate clips; ZeRO 1-3 report the pre-clip norm and clip themselves.
        "gradient_clipping": cfg.optim.grad_clip if cfg.zero_stage > 0 else 0.0,
        "zero_optimization": {"stage": cfg.zero_stage},
        "zero_allow_untested_optimizer": True,
        "fp16": {"enabled": False},
        "bf16": {"enabled": False},
        # The paper's bf16: fp32 weights and Adam state, bf16 autocast compute, fp32 gradient
        # reduction (no module communicates in bf16). Emulated bf16 rounds inside fp32 kernels.
        "torch_autocast": {
            "enabled": cfg.precision == "bf16" and cfg.bf16_kernels == "native",
            "dtype": "bfloat16",
            "lower_precision_safe_modules": [],
        },
        "prescale_gradients": False,
        "gradient_predivide_factor": 1.0,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
        # On by default, DeepSpeed's throughput timer calls cuda.synchronize() at every forward
        # and every engine.step(); the harness measures throughput itself (monitor/perf.py).
        "timers": {"throughput": {"enabled": False}},
        "checkpoint": {"load_universal": load_universal},
    }
    if cfg.zero_stage > 0:
        # Reduction in buckets that overlap the backward: the same sums of the same gradients,
        # so a run is the same with it on or off (tests/optim/test_distributed.py).
        ds = cfg.deepspeed
        config["zero_optimization"].update(
            overlap_comm=ds.overlap_comm,
            contiguous_gradients=True,
            reduce_bucket_size=ds.bucket_elements,
        )
        if cfg.zero_stage < 3:  # ZeRO 3 gathers parameters by its own prefetch sizes
            config["zero_optimization"]["allgather_bucket_size"] = ds.bucket_elements
    if cfg.bf16_kernels == "emulated":  # (only with precision=bf16)
        # ZeRO 3 otherwise swaps F.linear for its own autograd function, which the emulation's
        # rounding (model/tensor_core.py) cannot see into
        config["zero_optimization"]["memory_efficient_linear"] = False
    _merge_extra(config, cfg.deepspeed.extra, "deepspeed.extra")
    return config


def _merge_extra(config: dict[str, Any], extra: dict[str, Any], where: str) -> None:
    for key, value in extra.items():
        if key in config and isinstance(config[key], dict) and isinstance(value, dict):
            _merge_extra(config[key], value, f"{where}.{key}")
        elif key in config and config[key] != value:
            raise ConfigError(
                f"{where}.{key}={value!r} contradicts the harness's {config[key]!r}; "
                "set it through the harness's own config key instead"
            )
        else:
            config[key] = value


def adam_choice(o: OptimConfig, device_type: str) -> tuple[type, dict[str, Any]]:
    """The Adam class and its kernel option for adamw, adam_l2 and adamw_indep on a device.

    torch's own AdamW (decoupled forms) or Adam (adam_l2): `foreach` on a CPU, bitwise what
    torch users get; `fused` on CUDA, which ships in torch's wheel and needs no build. DeepSpeed's
    FusedAdam only when `optim.fused_adam=deepspeed` asks for it: DeepSpeed on PyPI ships its
    source, so the first use JIT-compiles the op (nvcc matching torch's CUDA, ninja, g++, one
    lock in ~/.cache/torch_extensions for every rank). If that build fails, torch's fused path
    runs instead, after one warning line.
    """
    torch_cls = torch.optim.AdamW if o.decoupled else torch.optim.Adam
    if device_type != "cuda":
        return torch_cls, {"foreach": True}
    if o.fused_adam == "deepspeed":
        try:
            return load_fused_adam(), {"adam_w_mode": o.decoupled}
        except Exception as err:  # a missing toolkit fails in many ways; all mean "no op"
            reason = f"{type(err).__name__}: {err}".splitlines()[0]
            print(
                f"warning: DeepSpeed's FusedAdam did not build ({reason}); using torch's "
                f"fused {torch_cls.__name__} (optim.fused_adam=torch avoids the build)",
                file=sys.stderr,
            )
    return torch_cls, {"fused": True}


def load_fused_adam() -> type:
    """DeepSpeed's FusedAdam class, with its CUDA op built (or loaded from the build cache)."""
    from deepspeed.ops.adam import FusedAdam
    from deepspeed.ops.op_builder import FusedAdamBuilder

    FusedAdamBuilder().load()
    return FusedAdam


def build_optimizer(groups: list[dict[str, Any]], cfg: TrainConfig, device: torch.device):
    """The optimizer of `optim.name`, gated (`adam_choice` picks the Adam of the torch forms).
    With `optim.l2_form=loss` Adam's own weight decay is 0 (the caller hooks the L2 gradient).

    adamw_indep is AdamW with wd / lr_max: its per-step shrink lr_t * wd / lr_max is the
    paper's schedule multiplier times wd. adamp, adam_spd: `FormAdam`.
    """
    o = cfg.optim
    if o.name in FORMS:
        base = FormAdam
        kwargs = dict(form=o.name, delta=o.adamp_delta, wd_ratio=o.adamp_wd_ratio)
    else:
        groups = [{**g, "weight_decay": o.torch_weight_decay(g["weight_decay"])} for g in groups]
        base, kwargs = adam_choice(o, device.type)
    kwargs.update(lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)
    gated_cls = type(f"Gated{base.__name__}", (_GatedStep, base), {})
    optimizer = gated_cls(groups, **kwargs)
    if issubclass(base, torch.optim.Adam | torch.optim.AdamW):
        optimizer.register_load_state_dict_pre_hook(_step_per_param)
    return optimizer


def _step_per_param(optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
    """Let torch's Adam load FusedAdam's state (a GPU run's checkpoint replayed on a CPU, say):
    FusedAdam counts steps in each param group, torch's Adam in each parameter's state, and
    raises KeyError 'step' on a state without one. The group's count fills it in."""
    for group in state_dict["param_groups"]:
        for index in group["params"]:
            state = state_dict["state"].get(index, {})
            if "exp_avg" in state and "step" not in state and "step" in group:
                state["step"] = torch.tensor(float(group["step"]))
    return state_dict


class _GatedStep:
    """Mixin that routes the optimizer's `step` through an `UpdateGate`."""

    gate: "UpdateGate | None" = None

    def step(self, closure=None):  # noqa: D102 - torch.optim signature
        if self.gate is None or self.gate.allows():
            return super().step(closure)
        return None


@dataclass
class StepScalars:
    """What the gate saw for one optimizer step."""

    step: int
    loss: float
    grad_norm: float
    applied: bool
    clipped: bool


class UpdateGate:
    """Decides once per optimizer step, identically on every rank, whether the update happens."""

    def __init__(self, engine, optimizer, cfg: TrainConfig, veto: Veto | None = None):
        self.engine = engine
        self.optimizer = optimizer
        self.zero_stage = cfg.zero_stage
        self.grad_clip = cfg.optim.grad_clip
        self.veto = veto
        self._step = -1
        self._loss: torch.Tensor | None = None
        self.last: StepScalars | None = None
        optimizer.gate = self

    def begin(self, step: int, loss: torch.Tensor) -> None:
        """Arm the gate for `step` with the step's mean loss, all-reduced across ranks."""
        loss = loss.detach().float().reshape(1)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(loss, op=dist.ReduceOp.AVG)
        self._step, self._loss, self.last = step, loss[0], None

    def allows(self) -> bool:
        """Called inside the optimizer's step (per group on ZeRO 1-3): decide once, then reuse."""
        if self.last is None or self.last.step != self._step:
            self.last = self._decide()
        return self.last.applied

    def finish(self) -> StepScalars:
        """After `engine.step()`: the step's scalars, also when DeepSpeed skipped the optimizer."""
        if self.last is None or self.last.step != self._step:
            scalars = self._decide()
            self.last = StepScalars(scalars.step, scalars.loss, scalars.grad_norm, False, False)
        elif not self.engine.was_step_applied():
            self.last.applied = False
        return self.last

    def _decide(self) -> StepScalars:
        norm = self._grad_norm()
        values = torch.stack([self._loss, norm.to(self._loss.device)]).tolist()  # host sync
        loss, grad_norm = values
        if grad_norm < 0:  # DeepSpeed reports a non-finite norm as -1
            grad_norm = math.nan
        finite = math.isfinite(loss) and math.isfinite(grad_norm)
        # The watch sees every step, non-finite ones included, so each is recorded as an event.
        vetoed = self.veto is not None and self.veto(self._step, loss, grad_norm)
        applied = finite and not vetoed
        clipped = finite and self.grad_clip > 0 and grad_norm > self.grad_clip
        if applied and self.zero_stage == 0 and clipped:
            torch.nn.utils.clip_grads_with_norm_(self._params(), self.grad_clip, norm)
        return StepScalars(self._step, loss, grad_norm, applied, clipped)

    def _grad_norm(self) -> torch.Tensor:
        if self.zero_stage > 0:
            norm = getattr(self.engine.optimizer, "_global_grad_norm", None)
            if norm is None:
                return torch.tensor(math.nan)
            return norm.float() if torch.is_tensor(norm) else torch.tensor(float(norm))
        # ZeRO 0: every rank holds the full, already averaged gradient; torch's own norm, so
        # clipping is bitwise what `clip_grad_norm_` does.
        return torch.nn.utils.get_total_norm([p.grad for p in self._params()])

    def _params(self) -> list[torch.Tensor]:
        groups = self.optimizer.param_groups
        return [p for g in groups for p in g["params"] if p.grad is not None]


def with_global_batch(cfg: TrainConfig, world_size: int) -> TrainConfig:
    """`cfg` with `train.grad_accum_steps` derived from `train.global_batch_size` (when set) for
    `world_size` ranks, so that a run on another number of nodes trains on the same batch."""
    t = cfg.train
    if t.global_batch_size is None:
        return cfg
    per_step = t.micro_batch_size * world_size
    if t.global_batch_size % per_step:
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} is not a multiple of "
            f"train.micro_batch_size x ranks = {t.micro_batch_size} x {world_size}: change "
            "one of them"
        )
    accum = t.global_batch_size // per_step
    if "grad_accum_steps" in t.model_fields_set and t.grad_accum_steps != accum:
        raise ConfigError(
            f"train.grad_accum_steps={t.grad_accum_steps} contradicts train.global_batch_size="
            f"{t.global_batch_size} on {world_size} rank(s), which needs {accum}: leave "
            "train.grad_accum_steps unset"
        )
    train = t.model_copy(update={"grad_accum_steps": accum})
    return cfg.model_copy(update={"train": train})


def initialize(
    model: torch.nn.Module,
    cfg: TrainConfig,
    world_size: int,
    device: torch.device,
    load_universal: bool = False,
):
    """`deepspeed.initialize` on our gated optimizer and generated config: (engine, optimizer)."""
    import deepspeed
    from deepspeed.utils import logger

    # DeepSpeed warns about any client optimizer under ZeRO ("untested"); ours is torch's Adam
    # (or FusedAdam) step behind a gate, checked against torch on every stage in tests/optim.
    logger.setLevel("ERROR")
    groups = param_groups(model, cfg.optim.weight_decay)
    add_l2_loss_grad(groups[0]["params"], cfg)
    optimizer = build_optimizer(groups, cfg, device)
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=deepspeed_config(cfg, world_size, load_universal)
    )
    if cfg.bf16_kernels == "emulated":  # (only with precision=bf16)
        emulate_tensor_cores(engine.module, cfg.bf16_flash)
    if isinstance(optimizer, FormAdam):
        optimizer.attach(engine, cfg.zero_stage)
    return engine, optimizer


def set_lr(optimizer, lr: float) -> None:
    """Set the learning rate of every group (the schedule is a pure function of the step)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
