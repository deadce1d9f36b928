"""The remedy table: each verdict's remedy as a config change, escalation, the bounds."""

import pytest

from configs import flatten_config, load_config, with_changes
from heal.remedies import LADDERS, Situation, choose, remedy, softcap_for
from optim.schedule import lr_at

DETECTION = {"kind": "spike", "metric": "loss", "value": 9.0, "threshold": 5.0}


def situation(*overrides: str, position: int | None = None, logit: float | None = None):
    return Situation(load_config(None, list(overrides)), 40, position, logit)


def test_every_remedy_is_a_config_change_the_schema_takes():
    at = situation("optim.grad_clip=0", position=7, logit=30.0)
    for name in sorted({n for ladder in LADDERS.values() for n in ladder}):
        found = remedy(name, at)
        assert found is not None and found.name == name and found.text
        changed = with_changes(at.cfg, {k: new for k, (_, new) in found.changes.items()})
        values = flatten_config(changed.model_dump(mode="json"))
        for key, (old, new) in found.changes.items():
            assert values[key] == new != old
    assert remedy("retry", at).changes == {}  # the same batches, unchanged


def test_strengths_come_from_the_heal_section():
    at = situation(
        "optim.grad_clip=0",
        "optim.eps=1e-6",
        "optim.weight_decay=0.2",
        "model.z_loss=1e-3",
        "divergence.heal.cooldown_factor=0.5",
        "divergence.heal.cooldown_steps=10",
        position=7,
    )
    assert remedy("skip_batch", at).changes == {"data.skip_batches": [[], [7]]}
    assert remedy("eps", at).changes == {"optim.eps": [1e-6, pytest.approx(1e-5)]}
    assert remedy("grad_clip", at).changes == {"optim.grad_clip": [0.0, 1.0]}
    assert remedy("weight_decay", at).changes == {"optim.weight_decay": [0.2, 0.4]}
    assert remedy("z_loss", at).changes == {"model.z_loss": [1e-3, pytest.approx(1e-2)]}
    assert remedy("output_softcap", at).changes == {"model.output_softcap": [0.0, 30.0]}
    cooldown = remedy("lr_cooldown", at)
    assert cooldown.changes == {
        "optim.cooldowns": [[], [{"start": 40, "steps": 10, "factor": 0.5}]]
    }
    cfg = with_changes(at.cfg, {"optim.cooldowns": cooldown.changes["optim.cooldowns"][1]})
    o, plain = cfg.optim, at.cfg.optim
    assert lr_at(39, o, 100) == lr_at(39, plain, 100)
    assert lr_at(40, o, 100) == 0.5 * lr_at(40, plain, 100)
    assert lr_at(49, o, 100) == 0.5 * lr_at(49, plain, 100)
    assert lr_at(50, o, 100) == lr_at(50, plain, 100)


def test_remedies_already_in_force_do_not_act():
    at = situation(
        "optim.grad_clip=1.0", "model.attn_softcap=20", "model.output_softcap=20", position=3
    )
    assert remedy("grad_clip", at) is None
    assert remedy("attn_softcap", at) is None
    assert remedy("output_softcap", at) is None
    skipped = situation("data.skip_batches=[3]", position=3)
    assert remedy("skip_batch", skipped) is None
    assert remedy("skip_batch", situation()) is None  # no batch named


def test_the_attention_cap_sits_above_the_logits_and_below_the_detector():
    assert softcap_for(None, 50.0, 1000.0) == 50.0
    assert softcap_for(10.0, 50.0, 1000.0) == 50.0
    assert softcap_for(120.0, 50.0, 1000.0) == 240.0
    assert softcap_for(700.0, 50.0, 1000.0) == 900.0


def test_a_remedy_that_did_not_hold_escalates_then_the_run_stops():
    at = situation("optim.grad_clip=0")
    first = choose("optimizer", DETECTION, [], at)
    assert first.name == "lr_cooldown"
    tried = [{"detection": DETECTION, "remedy": "lr_cooldown"}] * 2
    assert choose("optimizer", DETECTION, tried[:1], at).name == "lr_cooldown"
    assert choose("optimizer", DETECTION, tried, at).name == "eps"
    other = {**DETECTION, "metric": "grad_norm"}  # another detection starts at the bottom
    assert choose("optimizer", other, tried, at).name == "lr_cooldown"
    tried += [{"detection": DETECTION, "remedy": "eps"}] * 2
    tried += [{"detection": DETECTION, "remedy": "grad_clip"}] * 2
    reason = choose("optimizer", DETECTION, tried, situation("divergence.heal.max_heals=9"))
    assert isinstance(reason, str) and "every remedy for optimizer" in reason
    clipped = situation("optim.grad_clip=1", "divergence.heal.max_heals=9")
    assert "tried or is in force" in choose("optimizer", DETECTION, tried[:4], clipped)


def test_max_heals_and_unknown_mechanisms_stop():
    at = situation("divergence.heal.max_heals=1")
    one = [{"detection": {**DETECTION, "metric": "x"}, "remedy": "retry"}]
    assert "max_heals=1" in choose("transient", DETECTION, one, at)
    assert "no mechanism with a remedy (undetermined)" in choose("undetermined", DETECTION, [], at)
    with pytest.raises(ValueError, match="unknown remedy"):
        remedy("prayer", at)
