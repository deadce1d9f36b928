"""LR sensitivity (Wortsman et al. 2023): how much a recipe's final loss depends on hitting the LR.

A recipe that only works at one learning rate is fragile even if its best loss is good; the paper's
claims about weight decay and precision are claims about this fragility as much as the best loss.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from study.runs import MISSING, Run, canonical, label, to_float, varying_keys

LR_KEY = "optim.lr"


def lr_sensitivity(final_losses: Sequence[float], initial_losses: Sequence[float]) -> float:
    """Mean over an LR grid of `min(final, initial) - best`, one entry per run of the grid.

    Definition from Wortsman et al., "Small-scale proxies for large-scale Transformer training
    instabilities" (2023, arXiv:2309.14322): LR sensitivity is
    `E_{lr in grid}[min(loss(lr), loss_0) - min_{lr in grid} loss(lr)]`, where `loss_0` is the loss
    at initialization. Clipping at `loss_0` stops one blown-up run from dominating the mean. Here
    `loss_0` is each run's first logged loss, a non-finite final loss (pass NaN for a run that
    diverged) counts as `loss_0`, and `best` is taken after clipping, so the result is >= 0.
    """
    if len(final_losses) != len(initial_losses) or not final_losses:
        raise ValueError("need one initial loss per final loss, and at least one run")
    if not all(math.isfinite(x) for x in initial_losses):
        raise ValueError("initial losses must be finite")
    clipped = [
        min(final, initial) if math.isfinite(final) else initial
        for final, initial in zip(final_losses, initial_losses, strict=True)
    ]
    best = min(clipped)
    return sum(c - best for c in clipped) / len(clipped)


@dataclass
class LRGroup:
    """The runs of one recipe (every varying key but the LR fixed), sorted by LR."""

    label: str
    run_names: list[str]
    lrs: list[float]
    final_losses: list[float]  # NaN for diverged runs
    initial_losses: list[float]

    @property
    def sensitivity(self) -> float:
        """`lr_sensitivity` of the group."""
        return lr_sensitivity(self.final_losses, self.initial_losses)

    @property
    def clipped_losses(self) -> list[float]:
        """What the sensitivity averages: `min(final, initial)`, the initial loss if diverged."""
        return [
            min(f, i) if math.isfinite(f) else i
            for f, i in zip(self.final_losses, self.initial_losses, strict=True)
        ]

    @property
    def best(self) -> tuple[float, float]:
        """(lr, clipped final loss) of the group's best run."""
        losses = self.clipped_losses
        index = losses.index(min(losses))
        return self.lrs[index], losses[index]


def follows_lr(runs: Sequence[Run], key: str) -> bool:
    """Whether a key is set in proportion to the LR in every run (e.g. `min_lr = lr / 10`).

    Such a key varies only because the LR does, so grouping by it would split each recipe's grid
    into one run per group.
    """
    ratios = []
    for run in runs:
        lr, value = to_float(run.flat_config.get(LR_KEY)), run.flat_config.get(key, MISSING)
        if isinstance(value, bool) or not isinstance(value, int | float) or not lr:
            return False
        ratios.append(value / lr)
    return all(math.isclose(r, ratios[0], rel_tol=1e-6) for r in ratios)


def lr_groups(runs: Sequence[Run]) -> tuple[list[LRGroup], list[str]]:
    """Group runs by every varying key except the LR (and keys that follow it); [] if no LR grid.

    Returns the groups and notes on runs left out (no LR, or no logged loss to start from).
    """
    keys = varying_keys(runs)
    if LR_KEY not in keys:
        return [], []
    group_keys = [k for k in keys if k != LR_KEY and not follows_lr(runs, k)]
    groups: dict[str, LRGroup] = {}
    notes = []
    for run in runs:
        lr, initial = to_float(run.flat_config.get(LR_KEY)), run.initial_loss
        if not math.isfinite(lr) or not math.isfinite(initial):
            missing = "optim.lr" if not math.isfinite(lr) else "a finite logged loss"
            notes.append(f"{run.name}: left out of LR sensitivity (no {missing})")
            continue
        final = to_float(run.summary.get("final_loss"))
        if run.summary.get("status") == "diverged":
            final = math.nan
        group_id = " ".join(canonical(run.flat_config.get(k, MISSING)) for k in group_keys)
        group = groups.setdefault(
            group_id, LRGroup(label(run, group_keys) if group_keys else "all runs", [], [], [], [])
        )
        group.run_names.append(run.name)
        group.lrs.append(lr)
        group.final_losses.append(final)
        group.initial_losses.append(initial)
    for group in groups.values():
        order = sorted(range(len(group.lrs)), key=group.lrs.__getitem__)
        for column in (group.run_names, group.lrs, group.final_losses, group.initial_losses):
            column[:] = [column[i] for i in order]
    return list(groups.values()), notes
