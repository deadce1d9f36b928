"""`python -m postmortem.replay`: the steps before a detection, re-run from the checkpoint before
it with telemetry at every step, reproduce the recorded losses bit for bit on the CPU."""

import json

import pytest
import torch

from data.loader import BatchLoader
from postmortem import replay
from tests.monitor import runs

pytestmark = pytest.mark.usefixtures("dist_env", "one_thread")

POISONED = 140  # a random-token batch at this step, after the spike window (128) has filled


@pytest.fixture
def poisoned_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    """The batch of step POISONED (loader position POISONED - 1) is uniformly random tokens,
    for the run and for its replay alike."""
    next_step = BatchLoader.next_step

    def poisoned(self: BatchLoader):
        position = self.position
        batches = next_step(self)
        if position == POISONED - 1:
            gen = torch.Generator().manual_seed(0)
            return [
                tuple(torch.randint(0, runs.VOCAB, x.shape, generator=gen) for x in b)
                for b in batches
            ]
        return batches

    monkeypatch.setattr(BatchLoader, "next_step", poisoned)


def test_replay_reproduces_the_run_bitwise_with_telemetry_at_every_step(
    tmp_path, corpus, poisoned_batch, capsys
):
    run_dir = tmp_path / "run"
    knobs = {"train.log_interval": 5, "checkpoint.interval": 100}
    runs.run(run_dir, corpus, POISONED + 5, **knobs)
    found = runs.detections(run_dir)
    assert {(e["step"], e["kind"]) for e in found} == {(POISONED, "spike")}
    events_before = (run_dir / "events.jsonl").read_text()

    assert replay.main([str(run_dir), "--event", "0", "--check"]) == 0
    out_dir = run_dir / "replay-0"
    assert "from step_00000100" in capsys.readouterr().out

    lines = runs.metrics(out_dir)
    assert sorted(lines) == list(range(101, POISONED + 1))  # from the checkpoint to the event
    recorded = replay.recorded_losses(run_dir, 0)
    both = sorted(recorded.keys() & lines.keys())
    assert both == [105, *range(109, POISONED + 1)]  # log steps, then the 32-step evidence
    assert [lines[s]["loss"] for s in both] == [recorded[s] for s in both]  # bitwise
    logged = runs.metrics(run_dir)
    for step in range(105, POISONED + 1, 5):  # same lr schedule, same weights
        assert lines[step]["lr"] == logged[step]["lr"]
        assert lines[step]["param_norm"] == logged[step]["param_norm"]
    for line in lines.values():  # full telemetry at every step, per block too
        assert len(line["attn_logit_max/layers"]) == 2 and "log_z" in line
        assert {"param_norm/layer0", "param_norm/layer1", "update_ratio/layer1"} <= line.keys()

    again = runs.detections(out_dir)  # the replay sees the same detections, same values
    strip = [{k: e[k] for k in ("step", "kind", "metric", "value", "threshold")} for e in found]
    assert [{k: e[k] for k in strip[0]} for e in again] == strip
    assert runs.events(out_dir, "resume")[0]["step"] == 100
    assert not (out_dir / "checkpoints").exists() or not any((out_dir / "checkpoints").iterdir())
    assert (run_dir / "events.jsonl").read_text() == events_before  # the run's record untouched

    # a second replay of the same event replaces the first
    assert replay.main([str(run_dir), "--event", "-1"]) == 0
    assert sorted(runs.metrics(out_dir)) == list(range(101, POISONED + 1))


