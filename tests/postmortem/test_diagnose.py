"""`python -m postmortem.diagnose`: real tiny runs with known causes, each diagnosed end to end.

Causes are made the way tests/monitor/test_runs.py injects failures: a batch of random tokens
written into train.bin (data), a learning rate forced up on resume (state: optimizer), a high
lr in bf16 without decay (state: attention, in some layer), a NaN put into one
step's gradient by a forward hook the replay does not have (transient). Numbers that depend
on the CPU's bf16 kernels are never asserted, only the verdicts.
"""

import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from data.loader import BatchLoader
from postmortem import diagnose
from tests.checkpoint.runs import env
from tests.monitor import runs

pytestmark = pytest.mark.usefixtures("dist_env", "one_thread")

POISONED = 140  # after the spike window (128 readings) has filled


def poisoned_corpus(corpus: Path, out: Path, step: int, global_batch: int) -> tuple[Path, list]:
    """A copy of `corpus` whose global batch of `step` (loader position step - 1, seed 1337)
    is uniformly random tokens; returns it and that batch's windows."""
    out.mkdir()
    for name in ("train.bin", "val.bin", "meta.json"):
        shutil.copy(corpus / name, out / name)
    loader = BatchLoader(
        out / "train.bin",
        block_size=32,
        micro_batch_size=global_batch,
        seed=1337,
        vocab_size=runs.VOCAB,
    )
    windows = [int(w) for w in loader.windows(step - 1)]
    tokens = np.fromfile(out / "train.bin", dtype="<u2")
    rng = np.random.default_rng(0)
    for w in windows:
        tokens[w * 32 : (w + 1) * 32 + 1] = rng.integers(0, runs.VOCAB, 33)
    tokens.tofile(out / "train.bin")
    return out, windows


def diagnosis(run_dir: Path, index: int = 0) -> dict:
    return json.loads((run_dir / f"diagnosis-{index}" / "diagnosis.json").read_text())


def test_poisoned_batch_is_data_and_names_the_batch(tmp_path, corpus, capsys):
    data, windows = poisoned_corpus(corpus, tmp_path / "data", POISONED, 8)
    run_dir = tmp_path / "run"
    runs.run(run_dir, data, POISONED + 5, **{"checkpoint.interval": 100})
    assert [(e["step"], e["kind"]) for e in runs.detections(run_dir)][0] == (POISONED, "spike")

    assert diagnose.main([str(run_dir)]) == 0
    printed = capsys.readouterr().out
    assert "data-caused" in printed and "loader position 139" in printed
    result = diagnosis(run_dir)
    assert result["cause"] == "data" and result["reproduce"]["exact"]
    assert result["mechanisms"][0]["name"] == "bad_batch"
    batch = result["suspect_batch"]
    assert batch["position"] == POISONED - 1 and batch["windows"] == windows
    assert batch["token_ranges"] == [[w * 32, w * 32 + 33] for w in windows]
    others = [r for r in result["replays"] if r["name"].startswith("batch-")]
    assert len(others) == 3 and not any(r["blew_up"] for r in others)
    assert all(r["position"] != POISONED - 1 for r in others)
    (earlier,) = [r for r in result["replays"] if r["name"] == "suspect-earlier"]
    assert earlier["start_step"] == 100 and earlier["blew_up"]  # the batch alone does it
    assert result["confidence"] == "high"
    assert {d["series"] for d in result["timeline"]} >= {"loss"}
    assert all(d["step"] == POISONED for d in result["timeline"])  # nothing departed before
    # 40 steps to the detection, 3 single steps on other batches, 1 on the suspect earlier
    assert result["cost"]["replays"] == 5 and result["cost"]["steps_replayed"] == 44

    out = run_dir / "diagnosis-0"
    assert {"report.md", "diagnosis.json", "timeline.png"} <= {p.name for p in out.iterdir()}
    assert "## 4. Likely mechanism" in (out / "report.md").read_text()
    (event,) = runs.events(run_dir, "diagnosis")
    assert (event["step"], event["cause"], event["mechanism"]) == (POISONED, "data", "bad_batch")
    assert event["report"] == str(out / "report.md")
    assert "metric" not in event  # not a detection: replays and --event K count detections only


