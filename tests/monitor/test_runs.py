"""Failures injected into real tiny training runs: the right event at the right step, and the
policy's outcome. Detector thresholds stay at their defaults throughout.

Injections use the run's own config knobs and state between steps: a poisoned batch (the
loader's `next_step` patched for one position), a NaN put into one gradient entry (a torch
forward hook on the model for one step), a learning rate forced up on resume, attention weights
scaled in a checkpoint that the run then resumes from.
"""

import json
import math
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from checkpoint.manager import KEEP_FILE, MANIFEST_FILE, CheckpointError, file_crc32
from data.loader import BatchLoader
from model import GPT
from tests.monitor import runs

pytestmark = pytest.mark.usefixtures("dist_env", "one_thread")

# The spike detectors judge from the 129th reading on (window 128); a poisoned batch after that.
POISONED = 140
EVENT_FIELDS = {"step", "kind", "time", "metric", "value", "threshold", "detail", "evidence"}


def poison(monkeypatch: pytest.MonkeyPatch, positions: set[int]) -> None:
    """Replace the batch at each loader position in `positions` by uniformly random tokens."""
    next_step = BatchLoader.next_step

    def poisoned(self: BatchLoader):
        position = self.position
        batches = next_step(self)
        if position in positions:
            gen = torch.Generator().manual_seed(position)
            batches = [
                tuple(torch.randint(0, runs.VOCAB, t.shape, generator=gen) for t in (x, y))
                for x, y in batches
            ]
        return batches

    monkeypatch.setattr(BatchLoader, "next_step", poisoned)


def checkpoint_states(path: Path) -> dict[str, object]:
    """Every tensor DeepSpeed saved in a checkpoint (weights, Adam state), by file."""
    files = sorted(path.glob("*_states.pt"))
    assert files, f"no checkpoint at {path}"
    return {f.name: torch.load(f, weights_only=False) for f in files}


