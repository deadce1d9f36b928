"""`python -m bench.monitor`: the monitor's cost per step, end to end on a few steps."""

import pytest

from bench import monitor as bench

pytestmark = pytest.mark.usefixtures("dist_env", "one_thread")


def test_bench_times_every_setting(corpus, capsys):
    """`python -m bench.monitor` end to end, a few steps on the small corpus."""
    overrides = [f"data.dataset={corpus}", "model.vocab_size=256", "model.n_embd=32"]
    figures = bench.main(["--steps", "2", "--warmup", "1", "--sharpness-reps", "1", *overrides])
    assert {"on_ms", "off_ms", "nologit_ms", "overhead_on", "overhead_nologit"} <= figures.keys()
    assert figures["sharpness_steps"] == pytest.approx(figures["sharpness_ms"] / figures["off_ms"])
    assert figures["overhead_sharpness"] == pytest.approx(figures["sharpness_steps"] / 1000)
    assert all(value > 0 for key, value in figures.items() if key.endswith("_ms"))
    assert "on / off" in capsys.readouterr().out
