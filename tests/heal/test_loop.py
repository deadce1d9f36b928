"""`divergence.policy=heal` end to end on real tiny runs: each known cause made as
tests/postmortem/test_diagnose.py makes it, diagnosed, rolled back, remedied, trained on.

- a poisoned batch: skipped, the final validation loss within 0.02 nat of a clean run;
- an lr blow-up: an lr cooldown, and the run completes;
- attention logits growing at high lr in bf16 without decay: soft-capped;
- a one-off NaN gradient: retried unchanged;
- a machine that does not replay the run exactly: undiagnosable, so the run stops, with why;
- 2 ranks under ZeRO 3 (torchrun), and a SIGKILL in the middle of a heal, then a resume that
  ends bitwise where the uninterrupted run ends.
"""

import math
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import yaml

import heal
from configs import load_config
from monitor.run_record import read_config_history
from tests.checkpoint.runs import env
from tests.helpers import ROOT
from tests.monitor import runs
from tests.postmortem.test_diagnose import POISONED, poisoned_corpus

pytestmark = pytest.mark.usefixtures("dist_env", "one_thread")

# 20 healthy steps, then lr 3 at once (runs.LR_BLOW_UP); the cooldown takes it to 0.03
LR_HEAL = {
    **runs.LR_BLOW_UP,
    "checkpoint.force_resume": True,
    "checkpoint.interval": 10,
    "train.max_steps": 40,
    "divergence.policy": "heal",
    "divergence.heal.cooldown_factor": 0.01,
    "divergence.heal.cooldown_steps": 100,
}


# The heals of LR_HEAL's blow-up. Every signal leaves its baseline at step 21 or 22; the
# diagnosis ranks the optimizer first where the update ratios leave a step before the attention
# logits (one rank, on this AVX2 machine), and the attention first where both leave at step 21
# (2 ranks under ZeRO 3, whose telemetry reads rank 0's half of the batch): its soft cap then
# leaves the output logits to blow up, and the next heal escalates to the cooldown.
COOLDOWN_PATHS = (["lr_cooldown"], ["attn_softcap", "lr_cooldown"])


def heal_run(run_dir: Path, corpus: Path, **extra: object) -> dict:
    """`python train.py` in this process: `heal.run` on the test run's overrides."""
    return heal.run(load_config(None, runs.overrides(run_dir, corpus, **extra)))


def heals(run_dir: Path) -> list[dict]:
    return runs.events(run_dir, "heal")


def test_an_lr_blow_up_is_healed_by_a_cooldown_and_the_run_completes(tmp_path, corpus):
    run_dir = tmp_path / "lr"
    runs.run(run_dir, corpus, 20, **{"checkpoint.interval": 10})
    summary = heal_run(run_dir, corpus, **LR_HEAL)

    assert (summary["status"], summary["steps"]) == ("completed", 40)
    made, detected = heals(run_dir), runs.detections(run_dir)
    assert [h["remedy"] for h in made] in COOLDOWN_PATHS
    # the healed trajectory's watch never saw them: the summary counts every trajectory's
    assert summary == runs.summary(run_dir)
    acted = [e for e in detected if e["actionable"]]
    assert (summary["heals"], summary["divergences"]) == (len(made), len(acted))
    assert summary["record_only_detections"] == len(detected) - len(acted)
    first, healed = made[0], made[-1]
    assert summary["first_divergence_step"] == first["step"] == acted[0]["step"] > 20
    assert all(h["action"] == "heal" and h["cause"] == "state" for h in made)
    assert all(h["rollback_to"] == 20 and h["steps_lost"] == h["step"] - 20 for h in made)
    assert healed["mechanism"] in ("optimizer", "attention") and healed["minutes"] > 0
    cooldown = {"start": 20, "steps": 100, "factor": 0.01}
    assert healed["changes"] == {"optim.cooldowns": [[], [cooldown]]}
    assert Path(healed["diagnosis"]).is_file()
    # no detection after the last heal; each diverged state is kept beside the checkpoints
    assert all(e["time"] < healed["time"] for e in detected)
    assert (run_dir / "checkpoints" / f"diverged_step_{first['step']:08d}").is_dir()
    lines = runs.metrics(run_dir)
    assert lines[21]["lr"] == pytest.approx(0.03) and lines[40]["lr"] == pytest.approx(0.03)
    assert math.isfinite(lines[40]["loss"]) and lines[40]["loss"] < lines[20]["loss"] + 0.5
    # the remedy is the config in force from step 20 on: a replay or a resume runs it
    last = read_config_history(run_dir)[-1]
    assert last["step"] == 20 and last["changed"] == {"optim.cooldowns": [[], [cooldown]]}
    assert last["config"]["optim"]["cooldowns"] == [cooldown]


