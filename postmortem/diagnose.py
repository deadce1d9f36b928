"""Why did a run blow up? Replays that turn a detection's evidence into a diagnosis.

    python -m postmortem.diagnose RUN_DIR               # the first detection of events.jsonl
    python -m postmortem.diagnose RUN_DIR --event K     # the K-th (from 0; negative from the end)
    torchrun --nproc-per-node N -m postmortem.diagnose RUN_DIR  # a run made on N ranks

For detection K at step D, from the checkpoint kept before it (step C), as `postmortem.replay`:
1. Reproducible or transient: replay C -> D with the same batches. The detection recurs:
   reproducible. It does not, and the replay was otherwise exact (losses and grad norms before
   D, and the loss of step D, equal the recorded ones bitwise): transient, with the mismatch.
   Neither: undetermined (this machine does not replay the run exactly).
2. Data or state: step D again from the state just before it (step D - 1, saved by the first
   replay) on `--batches` other global batches (seeded), and the suspect batch from an earlier
   state (C, when C < D - 1). The detection follows the batch: data (the batch is named by its
   loader position and its windows' token ranges in train.bin); follows the state: state.
3. Which signal departed first: every series of the run's metrics up to C and the replay's from
   C + 1 to D (loss, grad norm, norms and update ratios per group and per block, attention
   logits per layer, |log Z|, sharpness where recorded), its increments judged reading by
   reading with the spike detector's robust z-score (upward; growth factors except for the
   loss): see `postmortem.signals.departure`.
4. A ranked mechanism with the remedies the harness offers, each with its evidence.
Written to RUN_DIR/diagnosis-K/ (report.md, diagnosis.json, timeline.png, and the replays'
run directories), a `diagnosis` event appended to RUN_DIR/events.jsonl, a summary printed.

Exit status: 0 diagnosed (whatever the verdict, "undetermined" included), 3 nothing to
diagnose (the run has no detection), 2 bad input (no run directory, no such event, no kept
checkpoint), 1 the diagnosis itself failed.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch.distributed as dist

import trainer
from checkpoint.config import CheckpointConfig
from checkpoint.manager import (
    HARNESS_FILE,
    KEEP_FILE,
    UNIVERSAL_DIR,
    Checkpointer,
    CheckpointError,
    read_harness,
    step_of,
    tag_for,
)
from common.files import json_safe, write_json_atomic
from configs import ConfigError, validate
from configs.schema import TrainConfig
from postmortem import replay
from postmortem.report import summary_text, write_report
from postmortem.signals import (
    Mechanism,
    departure,
    remedies,
    signal_series,
    state_mechanisms,
    timeline,
)

NUM_BATCHES = 3


@dataclass
class Replay:
    """One replay run: what it tried, and whether the detection came back."""

    name: str
    start_step: int
    stop_step: int
    position: int | None  # loader position of its first step, when it was moved there
    blew_up: bool  # the detection recurred, or its metric left its baseline there
    detections: list[dict[str, Any]] = field(default_factory=list)


# --- replays ---------------------------------------------------------------------------------


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def variant(
    cfg: TrainConfig, out_dir: Path, name: str, resume: Path, save_at: int = 0
) -> TrainConfig:
    """The replay config `cfg` (from `replay.plan`) run as `out_dir/name`, from `resume`,
    saving one checkpoint at step `save_at` (0: none); never diagnosing itself."""
    data = cfg.model_dump(mode="json")
    data["run"].update(out_dir=str(out_dir), name=name)
    data["checkpoint"].update(resume=str(resume), interval=save_at)
    data["divergence"]["diagnose"] = False
    return validate(data)


def run_replay(
    cfg: TrainConfig,
    out_dir: Path,
    name: str,
    resume: Path,
    stop_step: int,
    event: dict[str, Any],
    position: int | None = None,
    save_at: int = 0,
) -> Replay:
    """Train `resume` -> `stop_step` (from loader position `position` when given); did the
    detection (same kind and metric) come back at `stop_step`?"""
    run_dir = out_dir / name
    if position is not None:
        resume = moved(resume, out_dir / f"{name}-start", position)
    if _rank() == 0:
        shutil.rmtree(run_dir, ignore_errors=True)
    _barrier()
    trainer.run(variant(cfg, out_dir, name, resume, save_at), stop_step=stop_step)
    _barrier()  # rank 0's files are complete: every rank reads them and decides alike
    found = replay.detections(run_dir)
    recurred = any(
        e["step"] == stop_step and (e["kind"], e["metric"]) == (event["kind"], event["metric"])
        for e in found
    )
    start = read_harness(resume)["step"]
    return Replay(name, start, stop_step, position, recurred, found)


def moved(source: Path, target: Path, position: int) -> Path:
    """A copy of checkpoint `source` (files hard-linked) whose loader reads on at `position`."""
    if _rank() == 0:
        shutil.rmtree(target, ignore_errors=True)
        skip = shutil.ignore_patterns(UNIVERSAL_DIR, KEEP_FILE)
        shutil.copytree(source, target, copy_function=_link, ignore=skip)
        harness = read_harness(source)
        harness["loader"]["position"] = position
        write_json_atomic(target / HARNESS_FILE, harness)  # replaces the link, not the source
    _barrier()
    return target


def _link(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:  # another file system
        shutil.copy2(source, target)


def judge_blow_up(
    r: Replay, out: Path, history: Sequence[dict[str, Any]], event: dict[str, Any], cfg: TrainConfig
) -> bool:
    """Whether replay `r` blew up at its last step the way the run did at the detection.

    Yes when the detection recurred; when the detected metric left its baseline (the run's
    `history` before the replay, then the replay), which answers where the detectors cannot
    (from an early state their windows are not yet full); and, for the logit detections, when
    the reading is above half the threshold, the level at which the detector itself holds an
    episode open: a logit that grows over many steps crosses the line on one batch and stays
    just under it on the next.
    """
    if r.blew_up:
        return True
    name = {"log_z": "|log_z|", "loss_ema": "loss"}.get(event["metric"], event["metric"])
    lines = [*history, *replay.read_jsonl(out / r.name / "metrics.jsonl")]
    readings = signal_series(lines).get(name, [])
    last = dict(readings).get(r.stop_step)
    if event["kind"] in ("attn_logit", "output_logit") and last is not None:
        if last > float(event["threshold"]) / 2:
            return True
    d = cfg.divergence
    hit = departure(name, readings, d.spike_sigma, d.std_floor, d.window)
    return hit is not None and hit.step == r.stop_step


# --- 1. reproducible or transient ------------------------------------------------------------


def mismatches(
    run_dir: Path, index: int, replay_dir: Path, step: int
) -> list[tuple[str, int, float, float]]:
    """(key, step, recorded, replayed) where the replay differs bitwise from the run: losses
    and grad norms before `step`, and the loss of `step` (taken before its update)."""
    found = []
    for key in ("loss", "grad_norm"):
        recorded = replay.recorded_values(run_dir, index, key)
        replayed = replay.replayed_values(replay_dir, key)
        for s, a, b in replay.compare(recorded, replayed):
            if s < step or (s == step and key == "loss"):
                found.append((key, s, a, b))
    return sorted(found, key=lambda m: m[1])


def detection_values(run_dir: Path, index: int, replay_dir: Path, step: int) -> dict[str, Any]:
    """The loss and grad norm of `step` as recorded and as replayed."""
    values = {}
    for key in ("loss", "grad_norm"):
        values[key] = {
            "recorded": replay.recorded_values(run_dir, index, key).get(step),
            "replayed": replay.replayed_values(replay_dir, key).get(step),
        }
    return values


# --- 2. data or state ------------------------------------------------------------------------


def other_positions(suspect: int, count: int, num_positions: int, seed: int) -> list[int]:
    """`count` distinct seeded loader positions in [0, num_positions), none of them `suspect`."""
    rng = np.random.default_rng([seed, suspect])
    pool = np.setdiff1d(np.arange(num_positions), [suspect])
    return sorted(int(p) for p in rng.choice(pool, size=min(count, len(pool)), replace=False))


def batch_tokens(cfg: TrainConfig, position: int) -> dict[str, Any]:
    """Where global batch `position` lives in train.bin: its windows and their token ranges."""
    from data.loader import BatchLoader, resolve_dataset

    path = resolve_dataset(cfg.data) / "train.bin"
    global_batch = cfg.train.micro_batch_size * cfg.train.grad_accum_steps
    loader = BatchLoader(
        path,
        block_size=cfg.model.block_size,
        micro_batch_size=global_batch * _world_size(),
        seed=cfg.run.seed,
        vocab_size=cfg.model.vocab_size,
    )
    windows = loader.windows(position)
    block = cfg.model.block_size
    return {
        "file": str(path),
        "position": position,
        "epoch": position * loader.global_batch_size // loader.num_windows,
        "num_positions": loader.num_windows // loader.global_batch_size,
        "windows": [int(w) for w in windows],
        "token_ranges": [[int(w) * block, (int(w) + 1) * block + 1] for w in windows],
    }


def _world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def data_or_state(others: Sequence[Replay], earlier: Replay | None) -> tuple[str, str, str]:
    """(cause, confidence, evidence) from the other-batch replays and the suspect batch's."""
    recurred = sum(r.blew_up for r in others)
    of = f"{recurred} of {len(others)} other batches"
    if earlier is None:
        early = "no earlier state was kept to try the suspect batch on"
    else:
        early = f"the suspect batch from step {earlier.start_step}'s state " + (
            "blew up too" if earlier.blew_up else "did not blow up"
        )
    evidence = f"from the state before the detection {of} blew up; {early}"
    if recurred == 0:
        confidence = "high" if earlier is not None and earlier.blew_up else "medium"
        return "data", confidence, evidence
    if recurred == len(others):
        confidence = "high" if earlier is None or not earlier.blew_up else "medium"
        return "state", confidence, evidence
    return "state", "low", evidence


