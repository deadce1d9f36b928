"""Which signal departed first, and the state mechanism it points at (`postmortem.diagnose`).

Pure: metrics lines in, departures and ranked mechanisms out; no torch, no I/O.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from configs.schema import TrainConfig
from monitor.detectors import GRAD_NORM_LOG_FLOOR, SpikeDetector

# Metrics that are not signals of the model's state: schedule, throughput, bookkeeping, and
# aggregates whose parts are judged (`attn_logit_max` is the max of the per-layer readings), and
# the flash mechanism's running sum (cumulative: it departs by construction) and the coherence
# of delta's error (a sign share in [-1, 1], noise until the bias itself grows).
_NOT_SIGNALS = re.compile(
    r"^(step|tokens|time|lr|eff_lr(/.*)?|tok_per_s|mfu|step_time_ms|peak_mem_mb|clip_frac"
    r"|skipped_steps|grad_norm_clipped|attn_logit_max|attn_logit_max/layers|val_.*"
    r"|attn_delta_bias_sum/.*|attn_delta_coherence/.*)$"
)
# Fewest baseline readings before a series is judged (the detectors' smallest window).
MIN_BASELINE = 8


@dataclass
class Departure:
    """A series' first lasting departure from its own baseline."""

    series: str
    step: int
    value: float
    baseline: float  # the baseline's median, on the series' own scale
    z: float  # robust z-score of the departing reading (inf when it was not finite)


@dataclass
class Mechanism:
    """A likely cause, why it is believed, what to change, and how sure the ranking is."""

    name: str
    evidence: str
    remedies: list[str]
    confidence: str  # high, medium, low


def signal_series(lines: Sequence[dict[str, Any]]) -> dict[str, list[tuple[int, float]]]:
    """Every signal of metrics lines as (step, value) readings, one per step (the last line).

    Per-layer attention logits become `attn_logit_max/layer{i}`, log Z its magnitude `|log_z|`;
    keys this module does not know (sharpness, ...) are taken as they are if numeric.
    """
    by_step = {line["step"]: line for line in lines if "loss" in line}
    series: dict[str, list[tuple[int, float]]] = {}
    for step in sorted(by_step):
        for key, value in by_step[step].items():
            if key == "attn_logit_max/layers":
                for layer, reading in enumerate(value):
                    if (number := _float(reading)) is not None:
                        series.setdefault(f"attn_logit_max/layer{layer}", []).append((step, number))
                continue
            if _NOT_SIGNALS.match(key) or isinstance(value, bool):
                continue
            number = _float(value)
            if number is None:
                continue
            name, number = ("|log_z|", abs(number)) if key == "log_z" else (key, number)
            series.setdefault(name, []).append((step, number))
    return series


def _float(value: Any) -> float | None:
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str) and value in ("nan", "inf", "-inf"):
        return float(value)
    return None


