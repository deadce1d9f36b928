"""study/report.py: the claims' verdicts on synthetic sweeps whose answer is known by construction.

Every run logs steps 0..40 of a 40-step run. Its loss starts at 10, is flat at `mid` over steps
14..18 (the mid-training window, 35-45%) and flat at `final` over steps 38..40 (the final window,
the last 5%), so the expected means and stds below are the numbers put in.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from study import compare
from study.report import build_report, default_out, main
from study.runs import load_runs
from study.stats import detectable, fisher_greater, pooled_std, seeds_needed, stat, versus
from tests.study.conftest import config_with, event, train_line, write_run

REPO = Path(__file__).resolve().parents[2]
CLAIMS_KEYS = Path(__file__).with_name("claims_keys.txt")
MAX_STEPS = 40
NOISE = (0.01, -0.01, 0.0)  # per seed 1, 2, 3: mean 0, sample std 0.01


def loss_at(step: int, mid: float, final: float) -> float:
    """10 -> mid (flat over 14..18) -> final (flat over 38..40), linear in between."""
    return float(np.interp(step, [0, 14, 18, 38, 40], [10.0, mid, mid, final, final]))


def write_sweep_run(
    root: Path,
    name: str,
    *,
    mid: float = 5.0,
    final: float = 3.3,
    norm: float = 100.0,
    stop: int | None = None,
    jump: int | None = None,
    events: list[dict[str, Any]] = (),
    status: str = "completed",
    **config: Any,
) -> Path:
    """One run of a sweep; `stop` ends it with a NaN loss at that step; from step `jump` on the
    loss is 8.0 (a blow-up that stays finite)."""
    last = MAX_STEPS if stop is None else stop
    norms = {"param_norm/decay": norm, "eff_lr/decay": 3e-3 / norm, "adam_eff_lr": norm / 10}
    losses = [8.0 if jump and s >= jump else loss_at(s, mid, final) for s in range(last + 1)]
    lines = [train_line(s, loss, **norms) for s, loss in enumerate(losses[:-1])]
    lines.append(train_line(last, "nan" if stop else losses[-1], **norms))
    lines[-1]["val_loss"] = final + 0.1 if stop is None else "nan"
    summary = {"status": status, "steps": last, "final_loss": "nan" if stop else final}
    cfg = config_with(train__max_steps=MAX_STEPS, **config)
    return write_run(root, name, cfg, lines, list(events), summary)


def wd_sweep(
    root: Path, finals: dict[float, float], seeds: tuple[int, ...] = (1, 2, 3), **config: Any
) -> Path:
    """AdamW at each λ of `finals` x seeds, bf16; mid-training the larger λ is 0.2 higher."""
    root.mkdir(parents=True, exist_ok=True)
    for wd, final in finals.items():
        for seed in seeds:
            noise = NOISE[seed - 1]
            write_sweep_run(
                root,
                "-".join([*(f"{v}" for v in config.values()), f"wd{wd:g}", f"s{seed}"]),
                mid=5.0 + 2 * wd + noise,
                final=final + noise,
                norm=100.0 - 100 * wd + seed,
                optim__weight_decay=wd,
                run__seed=seed,
                **config,
            )
    return root


def make_report(*sweeps: Path, out: Path, plots: bool = False) -> tuple[dict[str, Any], str]:
    """claims.json and report.md of `sweeps`, without study.compare's per-sweep reports."""
    build_report([str(s) for s in sweeps], out, per_sweep=False, plots=plots)
    return json.loads((out / "claims.json").read_text()), (out / "report.md").read_text()


def linked_pngs(out: Path, text: str) -> list[str]:
    """The PNG links of report.md, each checked to be a real PNG beside it."""
    links = re.findall(r"\]\(([^)]+\.png)\)", text)
    for link in links:
        assert (out / link).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", link
    return links


# --- statistics ------------------------------------------------------------------------------