# --- the diagnosis ---------------------------------------------------------------------------


def diagnose(
    run_dir: str | Path, index: int = 0, num_batches: int = NUM_BATCHES, seed: int = 0
) -> dict[str, Any]:
    """Diagnose detection `index` of `run_dir` on every rank; rank 0 writes the outputs.

    Returns the diagnosis (what diagnosis.json holds). Raises ValueError, ConfigError or
    CheckpointError for a run that cannot be diagnosed (see `postmortem.replay.plan`).
    """
    from launch.distributed import init_distributed

    began = time.time()
    run_dir = Path(run_dir)
    plan = replay.plan(run_dir, index)
    init_distributed(plan.cfg.run.device)
    event, step, start = plan.event, plan.stop_step, step_of(plan.checkpoint)
    out = run_dir / f"diagnosis-{plan.index}"
    failure: list[OSError | None] = [None]
    if _rank() == 0:
        shutil.rmtree(out, ignore_errors=True)
        try:
            out.mkdir(parents=True)
        except OSError as err:
            failure[0] = err
    if dist.is_initialized():  # every rank gives up together, none waits in a collective
        dist.broadcast_object_list(failure, src=0)
    if failure[0] is not None:
        raise failure[0]

    # 1. the same batches: does the detection come back?
    save_at = step - 1 if step - 1 > start else 0
    first = run_replay(plan.cfg, out, "reproduce", plan.checkpoint, step, event, save_at=save_at)
    replays = [first]
    differ = mismatches(run_dir, plan.index, out / first.name, step)
    ran = sorted(replay.replayed_values(out / first.name, "loss"))  # the steps it trained
    found: dict[str, Any] = {
        "reproduced": first.blew_up,
        "exact": not differ if step in ran else None,  # no comparison without the step itself
        "steps_replayed": ran,
        "mismatches": [
            dict(zip(("key", "step", "recorded", "replayed"), m, strict=True)) for m in differ
        ],
        "at_detection": detection_values(run_dir, plan.index, out / first.name, step),
    }
    run_lines = replay.read_jsonl(run_dir / "metrics.jsonl")
    batch = None
    if first.blew_up:
        # 2. other batches from the state before the step; the suspect one from an earlier state
        state = out / first.name / "checkpoints" / tag_for(step - 1) if save_at else plan.checkpoint
        suspect = read_harness(state)["loader"]["position"]
        batch = batch_tokens(plan.cfg, suspect)
        positions = other_positions(suspect, num_batches, batch["num_positions"], seed)
        others = [
            run_replay(plan.cfg, out, f"batch-{p}", state, step, event, position=p)
            for p in positions
        ]
        kept = Checkpointer(run_dir, CheckpointConfig(), rank=0, world_size=1)
        early_ckpt = plan.checkpoint if start < step - 1 else kept.before(start)
        earlier = None
        if early_ckpt is not None:
            earlier = run_replay(
                plan.cfg,
                out,
                "suspect-earlier",
                early_ckpt,
                step_of(early_ckpt) + 1,
                event,
                position=suspect,
            )
        replays += [*others, *([earlier] if earlier else [])]
        replayed = replay.read_jsonl(out / first.name / "metrics.jsonl")
        lines = [line for line in run_lines if line.get("step", 0) <= start] + replayed
        before = [line for line in lines if line.get("step", 0) < step]
        for other in others:
            other.blew_up = judge_blow_up(other, out, before, event, plan.cfg)
        if earlier is not None:
            history = [line for line in run_lines if line.get("step", 0) <= earlier.start_step]
            earlier.blew_up = judge_blow_up(earlier, out, history, event, plan.cfg)
        cause, confidence, evidence = data_or_state(others, earlier)
    else:
        cause = "transient" if found["exact"] else "undetermined"
        confidence = "high" if found["exact"] else "low"
        evidence = _not_reproduced(found, step, plan)
        lines = run_lines
    departures = timeline(signal_series(lines), plan.cfg, step)

    # 4. the mechanism
    if cause == "data":
        mechanisms = [
            Mechanism("bad_batch", evidence, remedies("bad_batch", plan.cfg, batch), confidence)
        ]
    elif cause == "transient":
        mechanisms = [Mechanism("transient", evidence, remedies("transient", plan.cfg), confidence)]
    elif cause == "state":
        mechanisms = state_mechanisms(departures, event, step, plan.cfg)
    else:
        mechanisms = []
    if not mechanisms:
        mechanisms = [Mechanism("undetermined", evidence, [], "low")]

    result = {
        "run_dir": str(run_dir),
        "event": {
            k: event.get(k) for k in ("step", "kind", "metric", "value", "threshold", "detail")
        },
        "index": plan.index,
        "checkpoint": str(plan.checkpoint),
        "checkpoint_note": plan.note,
        "world_size": _world_size(),
        "reproduce": found,
        "cause": cause,
        "confidence": confidence,
        "cause_evidence": evidence,
        "suspect_batch": batch,
        "replays": [asdict(r) for r in replays],
        "timeline": [asdict(d) for d in departures],
        "mechanisms": [asdict(m) for m in mechanisms],
        "cost": {
            "replays": len(replays),
            "steps_replayed": sum(r.stop_step - r.start_step for r in replays),
            "minutes": (time.time() - began) / 60,
        },
    }
    result["summary"] = summary_text(result)
    if _rank() == 0:
        write_report(out, result, lines, step)
        append_event(run_dir, result, out)
    _barrier()
    return result