def departure(
    name: str, readings: Sequence[tuple[int, float]], sigma: float, loss_floor: float, window: int
) -> Departure | None:
    """The first lasting upward departure of one series from its own course.

    Each reading's step from the one before (its increment; of the logarithm for every series
    but the loss, so a growth factor) is judged as the spike detector judges the loss: robust
    z-score against up to `window` earlier unflagged increments, once `MIN_BASELINE` are
    there, the scale floored at `loss_floor` for the loss and at 5% for the others. Judging the
    increments, not the levels, lets a series that grows steadily (weight norms, attention
    logits early in training) go on growing; a jump or a sudden acceleration is flagged. A
    non-finite reading is flagged too. The departure is the first flagged reading after which
    the series never falls back below half its jump over its baseline (the median of the
    readings before it): a lone outlier that the series comes back from is not one.
    """
    log = name != "loss"
    size = max(MIN_BASELINE, min(window, len(readings) // 2))
    floor = GRAD_NORM_LOG_FLOOR if log else loss_floor
    detector = SpikeDetector(name, size, sigma, floor)
    levels: list[float] = []  # the judged scale: log or linear; +inf for a non-finite reading
    hits: list[tuple[int, int, float, float]] = []  # (level index, step, value, z)
    for step, value in readings:
        if math.isfinite(value) and log and value <= 0:
            continue  # no update measured (a skipped step): nothing to judge
        level = (math.log(value) if log else value) if math.isfinite(value) else math.inf
        if levels and math.isfinite(level) and math.isfinite(levels[-1]):
            z = detector.score(level - levels[-1])
            detector.update(step, level - levels[-1])
            if z is not None and z > sigma:
                hits.append((len(levels), step, value, z))
        elif not math.isfinite(level) and len(levels) >= MIN_BASELINE:
            hits.append((len(levels), step, value, math.inf))
        levels.append(level)
    for i, step, value, z in hits:
        base = float(np.median(levels[max(0, i - size) : i]))
        if not math.isfinite(base):
            continue
        half = base + (levels[i] - base) / 2 if math.isfinite(levels[i]) else base
        if all(level > half for level in levels[i:]):
            return Departure(name, step, value, math.exp(base) if log else base, z)
    return None


def timeline(
    series: dict[str, list[tuple[int, float]]], cfg: TrainConfig, step: int
) -> list[Departure]:
    """The departures of every series up to `step`, earliest first (larger z first on a tie)."""
    d = cfg.divergence
    found = []
    for name, readings in series.items():
        readings = [(s, v) for s, v in readings if s <= step]
        hit = departure(name, readings, d.spike_sigma, d.std_floor, d.window)
        if hit is not None:
            found.append(hit)
    return sorted(found, key=lambda h: (h.step, -h.z, h.series))


# --- the mechanism --------------------------------------------------------------------------

# State mechanisms, in the order that breaks a tie of departure steps: the logits first (they
# are what a detection of their own kind shows), then the update before the weight norms (an
# oversized update moves the norms in the same step, so norms that depart with it follow it).
_PRIORITY = ("attention", "output_logit", "optimizer", "weight_norm")


def mechanism_of(series: str) -> str | None:
    """The state mechanism a departed series points at, None for the loss and others."""
    if series.startswith("attn_logit_max/layer"):
        return "attention"
    if series == "|log_z|":
        return "output_logit"
    if series.startswith("param_norm"):
        return "weight_norm"
    if series.startswith(("update_ratio", "sharpness")) or series == "grad_norm":
        return "optimizer"
    return None


def remedies(name: str, cfg: TrainConfig, batch: dict[str, Any] | None = None) -> list[str]:
    """The harness's own knobs that answer mechanism `name`, with the run's current values."""
    o = cfg.optim
    lower_lr = f"a lower `optim.lr` (now {o.lr:g})"
    if name == "attention":
        return [
            "`model.qk_layernorm=true`",
            lower_lr,
            f"weight decay: `optim.weight_decay` (now {o.weight_decay:g})",
        ]
    if name == "output_logit":
        return [f"`model.z_loss=1e-4` (now {cfg.model.z_loss:g})"]
    if name == "weight_norm":
        if o.weight_decay == 0:
            return ["`optim.weight_decay=0.1` (now 0: no decay)"]
        return [f"a higher `optim.weight_decay` (now {o.weight_decay:g})"]
    if name == "optimizer":
        clip = (
            f"`optim.grad_clip=1.0` (now {o.grad_clip:g}: off)"
            if o.grad_clip == 0
            else (f"a tighter `optim.grad_clip` (now {o.grad_clip:g})")
        )
        return [lower_lr, f"a higher `optim.eps`, e.g. 1e-6 (now {o.eps:g})", clip]
    if name == "bad_batch":
        where = f" (loader position {batch['position']})" if batch else ""
        return [
            "`divergence.policy=skip` (withholds the step and moves past its batch) or `rollback`",
            f"drop or inspect the batch{where}: its token ranges are in diagnosis.json",
        ]
    if name == "transient":
        return ["rerun (resume from the last checkpoint); if it recurs, check the hardware"]
    return []


def state_mechanisms(
    departures: Sequence[Departure], event: dict[str, Any], step: int, cfg: TrainConfig
) -> list[Mechanism]:
    """State mechanisms ranked by how early their signal left its baseline.

    The detection itself counts as a reading of its own signal (an attention-logit detection
    of layer L shows attention, an output-logit one log Z) at the detection step. The first
    is `high` when its signal departed at least 2 steps before any other mechanism's and
    before the detection, `medium` when it still led, `low` otherwise.
    """
    first: dict[str, Departure] = {}
    for hit in departures:
        name = mechanism_of(hit.series)
        if name is not None and name not in first:
            first[name] = hit
    own = {"attn_logit": "attention", "output_logit": "output_logit"}.get(event["kind"])
    if own is not None and own not in first:
        series = event["metric"] if own == "attention" else "|log_z|"
        value = abs(float(event["value"])) if own == "output_logit" else float(event["value"])
        first[own] = Departure(series, step, value, math.nan, math.nan)
    if not first:
        return []
    order = sorted(first, key=lambda n: (first[n].step, n != own, _PRIORITY.index(n)))
    ranked = []
    for i, name in enumerate(order):
        hit = first[name]
        lead = step - hit.step
        if i == 0:
            runner_up = first[order[1]].step if len(order) > 1 else math.inf
            confidence = (
                "high" if runner_up - hit.step >= 2 and lead >= 2 else "medium" if lead else "low"
            )
        else:
            confidence = "low"
        if math.isnan(hit.z):
            evidence = f"the detection itself: {event['metric']} = {event['value']}"
        else:
            evidence = (
                f"{hit.series} left its baseline ({hit.baseline:.4g}) at step {hit.step}, "
                f"{steps_before(lead)} the detection ({hit.value:.4g}, z {hit.z:.1f})"
            )
        ranked.append(Mechanism(name, evidence, remedies(name, cfg), confidence))
    return ranked


def steps_before(count: int) -> str:
    """'1 step before', '3 steps before', 'at' (for 0)."""
    if count == 0:
        return "at"
    return f"{count} step{'' if count == 1 else 's'} before"
