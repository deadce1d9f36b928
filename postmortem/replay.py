"""Re-run the steps that led to a detection, with full telemetry at every step.

    python -m postmortem.replay RUN_DIR --event K        # K-th detection of events.jsonl, from 0
    python -m postmortem.replay RUN_DIR --event -1       # the last one
    torchrun --nproc-per-node N -m postmortem.replay RUN_DIR --event K   # a run made on N ranks

K counts the detections in `RUN_DIR/events.jsonl` (the events that have a `metric`), in file
order; negative K counts from the end. The replay restores the newest checkpoint taken before
the detection's step and trains from it up to and including that step, through `trainer.run`
with the config that trained that step (the run's config_history.jsonl: a resume with a new
lr or a larger `train.max_steps` replays as it ran; a run older than the history, the
checkpoint's own config) and these changes: `train.log_interval=1` and logit telemetry
(attention logits, log Z) plus per-block norms at every step; the `record` policy (a `skip`
run keeps `skip`, since its withheld updates are part of the trajectory); no checkpoints; no
wandb. The learning rate still follows the run's `train.max_steps`. Everything goes to
`RUN_DIR/replay-K/`, a run directory of its own (an earlier replay of K is replaced).

On the CPU in fp32, with the run's world size and thread count, the replayed losses equal the
recorded ones bitwise; the command prints the comparison (`--check` exits 1 on a mismatch).
The recorded per-step losses come from the detection's evidence window and metrics.jsonl.
"""

import argparse
import math
import os
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trainer
from checkpoint.config import CheckpointConfig
from checkpoint.layout import KEEP_FILE, published, step_of
from checkpoint.manager import Checkpointer, CheckpointError, read_harness
from common.files import read_jsonl
from configs import ConfigError, validate
from configs.schema import TrainConfig
from monitor.run_record import config_entry_at

# Events after which a run's steps repeat on another trajectory.
_TRAJECTORY_ENDS = ("rollback", "heal")


@dataclass(frozen=True)
class ReplayPlan:
    """What a replay of one detection runs: from which checkpoint, to which step, how."""

    index: int  # K, made non-negative
    event: dict[str, Any]
    checkpoint: Path
    stop_step: int
    cfg: TrainConfig
    note: str | None = None  # how the checkpoint was chosen, when it is not the pinned one

    @property
    def out_dir(self) -> Path:
        return Path(self.cfg.run.out_dir) / self.cfg.run.name


def detections(run_dir: Path) -> list[dict[str, Any]]:
    """The detection events of a run (those with a `metric`), in file order."""
    return [e for e in read_jsonl(Path(run_dir) / "events.jsonl") if "metric" in e]


def stopping_detection(run_dir: str | Path, step: int) -> int:
    """K of the detection that stopped the run at `step`: the first actionable one of the newest
    stretch of that step's detections (after a heal's rollback an earlier trajectory may have
    detections at the same step, with a `stop`, `heal` or `resume` event between the two; a
    record-only detection, `actionable` false, never stops a run)."""
    events = read_jsonl(Path(run_dir) / "events.jsonl")
    at_step = [i for i, e in enumerate(events) if "metric" in e and e["step"] == step]
    if not at_step:
        raise ValueError(f"{run_dir} has no detection at step {step}, where it stopped")
    first = at_step[-1]
    while first > 0 and events[first - 1]["step"] == step and _of_one_step(events[first - 1]):
        first -= 1
    stretch = [i for i in range(first, at_step[-1] + 1) if "metric" in events[i]]
    chosen = next((i for i in stretch if events[i].get("actionable", True)), stretch[0])
    return sum("metric" in e for e in events[:chosen])


def _of_one_step(event: dict[str, Any]) -> bool:
    """Whether `event` is one a training step writes (a detection, or its withheld update)."""
    return "metric" in event or event["kind"] == "skip"