def test_stat_and_versus() -> None:
    a, b = stat([3.31, 3.29, 3.30, math.nan]), stat([3.21, 3.19, 3.20])
    assert (a.n, a.mean, a.std) == (3, pytest.approx(3.30), pytest.approx(0.01))
    c = versus(b, a)
    assert c.diff == pytest.approx(-0.1) and c.sign == "lower"
    assert c.se == pytest.approx(math.sqrt(2 * 0.01**2 / 3))
    assert versus(a, a).sign == "same"
    assert versus(stat([3.0]), a).sign == "unknown"


def test_fisher_by_hand() -> None:
    assert fisher_greater(3, 3, 0, 3) == pytest.approx(1 / 20)
    assert fisher_greater(2, 2, 0, 2) == pytest.approx(1 / 6)
    assert fisher_greater(3, 3, 1, 3) == pytest.approx(4 / 20)
    assert fisher_greater(0, 3, 0, 3) == 1.0


def test_power_by_hand() -> None:
    """σ = 0.01 in every cell (4 degrees of freedom); n > 2·(2σ/0.02)² = 20,000·σ² seeds."""
    std, dof = pooled_std([stat([3.31, 3.29, 3.30]), stat([3.21, 3.19, 3.20]), stat([3.0])])
    assert (std, dof) == (pytest.approx(0.01), 4)
    assert seeds_needed(0.012) == 3 and seeds_needed(0.017) == 6 and seeds_needed(0.05) == 51
    assert seeds_needed(0.001) == 2  # a spread needs two seeds to be seen at all
    assert detectable(std, 3) == pytest.approx(2 * 0.01 * math.sqrt(2 / 3))
    assert pooled_std([stat([1.0])]) == (pytest.approx(math.nan, nan_ok=True), 0)


def test_the_report_sizes_seeds_from_the_spread_within_cells(tmp_path: Path) -> None:
    """wd_sweep's final val losses are final + 0.1 + NOISE[seed]: the same spread in each cell."""
    claims, text = make_report(wd_sweep(tmp_path / "wd", {0.0: 3.3, 0.1: 3.2}), out=tmp_path / "o")
    p = claims["power"]
    spread = float(np.std(NOISE, ddof=1))
    assert (p["pooled_std"], p["dof"]) == (pytest.approx(spread), 4)
    assert p["seeds_needed"] == seeds_needed(p["pooled_std"]) in (2, 3)  # 20,000·σ² = 2
    assert [c["final_val_loss"]["n"] for c in p["cells"]] == [3, 3]
    assert p["detectable"] == {"3": pytest.approx(detectable(spread, 3))}
    assert f"**{p['seeds_needed']} seeds per cell**" in text


# --- claim 1 ---------------------------------------------------------------------------------


def test_claim1_reproduced(tmp_path: Path) -> None:
    sweep = wd_sweep(tmp_path / "wd", {0.0: 3.3, 0.1: 3.2})
    claims, text = make_report(sweep, out=tmp_path / "out", plots=True)
    c1 = claims["claims"]["claim1"]
    assert c1["verdict"] == "reproduced"
    (group,) = c1["groups"]
    base, decayed = group["arms"]
    assert (base["weight_decay"], decayed["weight_decay"]) == (0.0, 0.1)
    assert base["final_loss"]["mean"] == pytest.approx(3.3)
    assert base["final_loss"]["std"] == pytest.approx(0.01)
    assert decayed["final_loss"]["mean"] == pytest.approx(3.2) and decayed["final_loss"]["n"] == 3
    assert decayed["final_vs_baseline"]["diff"] == pytest.approx(-0.1)
    assert decayed["final_val_loss"]["mean"] == pytest.approx(3.3)
    assert decayed["mid_loss"]["mean"] == pytest.approx(5.2)
    assert decayed["param_norm_decay"]["mean"] == pytest.approx(92.0)
    assert decayed["eff_lr_decay"]["mean"] == pytest.approx(
        np.mean([3e-3 / n for n in (91, 92, 93)])
    )
    assert decayed["adam_eff_lr"]["mean"] == pytest.approx(9.2)  # norm / 10 in write_sweep_run
    assert c1["mechanism"]["verdict"] == "reproduced"  # norm down, effective LR up
    assert c1["order"]["verdict"] == "reproduced"  # higher mid-training, lower at the end
    assert "Verdict on claim 1: **reproduced**" in text
    assert "Verdict on claim 3: **cannot tell**" in text  # no Adam+L2 runs
    assert set(linked_pngs(tmp_path / "out", text)) >= {
        "claim1_final_loss.png",
        "claim1_dynamics.png",
        "claim2_divergence.png",
    }


