"""The claim-2 pilot's tables and figure: `python -m experiments.flash_pilot runs/flash_pilot`.

Reads the pilot's run directories (`configs/sweeps/flash_pilot.yaml`, issue 20 stage a), applies
the divergence definition the sweep's header fixed before the runs, and writes to `--out`:
`pilot.json` (one row per run, the divergence counts and Fisher's exact p-values),
`runs.md` and `divergence.md` (the report's tables) and `telemetry.png` (the mechanism's
telemetry of layer 1 against step, one line per arm, one row of panels per learning rate).

A run diverges if (1) a train or val loss is non-finite (or a `nonfinite` detection), (2) a
logged train loss after the warmup lies more than BLOWUP nats above the lowest logged loss before
it, or (3) a bf16 run's final val loss exceeds the fp32 wd 0 run's at the same lr by more than
MARGIN nats. Detections of the divergence detector are listed, not counted.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from study.plots import finite, palette, save_figure
from study.runs import Run, StudyError, load_runs
from study.stats import fisher_greater

BLOWUP = 1.0  # nats above the running minimum of the logged train loss
MARGIN = 0.10  # nats of final val loss above the fp32 wd 0 run at the same lr
LAST = 5  # logged train losses averaged into the final train loss
REFERENCE = "fp32 wd0"
ARMS = (
    REFERENCE,
    "bf16 wd0",
    "bf16 wd0.1",
    "bf16 wd0 fp32_delta",
    "bf16 wd0 dynamic_max",
    "bf16 wd0 all_bf16",
)


VERDICT = {True: "yes", False: "no", None: "-"}


def arm_of(run: Run) -> str:
    """`bf16 wd0 dynamic_max`: precision, weight decay and, for a bf16 variant other than fa2,
    the flash variant."""
    cfg = run.flat_config
    precision = str(cfg.get("precision"))
    wd = float(cfg.get("optim.weight_decay", 0.0))
    name = f"{precision} wd{wd:g}"
    flash = cfg.get("bf16_flash", "fa2")
    if precision == "bf16" and flash != "fa2":
        name += f" {flash}"
    return name


def _last(run: Run, key: str) -> Any:
    """The value of `key` on the last train line that has it (None if none)."""
    for step in sorted(run.metrics, reverse=True):
        if key in run.metrics[step]:
            return run.metrics[step][key]
    return None


def _minutes(run: Run) -> float:
    """Wall minutes from the run's first logged line to its last line (eval included), scaled to
    cover the steps before the first line at the logged lines' rate."""
    times = sorted((line["step"], line["time"]) for line in run.metrics.values() if "time" in line)
    if len(times) < 2:
        return math.nan
    (s0, t0), (s1, t1) = times[0], times[-1]
    end = max([t1, *(e.get("time", t1) for e in run.events if e.get("kind") == "checkpoint")])
    per_step = (t1 - t0) / max(1, s1 - s0)
    return (end - t0 + per_step * s0) / 60.0


def blowup_step(steps: np.ndarray, losses: np.ndarray, warmup: int) -> int | None:
    """The first logged step after `warmup` whose loss is BLOWUP above the lowest before it."""
    lowest = math.inf
    for step, loss in zip(steps, losses, strict=True):
        if step > warmup and loss > lowest + BLOWUP:
            return int(step)
        lowest = min(lowest, loss)
    return None


def _mean(values: np.ndarray) -> float | None:
    values = values[np.isfinite(values)]
    return float(values.mean()) if values.size else None


def delta_bias_t(run: Run, layer: int) -> float | None:
    """The delta-bias readings' mean over its standard error: how far their running sum lies from
    zero in units of a random walk's spread (|t| > 2: a one-signed, growing bias)."""
    _, values = run.series(f"attn_delta_bias/layer{layer}")
    values = values[np.isfinite(values)]
    if values.size < 3 or values.std(ddof=1) == 0:
        return None
    return float(values.mean() / (values.std(ddof=1) / math.sqrt(values.size)))