def plan(run_dir: str | Path, index: int) -> ReplayPlan:
    """Which checkpoint and config replay detection `index` of `run_dir`; raises ValueError."""
    run_dir = Path(run_dir)
    events = read_jsonl(run_dir / "events.jsonl")
    found = [i for i, e in enumerate(events) if "metric" in e]
    if not found:
        raise ValueError(f"{run_dir} has no detections in events.jsonl")
    if not -len(found) <= index < len(found):
        raise ValueError(f"--event {index}: {run_dir} has {len(found)} detections (0..)")
    index %= len(found)
    position = found[index]
    event = events[position]
    step = int(event["step"])

    ckpt = Checkpointer(run_dir, CheckpointConfig(), rank=0, world_size=1).before(step)
    if ckpt is None:
        raise ValueError(
            f"no checkpoint from before step {step} is left in {run_dir / 'checkpoints'}"
        )
    # a rollback to this very checkpoint skipped batches after it: the detection came on a
    # trajectory that restoring the checkpoint alone does not reproduce
    rollbacks = [e for e in events[:position] if e["kind"] == "rollback"]
    if rollbacks and Path(rollbacks[-1]["path"]).name == ckpt.name:
        raise ValueError(
            f"detection {index} (step {step}) follows a rollback to {ckpt.name} that skipped "
            f"{rollbacks[-1].get('skipped_batches')} batches; replaying it needs a checkpoint "
            "saved after the rollback (a smaller checkpoint.interval)"
        )

    data, note = _config_for(run_dir, step, ckpt)
    policy = data["divergence"]["policy"]
    changes = {
        ("run", "out_dir"): str(run_dir),
        ("run", "name"): f"replay-{index}",
        ("train", "log_interval"): 1,
        ("telemetry", "enabled"): True,
        ("telemetry", "interval"): 0,
        ("telemetry", "per_layer"): True,
        ("divergence", "enabled"): True,
        ("divergence", "policy"): "skip" if policy == "skip" else "record",
        ("checkpoint", "resume"): str(ckpt),
        ("checkpoint", "force_resume"): True,  # the config in force may differ from ckpt's
        ("checkpoint", "interval"): 0,
        ("wandb", "mode"): "disabled",
    }
    for (section, key), value in changes.items():
        data.setdefault(section, {})[key] = value
    cfg = validate(data)
    return ReplayPlan(index, event, ckpt, min(step, cfg.train.max_steps), cfg, note)


def _config_for(run_dir: Path, step: int, ckpt: Path) -> tuple[dict[str, Any], str | None]:
    """The config that trained `step` (the run's history, so a resume with a new lr or a larger
    `train.max_steps` replays as it ran), and a note when the checkpoint is not the one the
    run pinned for this detection. A run older than the history: the checkpoint's config."""
    pinned = any(
        f"detection at step {step}" in (path / KEEP_FILE).read_text()
        for path in published(run_dir / "checkpoints")
        if (path / KEEP_FILE).is_file()
    )
    note = None if pinned else f"no checkpoint was kept for this detection; {ckpt.name} is used"
    entry = config_entry_at(run_dir, step)
    if entry is None:
        return read_harness(ckpt)["config"], note
    if step_of(ckpt) < entry["step"]:
        raise ValueError(
            f"the newest checkpoint before step {step} ({ckpt.name}) is older than the config "
            f"change at step {entry['step']}: a replay from it would cross that change (keep "
            "more checkpoints, checkpoint.keep_last)"
        )
    return entry["config"], note


def replay(run_dir: str | Path, index: int) -> ReplayPlan:
    """Run the replay of detection `index`; returns its plan (`plan.out_dir` has the files)."""
    replay_plan = plan(run_dir, index)
    if os.environ.get("RANK", "0") == "0":
        shutil.rmtree(replay_plan.out_dir, ignore_errors=True)
    trainer.run(replay_plan.cfg, stop_step=replay_plan.stop_step)
    return replay_plan


def recorded_losses(run_dir: str | Path, index: int) -> dict[int, float]:
    """The run's loss at each step on the trajectory that led to detection `index`."""
    return recorded_values(run_dir, index, "loss")