def test_kernel_paths_are_never_pooled_and_the_floor_gap_is_reported(tmp_path: Path) -> None:
    root = tmp_path / "paths"
    for path, offset in (("aten:AVX2 onednn:AVX2 sdpa:FLASH_ATTENTION", 0.0), ("cuda:H100", 0.3)):
        for wd, final in ((0.0, 3.3), (0.1, 3.2)):
            for seed in (1, 2, 3):
                write_sweep_run(
                    root,
                    f"{path[:4]}-wd{wd:g}-s{seed}",
                    final=final + offset + NOISE[seed - 1],
                    optim__weight_decay=wd,
                    run__seed=seed,
                    meta__kernel_path={"path": path},
                    meta__data={"loss_floor": 2.75},
                )
    claims, text = make_report(root, out=tmp_path / "out")
    groups = claims["claims"]["claim1"]["groups"]
    assert sorted(g["group"] for g in groups) == [
        "path=aten:AVX2 onednn:AVX2 sdpa:FLASH_ATTENTION",
        "path=cuda:H100",
    ]
    gaps = {g["group"][5:9]: g["arms"][1]["val_gap_to_floor"]["mean"] for g in groups}
    assert gaps == pytest.approx({"aten": 3.3 - 2.75, "cuda": 3.6 - 2.75})  # val = final + 0.1
    assert "| cuda:H100 | 6 | 2.7500 |" in text
    compare.report(load_runs([str(root)]), tmp_path / "cmp")
    table = (tmp_path / "cmp" / "summary.md").read_text()
    assert "| 3.5000 | 3.6000 | 0.8500 | 0 | - | 1,200 | cuda:H100 |" in table


def test_claim1_compares_validation_losses_only_where_every_run_has_one(tmp_path: Path) -> None:
    sweep = wd_sweep(tmp_path / "wd", {0.0: 3.3, 0.1: 3.2})
    group = make_report(sweep, out=tmp_path / "o")[0]["claims"]["claim1"]["groups"][0]
    assert group["loss_name"] == "final validation loss"
    assert group["arms"][1]["loss"]["mean"] == pytest.approx(3.3)  # final + 0.1
    metrics = sweep / "wd0-s2" / "metrics.jsonl"
    lines = [json.loads(line) for line in metrics.read_text().splitlines()]
    lines[-1].pop("val_loss")
    metrics.write_text("".join(json.dumps(line) + "\n" for line in lines))
    group = make_report(sweep, out=tmp_path / "o2")[0]["claims"]["claim1"]["groups"][0]
    assert group["loss_name"] == "final train loss"
    assert group["arms"][1]["loss"]["mean"] == pytest.approx(3.2)


def test_claim1_order_reads_mid_training_validation_where_every_run_has_it(tmp_path: Path) -> None:
    """An evaluation at step 16 (40% of 40): the order compares validation losses there."""
    sweep = wd_sweep(tmp_path / "wd", {0.0: 3.3, 0.3: 3.2})
    for metrics in sweep.glob("*/metrics.jsonl"):
        lines = [json.loads(line) for line in metrics.read_text().splitlines()]
        wd = 0.3 if "wd0.3" in metrics.parent.name else 0.0
        lines[16]["val_loss"] = 4.0 + wd + NOISE[int(metrics.parent.name[-1]) - 1]
        metrics.write_text("".join(json.dumps(line) + "\n" for line in lines))
    c1 = make_report(sweep, out=tmp_path / "o")[0]["claims"]["claim1"]
    assert c1["groups"][0]["arms"][1]["mid_val_loss"]["mean"] == pytest.approx(4.3)
    assert c1["order"]["verdict"] == "reproduced"
    assert "(validation losses): mid-training +0.3000" in c1["order"]["reason"]


