"""Knobs of the divergence detectors, the policy, the telemetry and wandb."""

from typing import Literal

from pydantic import Field

from configs.base import Section


class HealConfig(Section):
    """The remedies of `divergence.policy=heal`, each with its strength (heal/remedies.py holds
    the table of which verdict takes which, in order)."""

    max_heals: int = Field(5, ge=0, description="heals in one run before a detection stops it")
    tries: int = Field(
        2, ge=1, description="heals of one detection with one remedy before the next remedy"
    )
    cooldown_factor: float = Field(
        0.1, gt=0.0, lt=1.0, description="lr cooldown: the multiplier of the scheduled lr"
    )
    cooldown_steps: int = Field(200, ge=1, description="lr cooldown: how many steps it lasts")
    eps: float = Field(1e-6, gt=0.0, description="a higher Adam eps: at least this, else x10")
    grad_clip: float = Field(1.0, gt=0.0, description="clipping switched on where it was off")
    attn_softcap: float = Field(
        50.0, gt=0.0, description="attention-logit soft cap switched on (Gemma 2's 50)"
    )
    output_softcap: float = Field(
        30.0, gt=0.0, description="output-logit soft cap switched on (Gemma 2's 30)"
    )
    z_loss: float = Field(1e-4, gt=0.0, description="z-loss switched on (PaLM's 1e-4), else x10")
    weight_decay: float = Field(
        0.1, gt=0.0, description="weight decay raised to at least this, else doubled"
    )
    batches: int = Field(3, ge=1, description="other batches the diagnosis tries the step on")


class DivergenceConfig(Section):
    enabled: bool = Field(
        True,
        description="run the detectors; off only to measure their cost (non-finite updates are "
        "withheld either way)",
    )
    policy: Literal["record", "skip", "rollback", "stop", "heal"] = Field(
        "record",
        description="what a detection does; recording always happens; heal: diagnose, roll "
        "back, apply the remedy and train on (docs/heal)",
    )
    window: int = Field(128, ge=8, description="rolling window of the spike detectors, in steps")
    spike_sigma: float = Field(6.0, gt=0.0, description="robust z-score that counts as a spike")
    std_floor: float = Field(0.05, ge=0.0, description="floor on the window's robust std (loss)")
    grad_spike_sigma: float = Field(6.0, gt=0.0, description="robust z-score of a grad-norm spike")
    # A grad-norm spike alone is recorded but not acted on: clean runs have them (issue 23,
    # docs/divergences.md). It becomes actionable when the loss follows it (monitor.detectors'
    # LossFollows).
    grad_spike_follow_sigma: float = Field(
        3.0,
        gt=0.0,
        description="loss robust z-score that makes a grad-norm spike actionable (the loss "
        "follows)",
    )
    grad_spike_follow_steps: int = Field(
        4, ge=0, description="steps after a grad-norm spike in which the loss may follow it"
    )
    drift_margin: float = Field(
        0.5, gt=0.0, description="smoothed loss above its running minimum by this much: drift"
    )
    drift_steps: int = Field(
        50, ge=1, description="steps the smoothed loss must rise in a row to count as drift"
    )
    drift_ema: float = Field(0.98, gt=0.0, lt=1.0, description="EMA factor of the smoothed loss")
    attn_logit_max: float = Field(1000.0, gt=0.0, description="max |q.k/sqrt(d)| threshold")
    attn_logit_growth: float = Field(
        10.0, gt=1.0, description="growth factor of max attention logit between two readings"
    )
    output_log_z_max: float = Field(50.0, gt=0.0, description="|mean log Z| threshold")
    slingshot_growth_factor: float = Field(
        10.0,
        gt=1.0,
        description="slingshot: output-norm growth over its rolling median that starts a cycle",
    )
    slingshot_window: int = Field(
        20,
        ge=4,
        description="slingshot: log readings in the rolling median and each phase's deadline",
    )
    slingshot_settle: float = Field(
        0.1,
        gt=0.0,
        lt=1.0,
        description="slingshot: growth back below this share of its peak ends the cycle",
    )
    evidence_steps: int = Field(32, ge=1, description="steps of telemetry kept in each event")
    rollback_skip_batches: int = Field(200, ge=0, description="batches skipped after a rollback")
    max_rollbacks: int = Field(3, ge=0, description="rollbacks before the run stops")
    diagnose: bool = Field(
        False,
        description="after a divergence stop, run `postmortem.diagnose` on it (replays: minutes)",
    )
    heal: HealConfig = Field(default_factory=HealConfig, description="policy heal's remedies")


class TelemetryConfig(Section):
    interval: int = Field(
        0, ge=0, description="steps between logit telemetry forwards; 0 means every log step"
    )
    enabled: bool = Field(True, description="attention-logit and log Z telemetry on log steps")
    per_layer: bool = Field(
        False, description="also norms and update ratios per transformer block (replays set it)"
    )
    sharpness_interval: int = Field(
        0,
        ge=0,
        description="preconditioned sharpness of Adam on log steps that are multiples of this; "
        "0 off",
    )
    sharpness_batch_size: int = Field(
        8, ge=1, description="sequences in the fixed sharpness batch (the run's first ones)"
    )
    sharpness_iters: int = Field(
        20, ge=2, description="most Lanczos iterations (Hessian-vector products) per eigenvalue"
    )


class WandbConfig(Section):
    mode: Literal["offline", "online", "disabled"] = Field(
        "offline", description="offline needs no account; sync later with `wandb sync`"
    )
    project: str = Field("weight-decay-harness", description="wandb project")
    group: str | None = Field(None, description="wandb group (sweeps set it)")
    tags: list[str] = Field(default_factory=list, description="extra wandb tags")
