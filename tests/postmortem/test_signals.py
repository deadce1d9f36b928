"""postmortem.signals: departures from a series' own baseline, and the mechanisms they point at,
on synthetic series (the end-to-end verdicts are in test_diagnose.py)."""

import math

from configs import load_config
from postmortem.signals import departure, signal_series, state_mechanisms, timeline

FLAT = [(s, 1.0 + 0.01 * (s % 3)) for s in range(1, 30)]  # 1%-level noise


def test_a_lasting_jump_departs_a_lone_outlier_does_not():
    gone = departure("grad_norm", [*FLAT, (30, 5.0), (31, 6.0), (32, 5.5)], 6.0, 0.05, 128)
    assert (gone.step, gone.value, gone.baseline) == (30, 5.0, 1.01)
    assert gone.z > 6
    back = departure("grad_norm", [*FLAT, (30, 5.0), (31, 1.0), (32, 1.01)], 6.0, 0.05, 128)
    assert back is None
    assert departure("grad_norm", FLAT, 6.0, 0.05, 128) is None


def test_steady_growth_is_no_departure_a_sudden_acceleration_is():
    steady = [(s, 0.04 * 1.05**s) for s in range(1, 40)]  # 5% a step, as early logits grow
    assert departure("attn_logit_max/layer1", steady, 6.0, 0.05, 128) is None
    faster = [*steady, *((s, steady[-1][1] * 2.0 ** (s - 39)) for s in range(40, 44))]
    hit = departure("attn_logit_max/layer1", faster, 6.0, 0.05, 128)
    assert hit.step == 40 and hit.baseline < hit.value / 2


def test_nonfinite_counts_as_departed_and_the_loss_is_linear_with_its_floor():
    hit = departure("grad_norm", [*FLAT, (30, math.nan)], 6.0, 0.05, 128)
    assert hit.step == 30 and hit.z == math.inf
    # the loss floor 0.05 * 6 = 0.3 above the median: 1.25 is not a departure, 1.4 is
    assert departure("loss", [*FLAT, (30, 1.25)], 6.0, 0.05, 128) is None
    assert departure("loss", [*FLAT, (30, 1.4)], 6.0, 0.05, 128).step == 30


def test_too_few_readings_are_not_judged():
    assert departure("grad_norm", [(1, 1.0), (2, 1.0), (3, 100.0)], 6.0, 0.05, 128) is None


def test_series_per_layer_and_log_z_magnitude_and_unknown_keys():
    lines = [
        {
            "step": s,
            "loss": 3.0,
            "lr": 0.1,
            "attn_logit_max": 9.0,
            "attn_logit_max/layers": [1.0, 9.0],
            "log_z": -2.0,
            "sharpness/lambda_max": 4.0,
            "eff_lr/decay": 1.0,
        }
        for s in (1, 2)
    ]
    series = signal_series(lines)
    assert sorted(series) == [
        "attn_logit_max/layer0",
        "attn_logit_max/layer1",
        "loss",
        "sharpness/lambda_max",
        "|log_z|",
    ]
    assert series["|log_z|"] == [(1, 2.0), (2, 2.0)]


def test_the_signal_that_left_first_ranks_first():
    cfg = load_config(None, ["optim.grad_clip=0"])
    lines = []
    for s in range(1, 41):
        ratio = 0.01 if s < 30 else 0.5  # the update jumps at 30
        logit = 2.0 if s < 36 else 900.0  # the logits follow at 36
        lines.append(
            {
                "step": s,
                "loss": 3.0 if s < 40 else 9.0,
                "update_ratio/decay": ratio,
                "attn_logit_max/layers": [logit, 2.0],
            }
        )
    departures = timeline(signal_series(lines), cfg, 40)
    assert [(d.series, d.step) for d in departures] == [
        ("update_ratio/decay", 30),
        ("attn_logit_max/layer0", 36),
        ("loss", 40),
    ]
    event = {"kind": "spike", "metric": "loss", "value": 9.0}
    ranked = state_mechanisms(departures, event, 40, cfg)
    assert [(m.name, m.confidence) for m in ranked] == [("optimizer", "high"), ("attention", "low")]
    assert "optim.grad_clip=1.0" in ranked[0].remedies[2]
    assert "10 steps before the detection" in ranked[0].evidence
    # an attention-logit detection is evidence of its own layer, even with no departure
    event = {"kind": "attn_logit", "metric": "attn_logit_max/layer1", "value": 1200.0}
    (only,) = state_mechanisms([], event, 40, cfg)
    assert (only.name, only.confidence) == ("attention", "low")
    assert "attn_logit_max/layer1" in only.evidence