def test_claim1_identical_losses_not_reproduced(tmp_path: Path) -> None:
    claims, text = make_report(wd_sweep(tmp_path / "wd", {0.0: 3.3, 0.1: 3.3}), out=tmp_path / "o")
    c1 = claims["claims"]["claim1"]
    assert c1["verdict"] == "not reproduced"
    assert c1["groups"][0]["arms"][1]["final_vs_baseline"]["diff"] == pytest.approx(0, abs=1e-12)
    assert c1["groups"][0]["arms"][1]["final_vs_baseline"]["sign"] == "same"
    assert "Verdict on claim 1: **not reproduced**" in text


def test_claim1_one_seed_cannot_tell(tmp_path: Path) -> None:
    sweep = wd_sweep(tmp_path / "wd", {0.0: 3.3, 0.1: 3.0}, seeds=(1,))
    claims, text = make_report(sweep, out=tmp_path / "o")
    c1 = claims["claims"]["claim1"]
    assert c1["verdict"] == "cannot tell" and "too few seeds" in c1["reason"]
    assert c1["groups"][0]["arms"][0]["final_loss"] == {
        "mean": pytest.approx(3.31),
        "std": None,
        "n": 1,
        "values": [pytest.approx(3.31)],
    }
    assert "Verdict on claim 1: **cannot tell**" in text


def test_diverged_runs_are_left_out_of_loss_statistics(tmp_path: Path) -> None:
    sweep = wd_sweep(tmp_path / "wd", {0.0: 3.3, 0.1: 3.2})
    write_sweep_run(sweep, "wd0-s4", stop=30, status="diverged", optim__weight_decay=0.0)
    claims, _ = make_report(sweep, out=tmp_path / "o")
    base = claims["claims"]["claim1"]["groups"][0]["arms"][0]
    assert (base["runs"], base["left_out"], base["final_loss"]["n"]) == (4, 1, 3)
    assert base["final_loss"]["mean"] == pytest.approx(3.3)


# --- claim 2 ---------------------------------------------------------------------------------


def divergence_sweep(
    root: Path, diverge: bool = True, with_bf16_wd0: bool = True, bf16_kernels: str = "native"
) -> Path:
    """bf16 λ=0 / fp32 λ=0 / bf16 λ=0.1 x 3 seeds; bf16 λ=0 runs blow up at 30, 32, 34.

    Seeds 1 and 3 stop with a NaN loss (status diverged, a nonfinite event); seed 2 has a spike
    at 32 and its loss stays at 8.0 to the end (status completed). Seeds 1 and 2 carry an
    evidence window with attention logits and log Z; seed 3's event has none, so the report
    falls back to metrics.jsonl. A bf16 λ=0.1 run has an attn_logit detection, which is counted
    but flags nothing.
    """
    cells = [("bf16", 0.0), ("fp32", 0.0), ("bf16", 0.1)][0 if with_bf16_wd0 else 1 :]
    for precision, wd in cells:
        for seed in (1, 2, 3):
            kwargs: dict[str, Any] = {}
            if diverge and (precision, wd) == ("bf16", 0.0):
                stop = 28 + 2 * seed
                window = [
                    {
                        "step": stop - 3 + i,
                        "loss": 3.5,
                        "attn_logit_max": logit,
                        "attn_logit_max/layers": [logit, 50.0],
                        "log_z": z,
                    }
                    for i, (logit, z) in enumerate(
                        [(100.0, 0.5), (200.0, -1.0), (5000.0, 2.0), (1e4, -3.0)]
                    )
                ]
                evidence = window if seed < 3 else []
                kwargs = {
                    "stop": stop,
                    "status": "diverged",
                    "events": [
                        event(stop, "nonfinite", metric="loss", value="nan", evidence=evidence),
                        event(stop, "stop"),
                    ],
                }
                if seed == 2:
                    kwargs = {"jump": stop, "events": [event(stop, "spike", evidence=evidence)]}
            if (precision, wd, seed) == ("bf16", 0.1, 2):
                kwargs["events"] = [event(20, "attn_logit", metric="attn_logit_max", value=900.0)]
            if precision == "bf16":
                kwargs["bf16_kernels"] = bf16_kernels
            write_sweep_run(
                root,
                f"{precision}-wd{wd:g}-s{seed}",
                precision=precision,
                optim__weight_decay=wd,
                run__seed=seed,
                **kwargs,
            )
    return root