def row_of(run: Run) -> dict[str, Any]:
    """One run's row: identity, losses, detections and the mechanism's readings."""
    cfg = run.flat_config
    steps, losses = run.series("loss")
    val_steps, vals = run.val_series()
    n_layer = int(cfg.get("model.n_layer", 0))
    wq = [_last(run, f"attn_wq_norm/layer{i}") for i in range(n_layer)]
    _, logits = run.series("attn_logit_max")
    detections = run.detections
    nonfinite = bool(
        (~np.isfinite(losses)).any()
        or (~np.isfinite(vals)).any()
        or any(e.get("kind") == "nonfinite" for e in detections)
    )
    return {
        "run": run.name,
        "arm": arm_of(run),
        "lr": float(cfg.get("optim.lr")),
        "seed": int(cfg.get("run.seed")),
        "status": run.summary.get("status"),
        "steps": int(steps[-1]) if steps.size else 0,
        "max_steps": int(cfg.get("train.max_steps", 0)),
        "final_train_loss": float(np.mean(losses[-LAST:])) if losses.size else math.nan,
        "final_val_loss": float(vals[-1]) if vals.size else math.nan,
        "val_step": int(val_steps[-1]) if val_steps.size else None,
        "nonfinite": nonfinite,
        "blowup_step": blowup_step(steps, losses, int(cfg.get("optim.warmup_steps", 0))),
        "detections": [[int(e["step"]), e["kind"]] for e in detections],
        "max_attn_logit": float(np.nanmax(logits)) if logits.size else math.nan,
        "tie_frac": [_last(run, f"attn_tie_frac/layer{i}") for i in range(n_layer)],
        "delta_bias_sum": [_last(run, f"attn_delta_bias_sum/layer{i}") for i in range(n_layer)],
        "delta_bias_t": [delta_bias_t(run, i) for i in range(n_layer)],
        "delta_bias_mean_abs": [
            _mean(np.abs(run.series(f"attn_delta_bias/layer{i}")[1])) for i in range(n_layer)
        ],
        "delta_coherence_mean": [
            _mean(run.series(f"attn_delta_coherence/layer{i}")[1]) for i in range(n_layer)
        ],
        "wq_norm_max": [max(w) if w else None for w in wq],
        "minutes": _minutes(run),
        "kernel_path": run.kernel_path,
    }


def judge(rows: list[dict[str, Any]]) -> None:
    """Adds `diverged` and `why` to every row, by the definition above."""
    reference = {r["lr"]: r["final_val_loss"] for r in rows if r["arm"] == REFERENCE}
    for r in rows:
        why = []
        if r["nonfinite"]:
            why.append("non-finite loss")
        if r["blowup_step"] is not None:
            why.append(f"loss +{BLOWUP:g} nat over its minimum at step {r['blowup_step']}")
        ref = reference.get(r["lr"])
        r["val_minus_fp32"] = None
        at_end = r["val_step"] == r["max_steps"]
        if r["arm"] != REFERENCE and ref is not None and math.isfinite(ref) and at_end:
            r["val_minus_fp32"] = r["final_val_loss"] - ref
            if not r["final_val_loss"] <= ref + MARGIN:  # NaN counts as above
                why.append(f"final val loss > fp32's + {MARGIN:g}")
        finished = r["steps"] >= r["max_steps"] and r["val_step"] == r["max_steps"]
        # an unfinished run is judged only where rule 1 or 2 already fired
        r["diverged"] = bool(why) if finished or why else None
        r["why"] = why if finished or why else ["not finished"]