def recorded_values(run_dir: str | Path, index: int, key: str) -> dict[int, float]:
    """The run's `key` (loss, grad_norm) at each step on the trajectory to detection `index`.

    From the detection's evidence window (every step) and metrics.jsonl (log steps). After a
    rollback or a heal steps repeat: only the lines written between the rollbacks or heals
    around the detection count, by their `time`.
    """
    run_dir = Path(run_dir)
    events = read_jsonl(run_dir / "events.jsonl")
    found = [i for i, e in enumerate(events) if "metric" in e]
    position = found[index]
    event = events[position]
    before = [e["time"] for e in events[:position] if e["kind"] in _TRAJECTORY_ENDS]
    after = [e["time"] for e in events[position:] if e["kind"] in _TRAJECTORY_ENDS]
    start, end = (before[-1] if before else -math.inf), (after[0] if after else math.inf)
    values = {}
    for line in read_jsonl(run_dir / "metrics.jsonl"):
        if key in line and start < line["time"] <= end and line["step"] <= event["step"]:
            values[line["step"]] = _number(line[key])
    for record in event.get("evidence", []):
        if key in record:
            values[record["step"]] = _number(record[key])
    return dict(sorted(values.items()))


def replayed_losses(replay_dir: str | Path) -> dict[int, float]:
    """The loss at each step of a replay directory's metrics.jsonl."""
    return replayed_values(replay_dir, "loss")


def replayed_values(replay_dir: str | Path, key: str) -> dict[int, float]:
    """`key` at each step of a replay directory's metrics.jsonl (the last line of a step)."""
    lines = read_jsonl(Path(replay_dir) / "metrics.jsonl")
    return {line["step"]: _number(line[key]) for line in lines if key in line}


def _number(value: float | str) -> float:
    return float(value)  # 'nan' / 'inf' strings of the JSON files included


def compare(
    recorded: dict[int, float], replayed: dict[int, float]
) -> list[tuple[int, float, float]]:
    """(step, recorded, replayed) for the steps both have, where the two differ bitwise.

    NaN equals NaN here: a replay that reproduces a non-finite loss reproduces the run.
    """
    return [
        (step, recorded[step], replayed[step])
        for step in sorted(recorded.keys() & replayed.keys())
        if not _same(recorded[step], replayed[step])
    ]


def _same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


def detection_parser(prog: str, doc: str) -> argparse.ArgumentParser:
    """The arguments of every command about one detection of a run: the run directory and K."""
    parser = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="the run directory (<out_dir>/<name>)")
    parser.add_argument(
        "--event", type=int, default=0, help="which detection: K-th in events.jsonl, from 0"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: replay one detection of a run directory and compare the losses."""
    parser = detection_parser("python -m postmortem.replay", __doc__)
    parser.add_argument("--check", action="store_true", help="exit 1 if a loss differs")
    args = parser.parse_args(argv)
    try:
        replay_plan = replay(args.run_dir, args.event)
    except (ValueError, ConfigError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    e = replay_plan.event
    recorded = recorded_losses(args.run_dir, replay_plan.index)
    replayed = replayed_losses(replay_plan.out_dir)
    common = sorted(recorded.keys() & replayed.keys())
    differ = compare(recorded, replayed)
    if os.environ.get("RANK", "0") != "0":
        return 0
    print(
        f"replayed {e['kind']} of {e['metric']} at step {e['step']} from "
        f"{replay_plan.checkpoint.name}: {len(replayed)} steps in {replay_plan.out_dir}"
    )
    print(
        f"losses at {len(common)} recorded steps: "
        + ("all equal bitwise" if not differ else f"{len(differ)} differ")
    )
    for step, a, b in differ[:10]:
        print(f"  step {step}: recorded {a!r}, replayed {b!r}")
    return 1 if args.check and (differ or not common) else 0


if __name__ == "__main__":
    sys.exit(main())