def test_claim2_reproduced(tmp_path: Path) -> None:
    claims, text = make_report(divergence_sweep(tmp_path / "div"), out=tmp_path / "o", plots=True)
    c2 = claims["claims"]["claim2"]
    assert c2["verdict"] == "reproduced"
    (group,) = c2["groups"]
    assert group["controls"] == {"fp32": "reproduced", "weight_decay": "reproduced"}
    cells = {(c["precision"], c["weight_decay"]): c for c in group["cells"]}
    bf16 = cells[("bf16", 0.0)]
    assert (bf16["runs"], bf16["blew_up"], bf16["flagged"], bf16["status_diverged"]) == (3, 3, 3, 2)
    assert bf16["runs_with"] == {
        "nonfinite": 2,
        "spike": 1,
        "drift": 0,
        "attn_logit": 0,
        "output_logit": 0,
        "slingshot": 0,
    }
    assert bf16["first_divergence_steps"] == bf16["blew_up_steps"] == [30, 32, 34]
    assert bf16["first_divergence_step"]["mean"] == 32 and bf16["first_divergence_step"]["std"] == 2
    assert bf16["first_divergence_fraction"]["mean"] == pytest.approx(0.8)
    assert (cells[("fp32", 0.0)]["flagged"], cells[("bf16", 0.1)]["flagged"]) == (0, 0)
    assert cells[("bf16", 0.1)]["runs_with"]["attn_logit"] == 1  # counted, not a divergence
    assert "p=0.05" in c2["reason"]
    by_run = {e["run"]: e for e in group["evidence"]}
    assert set(by_run) == {"bf16-wd0-s1", "bf16-wd0-s2", "bf16-wd0-s3"}
    first = by_run["bf16-wd0-s1"]
    assert (first["kind"], first["step"], first["source"]) == ("nonfinite", 30, "event evidence")
    assert first["window"] == [27, 30]
    assert (first["attn_logit_max"], first["attn_logit_max_step"]) == (1e4, 30)
    assert first["attn_logit_max_layer"] == 0
    assert (first["log_z_last"], first["log_z_max_abs"]) == (-3.0, 3.0)
    assert (by_run["bf16-wd0-s2"]["kind"], by_run["bf16-wd0-s2"]["blew_up"]) == ("spike", True)
    fallback = by_run["bf16-wd0-s3"]  # train_line: attn_logit_max = 5 + step, log_z = 0.1 step
    assert (fallback["source"], fallback["window"]) == ("metrics.jsonl", [3, 34])
    assert fallback["attn_logit_max"] == 39.0 and fallback["log_z_last"] == pytest.approx(3.4)
    assert "Verdict on claim 2: **reproduced**" in text
    assert "claim2_divergence.png" in linked_pngs(tmp_path / "o", text)


def test_claim2_emulated_bf16_is_one_group_with_its_fp32_control(tmp_path: Path) -> None:
    """bf16_kernels=emulated on every bf16 run goes with the precision, not into a group."""
    sweep = divergence_sweep(tmp_path / "div", bf16_kernels="emulated")
    c2 = make_report(sweep, out=tmp_path / "o")[0]["claims"]["claim2"]
    (group,) = c2["groups"]
    assert group["controls"] == {"fp32": "reproduced", "weight_decay": "reproduced"}