def test_learning_rate_blow_up_is_state_optimizer(tmp_path, corpus):
    """20 healthy steps, then lr 3 with no warmup or clipping, a checkpoint every step."""
    run_dir = tmp_path / "blowup"
    runs.blow_up(run_dir, corpus, checkpoint_interval=1)
    first = runs.detections(run_dir)[0]["step"]

    result = diagnose.diagnose(run_dir)
    assert result["cause"] == "state" and result["reproduce"]["reproduced"]
    assert result["confidence"] == "high"  # every other batch blew up too
    top = result["mechanisms"][0]
    assert top["name"] == "optimizer"
    assert "update_ratio" in top["evidence"]
    assert any("optim.grad_clip=1.0" in r for r in top["remedies"])
    ratio = next(d for d in result["timeline"] if d["series"].startswith("update_ratio"))
    assert ratio["step"] == 21 < first  # the first step at lr 3, before the detection


def test_attention_growth_in_bf16_without_decay_is_state_attention(tmp_path, corpus):
    """bf16, lr 0.1, no weight decay: attention logits grow past 1000. Which layer crosses, at
    which step, and which layer's logit leaves its baseline first depend on the CPU's bf16
    kernels (on an AVX-512 BF16 CPU layer 0 was detected and layer 1 had departed 28 steps
    earlier; issue 19), so the diagnosis must name the mechanism and per-layer logit evidence
    from this run's layers, not one machine's layer."""
    run_dir = tmp_path / "attn"
    summary = runs.run(run_dir, corpus, **runs.ATTENTION_GROWTH, **{"divergence.policy": "stop"})
    first = runs.detections(run_dir)[0]
    assert summary["status"] == "diverged" and first["kind"] == "attn_logit"

    result = diagnose.diagnose(run_dir)
    assert result["cause"] == "state" and result["reproduce"]["reproduced"]
    top = result["mechanisms"][0]
    assert first["metric"].startswith("attn_logit_max")
    named = {int(n) for n in re.findall(r"attn_logit_max/layer(\d+)", top["evidence"])}
    assert top["name"] == "attention" and named and named <= set(range(runs.N_LAYER))
    assert "`model.qk_layernorm=true`" in top["remedies"]
    assert any("weight_decay` (now 0)" in r for r in top["remedies"])


def test_one_off_gradient_corruption_is_transient(tmp_path, corpus):
    """A NaN in one gradient entry of step 21 (a forward hook for that step only): the replay,
    without the hook, is exact and the detection does not recur."""
    run_dir, step = tmp_path / "nan", 21
    runs.run(run_dir, corpus, step - 1, **{"checkpoint.interval": 10})

    with runs.nan_in_the_next_gradient():
        runs.run(run_dir, corpus, step + 2, **{"checkpoint.interval": 10})
    assert [(e["step"], e["kind"]) for e in runs.detections(run_dir)] == [(step, "nonfinite")]

    result = diagnose.diagnose(run_dir)
    assert (result["cause"], result["confidence"]) == ("transient", "high")
    assert result["reproduce"] == {
        "reproduced": False,
        "exact": True,
        "steps_replayed": [step],  # from step 20's checkpoint: the detection's step, compared
        "mismatches": [],
        "at_detection": result["reproduce"]["at_detection"],
    }
    at = result["reproduce"]["at_detection"]
    assert at["loss"]["recorded"] == at["loss"]["replayed"]
    assert not math.isfinite(at["grad_norm"]["recorded"])
    assert math.isfinite(at["grad_norm"]["replayed"])
    assert result["mechanisms"][0]["name"] == "transient"
    assert [r["name"] for r in result["replays"]] == ["reproduce"]