def same(a: object, b: object) -> bool:
    """Bitwise equality of nested checkpoint contents (tensors, dicts, lists, scalars)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return True  # counters, names, versions: not weights


def assert_detection_event(event: dict) -> None:
    assert EVENT_FIELDS <= event.keys()
    assert event["evidence"] and event["evidence"][-1]["step"] == event["step"]
    steps = [record["step"] for record in event["evidence"]]
    assert steps == sorted(set(steps)), "one evidence record per step"


def test_clean_run_of_300_steps_records_no_detection(tmp_path, corpus):
    """False alarms matter as much as misses: default thresholds, telemetry at every step."""
    run_dir = tmp_path / "clean"
    summary = runs.run(run_dir, corpus, **{"train.max_steps": 300, "checkpoint.interval": 0})
    assert summary["status"] == "completed" and summary["steps"] == 300
    assert runs.detections(run_dir) == []
    assert (summary["divergences"], summary["record_only_detections"]) == (0, 0)
    assert summary["first_divergence_step"] is None
    lines = runs.metrics(run_dir)
    assert sorted(lines) == list(range(1, 301))
    assert lines[300]["loss"] < lines[1]["loss"] - 1.5  # it learned: ~5.5 -> below 4
    assert all(len(line["attn_logit_max/layers"]) == 2 for line in lines.values())


def test_poisoned_batch_is_a_spike_and_skip_withholds_its_update(tmp_path, corpus, monkeypatch):
    run_dir = tmp_path / "skip"
    knobs = {"divergence.policy": "skip"}
    # to the step before the poisoned one, then resume: the detectors' windows come back
    # from the checkpoint, and the poisoned step is judged against them
    runs.run(run_dir, corpus, POISONED - 1, **knobs, **{"checkpoint.interval": POISONED - 1})
    poison(monkeypatch, {POISONED - 1})  # the batch of step POISONED
    summary = runs.run(run_dir, corpus, POISONED + 1, **knobs, **{"checkpoint.interval": 1})

    found = runs.detections(run_dir)
    assert {(e["step"], e["kind"]) for e in found} == {(POISONED, "spike")}
    loss_spike = next(e for e in found if e["metric"] == "loss")
    assert loss_spike["value"] > loss_spike["threshold"]
    assert loss_spike["value"] == runs.metrics(run_dir)[POISONED]["loss"]
    for event in found:
        assert_detection_event(event)
    assert [e["step"] for e in runs.events(run_dir, "skip")] == [POISONED]
    assert summary["status"] == "completed" and summary["first_divergence_step"] == POISONED

    lines = runs.metrics(run_dir)
    assert lines[POISONED]["skipped_steps"] == 1
    assert lines[POISONED]["update_ratio/decay"] == 0.0
    assert lines[POISONED + 1]["update_ratio/decay"] > 0.0
    ckpts = run_dir / "checkpoints"
    before, at, after = (
        checkpoint_states(ckpts / f"step_{s:08d}") for s in range(POISONED - 1, POISONED + 2)
    )
    assert same(before, at), "the skipped step changed weights or optimizer state"
    assert not same(at, after), "training did not go on after the skipped step"


def test_nan_in_a_gradient_is_nonfinite_and_withheld_and_training_goes_on(tmp_path, corpus):
    """Under `record`, a NaN gradient is recorded, its update never applied, and the run goes
    on: the next steps train normally."""
    run_dir, step = tmp_path / "nan", 10
    runs.run(run_dir, corpus, step - 1, **{"checkpoint.interval": step - 1})

    with runs.nan_in_the_next_gradient():
        summary = runs.run(
            run_dir, corpus, step + 2, **{"checkpoint.interval": 1, "checkpoint.keep_last": 3}
        )

    found = runs.detections(run_dir)
    assert [(e["step"], e["kind"], e["metric"]) for e in found] == [
        (step, "nonfinite", "grad_norm")
    ]
    assert found[0]["value"] in ("nan", "inf") and found[0]["threshold"] == "inf"
    assert_detection_event(found[0])
    assert [e["step"] for e in runs.events(run_dir, "skip")] == [step]
    lines = runs.metrics(run_dir)
    assert math.isfinite(lines[step]["loss"]) and lines[step]["grad_norm"] in ("nan", "inf")
    assert lines[step]["update_ratio/decay"] == 0.0
    assert all(math.isfinite(lines[s]["grad_norm"]) for s in (step + 1, step + 2))
    assert summary["status"] == "completed" and summary["steps"] == step + 2
    ckpts = run_dir / "checkpoints"
    states = [checkpoint_states(ckpts / f"step_{s:08d}") for s in (step - 1, step, step + 1)]
    assert same(states[0], states[1]) and not same(states[1], states[2])


def test_learning_rate_blow_up_stops_the_run_and_a_restart_resumes_the_last_good_checkpoint(
    tmp_path, corpus
):
    """20 healthy steps, then the run is resumed with lr=3, no warmup, no clipping; then the
    same command again."""
    run_dir = tmp_path / "blowup"
    summary = runs.blow_up(run_dir, corpus, checkpoint_interval=10)

    found = runs.detections(run_dir)
    assert found, "lr=3 went unnoticed"
    first = found[0]["step"]
    assert 20 < first <= 25
    assert {e["step"] for e in found} == {first}  # the run stopped at the first detection
    for event in found:
        assert_detection_event(event)
    assert [e["step"] for e in runs.events(run_dir, "stop")] == [first]
    assert summary["status"] == "diverged" and summary["steps"] == first
    on_disk = runs.summary(run_dir)
    assert on_disk["status"] == "diverged" and on_disk["first_divergence_step"] == first
    assert on_disk["divergences"] == len(found)

    kept = [p for p in sorted((run_dir / "checkpoints").glob("step_*")) if (p / KEEP_FILE).exists()]
    assert [p.name for p in kept] == ["step_00000020"]
    assert f"detection at step {first}" in (kept[0] / KEEP_FILE).read_text()
    # loadable, and exactly: a run resumed from it at the healthy lr redoes step 21 (whose loss
    # comes from step 20's weights, before any update at the new lr) bit for bit
    healthy = tmp_path / "from_kept"
    resumed = runs.run(healthy, corpus, 22, **{"checkpoint.resume": kept[0]})
    assert resumed["status"] == "completed" and runs.detections(healthy) == []
    assert runs.metrics(healthy)[21]["loss"] == runs.metrics(run_dir)[21]["loss"]

    # The restart. The diverged state is kept beside the checkpoints, never resumed by default:
    # the same command again resumes from the pinned last good one (a `resume` event says why),
    # a config change still needs force_resume, and checkpoint.resume=PATH loads the diverged one.
    ckpts = run_dir / "checkpoints"
    diverged = ckpts / f"diverged_step_{first:08d}"
    assert (diverged / "harness.json").is_file()
    assert runs.events(run_dir, "stop")[-1]["path"] == str(diverged)
    assert (ckpts / "latest").read_text().strip() == "step_00000020"

    hot = runs.blow_up_overrides(checkpoint_interval=10)
    again = runs.run(run_dir, corpus, **hot)  # the same command: the same detection, again
    resume = runs.events(run_dir, "resume")[-1]
    assert resume["path"] == str(ckpts / "step_00000020") and resume["step"] == 20
    assert f"divergence stop at step {first}" in resume["reason"]
    assert again["status"] == "diverged" and again["steps"] == first
    assert diverged.is_dir() and (ckpts / "step_00000020" / KEEP_FILE).is_file()

    with pytest.raises(CheckpointError, match="optim.lr"):  # the guard stays: 1e-3 -> 1e-2
        runs.run(run_dir, corpus, **{"checkpoint.interval": 10, "optim.lr": 0.01})
    calm = runs.run(run_dir, corpus, first + 1, **{"checkpoint.interval": 10})  # step 20's lr
    assert calm["status"] == "completed" and runs.detections(run_dir)[-1]["step"] == first
    assert runs.events(run_dir, "resume")[-1]["path"] == str(ckpts / "step_00000020")
    assert runs.metrics(run_dir)[21]["loss"] == runs.metrics(healthy)[21]["loss"]
    explicit = runs.run(run_dir, corpus, first + 1, **{**hot, "checkpoint.resume": diverged})
    assert runs.events(run_dir, "resume")[-1]["path"] == str(diverged)
    assert runs.events(run_dir, "resume")[-1]["reason"] == "checkpoint.resume names it"
    assert explicit["steps"] == first + 1


def scale_attention(checkpoint: Path, layer: int, factor: float) -> None:
    """Multiply the query and key weights of `layer` by `factor` in a ZeRO-0 checkpoint, and
    record the edited file's new size and CRC in the checkpoint's manifest."""
    file = checkpoint / "mp_rank_00_model_states.pt"
    state = torch.load(file, weights_only=False)
    weight = state["module"][f"transformer.h.{layer}.attn.c_attn.weight"]  # (3C, C): q, k, v
    n_embd = weight.shape[1]
    weight[: 2 * n_embd] *= factor
    torch.save(state, file)
    manifest_path = checkpoint / MANIFEST_FILE
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        manifest[file.name] = {"bytes": file.stat().st_size, "crc32": file_crc32(file)}
        manifest_path.write_text(json.dumps(manifest))


def test_scaled_attention_weights_are_an_attn_logit_detection(tmp_path, corpus):
    """ZeRO 0, so that the module weights in the checkpoint are the ones training resumes from
    (ZeRO 1-3 restore from their own fp32 partitions)."""
    run_dir = tmp_path / "attn"
    knobs = {"zero_stage": 0, "checkpoint.interval": 20}
    runs.run(run_dir, corpus, 20, **knobs)
    before = runs.metrics(run_dir)[20]["attn_logit_max/layers"]
    assert max(before) < 50
    scale_attention(run_dir / "checkpoints" / "step_00000020", layer=0, factor=40.0)
    runs.run(run_dir, corpus, 22, **knobs)

    found = runs.detections(run_dir)
    assert [(e["step"], e["kind"], e["metric"]) for e in found] == [
        (21, "attn_logit", "attn_logit_max/layer0")
    ]
    # the reading before (restored with the detectors) was ~0.2: 1600x growth, above 100
    assert found[0]["value"] > max(found[0]["threshold"], 100.0)
    assert found[0]["threshold"] == 10 * before[0]
    assert_detection_event(found[0])
    assert found[0]["evidence"][-1]["attn_logit_max/layers"][0] == found[0]["value"]


def test_rollback_restores_the_last_good_checkpoint_then_stops_after_max_rollbacks(
    tmp_path, corpus, monkeypatch
):
    run_dir, skip = tmp_path / "rollback", 10
    knobs = {
        "divergence.policy": "rollback",
        "divergence.max_rollbacks": 1,
        "divergence.rollback_skip_batches": skip,
        "checkpoint.interval": 10,
    }
    # Step s reads loader position s - 1 until the rollback to step 130, which skips 10
    # batches: step 131 then reads position 140 (the poisoned 139 is never read again), and
    # position 150, poisoned too, comes at step 141.
    poison(monkeypatch, {POISONED - 1, 150})
    summary = runs.run(run_dir, corpus, POISONED + 20, **knobs)

    found = runs.detections(run_dir)
    assert sorted({(e["step"], e["kind"]) for e in found}) == [(POISONED, "spike"), (141, "spike")]
    rollbacks = runs.events(run_dir, "rollback")
    assert len(rollbacks) == 1
    assert rollbacks[0]["step"] == 130 and rollbacks[0]["skipped_batches"] == skip
    assert Path(rollbacks[0]["path"]).name == "step_00000130"
    assert [e["step"] for e in runs.events(run_dir, "stop")] == [141]  # max_rollbacks reached
    assert summary["status"] == "diverged" and summary["steps"] == 141
    assert runs.summary(run_dir)["first_divergence_step"] == POISONED

    lines = [line for line in runs.read_jsonl(run_dir / "metrics.jsonl") if "loss" in line]
    assert [line["step"] for line in lines] == [*range(1, POISONED + 1), *range(131, 142)]
    again = lines[POISONED]  # step 131 after the rollback
    assert again["step"] == 131 and again["tokens"] == lines[130]["tokens"]
    # its loss is checkpoint 130's weights on the batch at position 130 + 10 skipped
    expected = loss_of(run_dir, corpus, 130, position=130 + skip)
    assert again["loss"] == pytest.approx(expected, abs=1e-6)


def loss_of(run_dir: Path, corpus: Path, step: int, position: int) -> float:
    """The loss of a checkpoint's weights on the batch at a loader position, in plain torch."""
    from configs import load_config

    cfg = load_config(None, runs.overrides(run_dir, corpus))
    model = GPT(cfg.model)
    file = run_dir / "checkpoints" / f"step_{step:08d}" / "mp_rank_00_model_states.pt"
    model.load_state_dict(torch.load(file, weights_only=False)["module"])
    loader = BatchLoader(
        corpus / "train.bin",
        block_size=cfg.model.block_size,
        micro_batch_size=cfg.train.micro_batch_size,
        seed=cfg.run.seed,
        vocab_size=cfg.model.vocab_size,
    )
    loader.skip(position)
    ((x, y),) = loader.next_step()
    with torch.no_grad():
        return model(x, y).loss.item()


