"""The paper's three claims, answered with our runs: tables, plots and a verdict for each.

    python -m study.report SWEEP_DIR... [--out DIR] [--no-per-sweep]

Reads run directories only (docs/run_directory.md), as study.compare does, and writes
study.compare's report for each directory given under `<out>/sweeps/`. The numbers and verdicts
come from study.claims, whose docstring has the grouping and the verdict rules; this module
draws them and writes report.md and claims.json (whose objects are study.results' classes).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import yaml
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from study import compare
from study.claims import (
    DIVERGENCE_KINDS,
    FINAL_WINDOW,
    FISHER_P,
    MID_VAL_REACH,
    MID_WINDOW,
    OPT,
    PREC,
    RECOVERY,
    TITLES,
    WD,
    Facts,
    arm_name,
    arms,
    claim1,
    claim2,
    claim3,
    contexts,
    facts,
    lr_sensitivity,
    power,
    series,
)
from study.compare import markdown_table
from study.plots import finite, loss_limits, new_figure, palette, save_figure
from study.results import (
    Arm,
    Claim,
    Claim1,
    Claim1Group,
    Claim2Group,
    Claim3Group,
    Claims,
    Judged,
    KernelPath,
    LRSensitivity,
    Power,
    Report,
    Rule,
    Sweep,
    to_json,
)
from study.runs import DETECTION_KINDS, Run, StudyError, load_runs, report_dir, varying_keys
from study.stats import MIN_SEEDS, Stat, Z, versus_text

# --- plots -----------------------------------------------------------------------------------


def plot_final_loss(groups: list[Claim1Group], out: Path) -> Path | None:
    """Final train / val loss (mean ± std over seeds) against λ, and against L2 for Adam+L2."""
    optimizers = [
        o
        for o in ("adamw", "adam_l2")
        if any(r.optimizer == o and r.weight_decay > 0 for g in groups for r in g.arms)
    ]
    if not optimizers:
        return None
    fig = Figure(figsize=(9.6, 3.4 * len(optimizers)))
    axes = list(np.ravel(fig.subplots(len(optimizers), 2, squeeze=False)))
    colors = palette(len(groups))
    for i, optimizer in enumerate(optimizers):
        xs = sorted(
            {r.weight_decay for g in groups for r in g.arms if r.optimizer == optimizer} | {0.0}
        )
        panels: list[tuple[str, Callable[[Arm], Stat]]] = [
            ("final train loss", lambda r: r.final_loss),
            ("final val loss", lambda r: r.final_val_loss),
        ]
        for j, (title, loss_of) in enumerate(panels):
            ax = axes[2 * i + j]
            ax.grid(True, alpha=0.3)
            for k, (g, color) in enumerate(zip(groups, colors, strict=True)):
                rows = [r for r in g.arms if r.optimizer == optimizer or r.weight_decay == 0]
                shown = [(r.weight_decay, loss_of(r)) for r in rows if loss_of(r).n]
                offset = (k - (len(groups) - 1) / 2) * 0.06
                ax.errorbar(
                    [xs.index(wd) + offset for wd, _ in shown],
                    [loss.mean for _, loss in shown],
                    yerr=[np.nan_to_num(loss.std) for _, loss in shown],
                    color=color,
                    marker="o",
                    capsize=4,
                    lw=1.3,
                )
            ax.set_xticks(range(len(xs)), [f"{x:g}" for x in xs])
            ax.set_xlabel(
                "weight decay λ (AdamW)" if optimizer == "adamw" else "L2 coefficient (Adam+L2)"
            )
            ax.set_title(title + ", mean ± std")
    handles = [Line2D([], [], color=c, marker="o") for c in colors]
    return save_figure(
        fig,
        out / "claim1_final_loss.png",
        handles,
        [g.group for g in groups],
        "Final loss against weight decay",
    )


def _mean_curve(runs: Sequence[Run], key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    by_step: dict[int, list[float]] = {}
    for run in runs:
        for step, value in zip(*series(run, key), strict=True):
            if math.isfinite(value):
                by_step.setdefault(int(step), []).append(float(value))
    steps = np.array(sorted(by_step))
    mean = np.array([np.mean(by_step[s]) for s in steps])
    std = np.array([np.std(by_step[s]) for s in steps])
    return steps, mean, std


def plot_dynamics(items: Sequence[Facts], out: Path) -> Path | None:
    """Loss, decay-group norm and effective LR over steps, mean ± std over seeds per λ."""
    lines = [
        (f"{name} λ={wd:g}", [f.run for f in fs])
        for name, group in contexts(items, (WD, OPT))
        for (o, wd), fs in arms(group).items()
        if o == "adamw"
    ]
    if not lines:
        return None
    fig, axes = new_figure(3)
    colors = palette(len(lines))
    for ax, key in zip(axes, ("loss", "param_norm/decay", "eff_lr/decay"), strict=True):
        for (_, runs), color in zip(lines, colors, strict=True):
            steps, mean, std = _mean_curve(runs, key)
            ax.plot(steps, mean, color=color, lw=1.3)
            ax.fill_between(steps, mean - std, mean + std, color=color, alpha=0.2, lw=0)
        ax.set_title(key + ", mean ± std over seeds")
    max_steps = float(np.nanmedian([f.max_steps for f in items]))
    for low, high in (MID_WINDOW, (1 - FINAL_WINDOW, 1.0)):
        axes[0].axvspan(low * max_steps, high * max_steps, color="gray", alpha=0.15)
    if axes[2].has_data():
        axes[2].set_yscale("log")
    handles = [Line2D([], [], color=c) for c in colors]
    return save_figure(
        fig,
        out / "claim1_dynamics.png",
        handles,
        [t for t, _ in lines],
        "Dynamics by weight decay (gray: mid and final windows)",
    )


def plot_divergence(items: Sequence[Facts], out: Path) -> Path | None:
    """Each run's loss, max attention logit and log Z, colored by precision x λ; X = detection."""
    cells = [
        (name, p, wd, [f for f in fs if (f.precision, f.wd) == (p, wd)])
        for name, fs in contexts(items, (WD, PREC))
        for p, wd in sorted({(f.precision, f.wd) for f in fs})
    ]
    if not cells:
        return None
    fig, axes = new_figure(3)
    colors = palette(len(cells))
    for ax, key in zip(axes, ("loss", "attn_logit_max", "log_z"), strict=True):
        for (_, _, _, fs), color in zip(cells, colors, strict=True):
            for f in fs:
                steps, values = f.run.series(key)
                ax.plot(
                    steps, finite(values, key == "attn_logit_max"), color=color, lw=1.0, alpha=0.8
                )
                ok = np.isfinite(values)
                if (f.flagged or f.blew_up) and f.first_step is not None and ok.any():
                    y = np.interp(f.first_step, steps[ok], values[ok])
                    marker = {"mfc": color} if f.blew_up else {"mfc": "white"}
                    ax.plot(f.first_step, y, "X", mec=color, ms=9, **marker)
        if key == "attn_logit_max" and ax.has_data():
            ax.set_yscale("log")
        ax.set_title(key)
    limits = loss_limits([finite(f.run.series("loss")[1]) for *_, fs in cells for f in fs])
    if limits:  # a blow-up would flatten every other curve: cap at the initial loss
        axes[0].set_ylim(*limits)
    texts = [
        f"{n} {p} λ={wd:g} ({sum(f.blew_up for f in fs)}/{len(fs)} blew up)"
        for n, p, wd, fs in cells
    ]
    handles = [Line2D([], [], color=c) for c in colors]
    return save_figure(
        fig,
        out / "claim2_divergence.png",
        handles,
        texts,
        "Runs by precision and weight decay (X: first detection; hollow: recovered)",
    )