def test_claim2_no_divergence_not_reproduced(tmp_path: Path) -> None:
    claims, text = make_report(divergence_sweep(tmp_path / "d", diverge=False), out=tmp_path / "o")
    c2 = claims["claims"]["claim2"]
    assert c2["verdict"] == "not reproduced"
    assert "bf16 λ=0 blew up in 0/3 runs within 40 steps, detectors flagged 0/3" in c2["reason"]
    assert all(c["flagged"] == c["blew_up"] == 0 for c in c2["groups"][0]["cells"])
    assert c2["groups"][0]["evidence"] == []
    assert "Verdict on claim 2: **not reproduced**" in text


def test_claim2_without_bf16_wd0_cannot_tell(tmp_path: Path) -> None:
    sweep = divergence_sweep(tmp_path / "d", diverge=False, with_bf16_wd0=False)
    claims, _ = make_report(sweep, out=tmp_path / "o")
    c2 = claims["claims"]["claim2"]
    assert c2["verdict"] == "cannot tell"
    assert c2["reason"] == "bf16 without weight decay was not run."


def test_claim2_recovered_spike_is_flagged_but_not_a_blow_up(tmp_path: Path) -> None:
    sweep = divergence_sweep(tmp_path / "d")
    fp32 = {"precision": "fp32", "optim__weight_decay": 0.0}
    write_sweep_run(sweep, "fp32-s4", run__seed=4, events=[event(25, "spike")], **fp32)
    c2 = make_report(sweep, out=tmp_path / "o")[0]["claims"]["claim2"]
    cell = next(c for c in c2["groups"][0]["cells"] if c["precision"] == "fp32")
    assert (cell["runs"], cell["flagged"], cell["blew_up"]) == (4, 1, 0)
    assert cell["runs_with"]["spike"] == 1 and cell["first_divergence_steps"] == [25]
    assert c2["verdict"] == "reproduced"  # 3/3 against 0/4: p = 1/35
    # an fp32 run that does blow up: 3/3 against 1/5, p = 4/56, fewer but not significantly
    write_sweep_run(sweep, "fp32-s5", run__seed=5, stop=20, status="diverged", **fp32)
    c2 = make_report(sweep, out=tmp_path / "o2")[0]["claims"]["claim2"]
    assert c2["groups"][0]["controls"] == {"fp32": "cannot tell", "weight_decay": "reproduced"}
    assert c2["verdict"] == "cannot tell" and "p=0.0714" in c2["reason"]


def test_a_record_only_spike_flags_nothing(tmp_path: Path) -> None:
    """A grad-norm spike the loss did not follow (`actionable` false, issue 23) is counted by
    kind but does not flag its run; runs older than the field count every detection."""
    sweep = divergence_sweep(tmp_path / "d")
    fp32 = {"precision": "fp32", "optim__weight_decay": 0.0}
    lone = event(25, "spike", metric="grad_norm", actionable=False)
    write_sweep_run(sweep, "fp32-s4", run__seed=4, events=[lone], **fp32)
    c2 = make_report(sweep, out=tmp_path / "o")[0]["claims"]["claim2"]
    cell = next(c for c in c2["groups"][0]["cells"] if c["precision"] == "fp32")
    assert (cell["runs"], cell["flagged"], cell["runs_with"]["spike"]) == (4, 0, 1)


# --- claim 3 ---------------------------------------------------------------------------------


def l2_sweep(root: Path, finals: dict[float, float]) -> Path:
    """Adam + L2 at each coefficient of `finals` x 3 seeds, in wd_sweep's setup."""
    root.mkdir(parents=True)
    for coefficient, final in finals.items():
        for seed in (1, 2, 3):
            write_sweep_run(
                root,
                f"l2{coefficient:g}-s{seed}",
                final=final + NOISE[seed - 1],
                optim__name="adam_l2",
                optim__l2_form="loss",  # the paper's form: goes with the optimizer, not a group
                optim__weight_decay=coefficient,
                run__seed=seed,
            )
    return root


