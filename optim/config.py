"""Optimizer, learning-rate schedule and the DeepSpeed pass-through."""

from typing import Any, Literal

from pydantic import Field, model_validator

from configs.base import Section


class Cooldown(Section):
    """The learning rate times `factor` for `steps` steps from step `start`, then the schedule
    again: a heal's remedy for an update that blew up (`divergence.heal`)."""

    start: int = Field(ge=0, description="the first step it lowers (a step count, as lr_at's)")
    steps: int = Field(ge=1, description="how many steps it lasts")
    factor: float = Field(gt=0.0, le=1.0, description="the multiplier of the scheduled lr")

    def factor_at(self, step: int) -> float:
        """The multiplier this cooldown puts on the lr of `step`."""
        return self.factor if self.start <= step < self.start + self.steps else 1.0


class OptimConfig(Section):
    name: Literal["adamw", "adam_l2", "adamw_indep", "adamp", "adam_spd"] = Field(
        "adamw", description="decay form; docs/engine.md says what weight_decay means in each"
    )
    lr: float = Field(1e-3, gt=0.0, description="peak learning rate")
    min_lr: float = Field(1e-4, ge=0.0, description="learning rate at the end of the cosine")
    warmup_steps: int = Field(20, ge=0, description="linear warmup from 0 to lr, in steps")
    schedule: Literal["cosine", "constant"] = Field(
        "cosine", description="after warmup: cosine to min_lr, or constant at lr"
    )
    cooldowns: list[Cooldown] = Field(
        default_factory=list,
        description="stretches of lowered lr on top of the schedule (heals add them)",
    )
    weight_decay: float = Field(0.1, ge=0.0, description="λ on matrices and embeddings only")
    l2_form: Literal["grad", "loss"] = Field(
        "grad",
        description="adam_l2: grad = g + λp after clipping (torch's Adam); "
        "loss = the paper's loss term λ sum(w^2), gradient 2λp, before clipping",
    )
    adamp_delta: float = Field(
        0.1, gt=0.0, description="adamp: project where abs(cos(g, w)) < delta / sqrt(view width)"
    )
    adamp_wd_ratio: float = Field(
        0.1, ge=0.0, description="adamp: decay multiplier of a tensor whose update is projected"
    )
    betas: tuple[float, float] = Field((0.9, 0.95), description="Adam (beta1, beta2)")
    eps: float = Field(1e-8, gt=0.0, description="Adam epsilon")
    grad_clip: float = Field(1.0, ge=0.0, description="max global grad norm; 0 disables clipping")
    fused_adam: Literal["torch", "deepspeed"] = Field(
        "torch",
        description="CUDA Adam kernel of adamw, adam_l2, adamw_indep: torch (fused=True, no "
        "build) or deepspeed (FusedAdam, JIT-built; torch if the build fails)",
    )

    @model_validator(mode="after")
    def _check(self) -> "OptimConfig":
        if self.min_lr > self.lr:
            raise ValueError(f"optim.min_lr ({self.min_lr}) must not exceed optim.lr ({self.lr})")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"optim.betas must lie in [0, 1), got {self.betas}")
        if self.l2_form == "loss" and self.name != "adam_l2":
            raise ValueError(f"optim.l2_form=loss is a form of adam_l2, not of {self.name}")
        return self

    @property
    def decoupled(self) -> bool:
        """Whether the decay acts on the weights apart from the gradient: every form but
        adam_l2, whose λ enters the gradient (and so Adam's moments)."""
        return self.name != "adam_l2"

    def torch_weight_decay(self, decay: float) -> float:
        """The `weight_decay` torch's Adam/AdamW (or FusedAdam) takes for a group whose λ is
        `decay`: λ itself; λ / lr_max for adamw_indep, so that torch's lr_t * wd is the AdamW
        paper's (lr_t / lr_max) λ; 0 for `l2_form=loss`, whose decay is the loss term's
        gradient (optim/l2.py)."""
        if self.l2_form == "loss":
            return 0.0
        return decay / self.lr if self.name == "adamw_indep" else decay

    def shrink_per_step(self, lr: float) -> float:
        """The per-step decoupled shrink d_t toward zero of the decay group at rate `lr`.

        torch's form (adamw; adamp, whose wd_ratio on projected tensors is ignored here)
        shrinks by lr * λ, the AdamW paper's (adamw_indep) by (lr / lr_max) * λ; adam_l2 adds
        curvature instead (`l2_grad_coef`), and adam_spd decays toward the starting weights,
        not zero: 0 for both.
        """
        if self.name in ("adamw", "adamp"):
            return self.weight_decay * lr
        if self.name == "adamw_indep":
            return self.weight_decay * lr / self.lr
        return 0.0

    @property
    def l2_grad_coef(self) -> float:
        """c in the L2 gradient term c*p of the decayed weights (0: the decay is not L2)."""
        if self.name != "adam_l2":
            return 0.0
        return 2 * self.weight_decay if self.l2_form == "loss" else self.weight_decay


class DeepSpeedConfig(Section):
    overlap_comm: bool = Field(
        True, description="ZeRO 1-3: reduce gradients in buckets while the backward still runs"
    )
    bucket_elements: int = Field(
        50_000_000,
        ge=1_000,
        description="ZeRO 1-3: elements per gradient reduce and all-gather bucket (overlap_comm "
        "keeps a few such fp32 buffers)",
    )
    extra: dict[str, Any] = Field(
        default_factory=dict,
        description="extra DeepSpeed config keys; one that contradicts ours is an error",
    )