def plot_improvement(groups: list[Claim3Group], out: Path) -> Path | None:
    """Each decayed arm's final train loss below no decay (± 2 SE), AdamW and Adam+L2 together."""
    shown = [g for g in groups if g.baseline.n and g.best]
    if not shown:
        return None
    fig, axes = new_figure(len(shown))
    colors = {"adamw": "tab:blue", "adam_l2": "tab:orange"}
    for ax, g in zip(axes, shown, strict=True):
        rows = [r for r in g.arms if r.weight_decay > 0]
        gains = [r.final_vs_baseline for r in rows]
        ax.bar(
            range(len(rows)),
            [-c.diff for c in gains],
            yerr=[Z * np.nan_to_num(c.se) for c in gains],
            color=[colors.get(r.optimizer, "gray") for r in rows],
            capsize=4,
        )
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xticks(range(len(rows)), [arm_name(r.optimizer, r.weight_decay) for r in rows])
        ax.set_xlabel("")
        ax.set_ylabel("no-decay minus arm, final train loss")
        ax.set_title(g.group)
    handles = [Line2D([], [], color=c, lw=6) for c in colors.values()]
    return save_figure(
        fig,
        out / "claim3_improvement.png",
        handles,
        ["AdamW", "Adam+L2"],
        "Improvement over no decay (± 2 SE)",
    )