@pytest.mark.parametrize(
    "l2_finals, verdict",
    [
        ({1e-4: 3.25, 1e-3: 3.28}, "reproduced"),  # better than no decay, worse than AdamW
        ({1e-4: 3.2, 1e-3: 3.28}, "not reproduced"),  # as good as AdamW
        ({1e-4: 3.3, 1e-3: 3.31}, "not reproduced"),  # no improvement
    ],
)
def test_claim3(tmp_path: Path, l2_finals: dict[float, float], verdict: str) -> None:
    adamw = wd_sweep(tmp_path / "adamw", {0.0: 3.3, 0.1: 3.2, 0.3: 3.22})
    l2 = l2_sweep(tmp_path / "l2", l2_finals)
    claims, text = make_report(adamw, l2, out=tmp_path / "o", plots=verdict == "reproduced")
    c3 = claims["claims"]["claim3"]
    assert c3["verdict"] == verdict, c3["reason"]
    (group,) = c3["groups"]  # optim.name does not split the groups: one shared baseline
    assert group["loss_name"] == "final validation loss"  # every run has one: final + 0.1
    assert group["baseline"]["mean"] == pytest.approx(3.4)
    assert group["best"]["adamw"]["weight_decay"] == 0.1
    assert group["best"]["adamw"]["vs_baseline"]["diff"] == pytest.approx(-0.1)
    assert group["best"]["adamw"]["improvement_percent"] == pytest.approx(100 * 0.1 / 3.4)
    best_l2 = min(l2_finals, key=l2_finals.get)
    assert group["best"]["adam_l2"]["weight_decay"] == best_l2
    assert group["best"]["adam_l2"]["loss"]["mean"] == pytest.approx(l2_finals[best_l2] + 0.1)
    assert group["l2_minus_adamw"]["diff"] == pytest.approx(l2_finals[best_l2] - 3.2)
    assert f"Verdict on claim 3: **{verdict}**" in text
    assert [s["runs"] for s in claims["sweeps"]] == [9, 6]
    if verdict == "reproduced":
        assert "claim3_improvement.png" in linked_pngs(tmp_path / "o", text)
        assert "claim1_final_loss.png" in linked_pngs(tmp_path / "o", text)
    # claim 1 is judged on AdamW only; Adam+L2 rows are listed against the same baseline
    arms = [
        (a["optimizer"], a["weight_decay"]) for a in claims["claims"]["claim1"]["groups"][0]["arms"]
    ]
    assert arms == [
        ("adamw", 0.0),
        ("adamw", 0.1),
        ("adamw", 0.3),
        ("adam_l2", 0.0001),
        ("adam_l2", 0.001),
    ]


def test_groups_that_disagree_and_lr_sensitivity_over_seeds(tmp_path: Path) -> None:
    """Weight decay helps at lr 1e-3 and changes nothing at 3e-3: claim 1 cannot tell overall."""
    sweep = wd_sweep(tmp_path / "lr", {0.0: 3.3, 0.1: 3.2}, optim__lr=1e-3)
    wd_sweep(sweep, {0.0: 3.25, 0.1: 3.25}, optim__lr=3e-3)
    claims, text = make_report(sweep, out=tmp_path / "o")
    c1 = claims["claims"]["claim1"]
    verdicts = {g["group"]: g["verdict"] for g in c1["groups"]}
    assert verdicts == {"lr=0.001": "reproduced", "lr=0.003": "not reproduced"}
    assert c1["verdict"] == "cannot tell"
    assert c1["reason"].startswith("Groups disagree (1 reproduced, 1 not).")
    # per seed: best of the two LRs, the other 0.05 above -> sensitivity 0.025 for every seed
    rows = {r["group"]: r for r in claims["lr_sensitivity"]}
    assert set(rows) == {"weight_decay=0", "weight_decay=0.1"}
    assert rows["weight_decay=0.1"]["sensitivity"]["mean"] == pytest.approx(0.025)
    assert rows["weight_decay=0.1"]["sensitivity"]["n"] == 3
    assert rows["weight_decay=0.1"]["sensitivity"]["std"] == pytest.approx(0, abs=1e-9)
    assert rows["weight_decay=0.1"]["best_lrs"] == [1e-3] * 3
    assert rows["weight_decay=0"]["best_lrs"] == [3e-3] * 3
    assert "| weight_decay=0.1 | 0.001 0.003 | 0.0250 ± 0.0000 (n=3) |" in text


