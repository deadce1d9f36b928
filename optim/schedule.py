"""The learning rate as a pure function of the step, so resuming needs nothing but the step."""

import math

from optim.config import OptimConfig


def lr_at(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Linear warmup from 0 to `lr` over `warmup_steps`, then cosine (or constant) to `min_lr`;
    times the factor of each cooldown in force at `step` (`optim.cooldowns`).

    `step` counts completed updates, so the first update uses `lr_at(0)`; it is made nonzero by
    warming up to step + 1 (nanoGPT's form) so that no update is wasted at lr 0.
    """
    return math.prod(c.factor_at(step) for c in cfg.cooldowns) * _scheduled(step, cfg, max_steps)


def _scheduled(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """The schedule alone: warmup, then cosine or constant."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    decay_steps = max(1, max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)
