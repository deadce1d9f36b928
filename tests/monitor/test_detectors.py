"""The pure detectors against synthetic, seeded training curves: no false alarms, no misses."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

import configs  # noqa: F401  (import first: monitor.config and configs.schema import each other)
from monitor.config import DivergenceConfig
from monitor.detectors import (
    AttnLogitDetector,
    Detection,
    DivergenceDetectors,
    DriftDetector,
    EvidenceBuffer,
    LossFollows,
    OutputLogitDetector,
    SpikeDetector,
)

NUM_STEPS = 2000
CFG = DivergenceConfig()
# Steps 1-700 of a real clean run, every step's loss and pre-clip grad norm: claim 1's CPU proxy
# (configs/sweeps/stream_wd.yaml) at weight decay 0.1, seed 3, fp32, logged every step.
CLEAN_RUN = Path(__file__).parent / "data" / "clean_stream_wd0.1-s3.csv"


def training_curve(seed: int, drift_from: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A loss falling like a real run's (fast, then slowly) with batch noise, and a grad norm
    that shrinks early with multiplicative noise; optionally the loss climbs 0.002/step."""
    rng = np.random.default_rng(seed)
    t = np.arange(NUM_STEPS)
    loss = 3.3 + 2.5 * np.exp(-t / 250) + 0.3 * np.exp(-t / 2000) + rng.normal(0, 0.05, NUM_STEPS)
    if drift_from is not None:
        loss += 0.002 * np.clip(t - drift_from, 0, None)
    grad_norm = (0.25 + 1.5 * np.exp(-t / 150)) * np.exp(rng.normal(0, 0.1, NUM_STEPS))
    return loss, grad_norm


def lift(loss: np.ndarray, step: int, nats: float = 0.22) -> None:
    """Set the loss at `step` to `nats` above the median of the window before it: robust z
    ~4 on these curves (std 0.05), between the follow bar (3) and the spike bar (6)."""
    loss[step] = float(np.median(loss[step - CFG.window : step])) + nats


def run(detectors: DivergenceDetectors, loss, grad_norm, start: int = 0) -> list[Detection]:
    detections = []
    for step in range(start, len(loss)):
        detections += detectors.update(step, float(loss[step]), float(grad_norm[step]))
    return detections


def expected_threshold(values: np.ndarray, sigma: float, std_floor: float, rel: float) -> float:
    """The spike threshold recomputed independently with numpy."""
    median = float(np.median(values))
    scale = max(1.4826 * float(np.median(np.abs(values - median))), std_floor, rel * abs(median))
    return median + sigma * scale


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_healthy_run_raises_no_alarm(seed):
    detectors = DivergenceDetectors.from_config(CFG)
    loss, grad_norm = training_curve(seed)
    assert run(detectors, loss, grad_norm) == []
    # healthy telemetry: modest attention logits in 12 layers, log Z near 0
    rng = np.random.default_rng(seed)
    for step in range(0, NUM_STEPS, 10):
        attn = (20 * np.exp(rng.normal(0, 0.3, 12))).tolist()
        assert detectors.update_telemetry(step, attn, float(rng.normal(0, 2))) == []


def test_one_loss_spike_is_flagged_once_with_its_value_and_threshold():
    loss, grad_norm = training_curve(0)
    k = 1000
    loss[k] += 1.0
    detections = run(DivergenceDetectors.from_config(CFG), loss, grad_norm)
    assert len(detections) == 1
    (spike,) = detections
    assert (spike.kind, spike.step, spike.metric) == ("spike", k, "loss")
    assert spike.value == pytest.approx(loss[k])
    window = loss[k - CFG.window : k]
    assert spike.threshold == pytest.approx(
        expected_threshold(window, CFG.spike_sigma, CFG.std_floor, 0.0)
    )
    assert spike.value > spike.threshold