# --- the report ------------------------------------------------------------------------------


def _dash(value: float | None, spec: str = "") -> str:
    """A table cell: `-` for None or NaN, else the value formatted with `spec`."""
    if value is None or isinstance(value, float) and math.isnan(value):
        return "-"
    return f"{value:{spec}}"


def _verdict_line(key: str, verdict: str) -> str:
    return f"Verdict on {key.replace('claim', 'claim ')}: **{verdict}**"


def _claim1_md(c1: Claim1) -> str:
    rows = [
        [
            g.group,
            arm_name(r.optimizer, r.weight_decay),
            str(r.runs),
            str(r.left_out),
            r.final_loss.text(),
            r.final_val_loss.text(),
            versus_text(r.final_vs_baseline) if r.weight_decay > 0 else "-",
            r.val_gap_to_floor.text(),
            r.mid_loss.text(),
            r.mid_val_loss.text(),
            r.param_norm_decay.text(".4g"),
            r.eff_lr_decay.text(".3g"),
            r.adam_eff_lr.text(".3g"),
        ]
        for g in c1.groups
        for r in g.arms
    ]
    headers = (
        "group|arm|runs|left out (blew up)|final train loss|final val loss"
        "|verdict's loss vs λ=0 (± 2 SE)|val gap to floor|mid-training loss"
        "|mid-training val loss|decay-group norm (final)"
        "|eff. LR decay group (2nd half)|Adam eff. LR, paper's (2nd half)"
    ).split("|")
    compared = "; ".join(f"{g.group}: {g.loss_name}" for g in c1.groups)
    return (
        f"- The verdict compares ({compared}): the validation loss wherever every run has one.\n"
        f"- Mechanism (decay-group norm lower, effective LR higher): "
        f"**{c1.mechanism.verdict}**. {c1.mechanism.reason}\n"
        f"- Mid-training vs final order (paper: larger λ higher mid-training, lower at the end): "
        f"**{c1.order.verdict}**. {c1.order.reason}\n\n" + markdown_table(headers, rows)
    )


def _claim2_md(c2: Claim[Claim2Group]) -> str:
    cells = [
        [
            g.group,
            c.precision,
            f"{c.weight_decay:g}",
            str(c.runs),
            str(c.blew_up),
            str(c.flagged),
            str(c.status_diverged),
            *(str(c.runs_with[k]) for k in DETECTION_KINDS),
            ", ".join(map(str, c.first_divergence_steps)) or "-",
            c.first_divergence_fraction.text(".2f"),
        ]
        for g in c2.groups
        for c in g.cells
    ]
    headers = [
        *"group|precision|λ|runs|blew up|flagged|status diverged".split("|"),
        *DETECTION_KINDS,
        *"first detection steps|fraction of the run".split("|"),
    ]
    text = (
        "*Flagged*: status `diverged` or a detection of kind "
        f"{', '.join(DIVERGENCE_KINDS)} (`attn_logit` detections are counted in their column "
        "but flag nothing). *Blew up*: the loss ends non-finite, or after the first detection "
        f"it never comes back (its last {FINAL_WINDOW:.0%} of steps gives back more than "
        f"{RECOVERY:.0%} of the loss drop made before); the verdict counts these, as a spike "
        "the run recovers from is not a divergence in the paper's sense. Kind columns count "
        "runs with at least one such detection.\n\n" + markdown_table(headers, cells)
    )
    ev = [e for g in c2.groups for e in g.evidence]
    if ev:
        rows = [
            [
                e.run,
                "yes" if e.blew_up else "no",
                f"{e.kind} {e.metric or ''}={e.value}",
                str(e.step),
                "-" if not e.window else f"{e.window[0]}..{e.window[1]}",
                f"{_dash(e.attn_logit_max, '.4g')} (layer {_dash(e.attn_logit_max_layer)}, "
                f"step {_dash(e.attn_logit_max_step)})",
                _dash(e.log_z_last, ".4g"),
                _dash(e.log_z_max_abs, ".4g"),
                e.source,
            ]
            for e in ev
        ]
        headers = (
            "run|blew up|first detection|step|window|max attention logit|log Z (last)"
            "|max abs log Z|from"
        ).split("|")
        text += "\n\nThe window before each flagged run's first detection:\n\n" + markdown_table(
            headers, rows
        )
    return text