def wandb_records(path: Path) -> Iterator[object]:
    """The protobuf records of an offline wandb run file (`run-<id>.wandb`): a 7-byte header,
    then LevelDB-log blocks of 32 KiB whose chunks (crc32, length, type) carry the records."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32 * 1024
    assert data[:4] == b":W&B", "not a wandb run file"
    position, pending = 7, b""
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a chunk header
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        pending += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def test_wandb_offline_run_has_the_config_group_tags_and_event_fields(
    tmp_path, corpus, monkeypatch
):
    run_dir = tmp_path / "wandb"
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(run_dir))
    hot = {
        **runs.LR_BLOW_UP,
        "divergence.policy": "stop",
        "wandb.mode": "offline",
        "wandb.tags": "[study]",
    }
    summary = runs.run(run_dir, corpus, 20, **hot)
    assert summary["status"] == "diverged"
    first = runs.detections(run_dir)[0]

    (path,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    records = list(wandb_records(path))
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["optim"]["lr"] == 3 and config["run"]["name"] == "wandb"
    assert config["meta"]["world_size"] == 1
    assert run.run_group == "2L32C-adamw-fp32-wd0.1-lr3"  # the setting; seeds group together
    assert set(run.tags) == {"adamw", "fp32", "wd=0.1", "lr=3", "seed=1337", "study"}

    fields: dict[str, object] = {}
    for record in records:
        if record.WhichOneof("record_type") == "summary":
            for item in record.summary.update:
                fields[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    assert fields["status"] == "diverged"
    assert fields["first_divergence_step"] == first["step"]
    for kind in {e["kind"] for e in runs.detections(run_dir)}:
        of_kind = [e for e in runs.detections(run_dir) if e["kind"] == kind]
        latest = {k: v for k, v in of_kind[-1].items() if k != "evidence"}
        assert fields[f"events/{kind}"] == {**latest, "count": len(of_kind)}
    assert fields["events/stop"]["step"] == first["step"]
    alerts = [r.alert.title for r in records if r.WhichOneof("record_type") == "alert"]
    assert f"{first['kind']} at step {first['step']}" in alerts
    assert f"stop at step {first['step']}" in alerts
