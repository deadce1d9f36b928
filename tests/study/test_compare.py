"""study/: reading run directories, the comparison report and LR sensitivity, on synthetic runs."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest

from study.compare import default_out, ema, main, report
from study.runs import (
    FORWARD_ONLY_FLASH,
    StudyError,
    label,
    labels,
    load_run,
    load_runs,
    short_names,
    to_float,
    varying_keys,
)
from study.sensitivity import lr_groups, lr_sensitivity
from tests.study.conftest import config_with, event, train_line, write_run

REPO = Path(__file__).resolve().parents[2]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SWEEP_PNGS = ["loss", "val_loss", "grad_norm", "param_norm", "eff_lr", "logits"]


@pytest.fixture(scope="session")
def sweep_report(sweep_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The report of the four-run sweep, made once through the CLI entry point."""
    out = tmp_path_factory.mktemp("report")
    assert main([str(sweep_dir), "--out", str(out), "--smooth", "0.5"]) == 0
    return out


@pytest.fixture(scope="session")
def lr_report(lr_sweep_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("lr_report")
    assert main([str(lr_sweep_dir), "--out", str(out)]) == 0
    return out


def _csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


# --- reading runs ----------------------------------------------------------------------------


def test_rollback_keeps_each_steps_last_line(sweep_dir: Path) -> None:
    run = load_run(sweep_dir / "wd0.1-bf16")
    assert sorted(run.metrics) == list(range(21))
    assert run.metrics[10]["loss"] == 4.9375  # curve(10, 3.25), not the spike's 9.5
    assert run.metrics[12]["loss"] == pytest.approx(4.33)  # not the first timeline's 4.38
    assert run.val == {10: 4.9, 20: 3.35}
    steps, losses = run.series("loss")
    assert steps.tolist() == list(range(21)) and losses[-1] == 3.25


def test_resumed_timeline_drops_the_abandoned_tail(make_run: Callable[..., Path]) -> None:
    lines = [(s, 5.0) for s in range(11)] + [(s, 4.0) for s in (6, 7, 8)]
    run = load_run(make_run("resumed", lines))
    assert sorted(run.metrics) == list(range(9))
    assert run.metrics[8]["loss"] == 4.0 and run.summary["final_loss"] == 4.0


def test_a_config_changed_mid_run_is_credited_to_its_steps(tmp_path: Path) -> None:
    """A resume at a new lr (or a heal) changes the config from its step on; config.yaml holds
    only the last, so the run says so and `config_at` answers per step."""
    old, new = config_with(optim__lr=1e-3), config_with(optim__lr=3.0)
    path = write_run(tmp_path, "resumed", new, [train_line(s, 4.0) for s in range(1, 31)])
    history = [
        {"step": 0, "changed": {}, "force_resume": False, "config": old},
        {"step": 20, "changed": {"optim.lr": [1e-3, 3.0]}, "force_resume": True, "config": new},
    ]
    (path / "config_history.jsonl").write_text("".join(json.dumps(e) + "\n" for e in history))
    run = load_run(path)
    assert run.config_at(20)["optim.lr"] == 1e-3 and run.config_at(21)["optim.lr"] == 3.0
    assert run.flat_config["optim.lr"] == 3.0
    assert "config changed at step 20: optim.lr 0.001 -> 3.0" in run.notes
    bare = load_run(write_run(tmp_path, "bare", new, [train_line(1, 4.0)]))
    assert bare.config_at(1)["optim.lr"] == 3.0 and not bare.config_history


def test_a_record_only_detection_is_counted_apart_from_the_divergences(tmp_path: Path) -> None:
    quiet = event(4, "spike", metric="grad_norm", actionable=False)
    lines = [train_line(s, 4.0) for s in range(1, 9)]
    run = load_run(write_run(tmp_path, "r", config_with(), lines, [quiet, event(6, "drift")]))
    summary = run.summary
    assert (summary["divergences"], summary["first_divergence_step"]) == (1, 6)
    assert summary["record_only_detections"] == 1
    # a loss that followed the grad-norm spike: the divergence began at the spike
    follows = event(6, "spike", facts={"grad_norm_step": 4})
    run = load_run(write_run(tmp_path, "f", config_with(), lines, [quiet, follows]))
    assert (run.summary["divergences"], run.summary["first_divergence_step"]) == (1, 4)


def test_truncated_last_line_and_missing_summary(sweep_dir: Path) -> None:
    run = load_run(sweep_dir / "wd0.1-fp32")
    assert max(run.metrics) == 18
    assert run.summary == {
        "status": "unknown",
        "steps": 18,
        "final_loss": pytest.approx(3.466),  # curve(18, 3.4)
        "final_val_loss": None,
        "divergences": 1,  # the drift; the checkpoint event is not a detection
        "first_divergence_step": 6,
        "record_only_detections": 0,
    }
    assert any("skipped 1 line" in note for note in run.notes)
    assert any("no summary.json" in note for note in run.notes)


def test_nonfinite_values(sweep_dir: Path) -> None:
    run = load_run(sweep_dir / "wd0-fp32")
    _, losses = run.series("loss")
    _, grad_norms = run.series("grad_norm")
    _, log_z = run.series("log_z")
    assert math.isnan(losses[15]) and math.isinf(grad_norms[15]) and math.isnan(log_z[15])
    assert math.isnan(run.summary["final_loss"])  # "nan" in summary.json
    assert run.summary["status"] == "diverged"
    assert [e["kind"] for e in run.detections] == ["spike", "nonfinite"]
    assert (to_float("inf"), to_float("-inf"), to_float("3e-4"), to_float(2)) == (
        math.inf,
        -math.inf,
        3e-4,
        2.0,
    )
    assert all(math.isnan(to_float(x)) for x in (" NaN", None, "fast", True))


def test_stale_summary_is_noted(make_run: Callable[..., Path]) -> None:
    lines = [(s, 6.0 - s) for s in range(4)]
    run = load_run(make_run("stale", lines, summary={"status": "completed", "final_loss": 4.0}))
    assert run.summary["final_loss"] == 4.0  # summary.json wins where it has a value
    assert run.summary["steps"] == 3  # computed where it has none
    assert any("final_loss=4.0 but the logs give 3.0" in note for note in run.notes)


def test_a_key_newer_than_a_run_is_read_as_its_default(tmp_path: Path) -> None:
    """A run made before `bf16_kernels` existed ran as its default says: no key seems to vary."""
    old = config_with()
    old.pop("bf16_kernels", None)
    write_run(tmp_path, "old", old, [train_line(1, 5.0)])
    write_run(tmp_path, "new", config_with(bf16_kernels="native"), [train_line(1, 5.0)])
    write_run(tmp_path, "emulated", config_with(bf16_kernels="emulated"), [train_line(1, 5.0)])
    runs = load_runs([tmp_path / "old", tmp_path / "new"])
    assert runs[0].flat_config["bf16_kernels"] == "native" and varying_keys(runs) == []
    assert varying_keys(load_runs([tmp_path / "old", tmp_path / "emulated"])) == ["bf16_kernels"]


def test_an_emulated_run_older_than_bf16_flash_is_not_read_as_fa2(tmp_path: Path) -> None:
    """Its attention backward was autograd's fp32 one: never pooled with FA2 runs."""
    old = config_with(bf16_kernels="emulated")
    old.pop("bf16_flash", None)
    write_run(tmp_path, "old", old, [train_line(1, 5.0)])
    write_run(tmp_path, "new", config_with(bf16_kernels="emulated"), [train_line(1, 5.0)])
    runs = load_runs([tmp_path / "old", tmp_path / "new"])
    assert [r.flat_config["bf16_flash"] for r in runs] == [FORWARD_ONLY_FLASH, "fa2"]
    assert varying_keys(runs) == ["bf16_flash"]


def test_varying_keys_and_labels(sweep_dir: Path) -> None:
    runs = load_runs([sweep_dir])
    assert [run.name for run in runs] == ["wd0-bf16", "wd0-fp32", "wd0.1-bf16", "wd0.1-fp32"]
    keys = varying_keys(runs)
    assert keys == ["optim.weight_decay", "precision"]  # not run.name/out_dir, meta, wandb
    assert labels(runs, keys) == [
        "weight_decay=0 precision=bf16",
        "weight_decay=0 precision=fp32",
        "weight_decay=0.1 precision=bf16",
        "weight_decay=0.1 precision=fp32",
    ]
    assert label(runs[0], []) == "wd0-bf16"
    assert short_names(["optim.lr", "probe.lr", "precision"]) == {
        "optim.lr": "optim.lr",
        "probe.lr": "probe.lr",
        "precision": "precision",
    }


def test_mixed_arguments_are_read_once(sweep_dir: Path) -> None:
    runs = load_runs([sweep_dir / "wd0-fp32", sweep_dir, sweep_dir / "wd0-fp32"])
    assert [run.name for run in runs] == ["wd0-fp32", "wd0-bf16", "wd0.1-bf16", "wd0.1-fp32"]
    assert labels(runs[:1]) == ["wd0-fp32"]


@pytest.mark.parametrize(
    "make_path, message",
    [
        (lambda tmp: tmp / "nope", "does not exist"),
        (lambda tmp: (tmp / "f.txt").write_text("x") and tmp / "f.txt", "is a file"),
        (lambda tmp: tmp, "is neither a run directory (no config.yaml) nor a sweep directory"),
    ],
)
def test_bad_paths(tmp_path: Path, make_path: Callable[[Path], Path], message: str) -> None:
    (tmp_path / "empty_subdir").mkdir()
    path = make_path(tmp_path)
    with pytest.raises(StudyError, match=re.escape(message)):
        load_runs([path])
    with pytest.raises(StudyError, match="no runs"):
        load_runs([])


def test_cli_error_is_one_line_exit_2(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "study.compare", str(tmp_path / "missing")],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr == f"error: '{tmp_path / 'missing'}' does not exist\n"


# --- the report ------------------------------------------------------------------------------


def test_summary_csv_values(sweep_report: Path) -> None:
    rows = {row["run"]: row for row in _csv(sweep_report / "summary.csv")}
    expected = {  # status, steps, final loss, final val loss, divergences, first, mean tok/s
        "wd0-bf16": ("completed", "20", 3.3, "3.4", "0", "", 1100.0),
        "wd0.1-bf16": ("completed", "20", 3.25, "3.35", "1", "10", 1100.0),
        "wd0-fp32": ("diverged", "15", math.nan, "", "2", "14", 1075.0),
        "wd0.1-fp32": ("unknown", "18", 3.466, "", "1", "6", 1090.0),
    }
    assert set(rows) == set(expected)
    for name, (status, steps, loss, val, divergences, first, tok_per_s) in expected.items():
        row = rows[name]
        assert (row["status"], row["steps"], row["final_val_loss"]) == (status, steps, val)
        assert (row["divergences"], row["first_divergence_step"]) == (divergences, first)
        assert float(row["final_loss"]) == pytest.approx(loss, nan_ok=True)
        assert float(row["mean_tok_per_s"]) == pytest.approx(tok_per_s)
    assert rows["wd0-fp32"]["label"] == "weight_decay=0 precision=fp32"
    assert rows["wd0-fp32"]["optim.weight_decay"] == "0.0"
    assert rows["wd0-fp32"]["precision"] == "fp32"


def test_summary_md(sweep_report: Path, sweep_dir: Path) -> None:
    text = (sweep_report / "summary.md").read_text()
    assert "Runs differ in: `optim.weight_decay`, `precision`." in text
    assert (
        "| weight_decay=0 precision=fp32 | diverged | 15 | nan | - | - | 2 | 14 | 1,075 | - |"
        in text
    )
    assert (
        "| weight_decay=0.1 precision=bf16 | completed | 20 | 3.2500 | 3.3500 | - | 1 | 10 |"
        in text
    )
    for name in SWEEP_PNGS:
        assert f"]({name}.png)" in text
    assert "LR sensitivity" not in text  # the LR does not vary
    assert "wd0.1-fp32: no summary.json" in text
    link = os.path.relpath(sweep_dir / "wd0-fp32", sweep_report)
    assert (
        "## Diagnoses\n\n- weight_decay=0 precision=fp32: detection 0 at step 14: state (medium "
        f"confidence), likely optimizer: [report]({link}/diagnosis-0/report.md)"
    ) in text
    assert (
        "## Heals\n\n- weight_decay=0.1 precision=bf16: spike of loss at step 12: state "
        "(optimizer), healed by lr x 0.1 for steps 8-207, then the schedule; back to step 8, 4 "
        "steps lost"
    ) in text
    assert "a heal by a dotted line at the step it rolled back to" in text


@pytest.mark.parametrize("name", SWEEP_PNGS)
def test_plots_are_real_pngs(sweep_report: Path, name: str) -> None:
    path = sweep_report / f"{name}.png"
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    assert path.stat().st_size > 20_000
    height, width = matplotlib.image.imread(path).shape[:2]
    assert width > 600 and height > 300


def test_no_sensitivity_plot_without_lr_grid(sweep_report: Path) -> None:
    assert not (sweep_report / "lr_sensitivity.png").exists()
    assert not (sweep_report / "sensitivity.csv").exists()


def test_default_out(sweep_dir: Path, tmp_path: Path) -> None:
    assert default_out(str(sweep_dir)) == sweep_dir / "compare"
    assert default_out(str(sweep_dir / "wd0-bf16")) == Path("compare")  # never inside a run


def test_report_dir_inside_sweep_is_not_a_run(sweep_dir: Path, tmp_path: Path) -> None:
    paths, _ = report(load_runs([sweep_dir]), tmp_path / "compare")
    assert [p.name for p in paths[:2]] == ["summary.md", "summary.csv"]
    assert len(load_runs([sweep_dir])) == 4


def test_ema() -> None:
    values = np.array([1.0, 3.0, np.nan, 3.0])
    np.testing.assert_array_equal(ema(values, 0.0), values)
    smooth = ema(values, 0.5)
    assert smooth[0] == 1.0  # debiased: starts at the first value, not at 0.5
    assert smooth[1] == pytest.approx((0.25 * 1 + 0.5 * 3) / 0.75)
    assert np.isnan(smooth[2]) and np.isfinite(smooth[3])


# --- LR sensitivity --------------------------------------------------------------------------


def test_lr_sensitivity_by_hand() -> None:
    # min(final, initial): 4, 3.5, 10 (12 clipped) -> best 3.5 -> mean(0.5, 0, 6.5)
    assert lr_sensitivity([4.0, 3.5, 12.0], [10.0, 10.0, 10.0]) == pytest.approx(7 / 3)
    # NaN counts as the initial loss; per-run initial losses
    assert lr_sensitivity([4.0, math.nan], [10.0, 11.0]) == pytest.approx((0 + 7.0) / 2)
    assert lr_sensitivity([3.0], [10.0]) == 0.0
    with pytest.raises(ValueError):
        lr_sensitivity([], [])


def test_lr_groups(lr_sweep_dir: Path) -> None:
    groups, notes = lr_groups(load_runs([lr_sweep_dir]))
    assert notes == []
    # optim.min_lr = lr / 10 follows the LR, so it does not split the groups
    assert [g.label for g in groups] == ["name=adam_l2", "name=adamw"]
    adam_l2, adamw = groups
    assert adamw.lrs == [1e-3, 3e-3, 1e-2]
    assert adamw.clipped_losses == [4.0, 3.5, 10.0]
    assert adamw.sensitivity == pytest.approx(7 / 3)
    assert adamw.best == (3e-3, 3.5)
    # diverged runs count as the initial loss, finite final loss (6.0) or not
    assert adam_l2.clipped_losses == [4.2, 10.0, 10.0]
    assert adam_l2.sensitivity == pytest.approx((0 + 5.8 + 5.8) / 3)
    assert lr_groups(load_runs([lr_sweep_dir / "adamw-lr0.001"])) == ([], [])


def test_sensitivity_outputs(lr_report: Path) -> None:
    rows = _csv(lr_report / "sensitivity.csv")
    assert [(r["group"], r["lrs"]) for r in rows] == [
        ("name=adam_l2", "0.001 0.003 0.01"),
        ("name=adamw", "0.001 0.003 0.01"),
    ]
    assert float(rows[1]["sensitivity"]) == pytest.approx(7 / 3)
    assert (rows[0]["diverged"], rows[1]["best_lr"]) == ("2", "0.003")
    text = (lr_report / "summary.md").read_text()
    assert "| name=adamw | 0.001 0.003 0.01 | 0.003 | 3.5000 | 0 | 2.3333 |" in text
    assert "](lr_sensitivity.png)" in text
    png = lr_report / "lr_sensitivity.png"
    assert png.read_bytes()[:8] == PNG_SIGNATURE and png.stat().st_size > 10_000


# --- dynamics instruments ----------------------------------------------------------------------


def test_sharpness_and_output_layer_plots(tmp_path: Path) -> None:
    """Runs that log sharpness (every 5th step) and the slingshot signals get both figures, the
    slingshot detection its marker; runs without them get neither."""
    from tests.study.conftest import BASE_CONFIG, event, train_line, write_run

    for name, lr in (("a", 1e-3), ("b", 3e-3)):
        lines = []
        for step in range(1, 21):
            extra = {
                "param_norm/output": 50.0 + step**1.5,
                "output_norm_growth": 1e-3 * step,
                "softmax_saturated": 0.0,
                "zero_sum_residual": 1e-8,
            }
            if step % 5 == 0:
                threshold = 38 / lr
                s = threshold * min(1.0, step / 10)
                extra.update(
                    sharpness=s,
                    sharpness_threshold=threshold,
                    sharpness_ratio=s / threshold,
                    hessian_max_eig=10.0 * step,
                )
            lines.append(train_line(step, 5.0 - 0.1 * step, **extra))
        detection = event(15, "slingshot", metric="output_norm_growth", value=0.1, threshold=0.01)
        detection["detail"] = "cycle"
        config = {**BASE_CONFIG, "optim": {**BASE_CONFIG["optim"], "lr": lr}}
        write_run(tmp_path / "runs", name, config, lines, events=[detection])
    out = tmp_path / "out"
    assert (
        main([str(tmp_path / "runs" / "a"), str(tmp_path / "runs" / "b"), "--out", str(out)]) == 0
    )
    text = (out / "summary.md").read_text()
    for name in ("sharpness", "output_layer"):
        path = out / f"{name}.png"
        assert path.read_bytes()[:8] == PNG_SIGNATURE and path.stat().st_size > 20_000
        assert f"]({name}.png)" in text
    assert "plus: slingshot" in text
    plain = tmp_path / "plain"
    write_run(tmp_path / "plainruns", "p", BASE_CONFIG, [train_line(s, 5.0) for s in range(1, 5)])
    assert main([str(tmp_path / "plainruns" / "p"), "--out", str(plain)]) == 0
    assert not (plain / "sharpness.png").exists() and not (plain / "output_layer.png").exists()