def fisher_table(rows: list[dict[str, Any]], arm: str, against: str) -> list[dict[str, Any]]:
    """Divergences of `arm` against `against`, per lr both ran at and pooled over those lrs,
    with the one-sided Fisher p that `arm` diverges more often, and the smallest p its counts
    allow (what every run of `arm` diverging and none of `against` would give)."""
    judged = [r for r in rows if r["diverged"] is not None]
    lrs = sorted(
        {r["lr"] for r in judged if r["arm"] == arm}
        & {r["lr"] for r in judged if r["arm"] == against}
    )
    out = []
    for label, chosen in [*((f"{lr:g}", [lr]) for lr in lrs), ("pooled", lrs)]:
        if not chosen or (label == "pooled" and len(lrs) < 2):
            continue
        a = [r for r in judged if r["arm"] == arm and r["lr"] in chosen]
        b = [r for r in judged if r["arm"] == against and r["lr"] in chosen]
        k_a, k_b = sum(r["diverged"] for r in a), sum(r["diverged"] for r in b)
        out.append(
            {
                "arm": arm,
                "against": against,
                "lr": label,
                "diverged": [k_a, len(a)],
                "against_diverged": [k_b, len(b)],
                "seeds": sorted({r["seed"] for r in a + b}),
                "p": fisher_greater(k_a, len(a), k_b, len(b)),
                "p_min": fisher_greater(len(a), len(a), 0, len(b)),
            }
        )
    return out


