"""`python -m postmortem.false_alarms`: the detectors replayed over a recorded clean run."""

import json
from pathlib import Path

import numpy as np
import pytest

from postmortem import false_alarms

CLEAN_RUN = Path(__file__).parents[1] / "monitor" / "data" / "clean_stream_wd0.1-s3.csv"


def write_run(run_dir: Path, every: int = 1, loss_at: dict[int, float] | None = None) -> Path:
    """A run directory whose metrics.jsonl holds the recorded clean run's steps (every
    `every`-th), with telemetry on every 20th and an evaluation line, and a config.yaml."""
    run_dir.mkdir()
    data = np.loadtxt(CLEAN_RUN, delimiter=",", skiprows=1)
    lines = []
    for step, loss, grad_norm in data:
        step = int(step)
        if step % every:
            continue
        line = {"step": step, "loss": (loss_at or {}).get(step, loss), "grad_norm": grad_norm}
        if step % 20 == 0:
            line |= {"attn_logit_max/layers": [12.0, 15.0], "log_z": 7.9}
        lines.append(line)
        if step == 400:
            lines.append({"step": step, "val_loss": 3.9})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    (run_dir / "config.yaml").write_text("divergence:\n  policy: record\n  window: 128\n")
    return run_dir


def test_clean_run_counts_three_record_only_grad_norm_spikes(tmp_path, capsys):
    result = false_alarms.false_alarms(write_run(tmp_path / "clean"))
    assert (result["steps"], result["every"], result["detections"]) == (700, 1, 3)
    assert result["actionable"] == 0 and result["first_actionable_step"] is None
    assert result["by_detector"] == {
        "spike:grad_norm": {
            "count": 3,
            "actionable": 0,
            "steps": [497, 567, 588],
            "per_1000_steps": pytest.approx(3 / 0.7),
            "actionable_per_1000_steps": 0.0,
        }
    }
    assert false_alarms.main([str(tmp_path / "clean")]) == 0
    table = capsys.readouterr().out
    assert "| clean | 700 | spike:grad_norm | 3 | 0 | 4.29 | 497, 567, 588 |" in table


def test_an_injected_loss_spike_is_actionable_and_fails_the_check(tmp_path, capsys):
    run = write_run(tmp_path / "spiked", loss_at={650: 5.0})
    assert false_alarms.main([str(run), "--json"]) == 1
    result = json.loads(capsys.readouterr().out)
    assert result["first_actionable_step"] == 650
    assert result["by_detector"]["spike:loss"]["steps"] == [650]


def test_overrides_and_runs_logged_less_often(tmp_path):
    run = write_run(tmp_path / "clean")
    quiet = false_alarms.false_alarms(run, ["divergence.grad_spike_sigma=9"])
    assert quiet["detections"] == 0
    with pytest.raises(ValueError, match="divergence"):
        false_alarms.false_alarms(run, ["optim.lr=1"])
    sparse = false_alarms.false_alarms(write_run(tmp_path / "sparse", every=20))
    assert (sparse["steps"], sparse["every"]) == (35, 20)
    assert "(logged every 20 steps)" in false_alarms.table([sparse])