def _not_reproduced(found: dict[str, Any], step: int, plan: replay.ReplayPlan) -> str:
    at = ", ".join(
        f"{key} recorded {v['recorded']!r}, replayed {v['replayed']!r}"
        for key, v in found["at_detection"].items()
    )
    if found["exact"] is None:
        ran = found["steps_replayed"]
        trained = f"steps {ran[0]}-{ran[-1]}" if ran else "no step"
        return (
            f"undetermined, because the replay from {plan.checkpoint.name} trained {trained} "
            f"and never reached the detection at step {step} (its config ends at step "
            f"{plan.cfg.train.max_steps}), so nothing was compared"
        )
    if found["exact"]:
        return (
            f"replayed with the same batches the detection did not recur, and the replay was "
            f"otherwise exact (every earlier loss and grad norm, and step {step}'s loss, equal "
            f"bitwise); at step {step}: {at}"
        )
    m = found["mismatches"][0]
    return (
        f"replayed with the same batches the detection did not recur, but the replay is not "
        f"exact on this machine ({m['key']} at step {m['step']}: recorded {m['recorded']!r}, "
        f"replayed {m['replayed']!r}), so a transient fault cannot be told from "
        f"non-determinism; at step {step}: {at}"
    )


def append_event(run_dir: Path, result: dict[str, Any], out: Path) -> None:
    """One `diagnosis` line in the run's events.jsonl (appended: the record is never rewritten)."""
    record = {
        "step": result["event"]["step"],
        "kind": "diagnosis",
        "time": time.time(),
        "event": result["index"],
        "status": "done",
        "cause": result["cause"],
        "confidence": result["confidence"],
        "mechanism": result["mechanisms"][0]["name"],
        "report": str(out / "report.md"),
    }
    append_record(run_dir, record)