# --- LR sensitivity, the CLI and other sweeps ---------------------------------------------------


def test_lr_sensitivity_one_seed(lr_sweep_dir: Path, tmp_path: Path) -> None:
    claims, text = make_report(lr_sweep_dir, out=tmp_path / "o")
    rows = {r["group"]: r for r in claims["lr_sensitivity"]}
    assert set(rows) == {"name=adam_l2", "name=adamw"}
    assert rows["name=adamw"]["sensitivity"]["mean"] == pytest.approx(7 / 3)
    assert rows["name=adamw"]["best_lrs"] == [3e-3] and rows["name=adamw"]["lrs"] == [
        1e-3,
        3e-3,
        1e-2,
    ]
    assert "LR sensitivity, mean ± std over seeds" in text
    for key in ("claim1", "claim3"):  # weight decay does not vary
        assert claims["claims"][key]["verdict"] == "cannot tell"


def test_cli_with_per_sweep_reports(sweep_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    assert main([str(sweep_dir), "--out", str(out)]) == 0
    text = (out / "report.md").read_text()
    claims = json.loads((out / "claims.json").read_text())
    (sweep,) = claims["sweeps"]
    assert (sweep["runs"], sweep["manifest_runs"]) == (4, None)
    assert sweep["varying"] == ["optim.weight_decay", "precision"]
    assert "[summary.md](sweeps/" in text and (out / sweep["compare"]).is_file()
    linked_pngs(out, text)
    assert (out / "sweeps" / sweep_dir.name / "loss.png").is_file()
    # one seed per cell: no spread, and bf16 λ=0 ran without diverging
    assert claims["claims"]["claim1"]["verdict"] == "cannot tell"
    assert claims["claims"]["claim2"]["verdict"] == "not reproduced"
    assert "wd0.1-fp32: no summary.json" in text  # the readers' notes are kept


def test_cli_errors_and_default_out(sweep_dir: Path, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "study.report", str(tmp_path / "missing")],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr == f"error: '{tmp_path / 'missing'}' does not exist\n"
    assert default_out(str(sweep_dir)) == sweep_dir / "report"
    assert default_out(str(sweep_dir / "wd0-bf16")) == Path("docs/report")


# --- claims.json's schema --------------------------------------------------------------------


def key_paths(value: Any, prefix: str = "") -> Iterator[str]:
    """Every key of a JSON value as a dotted path, `[]` for a list's items, in the file's order."""
    if isinstance(value, dict):
        for key, item in value.items():
            path = f"{prefix}.{key}" if prefix else key
            yield path
            yield from key_paths(item, path)
    elif isinstance(value, list):
        for item in value:
            yield from key_paths(item, prefix + "[]")


def test_claims_json_keeps_its_keys(tmp_path: Path) -> None:
    """claims.json's keys, and their order, as the dict-built report wrote them before the
    results were typed (study.results): divergences with controls and evidence, both optimizers
    with a gap between them, and disagreeing groups with an LR grid, so every object shows up.

    claims_keys.txt holds what these sweeps gave with that code; changing it changes the schema.
    """
    sweeps = [
        [divergence_sweep(tmp_path / "div")],
        [
            wd_sweep(tmp_path / "adamw", {0.0: 3.3, 0.1: 3.2, 0.3: 3.22}),
            l2_sweep(tmp_path / "l2", {1e-4: 3.25, 1e-3: 3.28}),
        ],
        [wd_sweep(tmp_path / "lr", {0.0: 3.3, 0.1: 3.2}, optim__lr=1e-3)],
    ]
    wd_sweep(tmp_path / "lr", {0.0: 3.25, 0.1: 3.25}, optim__lr=3e-3)
    paths = [
        path
        for i, dirs in enumerate(sweeps)
        for path in key_paths(make_report(*dirs, out=tmp_path / f"o{i}")[0])
    ]
    lines = CLAIMS_KEYS.read_text().splitlines()
    assert list(dict.fromkeys(paths)) == [line for line in lines if not line.startswith("#")]