def test_grad_norm_spike_is_flagged_once():
    loss, grad_norm = training_curve(1)
    k = 1500
    grad_norm[k] *= 5
    detections = run(DivergenceDetectors.from_config(CFG), loss, grad_norm)
    assert [(d.kind, d.step, d.metric) for d in detections] == [("spike", k, "grad_norm")]
    # judged on log(grad norm): the threshold is exp of the log-space threshold
    window = np.log(grad_norm[k - CFG.window : k])
    assert detections[0].threshold == pytest.approx(
        np.exp(expected_threshold(window, CFG.grad_spike_sigma, np.log(1.05), 0.0))
    )
    # the loss did not follow: recorded, not for a policy to act on
    assert not detections[0].actionable
    assert detections[0].to_event()["actionable"] is False


def test_grad_norm_spike_that_the_loss_follows_is_actionable():
    loss, grad_norm = training_curve(1)
    k = 1500
    grad_norm[k] *= 5
    lift(loss, k + 2)
    detections = run(DivergenceDetectors.from_config(CFG), loss, grad_norm)
    assert [(d.step, d.metric, d.actionable) for d in detections] == [
        (k, "grad_norm", False),
        (k + 2, "loss", True),
    ]
    follow = detections[1]
    assert follow.kind == "spike" and follow.facts == {"grad_norm_step": k}
    assert follow.value == pytest.approx(loss[k + 2]) and follow.value > follow.threshold
    window = loss[k + 2 - CFG.window : k + 2]
    assert follow.threshold == pytest.approx(
        expected_threshold(window, CFG.grad_spike_follow_sigma, CFG.std_floor, 0.0)
    )
    # the same rise after the wait (4 steps) is no longer the grad-norm spike's
    loss, grad_norm = training_curve(1)
    grad_norm[k] *= 5
    lift(loss, k + CFG.grad_spike_follow_steps + 1)
    detections = run(DivergenceDetectors.from_config(CFG), loss, grad_norm)
    assert [(d.step, d.actionable) for d in detections] == [(k, False)]


def test_grad_norm_spike_with_the_loss_up_on_its_own_step_is_actionable():
    loss, grad_norm = training_curve(1)
    k = 1500
    grad_norm[k] *= 5
    lift(loss, k)  # above the follow bar (3 sigma), under the loss spike's (6 sigma)
    detections = run(DivergenceDetectors.from_config(CFG), loss, grad_norm)
    assert [(d.step, d.metric, d.actionable) for d in detections] == [(k, "grad_norm", True)]


def test_loss_follows_without_a_wait():
    """steps=0: only a loss up on the grad-norm spike's own step makes it actionable."""
    follows = LossFollows(steps=0, sigma=3.0)
    spike = Detection("spike", 10, "grad_norm", 5.0, 1.0, "z 9 > 6")
    grad, confirmed = follows.update(10, spike, None, 3.0, 0.5, 3.3)
    assert grad is not None and not grad.actionable and confirmed is None
    assert follows.update(11, None, None, 9.0, 50.0, 3.3) == (None, None)
    assert follows.update(12, spike, None, 9.0, 50.0, 3.3) == (spike, None)
    with pytest.raises(ValueError):
        LossFollows(steps=-1, sigma=3.0)


def test_log_normal_grad_noise_raises_no_alarm():
    """Small-batch grad norms are heavy-tailed; judged in log space their upper tail is normal."""
    rng = np.random.default_rng(7)
    grad_norm = np.exp(rng.normal(0.0, 0.4, 20_000))
    detector = DivergenceDetectors.from_config(CFG).grad_spike
    flagged = [s for s, g in enumerate(grad_norm) if detector.update(s, float(g))]
    assert flagged == []


def test_flagged_values_stay_out_of_the_window():
    detector = SpikeDetector("loss", window=32, sigma=6.0, std_floor=0.05)
    rng = np.random.default_rng(3)
    for step, value in enumerate(3.0 + rng.normal(0, 0.02, 32)):
        assert detector.update(step, float(value)) is None
    before = detector.state_dict()
    flagged = [detector.update(32 + i, 9.0) for i in range(40)]  # a run longer than the window
    assert all(d is not None and d.kind == "spike" for d in flagged)
    assert detector.state_dict() == before
    assert detector.update(72, -5.0) is None  # downward moves are not spikes