def test_bf16_high_lr_run_diverges_and_its_kept_checkpoint_replays(tmp_path, corpus):
    """The paper's divergence setting in miniature: bf16 autocast, no weight decay, lr 0.1.
    Attention logits pass 1000 and the policy stops the run there.

    bf16 autocast takes different kernels on different CPUs (oneDNN with AMX or AVX-512, AVX2,
    plain C++), so the step and the layer of the first detection are properties of the machine
    (layer 1 at step 47 where this test was written, layer 0 at 44 on an AMX machine, layer 0
    at 53 on an AVX2-only one, and at 96 there with ATEN_CPU_CAPABILITY=default). What holds on
    every CPU: an attention-logit detection before `bound`, the stop, the pinned checkpoint
    before it, and a replay of this very run that reproduces its own losses and detection bit
    for bit."""
    bound = 200
    run_dir = tmp_path / "bf16"
    knobs = {
        "precision": "bf16",
        "optim.lr": 0.1,
        "optim.warmup_steps": 20,
        "optim.weight_decay": 0.0,
        "optim.schedule": "constant",
        "checkpoint.interval": 10,
        "divergence.policy": "stop",
    }
    summary = runs.run(run_dir, corpus, bound, **knobs)
    found = runs.detections(run_dir)
    assert summary["status"] == "diverged" and found
    step = found[0]["step"]
    assert found[0]["kind"] == "attn_logit" and step < bound
    assert found[0]["metric"] in {"attn_logit_max/layer0", "attn_logit_max/layer1"}
    assert found[0]["value"] > found[0]["threshold"]
    assert summary["steps"] == summary["first_divergence_step"] == step
    assert runs.events(run_dir, "stop")[0]["step"] == step
    kept = [p.name for p in (run_dir / "checkpoints").glob("step_*") if (p / "KEEP").exists()]
    last_good = (step - 1) // 10 * 10  # the newest periodic checkpoint before the detection
    assert kept == [f"step_{last_good:08d}"]

    assert replay.main([str(run_dir), "--event", "0", "--check"]) == 0
    lines = runs.metrics(run_dir / "replay-0")
    assert sorted(lines) == list(range(last_good + 1, step + 1))
    logged = runs.metrics(run_dir)  # log_interval 1: every step was recorded
    assert [lines[s]["loss"] for s in lines] == [logged[s]["loss"] for s in lines]
    assert lines[step]["attn_logit_max/layers"] == logged[step]["attn_logit_max/layers"]
    fields = ("step", "kind", "metric", "value", "threshold")
    again = runs.detections(run_dir / "replay-0")
    assert [{k: e[k] for k in fields} for e in again] == [
        {k: e[k] for k in fields} for e in found if e["step"] == step
    ]


def test_replay_errors_are_one_line(tmp_path, capsys):
    run_dir = tmp_path / "quiet"
    run_dir.mkdir()
    (run_dir / "events.jsonl").write_text(json.dumps({"step": 5, "kind": "checkpoint"}) + "\n")
    assert replay.main([str(run_dir)]) == 2
    assert capsys.readouterr().err == f"error: {run_dir} has no detections in events.jsonl\n"
    detection = {"step": 7, "kind": "spike", "metric": "loss", "value": 9.0, "threshold": 4.0}
    with open(run_dir / "events.jsonl", "a") as f:
        f.write(json.dumps({**detection, "time": 0.0, "detail": "", "evidence": []}) + "\n")
    assert replay.main([str(run_dir), "--event", "1"]) == 2
    assert "has 1 detections" in capsys.readouterr().err
    assert replay.main([str(run_dir), "--event", "0"]) == 2
    assert "no checkpoint from before step 7" in capsys.readouterr().err


def test_the_stopping_detection_is_the_first_of_the_newest_stretch_at_its_step(tmp_path):
    """After a heal's rollback the same step holds detections of two trajectories."""
    events = [
        {"step": 5, "kind": "spike", "metric": "loss"},
        {"step": 22, "kind": "attn_logit", "metric": "a"},
        {"step": 22, "kind": "spike", "metric": "loss"},
        {"step": 22, "kind": "stop"},
        {"step": 22, "kind": "heal", "action": "heal"},
        {"step": 20, "kind": "resume"},
        {"step": 22, "kind": "spike", "metric": "grad_norm"},
        {"step": 22, "kind": "skip"},
        {"step": 22, "kind": "output_logit", "metric": "log_z"},
        {"step": 22, "kind": "stop"},
    ]
    (tmp_path / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    assert replay.stopping_detection(tmp_path, 22) == 3
    assert replay.stopping_detection(tmp_path, 5) == 0
    events[6]["actionable"] = False  # a record-only grad-norm spike: it did not stop the run
    (tmp_path / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    assert replay.stopping_detection(tmp_path, 22) == 4
    with pytest.raises(ValueError, match="no detection at step 7"):
        replay.stopping_detection(tmp_path, 7)
