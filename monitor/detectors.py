"""Pure divergence detectors: plain floats in, `Detection`s out; no torch, no I/O.

Each detector sees one series and says whether its newest value is alarming. They hold only small
rolling state, and all of it round-trips through `state_dict()` as strict JSON, so a resumed run
keeps its windows instead of going blind while they refill. What a detection *does* (record, skip,
roll back, stop) is `monitor.policy`'s business, not theirs.

Detectors see whatever readings the loop hands them: if the loop reads the loss only on log steps,
a "window of 128" is 128 readings, not 128 optimizer steps.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal, get_args

from common.files import json_number, json_safe

if TYPE_CHECKING:
    from monitor.config import DivergenceConfig

DetectionKind = Literal["nonfinite", "spike", "drift", "attn_logit", "output_logit", "slingshot"]

# The robust std of a normal sample is 1.4826 x its median absolute deviation.
MAD_TO_STD = 1.4826
# Grad norms live on no fixed scale (they shrink by orders of magnitude early in training) and are
# close to log-normal, so their spike detector works on log(grad norm), with its robust std
# floored at log(1.05): a 5% relative spread.
GRAD_NORM_LOG_FLOOR = math.log(1.05)
# Keeps a z-score finite when a window is perfectly constant and every floor is zero.
_MIN_SCALE = 1e-12
# Version 2 added the grad-norm spike's wait for the loss (`LossFollows`); version 1 states load,
# with nothing awaited.
STATE_VERSION = 2
_LOADABLE_VERSIONS = (1, 2)


def began_at(step: int, facts: Mapping[str, Any] | None) -> int:
    """The step a detection at `step` with `facts` began: a loss that followed a grad-norm spike
    began at that spike (a rollback's target, a run's first divergence)."""
    return int((facts or {}).get("grad_norm_step", step))


def _optional_float(value: float | None) -> float | None:
    return None if value is None else float(value)


@dataclass(frozen=True)
class Detection:
    """One alarming reading: what fired, where, and the value against the bar it crossed;
    `facts`, when a detection spans several readings (a slingshot cycle), their steps and values.

    `actionable` False marks a sensitive, record-only detection: it is recorded like any other,
    but a policy must not act on it (it fires on healthy runs too; docs/divergences.md)."""

    kind: DetectionKind
    step: int
    metric: str
    value: float
    threshold: float
    detail: str
    facts: Mapping[str, Any] | None = None
    actionable: bool = True

    def __post_init__(self) -> None:
        if self.kind not in get_args(DetectionKind):
            raise ValueError(f"unknown detection kind {self.kind!r}")

    @property
    def began(self) -> int:
        """The step its divergence began (`began_at`)."""
        return began_at(self.step, self.facts)

    def to_event(self) -> dict[str, Any]:
        """The events.jsonl fields of this detection (the sink adds `time`); strict JSON."""
        event = {
            "step": int(self.step),
            "kind": self.kind,
            "metric": self.metric,
            "value": json_number(self.value),
            "threshold": json_number(self.threshold),
            "detail": self.detail,
            "actionable": bool(self.actionable),
        }
        if self.facts is not None:
            event["facts"] = json_safe(dict(self.facts))
        return event


class NonFiniteDetector:
    """Flags a NaN or infinite loss or grad norm; stateless, one detection per bad metric."""

    def update(self, step: int, loss: float, grad_norm: float | None) -> list[Detection]:
        """Detections for each non-finite metric of this step (empty when all are finite)."""
        detections = []
        for metric, value in (("loss", loss), ("grad_norm", grad_norm)):
            if value is not None and not math.isfinite(value):
                detections.append(
                    Detection(
                        "nonfinite", step, metric, float(value), math.inf, f"{metric} is {value}"
                    )
                )
        return detections


class SpikeDetector:
    """Upward outliers of one metric against a rolling window of its previous finite values.

    The score is a robust z-score, `(x - median) / scale` with `scale = 1.4826 * MAD`, floored at
    `max(std_floor, relative_floor * |median|)`: the median and MAD ignore the occasional outlier
    that a mean and std would chase, and the floor keeps a very quiet window from turning ordinary
    noise into "spikes" (OLMo-core floors its std the same way). Only upward spikes count; a sudden
    drop of the loss is good news.

    With `log_scale`, values are judged as logarithms: right-skewed metrics such as the gradient
    norm are close to log-normal, and a linear median/MAD raises false alarms on their ordinary
    upper tail (seen on small-batch CPU runs: dozens per run). The floor is then in log units.

    A flagged value is NOT added to the window. A run of spikes then keeps being flagged instead of
    dragging the median up until it looks normal, and the baseline that a resumed or skipped step
    is judged against stays clean. The price: a genuine, lasting upward level shift is flagged on
    every reading until something else (a rollback, a stop) deals with it. While the window
    fills, values go in unjudged; the median and MAD shrug off a stray outlier among them.
    """

    def __init__(
        self,
        metric: str,
        window: int,
        sigma: float,
        std_floor: float,
        relative_floor: float = 0.0,
        log_scale: bool = False,
    ) -> None:
        if window < 2:
            raise ValueError(f"window must be at least 2, got {window}")
        if sigma <= 0 or std_floor < 0 or relative_floor < 0:
            raise ValueError("sigma must be > 0 and both floors >= 0")
        self.metric = metric
        self.window = window
        self.sigma = sigma
        self.std_floor = std_floor
        self.relative_floor = relative_floor
        self.log_scale = log_scale
        self._values: deque[float] = deque(maxlen=window)

    def _judged(self, value: float) -> float | None:
        """The value on the scale it is judged on; None when it cannot be judged."""
        if not math.isfinite(value) or (self.log_scale and value <= 0):
            return None
        return math.log(value) if self.log_scale else value

    @property
    def ready(self) -> bool:
        """Whether the window is full, i.e. whether `score` gives verdicts yet."""
        return len(self._values) == self.window

    def _center_and_scale(self) -> tuple[float, float]:
        ordered = sorted(self._values)
        center = _median(ordered)
        mad = _median(sorted(abs(v - center) for v in ordered))
        floor = max(self.std_floor, self.relative_floor * abs(center))
        return center, max(MAD_TO_STD * mad, floor, _MIN_SCALE)

    def score(self, value: float) -> float | None:
        """Robust z-score of `value` against the window; None ("no verdict") until it is full
        or when `value` is not finite (that is `NonFiniteDetector`'s to report)."""
        judged = self._judged(value)
        if not self.ready or judged is None:
            return None
        center, scale = self._center_and_scale()
        return (judged - center) / scale

    def bar(self, sigma: float) -> float | None:
        """The value whose robust z-score is `sigma`, on the metric's own scale; None until the
        window is full."""
        if not self.ready:
            return None
        center, scale = self._center_and_scale()
        bar = center + sigma * scale
        return math.exp(bar) if self.log_scale else bar

    def update(self, step: int, value: float) -> Detection | None:
        """Judge `value`, then add it to the window unless it was flagged or not finite."""
        judged = self._judged(value)
        if judged is None:
            return None
        detection = None
        if self.ready:
            center, scale = self._center_and_scale()
            z = (judged - center) / scale
            if z > self.sigma:
                on = "log " if self.log_scale else ""
                detail = (
                    f"robust z {z:.1f} > {self.sigma:g} ({on}median {center:.4g}, "
                    f"scale {scale:.3g} over {self.window} readings)"
                )
                threshold = center + self.sigma * scale
                if self.log_scale:
                    threshold = math.exp(threshold)
                detection = Detection("spike", step, self.metric, float(value), threshold, detail)
        if detection is None:
            self._values.append(judged)
        return detection

    def state_dict(self) -> dict[str, Any]:
        """The window, oldest first."""
        return {"values": list(self._values)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the window; keeps the newest `window` values if the window shrank."""
        self._values = deque((float(v) for v in state["values"]), maxlen=self.window)


def _median(ordered: Sequence[float]) -> float:
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])


class DriftDetector:
    """Slow upward drift of the loss, the kind a spike detector's rolling window absorbs.

    The loss is smoothed by a bias-corrected EMA. Drift is either (a) the smoothed loss above its
    running minimum by more than `margin`, or (b) the smoothed loss rising `sustained_steps`
    readings in a row, where "rising" means above the previous smoothed value by more than
    `rise_tol` so that float jitter on a flat curve never counts. On noisy data (b) is all but
    impossible by chance (about 0.5**50 for 50 readings), while (a) catches slow climbs.

    It fires once per episode. The episode ends, and the detector re-arms, once the smoothed loss
    is back within `margin` of its minimum and has made no new high for `sustained_steps`
    readings. "Stopped rising" is judged by new highs, not by one flat reading, because a noisy
    drift pauses its rise now and then without ending, and must not fire twice.

    The first `warmup_steps` readings only feed the EMA: early training is noisy and steep, and a
    minimum taken from the first few, barely averaged readings would sit too low. Non-finite
    losses are ignored; spikes are not (a lasting jump of the loss is exactly the drift this is
    for).
    """

    def __init__(
        self,
        ema: float,
        margin: float,
        sustained_steps: int,
        warmup_steps: int = 128,
        rise_tol: float = 1e-6,
    ) -> None:
        if not 0.0 < ema < 1.0:
            raise ValueError(f"ema must be in (0, 1), got {ema}")
        if margin <= 0 or sustained_steps < 1 or warmup_steps < 0 or rise_tol < 0:
            raise ValueError("need margin > 0, sustained_steps >= 1, warmup_steps, rise_tol >= 0")
        self.ema = ema
        self.margin = margin
        self.sustained_steps = sustained_steps
        self.warmup_steps = warmup_steps
        self.rise_tol = rise_tol
        self._num_updates = 0
        self._biased_ema = 0.0
        self._smoothed: float | None = None
        self._running_min: float | None = None
        self._rise_run = 0
        self._rise_start: float | None = None
        self._in_episode = False
        self._episode_high = 0.0
        self._since_high = 0

    @property
    def smoothed(self) -> float | None:
        """The bias-corrected EMA of the loss, None before the first finite reading."""
        return self._smoothed

    def update(self, step: int, loss: float) -> Detection | None:
        """Fold in one loss reading; a Detection when a drift episode starts."""
        if not math.isfinite(loss):
            return None
        self._num_updates += 1
        self._biased_ema = self.ema * self._biased_ema + (1.0 - self.ema) * loss
        smoothed = self._biased_ema / (1.0 - self.ema**self._num_updates)
        previous, self._smoothed = self._smoothed, smoothed
        if self._num_updates <= self.warmup_steps:
            return None

        if previous is not None and smoothed > previous + self.rise_tol:
            if self._rise_run == 0:
                self._rise_start = previous
            self._rise_run += 1
        else:
            self._rise_run, self._rise_start = 0, None
        if self._running_min is None or smoothed < self._running_min:
            self._running_min = smoothed

        above = smoothed - self._running_min > self.margin
        rising = self._rise_run >= self.sustained_steps
        if self._in_episode:
            if smoothed > self._episode_high:
                self._episode_high, self._since_high = smoothed, 0
            else:
                self._since_high += 1
            if not above and self._since_high >= self.sustained_steps:
                self._in_episode = False
            return None
        if not (above or rising):
            return None
        self._in_episode, self._episode_high, self._since_high = True, smoothed, 0
        if above:
            threshold = self._running_min + self.margin
            detail = (
                f"smoothed loss {smoothed:.4f} is {smoothed - self._running_min:.3f} above its "
                f"minimum {self._running_min:.4f} (margin {self.margin:g})"
            )
        else:
            assert self._rise_start is not None
            threshold = self._rise_start
            detail = (
                f"smoothed loss rose {self._rise_run} readings in a row, "
                f"{self._rise_start:.4f} -> {smoothed:.4f}"
            )
        return Detection("drift", step, "loss_ema", smoothed, threshold, detail)

    def state_dict(self) -> dict[str, Any]:
        """EMA, running minimum and episode state; all finite floats, ints, bools or None."""
        return {
            "num_updates": self._num_updates,
            "biased_ema": self._biased_ema,
            "smoothed": self._smoothed,
            "running_min": self._running_min,
            "rise_run": self._rise_run,
            "rise_start": self._rise_start,
            "in_episode": self._in_episode,
            "episode_high": self._episode_high,
            "since_high": self._since_high,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what `state_dict` returned."""
        self._num_updates = int(state["num_updates"])
        self._biased_ema = float(state["biased_ema"])
        self._smoothed = _optional_float(state["smoothed"])
        self._running_min = _optional_float(state["running_min"])
        self._rise_run = int(state["rise_run"])
        self._rise_start = _optional_float(state["rise_start"])
        self._in_episode = bool(state["in_episode"])
        self._episode_high = float(state["episode_high"])
        self._since_high = int(state["since_high"])


class AttnLogitDetector:
    """Per-layer max |attention logit| above `threshold`, or growing fast while already sizable.

    Attention-logit growth precedes divergence at high learning rates (Wortsman et al. 2023 saw
    > 1e4 in layer 0). A layer alarms when its reading is above `threshold`, not finite, or more
    than `growth` x its previous reading while above `min_level` (default threshold/10, so tiny
    early logits doubling do not alarm). Each layer fires once per episode; the episode ends at the
    first reading that is neither growing that fast nor above half the threshold (hysteresis: a
    logit hovering around the threshold is one episode, not one alarm per crossing).
    """

    def __init__(self, threshold: float, growth: float, min_level: float | None = None) -> None:
        if threshold <= 0 or growth <= 1:
            raise ValueError("need threshold > 0 and growth > 1")
        self.threshold = threshold
        self.growth = growth
        self.min_level = threshold / 10 if min_level is None else min_level
        self._previous: list[float | None] = []
        self._alarmed: list[bool] = []

    def update(self, step: int, values: Sequence[float]) -> list[Detection]:
        """Judge one reading (one value per layer); a Detection per layer starting an episode."""
        if len(values) != len(self._previous):  # first reading, or the model changed
            self._previous = [None] * len(values)
            self._alarmed = [False] * len(values)
        detections = []
        for layer, value in enumerate(values):
            value = float(value)
            previous = self._previous[layer]
            reason, threshold = None, self.threshold
            if not math.isfinite(value):
                reason = f"max |attention logit| is {value}"
            elif value > self.threshold:
                reason = f"{value:.4g} above threshold {self.threshold:g}"
            elif previous is not None and value > self.growth * previous and value > self.min_level:
                threshold = self.growth * previous
                factor = f"{value / previous:.1f}x" if previous > 0 else "from 0"
                reason = f"grew {factor} ({previous:.4g} -> {value:.4g}) above {self.min_level:g}"
            if reason is not None and not self._alarmed[layer]:
                metric = f"attn_logit_max/layer{layer}"
                detections.append(Detection("attn_logit", step, metric, value, threshold, reason))
            hovering = self._alarmed[layer] and math.isfinite(value) and value > self.threshold / 2
            self._alarmed[layer] = reason is not None or hovering
            self._previous[layer] = value if math.isfinite(value) else None
        return detections

    def state_dict(self) -> dict[str, Any]:
        """Previous reading and episode flag per layer."""
        return {"previous": list(self._previous), "alarmed": list(self._alarmed)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what `state_dict` returned."""
        self._previous = [_optional_float(v) for v in state["previous"]]
        self._alarmed = [bool(v) for v in state["alarmed"]]


class OutputLogitDetector:
    """|mean log Z| of the output softmax above `threshold`, once per episode.

    log Z drifting away from 0 is the output-logit divergence that a z-loss (and weight decay)
    prevents. Re-arms once |log Z| is back within the threshold.
    """

    def __init__(self, threshold: float) -> None:
        if threshold <= 0:
            raise ValueError(f"threshold must be > 0, got {threshold}")
        self.threshold = threshold
        self._alarmed = False

    def update(self, step: int, log_z: float) -> Detection | None:
        """Judge one reading of the mean log Z; a Detection when an episode starts."""
        log_z = float(log_z)
        bad = not math.isfinite(log_z) or abs(log_z) > self.threshold
        fire = bad and not self._alarmed
        self._alarmed = bad
        if not fire:
            return None
        detail = f"|mean log Z| {abs(log_z):.4g} > {self.threshold:g}"
        return Detection("output_logit", step, "log_z", log_z, self.threshold, detail)

    def state_dict(self) -> dict[str, Any]:
        """The episode flag."""
        return {"alarmed": self._alarmed}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what `state_dict` returned."""
        self._alarmed = bool(state["alarmed"])


class LossFollows:
    """Makes a grad-norm spike actionable only when the loss follows it.

    On clean runs the grad norm has lone upward outliers that the loss does not notice: one batch
    with an unusually large gradient (under clipping, an update of bounded size), then back to
    normal. In the CPU proxy study every healthy claim-1 run had such grad-norm spikes between
    steps 497 and 1200, at robust z 6-8, with the loss's own robust z below 2 on that step and the
    next ones (docs/divergences.md). A grad-norm spike that matters shows in the loss: a poisoned
    batch at once, a learning rate that is too high within a few steps.

    So a grad-norm spike stays a detection, recorded with its evidence, but an actionable one only
    if the loss's robust z-score (against the loss spike detector's window) exceeds `sigma` on its
    step. Otherwise it is recorded as `actionable=False` and the next `steps` steps wait for the
    loss: the first whose loss z exceeds `sigma` is an actionable `spike` of the loss, its facts
    naming the grad-norm step (a rollback should go back before that step). A loss spike of the
    loss detector's own (6 sigma by default) is actionable by itself and ends the wait; a further
    grad-norm spike while waiting restarts the count but keeps the first step.
    """

    def __init__(self, steps: int, sigma: float) -> None:
        if steps < 0 or sigma <= 0:
            raise ValueError("need steps >= 0 and sigma > 0")
        self.steps = steps
        self.sigma = sigma
        self._since: int | None = None  # the first grad-norm spike still waiting for the loss
        self._left = 0

    def _follows(self, loss_z: float | None) -> bool:
        return loss_z is not None and loss_z > self.sigma

    def update(
        self,
        step: int,
        grad_spike: Detection | None,
        loss_spike: Detection | None,
        loss: float,
        loss_z: float | None,
        loss_bar: float | None,
    ) -> tuple[Detection | None, Detection | None]:
        """This step's grad-norm spike, made record-only unless the loss follows at once, and
        a confirmation when the loss follows an earlier one; `loss_z` and `loss_bar` (the loss
        at `sigma`) are judged against the window before this step's loss joins it."""
        if loss_spike is not None:
            self._since, self._left = None, 0  # actionable by itself
            return grad_spike, None
        if grad_spike is not None:
            if self._follows(loss_z):
                self._since, self._left = None, 0
                return grad_spike, None
            if self.steps:
                self._since = step if self._since is None else self._since
                self._left = self.steps
            detail = (
                f"{grad_spike.detail}; record-only unless the loss's robust z exceeds "
                f"{self.sigma:g} within {self.steps} steps"
            )
            return replace(grad_spike, detail=detail, actionable=False), None
        if self._since is None:
            return None, None
        since = self._since
        self._left -= 1
        if self._left <= 0:
            self._since, self._left = None, 0
        if not self._follows(loss_z):
            return None, None
        self._since, self._left = None, 0
        assert loss_z is not None and loss_bar is not None
        detail = (
            f"loss robust z {loss_z:.1f} > {self.sigma:g}, {step - since} steps after the "
            f"grad-norm spike at step {since}"
        )
        facts = {"grad_norm_step": since}
        return None, Detection("spike", step, "loss", float(loss), loss_bar, detail, facts)

    def state_dict(self) -> dict[str, Any]:
        """The grad-norm spike awaiting the loss (None) and the steps it still waits."""
        return {"since": self._since, "left": self._left}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what `state_dict` returned."""
        self._since = None if state["since"] is None else int(state["since"])
        self._left = int(state["left"])


class DivergenceDetectors:
    """Every detector of a run, fed from the loop's scalars and the logit telemetry."""

    def __init__(
        self,
        nonfinite: NonFiniteDetector,
        loss_spike: SpikeDetector,
        grad_spike: SpikeDetector,
        drift: DriftDetector,
        attn_logit: AttnLogitDetector,
        output_logit: OutputLogitDetector,
        loss_follows: LossFollows | None = None,
    ) -> None:
        self.nonfinite = nonfinite
        self.loss_spike = loss_spike
        self.grad_spike = grad_spike
        self.drift = drift
        self.attn_logit = attn_logit
        self.output_logit = output_logit
        # None: every grad-norm spike is actionable (the detectors as they were before)
        self.loss_follows = loss_follows

    @classmethod
    def from_config(cls, cfg: DivergenceConfig) -> DivergenceDetectors:
        """The detectors `cfg` describes; drift ignores the first `cfg.window` readings."""
        return cls(
            nonfinite=NonFiniteDetector(),
            loss_spike=SpikeDetector("loss", cfg.window, cfg.spike_sigma, cfg.std_floor),
            grad_spike=SpikeDetector(
                "grad_norm",
                cfg.window,
                cfg.grad_spike_sigma,
                std_floor=GRAD_NORM_LOG_FLOOR,
                log_scale=True,
            ),
            drift=DriftDetector(
                cfg.drift_ema, cfg.drift_margin, cfg.drift_steps, warmup_steps=cfg.window
            ),
            attn_logit=AttnLogitDetector(cfg.attn_logit_max, cfg.attn_logit_growth),
            output_logit=OutputLogitDetector(cfg.output_log_z_max),
            loss_follows=LossFollows(cfg.grad_spike_follow_steps, cfg.grad_spike_follow_sigma),
        )

    def update(self, step: int, loss: float, grad_norm: float | None) -> list[Detection]:
        """Detections for one step's loss and grad norm (grad_norm None when not measured)."""
        detections = self.nonfinite.update(step, loss, grad_norm)
        follows = self.loss_follows
        # the loss judged against the window before it joins: what its spike detector sees
        loss_z = self.loss_spike.score(loss)
        loss_bar = None if follows is None else self.loss_spike.bar(follows.sigma)
        loss_spike = self.loss_spike.update(step, loss)
        grad_spike = None if grad_norm is None else self.grad_spike.update(step, grad_norm)
        confirmed = None
        if follows is not None:
            grad_spike, confirmed = follows.update(
                step, grad_spike, loss_spike, loss, loss_z, loss_bar
            )
        for detection in (loss_spike, grad_spike, confirmed, self.drift.update(step, loss)):
            if detection is not None:
                detections.append(detection)
        return detections

    def update_telemetry(
        self, step: int, attn_logit_max: Sequence[float] | None, log_z: float | None
    ) -> list[Detection]:
        """Detections for one telemetry reading; either part may be None when not measured."""
        detections = []
        if attn_logit_max is not None:
            detections += self.attn_logit.update(step, attn_logit_max)
        if log_z is not None and (detection := self.output_logit.update(step, log_z)):
            detections.append(detection)
        return detections

    def state_dict(self) -> dict[str, Any]:
        """Every detector's state as one strict-JSON dict, for the checkpoint."""
        return {
            "version": STATE_VERSION,
            "loss_spike": self.loss_spike.state_dict(),
            "grad_spike": self.grad_spike.state_dict(),
            "drift": self.drift.state_dict(),
            "attn_logit": self.attn_logit.state_dict(),
            "output_logit": self.output_logit.state_dict(),
            "loss_follows": None if self.loss_follows is None else self.loss_follows.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what `state_dict` returned, of this version or an older loadable one."""
        if state.get("version") not in _LOADABLE_VERSIONS:
            raise ValueError(
                f"detector state version {state.get('version')!r} is not one of "
                f"{_LOADABLE_VERSIONS}"
            )
        self.loss_spike.load_state_dict(state["loss_spike"])
        self.grad_spike.load_state_dict(state["grad_spike"])
        self.drift.load_state_dict(state["drift"])
        self.attn_logit.load_state_dict(state["attn_logit"])
        self.output_logit.load_state_dict(state["output_logit"])
        if self.loss_follows is not None:
            waiting = state.get("loss_follows")  # version 1: no grad-norm spike waits
            self.loss_follows.load_state_dict(waiting or {"since": None, "left": 0})


class EvidenceBuffer:
    """The last `steps` steps' metrics, embedded in an event so it explains itself.

    Values are made strict JSON on the way in (non-finite floats become 'nan'/'inf'), so both the
    snapshot and the checkpointed state can be written as they are.
    """

    def __init__(self, steps: int) -> None:
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        self.steps = steps
        self._records: deque[dict[str, Any]] = deque(maxlen=steps)

    def append(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Remember one step's metrics (a copy, under `step`)."""
        values = json_safe(dict(metrics))
        values.pop("step", None)
        self._records.append({"step": int(step), **values})

    def snapshot(self) -> list[dict[str, Any]]:
        """The buffered records, oldest first, as copies the caller may keep."""
        return [json_safe(record) for record in self._records]

    def __len__(self) -> int:
        return len(self._records)

    def state_dict(self) -> dict[str, Any]:
        """The buffered records."""
        return {"records": self.snapshot()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the records; keeps the newest `steps` if the buffer shrank."""
        self._records = deque((json_safe(r) for r in state["records"]), maxlen=self.steps)
