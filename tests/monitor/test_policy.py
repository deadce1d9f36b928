"""The divergence policy's action table, rollback counting, and DivergenceError."""

import math
import pickle

import pytest

import configs  # noqa: F401  (import first: monitor.config and configs.schema import each other)
from monitor.config import DivergenceConfig
from monitor.detectors import Detection
from monitor.divergence import DivergenceWatch
from monitor.policy import Action, DivergenceError, DivergencePolicy

LOSS_SPIKE = Detection("spike", 10, "loss", 9.0, 4.0, "robust z 30 > 6")
GRAD_SPIKE = Detection("spike", 10, "grad_norm", 9.0, 1.0, "robust z 12 > 6")
NAN_LOSS = Detection("nonfinite", 10, "loss", math.nan, math.inf, "loss is nan")
INF_GRAD = Detection("nonfinite", 10, "grad_norm", math.inf, math.inf, "grad_norm is inf")
DRIFT = Detection("drift", 10, "loss_ema", 4.0, 3.5, "above minimum")
ATTN = Detection("attn_logit", 10, "attn_logit_max/layer0", 2e3, 1e3, "above threshold")
LOG_Z = Detection("output_logit", 10, "log_z", 60.0, 50.0, "|log Z| 60 > 50")
ALL = [LOSS_SPIKE, GRAD_SPIKE, NAN_LOSS, INF_GRAD, DRIFT, ATTN, LOG_Z]

ACTION_TABLE = {
    # policy: expected action for each of ALL, in order
    "record": [Action.RECORD] * 7,
    "skip": [Action.SKIP] * 4 + [Action.RECORD] * 3,
    "stop": [Action.STOP] * 7,
}


def policy(name: str, max_rollbacks: int = 3) -> DivergencePolicy:
    return DivergencePolicy.from_config(DivergenceConfig(policy=name, max_rollbacks=max_rollbacks))


@pytest.mark.parametrize("name", ["record", "skip", "rollback", "stop"])
def test_no_detection_means_record(name):
    assert policy(name).decide([]) is Action.RECORD


@pytest.mark.parametrize("name", sorted(ACTION_TABLE))
def test_action_table(name):
    actions = [policy(name).decide([detection]) for detection in ALL]
    assert actions == ACTION_TABLE[name]


def test_skip_wins_when_a_skippable_detection_comes_with_others():
    assert policy("skip").decide([DRIFT, GRAD_SPIKE]) is Action.SKIP
    assert policy("skip").decide([DRIFT, ATTN, LOG_Z]) is Action.RECORD


@pytest.mark.parametrize("detection", ALL, ids=lambda d: f"{d.kind}-{d.metric}")
def test_rollback_on_any_detection(detection):
    assert policy("rollback").decide([detection]) is Action.ROLLBACK


def test_rollbacks_are_counted_until_stop_and_the_count_survives_a_restore():
    rollback = policy("rollback", max_rollbacks=2)
    assert rollback.decide([LOSS_SPIKE]) is Action.ROLLBACK
    assert rollback.decide([]) is Action.RECORD  # quiet steps do not count
    assert rollback.decide([DRIFT, ATTN]) is Action.ROLLBACK  # one rollback per step
    assert rollback.num_rollbacks == 2
    restored = policy("rollback", max_rollbacks=2)
    restored.load_state_dict(rollback.state_dict())
    assert restored.decide([NAN_LOSS]) is Action.STOP
    assert policy("rollback", max_rollbacks=0).decide([LOG_Z]) is Action.STOP


QUIET_GRAD_SPIKE = Detection(
    "spike", 10, "grad_norm", 9.0, 1.0, "robust z 12 > 6; record-only", actionable=False
)


@pytest.mark.parametrize("name", ["record", "skip", "rollback", "stop"])
def test_record_only_detections_are_never_acted_on(name):
    assert policy(name).decide([QUIET_GRAD_SPIKE]) is Action.RECORD
    rollback = policy("rollback", max_rollbacks=1)
    assert rollback.decide([QUIET_GRAD_SPIKE, QUIET_GRAD_SPIKE]) is Action.RECORD
    assert rollback.num_rollbacks == 0  # not counted either
    # with an actionable detection beside it, the policy acts as on that one alone
    assert policy(name).decide([QUIET_GRAD_SPIKE, DRIFT]) is policy(name).decide([DRIFT])


def test_watch_records_a_quiet_grad_spike_and_rolls_back_to_it_when_the_loss_follows():
    """A grad-norm spike the loss does not follow is an event but no action; when the loss
    follows, the rollback's target is the step before the grad-norm spike, not the loss's."""
    events = []
    cfg = DivergenceConfig(policy="rollback", window=8)
    watch = DivergenceWatch(cfg, events.append)
    for step in range(1, 9):  # fill the windows: loss ~3, grad norm ~0.5
        assert not watch.veto(step, 3.0 + 0.01 * (step % 3), 0.5 + 0.01 * (step % 2))
    assert not watch.veto(9, 3.0, 5.0)  # grad norm x10, the loss unmoved
    assert watch.take_pending() is Action.RECORD
    assert [(e["step"], e["metric"], e["actionable"]) for e in events] == [(9, "grad_norm", False)]
    # counted apart: no divergence yet, so nothing to pin or roll back to
    assert (watch.count, watch.record_only, watch.first_detection_step) == (0, 1, None)
    assert watch.veto(11, 3.2, 0.5)  # loss z 3.8 > 3 (median 3.01, std floored at 0.05), < 6
    assert watch.take_pending() is Action.ROLLBACK
    assert [(e["step"], e["metric"], e["actionable"]) for e in events[1:]] == [(11, "loss", True)]
    assert events[1]["facts"] == {"grad_norm_step": 9}
    # the divergence began at the grad-norm spike: the run's first, and the rollback's target
    assert (watch.count, watch.record_only) == (1, 1)
    assert watch.first_detection_step == watch.last_detection_step == 9
    restored = DivergenceWatch(cfg, events.append)
    restored.load_state_dict(watch.state_dict())
    assert (restored.count, restored.record_only, restored.first_detection_step) == (1, 1, 9)


def test_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="policy"):
        DivergencePolicy("ignore", 3)  # type: ignore[arg-type]


def test_divergence_error_carries_the_detection_and_its_evidence():
    evidence = [{"step": s, "loss": 3.0} for s in range(5, 10)]
    error = DivergenceError.from_detection(LOSS_SPIKE, evidence)
    assert isinstance(error, RuntimeError)
    assert (error.step, error.kind, error.metric) == (10, "spike", "loss")
    assert (error.value, error.threshold, error.detail) == (9.0, 4.0, "robust z 30 > 6")
    assert error.evidence == evidence and error.evidence is not evidence
    text = str(error)
    assert "step 10" in text and "spike of loss" in text and "threshold 4" in text
    assert "5 steps, 5..9" in text

    copy = pickle.loads(pickle.dumps(error))
    assert (copy.step, copy.evidence, str(copy)) == (10, evidence, text)
    assert "nan" in str(DivergenceError.from_detection(NAN_LOSS))
