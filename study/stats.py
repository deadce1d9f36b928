"""Seed statistics for the claims: mean ± std, differences in standard errors, Fisher's test.

An effect counts when the difference of two means exceeds Z standard errors of that difference;
with fewer than MIN_SEEDS finite values on either side there is no spread to judge it by.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

Z, MIN_SEEDS = 2.0, 2
EFFECT = 0.02  # nats: the smallest difference in final validation loss a study should resolve
# How a difference a - b reads: beyond Z SE either way, within it, or too few seeds to tell.
Sign = Literal["lower", "higher", "same", "unknown"]


@dataclass(frozen=True)
class Stat:
    """Mean, sample std and count of the finite values among a group's runs."""

    values: list[float]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return float(np.mean(self.values)) if self.values else math.nan

    @property
    def std(self) -> float:
        return float(np.std(self.values, ddof=1)) if self.n >= 2 else math.nan

    @property
    def se(self) -> float:
        return self.std / math.sqrt(self.n) if self.n >= 2 else math.nan

    def text(self, spec: str = ".4f") -> str:
        """`3.3012 ± 0.0040 (n=3)`; `3.3012 (n=1)`; `-` when there is no value."""
        if not self.n:
            return "-"
        spread = f" ± {self.std:{spec}}" if self.n >= 2 else ""
        return f"{self.mean:{spec}}{spread} (n={self.n})"

    def to_json(self) -> dict[str, float | int | list[float]]:
        """The JSON form of claims.json: the derived numbers beside the values they come from."""
        return {"mean": self.mean, "std": self.std, "n": self.n, "values": self.values}


def stat(values: Sequence[float]) -> Stat:
    """A Stat of the finite values (NaN stands for a run left out)."""
    return Stat([float(v) for v in values if math.isfinite(v)])


@dataclass(frozen=True)
class Comparison:
    """a - b of two Stats' means, the standard error of that difference, and how it reads."""

    diff: float
    se: float
    sign: Sign


def versus(a: Stat, b: Stat) -> Comparison:
    """a - b with its standard error and a sign: lower, higher, same (within Z SE) or unknown."""
    diff = a.mean - b.mean
    se = math.hypot(a.se, b.se)
    sign: Sign
    if a.n < MIN_SEEDS or b.n < MIN_SEEDS:
        sign = "unknown"
    elif abs(diff) > Z * se + 1e-12:
        sign = "lower" if diff < 0 else "higher"
    else:
        sign = "same"
    return Comparison(diff, se, sign)


def versus_text(c: Comparison, spec: str = ".4f") -> str:
    """`-0.1000 ± 0.0163 (lower)`: the difference with its 2 SE bar, as report.md prints it."""
    if c.sign == "unknown":
        return f"{c.diff:+{spec}} (too few seeds)" if math.isfinite(c.diff) else "-"
    words = {"same": "within the seed spread"}
    return f"{c.diff:+{spec}} ± {Z * c.se:{spec}} ({words.get(c.sign, c.sign)})"


def fisher_greater(a: int, n_a: int, b: int, n_b: int) -> float:
    """One-sided Fisher exact p that group a's rate exceeds group b's (a of n_a vs b of n_b)."""
    total, hits = n_a + n_b, a + b
    return sum(
        math.comb(hits, k) * math.comb(total - hits, n_a - k) for k in range(a, min(hits, n_a) + 1)
    ) / math.comb(total, n_a)


def pooled_std(stats: Sequence[Stat]) -> tuple[float, int]:
    """The seed spread within cells, pooled over cells by degrees of freedom: (std, dof).

    Cells differ in their means but, on one proxy, hardly in their spread, so pooling the
    spread of several small cells estimates it better than any one cell can.
    """
    cells = [s for s in stats if s.n >= 2]
    dof = sum(s.n - 1 for s in cells)
    if not dof:
        return math.nan, 0
    return math.sqrt(sum((s.n - 1) * s.std**2 for s in cells) / dof), dof


def seeds_needed(std: float, effect: float = EFFECT) -> int:
    """Seeds per cell for a difference `effect` of two cell means to exceed Z standard errors:
    the smallest n with Z * std * sqrt(2 / n) < effect, and never below MIN_SEEDS (one seed
    shows no spread to judge by)."""
    return max(MIN_SEEDS, math.floor(2 * (Z * std / effect) ** 2) + 1)


def detectable(std: float, n: int) -> float:
    """The smallest difference of two n-seed cell means that exceeds Z standard errors."""
    return Z * std * math.sqrt(2 / n)
