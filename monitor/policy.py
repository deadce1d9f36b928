"""The one divergence policy: maps a step's detections to what the loop does next; pure.

Recording always happens; the policy only decides what comes on top. The loop carries the action
out (withhold the update, restore a checkpoint, raise `DivergenceError`) and writes the events.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Literal, get_args

from monitor.detectors import Detection

if TYPE_CHECKING:
    from monitor.config import DivergenceConfig

PolicyName = Literal["record", "skip", "rollback", "stop", "heal"]

# Detections a skipped step undoes: the outlier is this step's batch and its update, so not
# applying that update removes it. Drift, attention-logit and output-logit growth build up over
# many steps in the weights themselves; withholding one update cannot undo them.
_SKIPPABLE_KINDS = frozenset({"spike", "nonfinite"})
_SKIPPABLE_METRICS = frozenset({"loss", "grad_norm"})


class Action(StrEnum):
    """What the loop does after a step's detections have been recorded.

    RECORD: train on. For a non-finite loss or grad norm this means "recorded, the update was
    withheld by the loop's finiteness guard (it is never applied), training continues".
    SKIP: do not apply this step's update and move past its data.
    ROLLBACK: restore the last good checkpoint and skip the batches after it.
    STOP: end the run with `DivergenceError`.
    """

    RECORD = "record"
    SKIP = "skip"
    ROLLBACK = "rollback"
    STOP = "stop"


def _skippable(detection: Detection) -> bool:
    return detection.kind in _SKIPPABLE_KINDS and detection.metric in _SKIPPABLE_METRICS


class DivergencePolicy:
    """Maps detections to an `Action` under one of the four policies.

    - record: RECORD, always.
    - skip: SKIP when a loss or grad-norm spike or non-finite value is among the detections,
      else RECORD (drift and logit growth cannot be undone by skipping one step).
    - rollback: ROLLBACK on any detection, at most `max_rollbacks` times, then STOP.
    - stop: STOP on any detection.
    - heal: STOP on any detection, as stop does: the diagnosis and the remedy need the run's
      files closed and replay from its kept checkpoint (`heal.run` acts after the stop).

    The rollback count must outlive the rollback itself: restore the detectors from the
    checkpoint, but not this policy, or a run that keeps diverging would roll back forever.
    """

    def __init__(self, policy: PolicyName, max_rollbacks: int) -> None:
        if policy not in get_args(PolicyName):
            raise ValueError(f"unknown divergence policy {policy!r}")
        if max_rollbacks < 0:
            raise ValueError(f"max_rollbacks must be >= 0, got {max_rollbacks}")
        self.policy = policy
        self.max_rollbacks = max_rollbacks
        self.num_rollbacks = 0

    @classmethod
    def from_config(cls, cfg: DivergenceConfig) -> DivergencePolicy:
        """The policy `cfg.policy` with `cfg.max_rollbacks`."""
        return cls(cfg.policy, cfg.max_rollbacks)

    def decide(self, detections: Sequence[Detection]) -> Action:
        """The action for one step's detections; RECORD when there are none.

        Under 'rollback' a ROLLBACK answer counts as one rollback taken. Record-only detections
        (`actionable` False: sensitive ones that clean runs have too) are recorded, never acted on.
        """
        detections = [d for d in detections if d.actionable]
        if not detections or self.policy == "record":
            return Action.RECORD
        if self.policy == "skip":
            return Action.SKIP if any(_skippable(d) for d in detections) else Action.RECORD
        if self.policy == "rollback":
            if self.num_rollbacks >= self.max_rollbacks:
                return Action.STOP
            self.num_rollbacks += 1
            return Action.ROLLBACK
        return Action.STOP

    def state_dict(self) -> dict[str, Any]:
        """The rollback count."""
        return {"num_rollbacks": self.num_rollbacks}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what `state_dict` returned."""
        self.num_rollbacks = int(state["num_rollbacks"])


class DivergenceError(RuntimeError):
    """A run stopped for divergence; carries the detection and the evidence window.

    The constructor's arguments are kept in `args`, so the error pickles (a SLURM launcher ships
    it back to the submitting process).
    """

    def __init__(
        self,
        step: int,
        kind: str,
        metric: str,
        value: float,
        threshold: float,
        evidence: Sequence[Mapping[str, Any]] = (),
        detail: str = "",
    ) -> None:
        evidence = [dict(record) for record in evidence]
        super().__init__(step, kind, metric, value, threshold, evidence, detail)
        self.step = step
        self.kind = kind
        self.metric = metric
        self.value = value
        self.threshold = threshold
        self.evidence = evidence
        self.detail = detail

    @classmethod
    def from_detection(
        cls, detection: Detection, evidence: Sequence[Mapping[str, Any]] = ()
    ) -> DivergenceError:
        """The error for `detection`, with the evidence window of the steps before it."""
        d = detection
        return cls(d.step, d.kind, d.metric, d.value, d.threshold, evidence, d.detail)

    def __str__(self) -> str:
        text = (
            f"divergence at step {self.step}: {self.kind} of {self.metric} = {self.value:.6g} "
            f"(threshold {self.threshold:.6g})"
        )
        if self.detail:
            text += f": {self.detail}"
        if self.evidence:
            steps = [record.get("step") for record in self.evidence]
            text += f" [evidence: {len(self.evidence)} steps, {steps[0]}..{steps[-1]}]"
        return text
