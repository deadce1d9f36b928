"""The divergence watch: detectors plus policy, fed by the update gate every step.

The gate hands over each step's loss and pre-clip grad norm before the update is applied; the
watch records detections as events (with the evidence window) and answers whether the update
may go ahead. Actions that need the loop (rollback, stop) are left in `pending` for it.

Evidence holds one record per step: the gate's loss and grad norm, merged with that step's
telemetry line when it is a log step, so `evidence_steps` records cover that many steps.
"""

import time
from collections.abc import Callable
from typing import Any

from monitor.config import DivergenceConfig
from monitor.detectors import Detection, DivergenceDetectors, EvidenceBuffer
from monitor.policy import Action, DivergencePolicy
from monitor.slingshot import SlingshotDetector


class DivergenceWatch:
    """Runs the detectors on every step and applies the configured policy."""

    def __init__(self, cfg: DivergenceConfig, emit: Callable[[dict[str, Any]], None]):
        self.detectors = DivergenceDetectors.from_config(cfg)
        self.slingshot = SlingshotDetector.from_config(cfg)
        self.policy = DivergencePolicy.from_config(cfg)
        self.evidence = EvidenceBuffer(cfg.evidence_steps)
        self.emit = emit
        self.enabled = cfg.enabled
        # this step's gate reading, held until its telemetry (if any) joins it in the evidence
        self._open: tuple[int, dict[str, Any]] | None = None
        self.pending: Action = Action.RECORD
        # the actionable detections only (`count`, and where the first and the last began); the
        # record-only ones are counted apart: they fire on healthy runs too
        self.first_detection_step: int | None = None
        self.last_detection_step: int | None = None
        self.count = 0
        self.record_only = 0
        self.last_detections: list[Detection] = []

    def veto(self, step: int, loss: float, grad_norm: float) -> bool:
        """The gate's question: withhold the update of `step`? (Non-finite is withheld anyway.)"""
        if not self.enabled:
            return False
        self._close()
        self._open = (step, {"loss": loss, "grad_norm": grad_norm})
        return self._act(self.detectors.update(step, loss, grad_norm)) != Action.RECORD

    def observe_telemetry(self, step: int, line: dict[str, Any]) -> None:
        """Log-step readings (attention logits, log Z); acted on after the update."""
        if not self.enabled:
            return
        if self._open is not None and self._open[0] == step:
            self._open[1].update(line)
        else:
            self._close()
            self._open = (step, dict(line))
        detections = self.detectors.update_telemetry(
            step, line.get("attn_logit_max/layers"), line.get("log_z")
        )
        slingshot = self.slingshot.update(step, line.get("output_norm_growth"), line.get("loss"))
        self._act(detections + ([slingshot] if slingshot else []))

    def _close(self) -> None:
        """Move the held step's record into the evidence buffer."""
        if self._open is not None:
            self.evidence.append(*self._open)
            self._open = None

    def _evidence(self) -> list[dict[str, Any]]:
        """The buffered steps plus the one still held: the window up to the current step."""
        if self._open is None:
            return self.evidence.snapshot()
        # a throwaway buffer, so the held record stays open for its telemetry
        window = EvidenceBuffer(self.evidence.steps)
        window.load_state_dict(self.evidence.state_dict())
        window.append(*self._open)
        return window.snapshot()

    def _act(self, detections: list[Detection]) -> Action:
        self.last_detections = detections
        if not detections:
            return Action.RECORD
        acted = [d for d in detections if d.actionable]
        self.count += len(acted)
        self.record_only += len(detections) - len(acted)
        if acted:
            began = min(d.began for d in acted)
            if self.first_detection_step is None:
                self.first_detection_step = began
            self.last_detection_step = began
        evidence = self._evidence()
        for detection in detections:
            self.emit({**detection.to_event(), "time": time.time(), "evidence": evidence})
        action = self.policy.decide(detections)
        if action in (Action.ROLLBACK, Action.STOP):
            self.pending = action
        return action

    def take_pending(self) -> Action:
        """The rollback or stop a detection asked for since the last call (RECORD if none)."""
        action, self.pending = self.pending, Action.RECORD
        return action

    def state_dict(self) -> dict[str, Any]:
        """Detector windows, rollback count, evidence and counters, for the checkpoint."""
        self._close()  # a checkpoint comes after the step's telemetry: the record is complete
        return {
            "detectors": self.detectors.state_dict(),
            "slingshot": self.slingshot.state_dict(),
            "policy": self.policy.state_dict(),
            "evidence": self.evidence.state_dict(),
            "count": self.count,
            "record_only": self.record_only,
            "first_detection_step": self.first_detection_step,
        }

    def load_state_dict(self, state: dict[str, Any], keep_counts: bool = False) -> None:
        """Restore the detectors' windows; after a rollback (`keep_counts`) the policy's rollback
        count and the detection counters stay live, so `max_rollbacks` is reached."""
        self.detectors.load_state_dict(state["detectors"])
        if "slingshot" in state:  # checkpoints from before the slingshot watch have none
            self.slingshot.load_state_dict(state["slingshot"])
        self.evidence.load_state_dict(state["evidence"])
        self._open = None
        if keep_counts:
            return
        self.policy.load_state_dict(state["policy"])
        self.count = state["count"]
        self.record_only = state.get("record_only", 0)  # checkpoints from before the count
        self.first_detection_step = state["first_detection_step"]