def test_a_poisoned_batch_is_skipped_and_the_run_ends_as_a_clean_one(tmp_path, corpus):
    data, _ = poisoned_corpus(corpus, tmp_path / "data", POISONED, 8)
    knobs = {"train.max_steps": POISONED + 20, "checkpoint.interval": 20}
    clean = runs.run(tmp_path / "clean", corpus, **knobs)
    summary = heal_run(tmp_path / "run", data, **knobs, **{"divergence.policy": "heal"})

    assert summary["status"] == "completed" and summary["steps"] == POISONED + 20
    (healed,) = heals(tmp_path / "run")
    assert (healed["step"], healed["cause"], healed["remedy"]) == (POISONED, "data", "skip_batch")
    position = POISONED - 1  # the loader position of step POISONED's batch
    assert healed["changes"] == {"data.skip_batches": [[], [position]]}
    assert (healed["rollback_to"], healed["steps_lost"]) == (120, 20)
    assert abs(summary["final_val_loss"] - clean["final_val_loss"]) < 0.02


def test_attention_logits_at_high_lr_in_bf16_are_soft_capped(tmp_path, corpus):
    """bf16, lr 0.1, no decay (the diagnosis test's attention case): the logits cross 1,000;
    the heal caps them below the detector's threshold and the run trains to its end. Which
    layer crosses, and when, depends on the CPU's bf16 kernels (issue 19), so later heals of
    other causes are allowed; the first must be the cap, and it must hold."""
    run_dir = tmp_path / "attn"
    summary = heal_run(run_dir, corpus, **runs.ATTENTION_GROWTH, **{"divergence.policy": "heal"})
    assert summary["status"] == "completed"
    healed = heals(run_dir)[0]
    assert (healed["mechanism"], healed["remedy"]) == ("attention", "attn_softcap")
    (cap,) = [new for _, new in healed["changes"].values()]
    assert 50 <= cap <= 900  # twice the logits at the rollback, below 0.9 x the threshold
    after = [line for s, line in runs.metrics(run_dir).items() if s > healed["rollback_to"]]
    assert all(line["attn_logit_max"] <= cap for line in after)
    assert not [
        e
        for e in runs.detections(run_dir)
        if e["time"] > healed["time"] and e["kind"] == "attn_logit"
    ]
    assert all(math.isfinite(line["loss"]) for line in after)


def test_a_one_off_nan_gradient_is_retried_unchanged(tmp_path, corpus):
    run_dir = tmp_path / "nan"
    runs.run(run_dir, corpus, 20, **{"checkpoint.interval": 10})
    with runs.nan_in_the_next_gradient():
        summary = heal_run(run_dir, corpus, **{"divergence.policy": "heal", "train.max_steps": 30})
    assert summary["status"] == "completed"
    (healed,) = heals(run_dir)
    assert (healed["step"], healed["detection"]["kind"]) == (21, "nonfinite")
    assert (healed["cause"], healed["remedy"], healed["changes"]) == ("transient", "retry", {})
    assert math.isfinite(runs.metrics(run_dir)[21]["grad_norm"])


@contextmanager
def a_flaky_machine(step: int) -> Iterator[None]:
    """Training forwards from now on scale the loss by 1 + 1e-5 until the `step`-th, whose
    gradient gets a NaN: a machine whose arithmetic is not the replay's, then a fault."""
    from model import GPT

    calls = [0]

    def flaky(module, args, output):
        if not (isinstance(module, GPT) and module.training):
            return None
        calls[0] += 1
        if calls[0] == step:
            handle.remove()
            output.logits.register_hook(lambda g: g.index_put((torch.tensor(0),), g[0] * math.nan))
            return None
        output.loss = output.loss * (1 + 1e-5)
        return output

    handle = torch.nn.modules.module.register_module_forward_hook(flaky)
    try:
        yield
    finally:
        handle.remove()


def test_a_detection_the_diagnosis_cannot_explain_stops_the_run_with_the_reason(
    tmp_path, corpus, capsys
):
    run_dir = tmp_path / "flaky"
    runs.run(run_dir, corpus, 20, **{"checkpoint.interval": 10})
    with a_flaky_machine(step=4):  # steps 21-23 shifted, a NaN at step 24
        summary = heal_run(run_dir, corpus, **{"divergence.policy": "heal", "train.max_steps": 30})
    assert (summary["status"], summary["steps"]) == ("diverged", 24)
    (stopped,) = heals(run_dir)
    assert (stopped["action"], stopped["mechanism"]) == ("stop", "undetermined")
    assert stopped["reason"].startswith("the diagnosis could not tell the cause")
    assert "not exact on this machine" in stopped["reason"]
    assert "stopping, because the diagnosis could not tell" in capsys.readouterr().out