def _claim3_md(c3: Claim[Claim3Group]) -> str:
    def best(g: Claim3Group, o: str, what: str) -> str:
        b = g.best.get(o)
        if not b:
            return "-"
        if what == "arm":
            return f"{arm_name(o, b.weight_decay)}: {b.loss.text()}"
        percent = _dash(b.improvement_percent, ".2f")
        return f"{versus_text(b.vs_baseline)}; improvement {percent}%"

    rows = [
        [
            g.group,
            g.baseline.text(),
            best(g, "adamw", "arm"),
            best(g, "adamw", "gain"),
            best(g, "adam_l2", "arm"),
            best(g, "adam_l2", "gain"),
            versus_text(g.l2_minus_adamw) if g.l2_minus_adamw else "-",
        ]
        for g in c3.groups
    ]
    headers = (
        "group|no decay|best AdamW|vs no decay (± 2 SE), improvement|best Adam+L2"
        "|vs no decay (± 2 SE), improvement|Adam+L2 minus AdamW"
    ).split("|")
    return (
        "Best = lowest mean final loss (claim 1's verdict loss) over each optimizer's grid "
        "(picking the best of "
        "several arms favours it slightly; the 2 SE bar does not correct for that).\n\n"
        + markdown_table(headers, rows)
    )


def _lr_md(rows: list[LRSensitivity]) -> str:
    if not rows:
        return "The runs do not vary `optim.lr`: no LR sensitivity.\n"
    table = markdown_table(
        ["group", "LR grid", "LR sensitivity, mean ± std over seeds", "best LR per seed"],
        [
            [
                r.group,
                " ".join(f"{x:g}" for x in r.lrs),
                r.sensitivity.text(),
                " ".join(f"{x:g}" for x in r.best_lrs),
            ]
            for r in rows
        ],
    )
    return (
        "Wortsman et al. (2023): mean over the LR grid of `min(final loss, initial loss) - best`,"
        " a diverged run counting as its initial loss (study/sensitivity.py), per seed. Lower is"
        " more robust to the LR. Not one of the paper's claims: no verdict.\n\n" + table + "\n"
    )


METHOD = f"""\
- Groups: every config key that varies across the runs except `run.seed` (and keys zipped
  one-to-one with the seed or λ); numbers are mean ± sample std over a group's seeds (n).
- Final train loss: mean logged loss over the last {FINAL_WINDOW:.0%} of `train.max_steps`;
  mid-training loss: over {MID_WINDOW[0]:.0%}-{MID_WINDOW[1]:.0%} (the paper's 20k of 50k
  steps); mid-training val loss: the evaluation nearest {sum(MID_WINDOW) / 2:.0%} of the run,
  within {MID_VAL_REACH:.0%} of it. Claims 1 and 3 compare final (and, for the order,
  mid-training) validation losses where every run has them: on one pass over fresh data they
  estimate the same expected loss as the train loss, on the same fixed set for every run. Runs
  that blew up (claim 2) are left out of loss, norm and effective-LR statistics.
- Decay-group norm: last logged `param_norm/decay`; effective LR: mean `eff_lr/decay`
  (`lr / ||w_decay||`) over the second half of the run; the paper's Adam effective LR: mean
  `adam_eff_lr` (mean over weights of `lr / (sqrt(v) + eps)`) over the second half.
- An effect counts when the difference of means exceeds {Z:g} standard errors of the difference
  (`sqrt(s1²/n1 + s2²/n2)`); fewer than {MIN_SEEDS} seeds on a side: cannot tell. With enough
  seeds and no effect beyond the spread, or one in the other direction: not reproduced.
- Divergence counts: one-sided Fisher exact test, p <= {FISHER_P:g}. Claim 2 is "cannot tell"
  where bf16 without weight decay was not run, "not reproduced" where it ran and never blew up.
- Groups that disagree give "cannot tell" overall; each group's verdict is listed in the reason.
"""