def test_clean_run_has_nothing_to_diagnose_and_bad_input_is_one_line(tmp_path, corpus, capsys):
    run_dir = tmp_path / "clean"
    runs.run(run_dir, corpus, 5, **{"checkpoint.interval": 0})
    capsys.readouterr()
    assert diagnose.main([str(run_dir)]) == 3
    assert capsys.readouterr().out == (
        f"nothing to diagnose: {run_dir} has no detections in events.jsonl\n"
    )
    assert not list(run_dir.glob("diagnosis-*")) and not runs.events(run_dir, "diagnosis")
    assert diagnose.main([str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_two_ranks_zero3_stop_is_diagnosed_automatically(tmp_path, corpus):
    """torchrun, 2 ranks, ZeRO 3, `divergence.diagnose=true`: the run stops at the poisoned
    batch, keeps its status, and the diagnosis (replays on 2 ranks) names the batch."""
    data, windows = poisoned_corpus(corpus, tmp_path / "data", POISONED, 8)
    run_dir = tmp_path / "ranks"
    knobs = {
        "zero_stage": 3,
        "train.micro_batch_size": 4,
        "train.max_steps": POISONED + 5,
        "checkpoint.interval": 100,
        "divergence.policy": "stop",
        "divergence.diagnose": True,
    }
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    command += ["train.py", *runs.overrides(run_dir, data, **knobs)]
    done = subprocess.run(
        command, cwd=runs.REPO, env=env(2), capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "data-caused" in done.stdout
    summary = runs.summary(run_dir)
    assert summary["status"] == "diverged" and summary["steps"] == POISONED

    result = diagnosis(run_dir)
    assert result["world_size"] == 2 and result["cause"] == "data"
    assert result["suspect_batch"]["windows"] == windows
    replayed = yaml.safe_load((run_dir / "diagnosis-0" / "reproduce" / "config.yaml").read_text())
    assert replayed["zero_stage"] == 3 and replayed["meta"]["world_size"] == 2
    kinds = [e["kind"] for e in runs.events(run_dir)]
    assert kinds[-2:] == ["stop", "diagnosis"]


def test_automatic_diagnosis_that_fails_is_recorded_and_the_run_keeps_its_status(
    tmp_path, corpus, capsys
):
    """A file where the diagnosis directory goes: the diagnosis fails after the stop is saved;
    the failure is an event, the summary stays `diverged`, nothing is raised."""
    run_dir = tmp_path / "blocked"
    run_dir.mkdir()
    (run_dir / "diagnosis-0").write_text("in the way\n")
    hot = {
        **runs.LR_BLOW_UP,
        "divergence.policy": "stop",
        "divergence.diagnose": True,
    }
    summary = runs.run(run_dir, corpus, 20, **hot)
    assert summary["status"] == "diverged"
    stop, last = runs.events(run_dir)[-2:]
    assert stop["kind"] == "stop" and last["kind"] == "diagnosis"
    assert last["status"] == "failed" and last["step"] == stop["step"]
    assert last["error"].startswith("FileExistsError")
    assert runs.summary(run_dir)["status"] == "diverged"
    assert "warning: the diagnosis of" in capsys.readouterr().err


def test_a_resume_with_a_new_lr_is_replayed_with_it_and_a_replay_of_nothing_is_undetermined(
    tmp_path, corpus
):
    """issue 23: 20 healthy steps to the end of a 20-step run, checkpoints every 5; then the same
    run resumed at lr 3 with a larger `train.max_steps` (force_resume), stopped at a detection.
    The replay used to start from step 20's checkpoint with that checkpoint's config (20 steps,
    lr 1e-3): it ran no step, and the diagnosis called the comparison of nothing exact and the
    detection transient with high confidence. Now it replays with the config in force."""
    run_dir = tmp_path / "resumed"
    healthy = {"optim.lr": 1e-3, "checkpoint.interval": 5, "train.max_steps": 20}
    healthy.update({k: v for k, v in runs.LR_BLOW_UP.items() if k != "optim.lr"})
    runs.run(run_dir, corpus, **healthy)
    summary = runs.run(run_dir, corpus, **{**runs.blow_up_overrides(5), "train.max_steps": 40})
    first = runs.detections(run_dir)[0]["step"]
    assert summary["status"] == "diverged" and 20 < first < 40
    (change,) = runs.events(run_dir, "config")
    assert change["step"] == 20 and change["changed"]["optim.lr"] == [1e-3, 3]
    assert change["changed"]["train.max_steps"] == [20, 40] and change["force_resume"]

    result = diagnose.diagnose(run_dir)
    found = result["reproduce"]
    assert found["steps_replayed"] == list(range(21, first + 1))
    assert found["exact"] and found["reproduced"] and result["cause"] == "state"
    assert result["checkpoint_note"] is None  # step 20: the one kept for this detection
    (run_dir / "checkpoints" / "step_00000020" / "KEEP").unlink()  # as if it had gone
    note = diagnose.replay.plan(run_dir, 0).note
    assert note == "no checkpoint was kept for this detection; step_00000020 is used"

    (run_dir / "config_history.jsonl").unlink()  # as a run made before the history was kept
    result = diagnose.diagnose(run_dir)
    assert result["reproduce"]["exact"] is None and result["reproduce"]["steps_replayed"] == []
    assert (result["cause"], result["confidence"]) == ("undetermined", "low")
    assert result["cause_evidence"].startswith("undetermined, because the replay from step_")
    assert "never compared" in (run_dir / "diagnosis-0" / "report.md").read_text()