def test_max_heals_stops_without_a_diagnosis(tmp_path, corpus):
    run_dir = tmp_path / "bounded"
    runs.run(run_dir, corpus, 20, **{"checkpoint.interval": 10})
    summary = heal_run(run_dir, corpus, **{**LR_HEAL, "divergence.heal.max_heals": 0})
    assert summary["status"] == "diverged"
    (stopped,) = heals(run_dir)
    assert stopped["action"] == "stop" and "max_heals=0" in stopped["reason"]
    assert not list(run_dir.glob("diagnosis-*"))


def test_two_ranks_zero3_resume_at_a_new_lr_and_heal_its_blow_up(tmp_path, corpus):
    """torchrun, 2 ranks, ZeRO 3: 20 healthy steps, then a resume at lr 3 (a config change on
    2 ranks, recorded from step 20) blows up; the diagnosis replays the lr in force, not the
    checkpoint's, on both ranks, and the same heal completes the run."""
    run_dir = tmp_path / "ranks"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    common = {"zero_stage": 3, "train.micro_batch_size": 4}
    for extra in ({"checkpoint.interval": 10, "train.max_steps": 20}, LR_HEAL):
        command = torchrun + ["train.py", *runs.overrides(run_dir, corpus, **common, **extra)]
        done = subprocess.run(command, cwd=ROOT, env=env(2), capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]
    assert runs.summary(run_dir)["status"] == "completed"
    start = read_config_history(run_dir)[1]
    assert start["step"] == 20 and start["changed"]["optim.lr"] == [0.003, 3.0]
    made = heals(run_dir)
    assert [h["remedy"] for h in made] in COOLDOWN_PATHS
    assert all(h["cause"] == "state" and h["rollback_to"] == 20 for h in made)
    replayed = yaml.safe_load((run_dir / "diagnosis-0" / "reproduce" / "config.yaml").read_text())
    assert replayed["optim"]["lr"] == 3.0 and replayed["zero_stage"] == 3
    assert replayed["meta"]["world_size"] == 2


def cli(run_dir: Path, corpus: Path, **extra: object) -> list[str]:
    return [sys.executable, "train.py", *runs.overrides(run_dir, corpus, **extra)]


def healthy_then_lr_blow_up(run_dir: Path, corpus: Path) -> list[str]:
    """Train 20 healthy steps through the CLI; return the command that resumes at lr 3."""
    healthy = cli(run_dir, corpus, **{"checkpoint.interval": 10, "train.max_steps": 20})
    assert subprocess.run(healthy, cwd=ROOT, env=env(1), capture_output=True).returncode == 0
    return cli(run_dir, corpus, **LR_HEAL)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory, corpus: Path) -> tuple[float, list]:
    """The last loss and the remedies of the lr blow-up healed without interruption (CLI)."""
    run_dir = tmp_path_factory.mktemp("whole") / "run"
    done = subprocess.run(healthy_then_lr_blow_up(run_dir, corpus), cwd=ROOT, env=env(1))
    assert done.returncode == 0
    return runs.metrics(run_dir)[40]["loss"], [e["remedy"] for e in heals(run_dir)]


@pytest.mark.parametrize("moment", ["diagnosing", "healed"])
def test_a_sigkill_during_a_heal_then_a_resume_ends_bitwise_as_the_uninterrupted_run(
    tmp_path, corpus, uninterrupted, moment
):
    """Killed in the diagnosis (before the heal event: the restart meets the detection again
    and heals it) or just after the heal event (before the healed run's next checkpoint: the
    restart applies the recorded remedy to the checkpoint it rolled back to). Rerunning the
    command takes the stale lock over and ends on the uninterrupted run's last loss bit for bit
    (CPU, fp32)."""
    run_dir = tmp_path / "run"
    command = healthy_then_lr_blow_up(run_dir, corpus)
    proc = subprocess.Popen(command, cwd=ROOT, env=env(1), stdout=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (
        (run_dir / "diagnosis-0" / "reproduce").exists()
        if moment == "diagnosing"
        else heals(run_dir)
    ):
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert runs.events(run_dir, "stop") and bool(heals(run_dir)) == (moment == "healed")
    assert not (run_dir / "checkpoints" / "step_00000030").exists()

    done = subprocess.run(command, cwd=ROOT, env=env(1), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "took over" in done.stdout
    assert runs.summary(run_dir)["status"] == "completed"
    loss, remedies = uninterrupted
    assert remedies in COOLDOWN_PATHS and [e["remedy"] for e in heals(run_dir)] == remedies
    assert runs.metrics(run_dir)[40]["loss"] == loss
