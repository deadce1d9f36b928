"""experiments.flash_pilot: the pilot's divergence rule, its Fisher table and its files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from experiments import flash_pilot

WARMUP = 5
STEPS = 40


def write_run(
    root: Path,
    name: str,
    precision: str,
    flash: str,
    wd: float,
    lr: float,
    losses: list[float],
    val: float,
    events: list[dict[str, Any]] = (),
) -> None:
    path = root / name
    path.mkdir(parents=True)
    config = {
        "run": {"name": name, "out_dir": str(root), "seed": 1337},
        "model": {"n_layer": 2},
        "optim": {"lr": lr, "weight_decay": wd, "warmup_steps": WARMUP},
        "train": {"max_steps": STEPS},
        "precision": precision,
        "bf16_flash": flash,
    }
    (path / "config.yaml").write_text(yaml.safe_dump(config))
    lines = []
    for i, loss in enumerate(losses):
        step = (i + 1) * 4
        lines.append(
            {
                "step": step,
                "tokens": step * 100,
                "time": 1000.0 + 3 * step,
                "loss": loss,
                "attn_logit_max": 2.0 + step,
                "attn_tie_frac/layer0": 0.1,
                "attn_tie_frac/layer1": 0.3 - step / 400,
                "attn_delta_bias_sum/layer0": 1e-5 * step,
                "attn_delta_bias_sum/layer1": -1e-5 * step,
                "attn_delta_bias/layer0": 1e-6 * (2 + (-1) ** i),  # one-signed: 3, 1, 3, ...
                "attn_delta_bias/layer1": 1e-6 * (-1) ** i,  # alternating: mean 0
                "attn_wq_norm/layer0": [1.0, 1.5],
                "attn_wq_norm/layer1": [2.0, 1.0 + step / 10],
            }
        )
    lines.append({"step": len(losses) * 4, "tokens": 0, "time": 2000.0, "val_loss": val})
    (path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (path / "events.jsonl").write_text("".join(json.dumps(x) + "\n" for x in events))


def smooth(final: float) -> list[float]:
    return [5.0 - (5.0 - final) * i / 9 for i in range(10)]


@pytest.fixture()
def pilot(tmp_path: Path) -> Path:
    root = tmp_path / "flash_pilot"
    write_run(root, "fp32", "fp32", "fa2", 0.0, 1e-2, smooth(3.0), 3.05)
    # recovers from a blow-up of 1.2 nats above its minimum: diverged by rule 2
    spike = smooth(3.0)
    spike[5] = spike[4] + 1.2
    write_run(
        root,
        "bf16",
        "bf16",
        "fa2",
        0.0,
        1e-2,
        spike,
        3.10,
        [{"step": 24, "kind": "spike", "time": 1.0}],
    )
    # 0.11 above fp32's val loss: diverged by rule 3
    write_run(root, "bf16-wd", "bf16", "fa2", 0.1, 1e-2, smooth(3.0), 3.16)
    # non-finite: rule 1
    write_run(
        root, "bf16-all", "bf16", "all_bf16", 0.0, 1e-2, [*smooth(3.0)[:9], float("nan")], 3.0
    )
    # a spike of 0.9 nat and 0.09 above fp32: not diverged
    mild = smooth(3.0)
    mild[5] = mild[4] + 0.9
    write_run(root, "bf16-fp32delta", "bf16", "fp32_delta", 0.0, 1e-2, mild, 3.14)
    # killed at step 20 of 40, 0.5 nat above fp32's val loss there: not judged
    write_run(root, "bf16-short", "bf16", "dynamic_max", 0.0, 1e-2, smooth(3.0)[:5], 3.55)
    return root


def test_the_rule_and_the_rows(pilot: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert flash_pilot.main([str(pilot), "--out", str(out)]) == 0
    data = json.loads((out / "pilot.json").read_text())
    rows = {r["run"]: r for r in data["runs"]}
    assert [rows[n]["diverged"] for n in ("fp32", "bf16", "bf16-wd", "bf16-all")] == [
        False,
        True,
        True,
        True,
    ]
    assert rows["bf16"]["blowup_step"] == 24 and rows["bf16"]["detections"] == [[24, "spike"]]
    assert rows["bf16-wd"]["why"] == ["final val loss > fp32's + 0.1"]
    assert rows["bf16-all"]["nonfinite"]
    assert not rows["bf16-fp32delta"]["diverged"]
    assert rows["bf16-short"]["diverged"] is None and rows["bf16-short"]["why"] == ["not finished"]
    assert rows["bf16-fp32delta"]["arm"] == "bf16 wd0 fp32_delta"
    assert rows["bf16-wd"]["arm"] == "bf16 wd0.1"
    assert rows["fp32"]["final_train_loss"] == pytest.approx(sum(smooth(3.0)[-5:]) / 5)
    assert rows["fp32"]["wq_norm_max"] == [1.5, 1.0 + 40 / 10]
    assert rows["fp32"]["tie_frac"] == [0.1, 0.3 - 40 / 400]
    assert rows["fp32"]["max_attn_logit"] == 42.0
    # layer 0: mean 2e-6, sd 1.054e-6 over 10 readings; layer 1: mean 0
    assert rows["fp32"]["delta_bias_t"] == pytest.approx([2 / (1.0541 / 10**0.5), 0.0], abs=1e-3)
    assert rows["bf16-short"]["val_minus_fp32"] is None
    # 3 s a step from step 4 to step 40, scaled to cover steps 0-4: 120 s
    assert rows["fp32"]["minutes"] == pytest.approx(2.0)
    assert (out / "telemetry.png").stat().st_size > 10_000
    assert "| bf16 wd0 | 0.01 | 1337 |" in (out / "runs.md").read_text()


def test_fisher_counts_and_limits(pilot: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert flash_pilot.main([str(pilot), "--out", str(out), "--no-figure"]) == 0
    tests = json.loads((out / "pilot.json").read_text())["fisher"]
    first = tests[0]
    assert (first["arm"], first["against"], first["lr"]) == ("bf16 wd0", "fp32 wd0", "0.01")
    assert first["diverged"] == [1, 1] and first["against_diverged"] == [0, 1]
    # one run against one: even 1 of 1 against 0 of 1 gives p = 1/2
    assert first["p"] == pytest.approx(0.5) and first["p_min"] == pytest.approx(0.5)
    against_wd = tests[1]
    assert against_wd["against_diverged"] == [1, 1] and against_wd["p"] == pytest.approx(1.0)
    assert not (out / "telemetry.png").exists()


def test_pooled_over_learning_rates(tmp_path: Path) -> None:
    rows = [
        {"arm": arm, "lr": lr, "seed": 1, "diverged": arm == "bf16 wd0"}
        for lr in (1e-3, 3e-3, 1e-2)
        for arm in ("fp32 wd0", "bf16 wd0")
    ]
    rows.append({"arm": "bf16 wd0", "lr": 3e-2, "seed": 1, "diverged": None})  # not finished
    tests = flash_pilot.fisher_table(rows, "bf16 wd0", "fp32 wd0")
    assert [t["lr"] for t in tests] == ["0.001", "0.003", "0.01", "pooled"]
    pooled = tests[-1]
    assert pooled["lr"] == "pooled" and pooled["diverged"] == [3, 3]
    assert pooled["p"] == pytest.approx(1 / 20)  # 1 / C(6, 3)


def test_a_missing_directory_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert flash_pilot.main([str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err.startswith("error: ")
