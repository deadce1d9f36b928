"""The slingshot detector on synthetic traces (injected cycles found exactly, clean runs quiet), and
a real tiny run recording the signals it reads."""

import math

import numpy as np
import pytest
import torch

from configs import load_config
from model import GPT
from model.config import ModelConfig
from monitor.slingshot import SlingshotDetector
from tests.monitor.runs import metrics, run

CFG = load_config(None, []).divergence


def trace(num: int, cycles: list[int], seed: int = 0):
    """(growth, loss) per log reading: a noisy slowly falling loss and small positive norm growth;
    each cycle starting at reading c has 5 readings of fast growth, a loss spike 3 readings in,
    then the norm sits still for 15 readings."""
    rng = np.random.default_rng(seed)
    growth = np.abs(rng.lognormal(np.log(2e-4), 0.5, num))
    loss = 4.0 - 0.3 * np.arange(num) / num + rng.normal(0, 0.03, num)
    for c in cycles:
        growth[c : c + 5] = rng.uniform(5e-3, 2e-2, 5)
        loss[c + 3] += 1.5
        loss[c + 4] += 0.8
        growth[c + 5 : c + 20] = rng.normal(0, 1e-6, 15)
    return growth, loss


def found(growth, loss, detector=None):
    detector = detector or SlingshotDetector.from_config(CFG)
    hits = []
    for i, (g, value) in enumerate(zip(growth, loss, strict=True)):
        detection = detector.update(10 * i, float(g), float(value))
        if detection is not None:
            hits.append(detection)
    return hits


@pytest.mark.parametrize("seed", range(5))
def test_injected_cycles_are_found_exactly(seed):
    cycles = [100, 180, 300]
    growth, loss = trace(400, cycles, seed)
    hits = found(growth, loss)
    assert [h.facts["growth_start_step"] for h in hits] == [10 * c for c in cycles]
    assert [h.facts["spike_step"] for h in hits] == [10 * (c + 3) for c in cycles]
    assert [h.step for h in hits] == [10 * (c + 5) for c in cycles]
    for h in hits:
        assert h.kind == "slingshot" and h.metric == "output_norm_growth"
        assert h.value == h.facts["peak_growth"] > 10 * h.facts["median_growth"]
        assert h.value > h.threshold
        event = h.to_event()
        assert event["facts"]["spike_loss"] > event["facts"]["loss_median"] + 1.0


@pytest.mark.parametrize("seed", range(5))
def test_clean_runs_have_none(seed):
    growth, loss = trace(1000, [], seed)
    assert found(growth, loss) == []


def test_parts_of_a_cycle_alone_are_not_a_slingshot():
    growth, loss = trace(400, [], 3)
    fast_growth = growth.copy()
    fast_growth[100:105] = 1e-2  # growth, no spike
    spiky = loss.copy()
    spiky[200] += 2.0  # spike, no growth
    never_settles = growth.copy()
    never_settles[300:400] = 1e-2  # growth and spike, the norm keeps growing
    never_loss = loss.copy()
    never_loss[303] += 2.0
    assert found(fast_growth, loss) == []
    assert found(growth, spiky) == []
    assert found(never_settles, never_loss) == []


def test_state_round_trip_mid_cycle_finds_the_same():
    growth, loss = trace(300, [120], 1)
    uninterrupted = found(growth, loss)
    first = SlingshotDetector.from_config(CFG)
    found(growth[:122], loss[:122], first)  # stops inside the growth phase
    resumed = SlingshotDetector.from_config(CFG)
    resumed.load_state_dict(first.state_dict())
    rest = [
        d
        for i in range(122, 300)
        if (d := resumed.update(10 * i, float(growth[i]), float(loss[i]))) is not None
    ]
    assert [d.to_event() for d in rest] == [d.to_event() for d in uninterrupted]


def test_softmax_collapse_readings():
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=1, n_head=1, n_embd=8, block_size=4, vocab_size=32))
    x = torch.randint(0, 32, (2, 4))
    y = x.clone()
    out = model(x, y, telemetry=True)
    saturated, residual = out.softmax_collapse.tolist()
    assert saturated == 0.0 and residual < 1e-6  # near-uniform softmax: the gradient sums to 0
    # the target scored 25 above the rest: its probability rounds to 1 in fp32, and the gradient
    # (softmax - onehot) keeps only the other classes' mass (exp(-25) each), all of one sign
    logits = torch.zeros(2, 4, 32)
    logits.scatter_(-1, y.unsqueeze(-1), 25.0)
    saturated, residual = GPT._softmax_collapse(logits, y).tolist()
    assert saturated == 1.0
    assert residual == pytest.approx(1.0)
    # a target ignored (-1) does not count; only the first sequence is read
    y_masked = y.clone()
    y_masked[0, :2] = -1
    logits[0, :2] = 0.0
    logits[1] = 0.0
    saturated, residual = GPT._softmax_collapse(logits, y_masked).tolist()
    assert saturated == 1.0 and residual == pytest.approx(1.0)
    logits[0, 3] = 0.0  # one of the two counted positions is uniform again
    saturated, residual = GPT._softmax_collapse(logits, y_masked).tolist()
    assert saturated == 0.5 and residual == pytest.approx(0.5, abs=1e-6)


def test_a_real_run_records_the_signals(tmp_path, corpus, dist_env, one_thread):
    run_dir = tmp_path / "signals"
    run(run_dir, corpus, **{"train.max_steps": 6, "checkpoint.interval": 0})
    lines = metrics(run_dir)
    assert sorted(lines) == list(range(1, 7))
    for step, line in lines.items():
        assert 0 < line["param_norm/output"] < line["param_norm/embed"]  # wte, without wpe
        assert 0.0 <= line["softmax_saturated"] <= 1.0
        assert 0.0 <= line["zero_sum_residual"] < 1e-3
        if step > 1:
            previous = lines[step - 1]["param_norm/output"]
            expected = line["param_norm/output"] / previous - 1
            assert line["output_norm_growth"] == pytest.approx(expected, rel=1e-6)
            assert math.isfinite(line["output_norm_growth"])
    assert "output_norm_growth" not in lines[1]
