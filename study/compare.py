"""Compare runs: plots over steps, a summary table, and LR sensitivity when the runs sweep the LR.

    python -m study.compare RUN_DIR_OR_SWEEP_DIR... [--out DIR] [--smooth 0.6]

Each line is labelled by the config keys in which the runs differ, so a weight-decay x precision
sweep reads as `weight_decay=0.1 precision=bf16`. Everything comes from the run directories'
files (docs/run_directory.md); nothing here imports training code.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import matplotlib.ticker
import numpy as np
from matplotlib.axes import Axes
from matplotlib.lines import Line2D

from study.plots import finite, loss_limits, new_figure, palette, save_figure
from study.runs import Run, StudyError, labels, load_runs, report_dir, to_float, varying_keys
from study.sensitivity import LRGroup, lr_groups

# One marker per detection kind, drawn on the run's loss line at the detection step.
MARKERS = {
    "nonfinite": "X",
    "spike": "^",
    "drift": "v",
    "attn_logit": "s",
    "output_logit": "D",
    "slingshot": "P",
}
_MARKER_NAMES = {
    "X": "cross",
    "^": "triangle up",
    "v": "triangle down",
    "s": "square",
    "D": "diamond",
    "P": "plus",
}
# The slingshot watch's readings (monitor.telemetry), drawn together.
OUTPUT_LAYER_KEYS = [
    "param_norm/output",
    "output_norm_growth",
    "softmax_saturated",
    "zero_sum_residual",
]
# (key, markdown header) of the summary table, in order; CSV uses the keys as headers.
COLUMNS = [
    ("status", "status"),
    ("steps", "steps"),
    ("final_loss", "final loss"),
    ("final_val_loss", "final val loss"),
    ("gap_to_floor", "val gap to floor"),
    ("divergences", "divergences"),
    ("first_divergence_step", "first divergence step"),
    ("mean_tok_per_s", "mean tok/s"),
    ("kernel_path", "CPU kernel path"),
]
_OPTIONAL = ("mean_tok_per_s", "gap_to_floor")


# --- the table -------------------------------------------------------------------------------


def table_rows(runs: Sequence[Run], run_labels: Sequence[str]) -> list[dict[str, Any]]:
    """One row per run: label, name and the summary fields of COLUMNS (None where unknown).

    A row is a dict, not a dataclass: it is a summary.csv record, whose columns also hold
    whichever config keys vary across the runs (`report` adds them).
    """
    rows = []
    for run, text in zip(runs, run_labels, strict=True):
        row: dict[str, Any] = {"label": text, "run": run.name}
        row.update({key: run.summary.get(key) for key, _ in COLUMNS})
        row["mean_tok_per_s"] = run.mean_tok_per_s
        row["gap_to_floor"] = to_float(row["final_val_loss"]) - run.loss_floor
        row["kernel_path"] = run.kernel_path
        rows.append(row)
    return rows


def _cell(key: str, value: Any) -> str:
    """Markdown text of a table value: losses to 4 decimals, throughput to whole tokens."""
    # Unknown throughput or floor is "-"; a NaN loss stays "nan" (it tells of a blow-up).
    if value is None or (key in _OPTIONAL and not math.isfinite(value)):
        return "-"
    if isinstance(value, float) and math.isfinite(value):
        return f"{value:,.0f}" if key == "mean_tok_per_s" else f"{value:.4f}"
    return str(value)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub markdown table; `|` in cells is escaped so labels cannot break columns."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_csv(path: Path, rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
    """Rows as CSV; None -> empty cell, floats at full precision ("nan" stays "nan")."""
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for row in rows:
            writer.writerow(["" if row.get(c) is None else row[c] for c in columns])


# --- plots -----------------------------------------------------------------------------------


def ema(values: np.ndarray, smooth: float) -> np.ndarray:
    """Debiased exponential moving average (TensorBoard's smoothing); gaps stay gaps.

    `smooth` is the weight on the past, 0 = raw. Non-finite points keep their NaN in the output
    but do not poison the average, so the line resumes after a NaN step.
    """
    if smooth <= 0:
        return values
    out = np.full_like(values, np.nan)
    total, weight = 0.0, 0.0
    for i, value in enumerate(values):
        if np.isfinite(value):
            total = smooth * total + (1 - smooth) * value
            weight = smooth * weight + (1 - smooth)
            out[i] = total / weight
    return out


def _run_handles(run_labels: Sequence[str], colors: Sequence[Any]) -> list[Any]:
    return [Line2D([], [], color=c, lw=1.5) for c in colors[: len(run_labels)]]


def _mark_detections(ax: Axes, run: Run, steps: np.ndarray, line: np.ndarray, color: Any) -> None:
    """A marker per detection on the run's drawn line; a NaN step takes its neighbours' height."""
    ok = np.isfinite(line)
    if not ok.any():
        return
    low, high = ax.get_ylim()
    for event in run.detections:
        y = float(np.interp(event["step"], steps[ok], line[ok]))
        marker = MARKERS.get(event["kind"], "o")
        ax.plot(event["step"], min(max(y, low), high), marker, color=color, ms=8, mec="black")


def _heals(run: Run) -> list[dict[str, Any]]:
    """The run's heals that acted (`divergence.policy=heal`), not those that stopped it."""
    return [e for e in run.events if e.get("kind") == "heal" and e.get("action") == "heal"]


def _mark_heals(ax: Axes, run: Run, color: Any) -> None:
    """A dotted line at each step a heal rolled back to: the run's line after it is the
    healed trajectory (a step's last line wins)."""
    for event in _heals(run):
        ax.axvline(event["rollback_to"], color=color, ls=":", lw=1.2)


def plot_loss(
    runs: Sequence[Run], run_labels: Sequence[str], colors: Sequence[Any], out: Path, smooth: float
) -> Path | None:
    """Training loss, whole run and a zoom on the second half, with detections marked."""
    series = [run.series("loss") for run in runs]
    if not any(steps.size for steps, _ in series):
        return None
    fig, (full, zoom) = new_figure(2)
    drawn = []
    for (steps, raw), color in zip(series, colors, strict=True):
        raw = finite(raw)
        line = ema(raw, smooth)
        if smooth > 0:
            for ax in (full, zoom):
                ax.plot(steps, raw, color=color, lw=0.8, alpha=0.25)
        for ax in (full, zoom):
            ax.plot(steps, line, color=color, lw=1.3)
        drawn.append(line)
    limits = loss_limits(drawn)
    if limits:
        full.set_ylim(*limits)
    last_step = max(int(steps.max()) for steps, _ in series if steps.size)
    zoom.set_xlim(last_step / 2, last_step * 1.01)
    # Zoom to what is drawn in the second half, raw and smoothed, so no curve leaves the panel
    # except a blow-up (the top 0.5%).
    tail = np.concatenate(
        [
            v[(steps >= last_step / 2) & np.isfinite(v)]
            for (steps, raw), line in zip(series, drawn, strict=True)
            for v in (raw, line)
        ]
    )
    if tail.size:
        low, high = np.percentile(tail, [0.5, 99.5])
        pad = 0.05 * (high - low) or 0.05
        zoom.set_ylim(low - pad, high + pad)
    for (steps, _), line, run, color in zip(series, drawn, runs, colors, strict=True):
        for ax in (full, zoom):
            _mark_detections(ax, run, steps, line, color)
            _mark_heals(ax, run, color)
    full.set_title("training loss" + (f" (EMA {smooth:g})" if smooth > 0 else ""))
    zoom.set_title("second half, zoomed")
    full.set_ylabel("loss")
    kinds = sorted({e["kind"] for run in runs for e in run.detections})
    handles = _run_handles(run_labels, colors) + [
        Line2D([], [], marker=MARKERS.get(k, "o"), color="gray", mec="black", ls="none")
        for k in kinds
    ]
    texts = list(run_labels) + [f"detection: {k}" for k in kinds]
    if any(_heals(run) for run in runs):
        handles.append(Line2D([], [], color="gray", ls=":", lw=1.2))
        texts.append("heal: rolled back to")
    return save_figure(fig, out / "loss.png", handles, texts, "Training loss")


def plot_val_loss(
    runs: Sequence[Run], run_labels: Sequence[str], colors: Sequence[Any], out: Path
) -> Path | None:
    """Validation loss at each eval step."""
    if not any(run.val for run in runs):
        return None
    fig, (ax,) = new_figure(1)
    for run, color in zip(runs, colors, strict=True):
        steps, values = run.val_series()
        ax.plot(steps, finite(values), color=color, lw=1.3, marker="o", ms=3)
    floors = sorted({f for f in (run.loss_floor for run in runs) if math.isfinite(f)})
    for floor in floors:
        ax.axhline(floor, color="black", ls="--", lw=1)
        ax.annotate(f"floor {floor:.3f}", (0, floor), xycoords=("axes fraction", "data"),
                    textcoords="offset points", xytext=(4, 3), fontsize=8)  # fmt: skip
    ax.set_ylabel("val loss (dashed: the data's loss floor)" if floors else "val loss")
    return save_figure(
        fig,
        out / "val_loss.png",
        _run_handles(run_labels, colors),
        list(run_labels),
        "Validation loss",
    )


def plot_panels(
    runs: Sequence[Run],
    run_labels: Sequence[str],
    colors: Sequence[Any],
    keys: Sequence[str],
    path: Path,
    title: str,
    log_keys: Sequence[str] = (),
) -> Path | None:
    """One panel per metric key that some run logs; keys in `log_keys` get a log y axis."""
    present = sorted(set().union(*(run.metric_keys() for run in runs)))
    keys = [k for k in keys if k in present]
    if not keys:
        return None
    fig, axes = new_figure(len(keys))
    for ax, key in zip(axes, keys, strict=True):
        positive = key in log_keys
        for run, color in zip(runs, colors, strict=True):
            steps, values = run.series(key)
            ax.plot(steps, finite(values, positive), color=color, lw=1.2)
        if positive and ax.has_data():
            ax.set_yscale("log")
        ax.set_title(key)
    return save_figure(fig, path, _run_handles(run_labels, colors), list(run_labels), title)


def plot_sharpness(
    runs: Sequence[Run], run_labels: Sequence[str], colors: Sequence[Any], out: Path
) -> Path | None:
    """Adam's preconditioned sharpness S against its stability threshold (38/lr at beta1 0.9,
    dashed, the run's color), S / threshold, and lambda_max(H), on log axes."""
    if not any("sharpness" in run.metric_keys() for run in runs):
        return None
    fig, (ax_s, ax_ratio, ax_h) = new_figure(3)
    for run, color in zip(runs, colors, strict=True):
        steps, values = run.series("sharpness")
        ax_s.plot(steps, finite(values, True), color=color, lw=1.3, marker="o", ms=3)
        steps, values = run.series("sharpness_threshold")
        ax_s.plot(steps, finite(values, True), color=color, lw=1.0, ls="--")
        steps, values = run.series("sharpness_ratio")
        ax_ratio.plot(steps, finite(values, True), color=color, lw=1.3, marker="o", ms=3)
        steps, values = run.series("hessian_max_eig")
        ax_h.plot(steps, finite(values, True), color=color, lw=1.3, marker="o", ms=3)
    ax_ratio.axhline(1.0, color="gray", lw=1.0, ls="--")
    for ax, title in (
        (ax_s, "S = lambda_max(P^-1 H); dashed: threshold"),
        (ax_ratio, "S / threshold"),
        (ax_h, "lambda_max(H)"),
    ):
        if ax.has_data():
            ax.set_yscale("log")
        ax.set_title(title)
    return save_figure(
        fig,
        out / "sharpness.png",
        _run_handles(run_labels, colors),
        list(run_labels),
        "Preconditioned sharpness (Adam's edge of stability)",
    )


def _group_keys(runs: Sequence[Run], prefix: str) -> list[str]:
    """`prefix` itself, then its per-group keys (`param_norm/decay`, ...), in a stable order."""
    keys = set().union(*(run.metric_keys() for run in runs))
    return [prefix] + sorted(k for k in keys if k.startswith(prefix + "/"))


def plot_sensitivity(groups: Sequence[LRGroup], out: Path) -> Path:
    """Final loss against LR per recipe; diverged or worse-than-initial runs drawn hollow."""
    fig, (ax,) = new_figure(1)
    colors = palette(len(groups))
    handles, texts = [], []
    for group, color in zip(groups, colors, strict=True):
        lrs, losses = np.asarray(group.lrs), np.asarray(group.clipped_losses)
        (line,) = ax.plot(lrs, losses, color=color, lw=1.3, marker="o")
        failed = losses >= np.asarray(group.initial_losses)
        if failed.any():
            ax.plot(lrs[failed], losses[failed], "o", color="white", mec=color, ms=7)
        handles.append(line)
        texts.append(f"{group.label} (sensitivity {group.sensitivity:.3f})")
    ax.set_xscale("log")
    grid = sorted({lr for group in groups for lr in group.lrs})
    ax.set_xticks(grid, [f"{lr:g}" for lr in grid])
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_xlabel("learning rate (optim.lr)")
    ax.set_ylabel("final loss, min(final, initial)")
    handles.append(Line2D([], [], marker="o", color="gray", mfc="white", ls="none"))
    texts.append("diverged or above initial loss")
    return save_figure(
        fig, out / "lr_sensitivity.png", handles, texts, "Final loss vs learning rate"
    )


# --- the report ------------------------------------------------------------------------------


@dataclass(frozen=True)
class SensitivityRow:
    """One recipe's line of sensitivity.csv (the field names are its columns) and of its table."""

    group: str
    lrs: str  # the LR grid, space-separated
    best_lr: float
    best_final_loss: float  # clipped at the initial loss, as the sensitivity counts it
    diverged: int
    sensitivity: float


def _sensitivity_section(groups: Sequence[LRGroup], out: Path) -> tuple[str, list[Path]]:
    """Markdown table + CSV + plot of LR sensitivity per group."""
    rows = [
        SensitivityRow(
            group=group.label,
            lrs=" ".join(f"{lr:g}" for lr in group.lrs),
            best_lr=group.best[0],
            best_final_loss=group.best[1],
            diverged=sum(not math.isfinite(f) for f in group.final_losses),
            sensitivity=group.sensitivity,
        )
        for group in groups
    ]
    csv_path = out / "sensitivity.csv"
    write_csv(csv_path, [asdict(r) for r in rows], [f.name for f in fields(SensitivityRow)])
    plot_path = plot_sensitivity(groups, out)
    table = markdown_table(
        ["group", "LR grid", "best LR", "best final loss", "diverged", "LR sensitivity"],
        [
            [
                r.group,
                r.lrs,
                f"{r.best_lr:g}",
                f"{r.best_final_loss:.4f}",
                str(r.diverged),
                f"{r.sensitivity:.4f}",
            ]
            for r in rows
        ],
    )
    text = (
        "## LR sensitivity\n\n"
        "Wortsman et al. (2023): mean over the LR grid of `min(final loss, initial loss) - best`,"
        " with a diverged or non-finite final loss counted as the initial loss. Lower is more"
        " robust to the choice of LR.\n\n"
        f"{table}\n\n![Final loss vs learning rate]({plot_path.name})\n"
    )
    return text, [csv_path, plot_path]


def diagnoses_section(runs: Sequence[Run], run_labels: Sequence[str], out: Path) -> str | None:
    """A line per `diagnosis` event (`python -m postmortem.diagnose`), linking its report."""
    items = []
    for run, text in zip(runs, run_labels, strict=True):
        for e in run.events:
            if e.get("kind") != "diagnosis":
                continue
            head = f"- {text}: detection {e.get('event')} at step {e['step']}: "
            if e.get("status") == "failed":
                items.append(head + f"the diagnosis failed ({e.get('error')})")
                continue
            report = run.path / f"diagnosis-{e.get('event')}" / "report.md"
            link = os.path.relpath(report.resolve(), out.resolve())
            items.append(
                head + f"{e.get('cause')} ({e.get('confidence')} confidence), likely "
                f"{e.get('mechanism')}: [report]({link})"
            )
    return "## Diagnoses\n\n" + "\n".join(items) + "\n" if items else None


def heals_section(runs: Sequence[Run], run_labels: Sequence[str]) -> str | None:
    """A line per `heal` event (`divergence.policy=heal`): what was detected, the verdict, the
    remedy and the steps lost, or why the run stopped instead."""
    items = []
    for run, text in zip(runs, run_labels, strict=True):
        for e in run.events:
            if e.get("kind") != "heal":
                continue
            d = e.get("detection") or {}
            head = f"- {text}: {d.get('kind')} of {d.get('metric')} at step {e['step']}: "
            if e.get("action") == "stop":
                items.append(head + f"stopped, because {e.get('reason')}")
                continue
            items.append(
                head + f"{e.get('cause')} ({e.get('mechanism')}), healed by {e.get('text')}; "
                f"back to step {e.get('rollback_to')}, {e.get('steps_lost')} steps lost"
            )
    return "## Heals\n\n" + "\n".join(items) + "\n" if items else None


def report(runs: Sequence[Run], out: Path, smooth: float = 0.0) -> tuple[list[Path], list[str]]:
    """Write every plot and table for `runs` into `out`; return the paths written and notes."""
    out.mkdir(parents=True, exist_ok=True)
    keys = varying_keys(runs)
    run_labels = labels(runs, keys)
    colors = palette(len(runs))
    notes = [f"{run.name}: {note}" for run in runs for note in run.notes]

    plots = [
        ("Training loss", plot_loss(runs, run_labels, colors, out, smooth)),
        ("Validation loss", plot_val_loss(runs, run_labels, colors, out)),
        (
            "Gradient norm (before clipping)",
            plot_panels(
                runs,
                run_labels,
                colors,
                ["grad_norm"],
                out / "grad_norm.png",
                "Gradient norm (before clipping)",
                ["grad_norm"],
            ),
        ),
        (
            "Parameter norm per group",
            plot_panels(
                runs,
                run_labels,
                colors,
                _group_keys(runs, "param_norm"),
                out / "param_norm.png",
                "Parameter norm per group",
            ),
        ),
        (
            "Effective learning rate per group",
            plot_panels(
                runs,
                run_labels,
                colors,
                _group_keys(runs, "eff_lr")[1:],
                out / "eff_lr.png",
                "Effective learning rate per group",
                _group_keys(runs, "eff_lr"),
            ),
        ),
        (
            "Max attention logit and log Z",
            plot_panels(
                runs,
                run_labels,
                colors,
                ["attn_logit_max", "log_z"],
                out / "logits.png",
                "Max attention logit and output log Z",
                ["attn_logit_max"],
            ),
        ),
        (
            "Preconditioned sharpness",
            plot_sharpness(runs, run_labels, colors, out),
        ),
        (
            "Output layer (slingshot watch)",
            plot_panels(
                runs,
                run_labels,
                colors,
                OUTPUT_LAYER_KEYS,
                out / "output_layer.png",
                "Output-layer norm, its growth per step, and softmax collapse",
            ),
        ),
    ]
    written = [path for _, path in plots if path is not None]

    rows = table_rows(runs, run_labels)
    for row, run in zip(rows, runs, strict=True):
        row.update({key: run.flat_config.get(key) for key in keys})
        row["path"] = str(run.path)
    csv_path = out / "summary.csv"
    write_csv(csv_path, rows, ["run", "label", *keys] + [k for k, _ in COLUMNS] + ["path"])

    differ = ", ".join(f"`{k}`" for k in keys) if keys else "nothing (labels are run names)"
    table = markdown_table(
        ["run", *[header for _, header in COLUMNS], "directory"],
        [[r["label"], *[_cell(k, r[k]) for k, _ in COLUMNS], r["run"]] for r in rows],
    )
    marker_text = ", ".join(f"{_MARKER_NAMES[m]}: {k}" for k, m in MARKERS.items())
    sections = [
        f"# Comparison of {len(runs)} runs\n\nRuns differ in: {differ}.\n",
        f"## Summary\n\n{table}\n\nTable as CSV: [summary.csv](summary.csv).\n",
        "## Plots\n\nDetections are marked on the loss plot, on the run's line"
        f" ({marker_text}); a heal by a dotted line at the step it rolled back to.\n\n"
        + "\n".join(f"### {title}\n\n![{title}]({path.name})\n" for title, path in plots if path),
    ]
    for section in (diagnoses_section(runs, run_labels, out), heals_section(runs, run_labels)):
        if section:
            sections.append(section)
    groups, group_notes = lr_groups(runs)
    notes += group_notes
    if groups:
        text, paths = _sensitivity_section(groups, out)
        sections.append(text)
        written += paths
    if notes:
        sections.append("## Notes\n\n" + "\n".join(f"- {n}" for n in notes) + "\n")
    md_path = out / "summary.md"
    md_path.write_text("\n".join(sections))
    return [md_path, csv_path, *written], notes


def default_out(first: str) -> Path:
    """`<sweep dir>/compare` for a sweep directory; `./compare` otherwise."""
    return report_dir(first, "compare", Path("compare"))


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status (2 with `error: ...` for unusable input)."""
    parser = argparse.ArgumentParser(
        prog="python -m study.compare", description=__doc__.split("\n")[0]
    )
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run or sweep directories")
    parser.add_argument(
        "--out",
        type=Path,
        help="output directory (default: SWEEP_DIR/compare for a sweep, else ./compare)",
    )
    parser.add_argument(
        "--smooth",
        type=float,
        default=0.0,
        help="EMA weight in [0, 1) for the training loss (0 = raw)",
    )
    args = parser.parse_args(argv)
    if not 0 <= args.smooth < 1:
        parser.error("--smooth must be in [0, 1)")
    try:
        runs = load_runs(args.runs)
        paths, notes = report(runs, args.out or default_out(args.runs[0]), args.smooth)
    except (StudyError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