def _num(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


def _list(values: Sequence[Any], spec: str) -> str:
    return " / ".join(_num(v, spec) for v in values)


def runs_table(rows: list[dict[str, Any]]) -> str:
    """The per-run markdown table of the report."""
    head = (
        "| arm | lr | seed | status | final train | final val | val - fp32 | diverged | "
        "first detection | max attn logit | tie frac L0 / L1 | delta-bias sum L0 / L1 | "
        "delta-bias t L0 / L1 | max W_Q norm L0 / L1 | minutes |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for r in rows:
        det = r["detections"]
        first = f"{det[0][1]} @ {det[0][0]} ({len(det)} in all)" if det else "none"
        lines.append(
            f"| {r['arm']} | {r['lr']:g} | {r['seed']} | {r['status']} ({r['steps']}) | "
            f"{_num(r['final_train_loss'], '.4f')} | {_num(r['final_val_loss'], '.4f')} | "
            f"{_num(r['val_minus_fp32'], '+.4f')} | "
            f"{VERDICT[r['diverged']]}{': ' + '; '.join(r['why']) if r['why'] else ''} | {first} | "
            f"{_num(r['max_attn_logit'], '.1f')} | {_list(r['tie_frac'], '.3f')} | "
            f"{_list(r['delta_bias_sum'], '+.2e')} | {_list(r['delta_bias_t'], '+.1f')} | "
            f"{_list(r['wq_norm_max'], '.2f')} | "
            f"{_num(r['minutes'], '.1f')} |"
        )
    return head + "\n".join(lines) + "\n"


def divergence_table(tests: list[dict[str, Any]]) -> str:
    """The Fisher comparisons as a markdown table."""
    head = (
        "| arm | against | lr | diverged | against diverged | seeds | one-sided p | "
        "smallest p these counts allow |\n|---|---|---|---|---|---|---|---|\n"
    )
    lines = [
        f"| {t['arm']} | {t['against']} | {t['lr']} | {t['diverged'][0]} of {t['diverged'][1]} | "
        f"{t['against_diverged'][0]} of {t['against_diverged'][1]} | "
        f"{', '.join(map(str, t['seeds']))} | {t['p']:.3f} | {t['p_min']:.3f} |"
        for t in tests
    ]
    return head + "\n".join(lines) + "\n"


# (key, title, log axis); "{i}" stands for the layer: layer 1 solid, layer 0 dashed
PANELS = (
    ("loss", "train loss (points: val loss)", False),
    ("attn_tie_frac/layer{i}", "tie-row fraction", False),
    ("attn_delta_bias_sum/layer{i}", "delta-bias running sum", False),
    ("attn_wq_norm/layer{i}", "W_Q spectral norm, max over heads", False),
    ("attn_logit_max", "max attention logit, all layers", True),
)
LAYER_STYLES = ((1, "-"), (0, "--"))


def figure(runs: list[Run], path: Path) -> Path:
    """The mechanism's telemetry against step: one row per lr, one color per arm; per-layer
    readings solid for layer 1, dashed for layer 0."""
    import matplotlib.pyplot as plt  # Agg: study.plots selected it on import

    lrs = sorted({float(r.flat_config.get("optim.lr")) for r in runs})
    colors = dict(zip(ARMS, palette(len(ARMS)), strict=True))
    fig, grid = plt.subplots(
        len(lrs), len(PANELS), figsize=(3.6 * len(PANELS), 2.9 * len(lrs)), squeeze=False
    )
    handles: dict[str, Any] = {}
    for i, j in np.ndindex(len(lrs), len(PANELS)):
        ax = grid[i, j]
        ax.grid(True, alpha=0.3)
        ax.set_xlabel("step", fontsize=8)
        pattern, title, log = PANELS[j]
        per_layer = "{i}" in pattern
        ax.set_title(
            f"{title}{' (L1 solid, L0 dashed)' if per_layer else ''}\nlr {lrs[i]:g}", fontsize=8
        )
        for run in runs:
            if float(run.flat_config.get("optim.lr")) != lrs[i]:
                continue
            arm = arm_of(run)
            for layer, style in LAYER_STYLES if per_layer else ((None, "-"),):
                key = pattern.format(i=layer)
                steps = np.asarray(sorted(s for s in run.metrics if key in run.metrics[s]))
                values = [run.metrics[s][key] for s in steps]
                if key.startswith("attn_wq_norm"):
                    values = [max(v) for v in values]
                values = finite(np.asarray(values, dtype=np.float64), positive=log)
                color = colors.get(arm, "black")
                (line,) = ax.plot(steps, values, style, color=color, lw=1.0)
                if style == "-":
                    handles.setdefault(arm, line)
            if pattern == "loss":  # the val losses as points
                val_steps, vals = run.val_series()
                ax.plot(val_steps, vals, "o", color=colors.get(arm, "black"), ms=3)
        if log:
            ax.set_yscale("log")
        if pattern == "loss":
            ax.set_ylim(top=5.0)
    order = [a for a in ARMS if a in handles] + [a for a in handles if a not in ARMS]
    return save_figure(
        fig,
        path,
        [handles[a] for a in order],
        order,
        "Claim-2 pilot: flash-attention mechanism telemetry by arm",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.flash_pilot", description=__doc__.split("\n")[0]
    )
    parser.add_argument("runs", nargs="+", help="run or sweep directories (runs/flash_pilot)")
    parser.add_argument("--out", default="docs/proxy_study/flash_pilot", help="output directory")
    parser.add_argument("--no-figure", action="store_true", help="tables and JSON only")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        runs = load_runs(args.runs)
    except StudyError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    order = {arm: i for i, arm in enumerate(ARMS)}
    runs.sort(key=lambda r: (float(r.flat_config.get("optim.lr")), order.get(arm_of(r), 99)))
    rows = [row_of(r) for r in runs]
    judge(rows)
    tests = [
        *fisher_table(rows, "bf16 wd0", REFERENCE),
        *fisher_table(rows, "bf16 wd0", "bf16 wd0.1"),
    ]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    definition = {"blowup_nats": BLOWUP, "margin_nats": MARGIN, "final_train_last": LAST}
    (out / "pilot.json").write_text(
        json.dumps({"definition": definition, "runs": rows, "fisher": tests}, indent=1) + "\n"
    )
    (out / "runs.md").write_text(runs_table(rows))
    (out / "divergence.md").write_text(divergence_table(tests))
    if not args.no_figure:
        figure(runs, out / "telemetry.png")
    print(runs_table(rows))
    print(divergence_table(tests))
    return 0


if __name__ == "__main__":
    sys.exit(main())