def test_no_verdict_until_the_window_is_full():
    detector = SpikeDetector("loss", window=16, sigma=6.0, std_floor=0.05)
    for step in range(16):
        assert not detector.ready
        assert detector.score(1e9) is None
        assert detector.update(step, 3.0 + 0.01 * (step % 3)) is None
    assert detector.ready
    assert detector.score(1e9) > 6.0
    assert detector.update(16, 1e9) is not None


def test_nan_and_inf_are_nonfinite_detections_and_do_not_poison_the_windows():
    loss, grad_norm = training_curve(2)
    loss[700] = math.nan
    grad_norm[900] = math.inf
    loss[1200] += 1.0  # a later spike is still judged against a clean window
    detections = run(DivergenceDetectors.from_config(CFG), loss, grad_norm)
    assert [(d.kind, d.step, d.metric) for d in detections] == [
        ("nonfinite", 700, "loss"),
        ("nonfinite", 900, "grad_norm"),
        ("spike", 1200, "loss"),
    ]
    events = [d.to_event() for d in detections]
    assert events[0]["value"] == "nan" and events[1]["value"] == "inf"
    json.dumps(events, allow_nan=False)


def test_to_event_has_exactly_the_event_fields():
    event = Detection("spike", 7, "loss", 5.5, 4.0, "z 9 > 6").to_event()
    assert event == {
        "step": 7,
        "kind": "spike",
        "metric": "loss",
        "value": 5.5,
        "threshold": 4.0,
        "detail": "z 9 > 6",
        "actionable": True,
    }
    assert Detection("nonfinite", 1, "loss", -math.inf, math.inf, "").to_event()["value"] == "-inf"
    with pytest.raises(ValueError):
        Detection("explosion", 1, "loss", 1.0, 1.0, "")


def test_slow_drift_is_detected_within_a_bounded_delay_and_only_once():
    for seed in range(3):
        loss, grad_norm = training_curve(seed, drift_from=600)
        drifts = [d for d in run(DivergenceDetectors.from_config(CFG), loss, grad_norm)]
        drifts = [d for d in drifts if d.kind == "drift"]
        # 0.5 margin at 0.002/step is 250 steps, plus the EMA's lag (~50) and the noise
        assert len(drifts) == 1
        assert 600 < drifts[0].step <= 1100
        assert drifts[0].metric == "loss_ema"
        assert drifts[0].value > drifts[0].threshold


def test_drift_fires_once_per_episode_and_rearms():
    detector = DriftDetector(ema=0.98, margin=0.5, sustained_steps=50, warmup_steps=100)
    curve = (
        [3.0] * 300
        + list(np.linspace(3.0, 4.0, 100))
        + [4.0] * 300
        + [3.0] * 400
        + list(np.linspace(3.0, 4.0, 100))
        + [4.0] * 300
    )
    fired = [step for step, loss in enumerate(curve) if detector.update(step, float(loss))]
    assert len(fired) == 2
    assert 300 < fired[0] < 700 and 1100 < fired[1] < 1500


@pytest.mark.parametrize("warmup_steps", [0, 100])
def test_drift_ignores_the_warmup(warmup_steps):
    detector = DriftDetector(ema=0.98, margin=0.5, sustained_steps=5, warmup_steps=warmup_steps)
    # an early transient (a climb, then back down) inside the warmup is not judged
    curve = [3.0 + 0.05 * step for step in range(100)] + [3.0] * 400
    fired = [step for step, loss in enumerate(curve) if detector.update(step, loss)]
    assert fired == ([] if warmup_steps else [5])


def test_attention_logits_growing_10x_or_above_threshold():
    detector = AttnLogitDetector(threshold=1000.0, growth=10.0)
    base = [20.0] * 12

    def reading(step, **layers):
        values = list(base)
        for name, value in layers.items():
            values[int(name.removeprefix("layer"))] = value
        return detector.update(step, values)

    assert reading(0, layer0=0.5, layer3=50.0) == []
    assert reading(1, layer0=20.0, layer3=50.0) == []  # 40x growth of a tiny value is not alarming
    (grown,) = reading(2, layer3=600.0)  # 12x from 50, above threshold/10
    assert (grown.kind, grown.metric, grown.step) == ("attn_logit", "attn_logit_max/layer3", 2)
    assert grown.threshold == pytest.approx(500.0)
    assert reading(3, layer3=1500.0) == []  # same episode, even past the threshold
    assert reading(4, layer3=40.0) == []  # back under: re-armed
    (both,) = reading(5, layer3=1200.0)  # above threshold and 30x: one detection
    assert both.value == 1200.0 and both.threshold == 1000.0
    (bad,) = reading(6, layer3=1200.0, layer7=math.nan)
    assert bad.metric == "attn_logit_max/layer7" and bad.to_event()["value"] == "nan"