def _paths_md(paths: list[KernelPath]) -> str:
    rows = [
        [p.kernel_path or "not recorded", str(p.runs), _dash(p.loss_floor, ".4f")] for p in paths
    ]
    return (
        "Runs on different kernel paths are never pooled into one group (the path is a grouping "
        "key). The loss floor is the best mean validation loss any model can reach on the "
        "data (the stream's entropy rate over the run's windows).\n\n"
        + markdown_table(["CPU kernel path", "runs", "loss floor"], rows)
    )


def _power_md(p: Power) -> str:
    if not p.dof:
        return "No cell has two seeds with a final validation loss: no seed spread to size by.\n"
    rows = [[c.cell, c.final_val_loss.text()] for c in p.cells]
    detectable = ", ".join(f"{v:.4f} nat at {n} seeds" for n, v in p.detectable.items())
    return (
        f"Seed spread of the final validation loss within cells, pooled: **σ = "
        f"{p.pooled_std:.4f}** ({p.dof} degrees of freedom). A difference of "
        f"{p.effect:g} nat between two cell means exceeds 2 standard errors with "
        f"**{p.seeds_needed} seeds per cell** (n > 2·(2σ/{p.effect:g})²). Smallest "
        f"difference these runs resolve: {detectable}.\n\n"
        + markdown_table(["cell", "final val loss (mean ± std over seeds)"], rows)
    )


def write_markdown(out: Path, result: Report, plots: dict[str, Path | None]) -> Path:
    sweeps = markdown_table(
        ["sweep", "runs", "listed in sweep.yaml", "statuses", "varies", "comparison report"],
        [
            [
                s.name,
                str(s.runs),
                str(s.manifest_runs or "-"),
                s.statuses,
                ", ".join(f"`{k}`" for k in s.varying) or "-",
                f"[summary.md]({s.compare})" if s.compare else "-",
            ]
            for s in result.sweeps
        ],
    )
    claims = result.claims
    answers: list[tuple[str, Judged, str]] = [
        ("claim1", claims.claim1, _claim1_md(claims.claim1)),
        ("claim2", claims.claim2, _claim2_md(claims.claim2)),
        ("claim3", claims.claim3, _claim3_md(claims.claim3)),
    ]
    summary = markdown_table(
        ["claim", "verdict"],
        [[f"{key[-1]}. {TITLES[key]}", f"**{c.verdict}**"] for key, c, _ in answers],
    )
    sections = [
        f"# The paper's claims, tested on our runs\n\n{result.runs} runs from "
        f"{len(result.sweeps)} sweep(s).\n\n{summary}\n",
        f"## Sweeps\n\n{sweeps}\n",
        f"## Data and CPU kernel paths\n\n{_paths_md(result.paths)}\n",
    ]
    for key, c, body in answers:
        figures = "".join(
            f"\n\n![{name}]({path.name})"
            for name, path in plots.items()
            if path and name.startswith(key)
        )
        sections.append(
            f"## Claim {key[-1]}: {TITLES[key]}\n\n{_verdict_line(key, c.verdict)}\n\n"
            f"{c.reason}\n\n{body}{figures}\n"
        )
    sections.append(f"## Power: seeds per cell\n\n{_power_md(result.power)}")
    sections.append(f"## LR sensitivity\n\n{_lr_md(result.lr_sensitivity)}")
    sections.append(f"## How the numbers are made\n\n{METHOD}")
    if result.notes:
        sections.append("## Notes\n\n" + "\n".join(f"- {n}" for n in result.notes) + "\n")
    path = out / "report.md"
    path.write_text("\n".join(sections))
    return path


def _sweep_info(arg: str, runs: list[Run]) -> Sweep:
    path = Path(arg)
    manifest = path / "sweep.yaml"
    listed = None
    if manifest.is_file():
        try:
            listed = yaml.safe_load(manifest.read_text()) or {}
        except yaml.YAMLError:
            listed = {}
        entries = listed.get("runs") if isinstance(listed, dict) else None
        listed = len(entries) if isinstance(entries, list) else None
    statuses: dict[str, int] = {}
    for run in runs:
        statuses[str(run.summary.get("status"))] = (
            statuses.get(str(run.summary.get("status")), 0) + 1
        )
    return Sweep(
        name=path.resolve().name,
        path=str(path),
        runs=len(runs),
        manifest_runs=listed,
        statuses=", ".join(f"{k} {v}" for k, v in sorted(statuses.items())),
        varying=varying_keys(runs) if len(runs) > 1 else [],
        compare=None,
    )