def append_record(run_dir: Path, record: dict[str, Any]) -> None:
    """Append one line to the run's events.jsonl (the record is never rewritten)."""
    with open(run_dir / "events.jsonl", "a") as f:
        f.write(json.dumps(json_safe(record)) + "\n")


def after_stop(run_dir: Path, step: int) -> None:
    """`divergence.diagnose=true`: diagnose the detection that stopped the run at `step`.

    Called on every rank once the stop is saved and the run's files are closed. A failure is
    recorded as a failed `diagnosis` event and a warning, never raised: the run's record and
    status stay as they are.
    """
    index = None
    try:
        index = replay.stopping_detection(run_dir, step)
        result = diagnose(run_dir, index)
        if _rank() == 0:
            print(result["summary"], flush=True)
    except Exception as err:  # the diagnosis must never take the run's outcome with it
        message = f"{type(err).__name__}: {err}"
        if _rank() == 0:
            print(f"warning: the diagnosis of {run_dir} failed: {message}", file=sys.stderr)
            record = {"step": step, "kind": "diagnosis", "time": time.time(), "event": index}
            append_record(run_dir, {**record, "status": "failed", "error": message})


def diagnose_stop(cfg: TrainConfig, summary: dict[str, Any]) -> None:
    """After `trainer.run`: with `divergence.diagnose=true`, diagnose the detection that stopped
    the run (every rank calls this, as it called the run)."""
    if summary["status"] == "diverged" and cfg.divergence.diagnose:
        after_stop(Path(cfg.run.out_dir) / cfg.run.name, summary["steps"])


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: diagnose one detection of a run directory; see the module docstring."""
    parser = replay.detection_parser("python -m postmortem.diagnose", __doc__)
    parser.add_argument(
        "--batches", type=int, default=NUM_BATCHES, help="other batches to try the step on"
    )
    parser.add_argument("--seed", type=int, default=0, help="seeds the choice of other batches")
    args = parser.parse_args(argv)
    if not (args.run_dir / "events.jsonl").is_file():
        print(f"error: {args.run_dir} is not a run directory (no events.jsonl)", file=sys.stderr)
        return 2
    if not replay.detections(args.run_dir):
        print(f"nothing to diagnose: {args.run_dir} has no detections in events.jsonl")
        return 3
    if args.batches < 1:
        print(f"error: --batches must be >= 1, got {args.batches}", file=sys.stderr)
        return 2
    from data.dataset import DataError
    from launch.distributed import close_distributed

    joined = dist.is_initialized()  # a caller's process group is the caller's to close
    try:
        result = diagnose(args.run_dir, args.event, args.batches, args.seed)
    except (ValueError, ConfigError, CheckpointError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not joined:
        close_distributed()
    if _rank() == 0:
        print(result["summary"])
        report = args.run_dir / f"diagnosis-{result['index']}" / "report.md"
        print(f"report: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