def test_log_z_beyond_threshold_fires_once_per_episode():
    detector = OutputLogitDetector(threshold=50.0)
    readings = [1.0, -3.0, 60.0, 70.0, 10.0, -55.0, math.inf, 2.0]
    fired = [(s, d.value) for s, z in enumerate(readings) if (d := detector.update(s, z))]
    assert fired == [(2, 60.0), (5, -55.0)]


def test_restored_detectors_flag_the_same_spikes_as_an_uninterrupted_run():
    loss, grad_norm = training_curve(4)
    loss[750] += 1.0
    grad_norm[1300] *= 5
    uninterrupted = DivergenceDetectors.from_config(CFG)
    expected = run(uninterrupted, loss, grad_norm)
    assert [(d.step, d.metric) for d in expected] == [(750, "loss"), (1300, "grad_norm")]

    for resume_at in (60, 700):  # window still filling, and full
        first = DivergenceDetectors.from_config(CFG)
        before = run(first, loss[:resume_at], grad_norm[:resume_at])
        first.update_telemetry(resume_at - 1, [20.0, 600.0], 3.0)
        state = json.loads(json.dumps(first.state_dict(), allow_nan=False))
        resumed = DivergenceDetectors.from_config(CFG)
        resumed.load_state_dict(state)
        assert resumed.state_dict() == first.state_dict()
        assert before + run(resumed, loss, grad_norm, start=resume_at) == expected

    # without the state, a resumed run is blind while its windows refill
    fresh = DivergenceDetectors.from_config(CFG)
    assert run(fresh, loss, grad_norm, start=700)[0].step == 1300


def test_state_of_a_wrong_version_is_refused():
    detectors = DivergenceDetectors.from_config(CFG)
    state = detectors.state_dict() | {"version": 0}
    with pytest.raises(ValueError, match="version"):
        detectors.load_state_dict(state)


def test_a_wait_for_the_loss_survives_a_resume_and_version_1_states_load():
    loss, grad_norm = training_curve(5)
    grad_norm[800] *= 5
    lift(loss, 803)
    expected = run(DivergenceDetectors.from_config(CFG), loss, grad_norm)
    assert [(d.step, d.actionable) for d in expected] == [(800, False), (803, True)]
    first = DivergenceDetectors.from_config(CFG)
    before = run(first, loss[:802], grad_norm[:802])  # resumed while the spike waits
    state = json.loads(json.dumps(first.state_dict(), allow_nan=False))
    assert state["version"] == 2 and state["loss_follows"] == {"since": 800, "left": 3}
    resumed = DivergenceDetectors.from_config(CFG)
    resumed.load_state_dict(state)
    assert before + run(resumed, loss, grad_norm, start=802) == expected

    # a checkpoint from before the wait existed: version 1, no `loss_follows`; nothing waits
    old = {k: v for k, v in state.items() if k != "loss_follows"} | {"version": 1}
    resumed = DivergenceDetectors.from_config(CFG)
    resumed.load_state_dict(old)
    assert resumed.loss_follows.state_dict() == {"since": None, "left": 0}
    assert run(resumed, loss, grad_norm, start=802) == []


def clean_run() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    data = np.loadtxt(CLEAN_RUN, delimiter=",", skiprows=1)
    return data[:, 0].astype(int), data[:, 1], data[:, 2]


def replay(steps, loss, grad_norm, detectors=None) -> list[Detection]:
    detectors = detectors or DivergenceDetectors.from_config(CFG)
    detections = []
    for step, value, norm in zip(steps, loss, grad_norm, strict=True):
        detections += detectors.update(int(step), float(value), float(norm))
    return detections