def _kernel_paths(runs: Sequence[Run]) -> list[KernelPath]:
    """Runs per (CPU kernel path, loss floor), in first-seen order."""
    counts: dict[tuple[str | None, float], int] = {}
    for run in runs:
        key = (run.kernel_path, run.loss_floor)
        counts[key] = counts.get(key, 0) + 1
    return [KernelPath(p, f, n) for (p, f), n in counts.items()]


def build_report(
    args: Sequence[str], out: Path, per_sweep: bool = True, plots: bool = True
) -> tuple[list[Path], list[str]]:
    """Load the sweeps, answer the claims, write report.md, claims.json and the PNGs into `out`.

    `per_sweep` adds study.compare's report of each directory given; `plots=False` writes the
    numbers only (report.md then has no figures).
    """
    by_arg = [(arg, load_runs([arg])) for arg in args]
    runs, seen = [], set()
    for _, arg_runs in by_arg:
        for run in arg_runs:
            if run.path.resolve() not in seen:
                seen.add(run.path.resolve())
                runs.append(run)
    notes = [f"{run.name}: {note}" for run in runs for note in run.notes]
    if not any(run.metrics for run in runs):
        raise StudyError(
            f"no run in {', '.join(map(str, args))} has training metrics (metrics.jsonl): "
            "nothing to report; train the runs first"
        )
    out.mkdir(parents=True, exist_ok=True)
    notes += [f"{run.name}: no training metrics, left out" for run in runs if not run.metrics]
    items = [facts(run) for run in runs if run.metrics]
    notes += [f"{f.run.name}: no `{WD}`, left out of the claims" for f in items if math.isnan(f.wd)]
    items = [f for f in items if not math.isnan(f.wd)]
    sweeps, written, names = [], [], set()
    for arg, arg_runs in by_arg:
        info = _sweep_info(arg, arg_runs)
        if per_sweep:
            name = info.name
            while name in names:
                name += "_"
            names.add(name)
            paths, _ = compare.report(arg_runs, out / "sweeps" / name)
            info = replace(info, compare=f"sweeps/{name}/summary.md")
            written += paths
        sweeps.append(info)
    c1 = claim1(items)
    claims = Claims(claim1=c1, claim2=claim2(items), claim3=claim3(c1))
    result = Report(
        generated_by="python -m study.report",
        rule=Rule(
            z=Z,
            min_seeds=MIN_SEEDS,
            fisher_p=FISHER_P,
            final_window=FINAL_WINDOW,
            mid_window=MID_WINDOW,
        ),
        runs=len(runs),
        sweeps=sweeps,
        claims=claims,
        lr_sensitivity=lr_sensitivity(items),
        power=power(items),
        paths=_kernel_paths(runs),
        notes=notes,
    )
    figures = {}
    if plots:
        adamw = [f for f in items if f.optimizer == "adamw"]
        figures = {
            "claim1: final loss against weight decay": plot_final_loss(c1.groups, out),
            "claim1: dynamics by weight decay": plot_dynamics(adamw, out),
            "claim2: runs by precision and weight decay": plot_divergence(adamw, out),
            "claim3: improvement over no decay": plot_improvement(claims.claim3.groups, out),
        }
    md = write_markdown(out, result, figures)
    claims_path = out / "claims.json"
    claims_path.write_text(json.dumps(to_json(result), indent=1, allow_nan=False) + "\n")
    return [md, claims_path, *(p for p in figures.values() if p), *written], notes


def default_out(first: str) -> Path:
    """`<sweep dir>/report` for a sweep directory, `docs/report` otherwise."""
    return report_dir(first, "report", Path("docs/report"))


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status (2 with `error: ...` for unusable input)."""
    parser = argparse.ArgumentParser(
        prog="python -m study.report", description=__doc__.split("\n")[0]
    )
    parser.add_argument("sweeps", nargs="+", metavar="SWEEP_DIR", help="sweep or run directories")
    parser.add_argument(
        "--out",
        type=Path,
        help="output directory (default: SWEEP_DIR/report for a sweep, else docs/report)",
    )
    parser.add_argument(
        "--no-per-sweep", action="store_true", help="skip study.compare's report of each sweep"
    )
    args = parser.parse_args(argv)
    try:
        paths, notes = build_report(
            args.sweeps, args.out or default_out(args.sweeps[0]), not args.no_per_sweep
        )
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
