"""Matplotlib helpers shared by study.compare and study.report: colors, panels, saving.

Importing this module selects the Agg backend (files only), before pyplot is imported.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display on clusters or in CI

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

DPI = 120


def palette(count: int) -> list[Any]:
    """One color per run, the same in every plot."""
    cmap = plt.get_cmap("tab10" if count <= 10 else "tab20" if count <= 20 else "viridis")
    if count <= 20:
        return [cmap(i) for i in range(count)]
    return [cmap(x) for x in np.linspace(0, 1, count)]


def finite(values: np.ndarray, positive: bool = False) -> np.ndarray:
    """NaN where a value cannot be drawn (inf; <= 0 on a log axis), so lines break there."""
    values = np.where(np.isfinite(values), values, np.nan)
    return np.where(values > 0, values, np.nan) if positive else values


def new_figure(panels: int) -> tuple[Figure, list[Axes]]:
    """`panels` gridded axes over steps, up to 3 a row; spare cells of the grid are hidden."""
    cols = min(panels, 3)
    rows = math.ceil(panels / cols)
    width, height = (8.0, 4.8) if panels == 1 else (4.8 * cols, 3.4 * rows)
    fig, axes = plt.subplots(rows, cols, figsize=(width, height), squeeze=False)
    flat = list(axes.ravel())
    for ax in flat[panels:]:
        ax.set_visible(False)
    for ax in flat[:panels]:
        ax.grid(True, alpha=0.3)
        ax.set_xlabel("step")
    return fig, flat[:panels]


def save_figure(fig: Figure, path: Path, handles: list[Any], texts: list[str], title: str) -> Path:
    """Title, one legend outside the panels (it never hides a curve), write, close."""
    fig.suptitle(title)
    fig.tight_layout()
    fig.legend(
        handles, texts, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False, fontsize=8
    )
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path


def loss_limits(lines: list[np.ndarray]) -> tuple[float, float] | None:
    """Y range that stops one spike from flattening every other curve: cap at the initial loss."""
    values = np.concatenate([v[np.isfinite(v)] for v in lines] or [np.array([])])
    starts = [v[np.isfinite(v)][0] for v in lines if np.isfinite(v).any()]
    if not values.size or values.max() <= max(starts) * 1.02:
        return None
    top, bottom = max(starts) * 1.02, values.min()
    return bottom - 0.03 * (top - bottom), top