def test_recorded_clean_run_has_grad_norm_spikes_that_no_policy_acts_on():
    """The issue-23 false alarms: lone grad-norm outliers at robust z 6.3-8.2, the loss's own
    z within +-3 on their steps and the 4 after; recorded, none actionable."""
    steps, loss, grad_norm = clean_run()
    assert list(steps) == list(range(1, 701))
    detections = replay(steps, loss, grad_norm)
    assert [(d.kind, d.step, d.metric, d.actionable) for d in detections] == [
        ("spike", 497, "grad_norm", False),
        ("spike", 567, "grad_norm", False),
        ("spike", 588, "grad_norm", False),
    ]
    assert [round(d.value, 4) for d in detections] == [0.2938, 0.3693, 0.3623]
    # without the wait for the loss (the detectors before issue 23) all three were actionable
    detectors = DivergenceDetectors.from_config(CFG)
    detectors.loss_follows = None
    assert [(d.step, d.actionable) for d in replay(steps, loss, grad_norm, detectors)] == [
        (497, True),
        (567, True),
        (588, True),
    ]


@pytest.mark.parametrize(
    "fault, actionable, quiet",
    [
        ("loss+1 at 650", [(650, "spike", "loss")], []),
        ("nan loss at 650", [(650, "nonfinite", "loss")], []),
        ("inf grad at 650", [(650, "nonfinite", "grad_norm")], []),
        ("grad x5 at 650, loss 4.1 at 652", [(652, "spike", "loss")], [650]),
        ("grad x5 at 650, loss 4.1 at 650", [(650, "spike", "grad_norm")], []),
        ("grad x5 at 650", [], [650]),
        ("grad x5 at 650, loss 4.1 at 655", [], [650]),
    ],
)
def test_faults_injected_into_the_recorded_clean_run_are_caught_at_their_step(
    fault, actionable, quiet
):
    """Against the window at step 650 the loss's median is ~3.78 and its follow bar (3 sigma)
    4.006, its spike bar (6 sigma) 4.233; the grad norm's spike bar is 0.541 (it reads 0.325).
    `quiet`: record-only detections beyond the clean run's three."""
    steps, loss, grad_norm = clean_run()
    at = {int(s): i for i, s in enumerate(steps)}
    for part in fault.split(", "):
        what, step = part.rsplit(" at ", 1)
        i = at[int(step)]
        if what == "loss+1":
            loss[i] += 1.0
        elif what == "nan loss":
            loss[i] = math.nan
        elif what == "inf grad":
            grad_norm[i] = math.inf
        elif what == "grad x5":
            grad_norm[i] *= 5
        else:
            loss[i] = float(what.removeprefix("loss "))
    detections = replay(steps, loss, grad_norm)
    assert [(d.step, d.kind, d.metric) for d in detections if d.actionable] == actionable
    assert [d.step for d in detections if not d.actionable] == [497, 567, 588, *quiet]


def test_evidence_buffer_keeps_the_last_steps_as_strict_json():
    buffer = EvidenceBuffer(steps=3)
    for step in range(5):
        buffer.append(step, {"loss": 3.0 + step, "grad_norm": np.float32(0.5), "attn": [1.0, 2.0]})
    buffer.append(5, {"loss": math.nan, "grad_norm": math.inf, "attn": [math.nan]})
    snapshot = buffer.snapshot()
    assert [r["step"] for r in snapshot] == [3, 4, 5]
    assert snapshot[-1] == {"step": 5, "loss": "nan", "grad_norm": "inf", "attn": ["nan"]}
    json.dumps(snapshot, allow_nan=False)
    snapshot[0]["attn"].append(99.0)  # the snapshot is a copy
    assert buffer.snapshot()[0]["attn"] == [1.0, 2.0]

    restored = EvidenceBuffer(steps=2)
    restored.load_state_dict(json.loads(json.dumps(buffer.state_dict())))
    assert restored.snapshot() == snapshot[1:]
    with pytest.raises(TypeError):
        buffer.append(6, {"loss": object()})
