"""The slingshot watch (Thilak et al. 2022): a pure detector of the output layer's norm cycle.

Late in training with adaptive optimizers the last layer's weight norm grows fast, a training-loss
spike follows, then the norm plateaus; the cycle repeats. The detector reads, at each log step,
the relative growth per step of the output-layer norm (`output_norm_growth`, from
`monitor.telemetry`) and the loss, and recognises the whole cycle:

1. growth far above its rolling median: more than `growth_factor` x the median |growth| of the
   last `window` quiet readings (and above `GROWTH_FLOOR`, so a median of ~0 cannot make noise
   look like growth);
2. a loss spike within `window` readings of that start: a robust z-score above `spike_sigma`
   against the losses before the growth began (median/MAD, floored at `std_floor`);
3. growth back near zero within `window` readings of the spike: |growth| at most `settle` x the
   peak growth of the episode.

Only then is it one `slingshot` detection (at the settling step), carrying the cycle's steps and
values. Growth with no spike, or a spike with no growth, is not a slingshot; the episode is
dropped once its window runs out, and its readings (quiet after all) join the rolling windows
then. Readings of a cycle never do, and the `window` readings after a detection (the plateau)
are neither judged nor added: a still norm would make ordinary growth look "far above" it.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from monitor.detectors import MAD_TO_STD, Detection, _median

if TYPE_CHECKING:
    from monitor.config import DivergenceConfig

# Relative growth per step below which the norm counts as still, whatever the median says.
GROWTH_FLOOR = 1e-5


class SlingshotDetector:
    """Growth far above its rolling median, then a loss spike, then growth back near zero."""

    def __init__(
        self,
        growth_factor: float,
        window: int,
        settle: float,
        spike_sigma: float,
        std_floor: float,
    ) -> None:
        if growth_factor <= 1 or window < 4 or not 0 < settle < 1 or spike_sigma <= 0:
            raise ValueError("need growth_factor > 1, window >= 4, 0 < settle < 1, spike_sigma > 0")
        self.growth_factor = growth_factor
        self.window = window
        self.settle = settle
        self.spike_sigma = spike_sigma
        self.std_floor = std_floor
        self._growth: deque[float] = deque(maxlen=window)
        self._loss: deque[float] = deque(maxlen=window)
        self._episode: dict[str, Any] | None = None
        self._cooldown = 0

    @classmethod
    def from_config(cls, cfg: DivergenceConfig) -> SlingshotDetector:
        """The detector `cfg` describes; the loss spike takes the spike detector's sigma, floor."""
        return cls(
            cfg.slingshot_growth_factor,
            cfg.slingshot_window,
            cfg.slingshot_settle,
            cfg.spike_sigma,
            cfg.std_floor,
        )

    def update(self, step: int, growth: float | None, loss: float | None) -> Detection | None:
        """Judge one log-step reading; a Detection when a whole cycle has been seen."""
        if growth is None or loss is None or not (math.isfinite(growth) and math.isfinite(loss)):
            return None
        if self._cooldown > 0:
            self._cooldown -= 1
            return None
        if self._episode is None:
            self._maybe_start(step, growth, loss)
            return None
        return self._advance(step, growth, loss)

    def _maybe_start(self, step: int, growth: float, loss: float) -> None:
        if len(self._growth) == self.window and len(self._loss) == self.window:
            median = _median(sorted(self._growth))
            bar = max(self.growth_factor * median, GROWTH_FLOOR)
            if growth > bar:
                losses = sorted(self._loss)
                center = _median(losses)
                mad = _median(sorted(abs(v - center) for v in losses))
                self._episode = {
                    "start_step": step,
                    "readings": 1,
                    "median_growth": median,
                    "threshold": bar,
                    "peak_growth": growth,
                    "peak_step": step,
                    "loss_median": center,
                    "loss_scale": max(MAD_TO_STD * mad, self.std_floor, 1e-12),
                    "spike_step": None,
                    "spike_loss": None,
                    "since_spike": 0,
                    "readings_seen": [[growth, loss]],
                }
                return
        self._growth.append(abs(growth))
        self._loss.append(loss)

    def _advance(self, step: int, growth: float, loss: float) -> Detection | None:
        e = self._episode
        assert e is not None
        e["readings"] += 1
        e["readings_seen"].append([growth, loss])
        if growth > e["peak_growth"]:
            e["peak_growth"], e["peak_step"] = growth, step
        if e["spike_step"] is None:
            z = (loss - e["loss_median"]) / e["loss_scale"]
            if z > self.spike_sigma:
                e["spike_step"], e["spike_loss"], e["spike_z"] = step, loss, z
            elif e["readings"] > self.window:  # growth without a spike: not a slingshot
                self._episode = None
                for quiet_growth, quiet_loss in e["readings_seen"]:
                    self._growth.append(abs(quiet_growth))
                    self._loss.append(quiet_loss)
            return None
        e["since_spike"] += 1
        if abs(growth) <= self.settle * e["peak_growth"]:
            self._episode, self._cooldown = None, self.window
            return self._detection(step, growth, e)
        if e["since_spike"] > self.window:
            self._episode = None  # the norm never settled: not this cycle
        return None

    def _detection(self, step: int, growth: float, e: Mapping[str, Any]) -> Detection:
        detail = (
            f"output-norm growth {e['peak_growth']:.3g}/step at step {e['peak_step']} "
            f"(> {self.growth_factor:g}x its rolling median {e['median_growth']:.3g}, from step "
            f"{e['start_step']}), loss spike {e['spike_loss']:.4g} at step {e['spike_step']} "
            f"(robust z {e['spike_z']:.1f} > {self.spike_sigma:g} over median "
            f"{e['loss_median']:.4g}), growth back to {growth:.3g}/step at step {step}"
        )
        cycle = {
            "growth_start_step": e["start_step"],
            "peak_growth": e["peak_growth"],
            "peak_step": e["peak_step"],
            "median_growth": e["median_growth"],
            "spike_step": e["spike_step"],
            "spike_loss": e["spike_loss"],
            "loss_median": e["loss_median"],
            "settle_step": step,
            "settle_growth": growth,
        }
        return Detection(
            "slingshot",
            step,
            "output_norm_growth",
            e["peak_growth"],
            e["threshold"],
            detail,
            cycle,
        )

    def state_dict(self) -> dict[str, Any]:
        """The quiet windows and the open episode, strict JSON."""
        return {
            "growth": list(self._growth),
            "loss": list(self._loss),
            "episode": None if self._episode is None else dict(self._episode),
            "cooldown": self._cooldown,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what `state_dict` returned."""
        self._growth = deque((float(v) for v in state["growth"]), maxlen=self.window)
        self._loss = deque((float(v) for v in state["loss"]), maxlen=self.window)
        self._episode = None if state["episode"] is None else dict(state["episode"])
        self._cooldown = int(state["cooldown"])
