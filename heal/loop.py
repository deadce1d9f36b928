"""`heal.run`: trainer.run, and after a divergence stop its diagnosis, or under
`divergence.policy=heal` the heal: diagnose, roll back, apply the remedy, train on.

One heal, after the run stopped at detection step D (the trainer's `stop`: the update of D is
withheld and the diverged state kept as `diverged_step_D`, never resumed):
1. `postmortem.diagnose` replays the detection from the checkpoint kept before it (step C),
   in this process, while this process holds the run's lock;
2. `heal.remedies.choose` picks the remedy for the verdict, escalating past remedies that did
   not hold, or gives the reason to stop;
3. a `heal` event records the detection, the verdict, the remedy, its config diff and the
   steps lost (D - C); a stop records its reason the same way (`action: stop`);
4. the run resumes from C with the remedy in its config: the start records it in
   config_history.jsonl from step C on, so replays and diagnoses of later detections run it.

The heals of a run are its `heal` events: a restart of the run (after a crash, a SIGKILL in
the middle of a heal, a requeue) applies them all again, so the run goes on as healed. A
SIGKILL before the heal event is written loses nothing either: the restart resumes from C,
meets the detection again and heals it.
"""

import time
from pathlib import Path
from typing import Any

import torch.distributed as dist

import trainer
from checkpoint import layout
from common.files import read_jsonl, write_json_atomic
from configs import with_changes
from configs.schema import TrainConfig
from heal.remedies import Remedy, Situation, bound_reached, choose
from launch.distributed import init_distributed
from monitor.detectors import began_at
from postmortem import replay
from postmortem.diagnose import append_record, diagnose, diagnose_stop
from trainer.trainer import hold_run_lock


def run(cfg: TrainConfig) -> dict[str, Any]:
    """Train `cfg` to its end as `python train.py` does; return the final summary.

    Without the heal policy: `trainer.run`, then the diagnosis of a divergence stop when
    `divergence.diagnose` asks. With it: heal each divergence stop until the run completes,
    is preempted, or cannot be healed (its last summary says `diverged`; the last `heal` event
    says why). Every rank calls this.
    """
    if cfg.divergence.policy != "heal":
        summary = trainer.run(cfg)
        diagnose_stop(cfg, summary)
        return summary
    env = init_distributed(cfg.run.device, cfg.run.collective_timeout_s)
    run_dir = Path(cfg.run.out_dir) / cfg.run.name
    lock = hold_run_lock(run_dir, env)  # one writer across the restarts and diagnoses
    if lock is not None and lock.took_over:
        print(lock.takeover_note(), flush=True)
    try:
        resume = None
        while True:
            summary = trainer.run(with_heals(cfg, run_dir, resume), locked=True)
            if summary["status"] == "diverged":
                resume = heal(with_heals(cfg, run_dir), run_dir, summary["steps"])
            if summary["status"] != "diverged" or resume is None:
                return count_heals(run_dir, summary, env.is_main)
    finally:
        if lock is not None:
            lock.release()


def count_heals(run_dir: Path, summary: dict[str, Any], writer: bool) -> dict[str, Any]:
    """The summary with `heals` and the detections of every trajectory: each heal resumed a
    checkpoint whose watch had not seen the detections after it (`writer`: rank 0 writes)."""
    events = read_jsonl(run_dir / "events.jsonl")
    found = [e for e in events if "metric" in e]
    detections = [began_at(e["step"], e.get("facts")) for e in found if e.get("actionable", True)]
    summary = {
        **summary,
        "heals": len(_acted(events)),
        "divergences": len(detections),
        "first_divergence_step": min(detections, default=None),
        "record_only_detections": len(found) - len(detections),
    }
    if writer:
        write_json_atomic(run_dir / "summary.json", summary)
    return summary


def heals_of(run_dir: Path) -> list[dict[str, Any]]:
    """The heals a run has made (its `heal` events that acted), oldest first."""
    return _acted(read_jsonl(run_dir / "events.jsonl"))


def _acted(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e["kind"] == "heal" and e["action"] == "heal"]


def with_heals(cfg: TrainConfig, run_dir: Path, resume: Path | None = None) -> TrainConfig:
    """`cfg` with every heal of the run applied, in order, resuming `resume` when given.

    Resuming the checkpoint a heal rolled back to (its config is from before the remedy) is
    forced: the change it meets is the heal's, recorded.
    """
    heals = heals_of(run_dir)
    changes = {key: new for e in heals for key, (_, new) in e["changes"].items()}
    target = resume or layout.latest(run_dir / "checkpoints")
    if resume is not None:
        changes["checkpoint.resume"] = str(resume)
    if target is not None and any(e["checkpoint"] == str(target) for e in heals):
        changes["checkpoint.force_resume"] = True
    return with_changes(cfg, changes) if changes else cfg


def heal(cfg: TrainConfig, run_dir: Path, step: int) -> Path | None:
    """Diagnose the detection that stopped the run at `step` and pick its remedy; record the
    heal (or the reason to stop) as an event. Returns the checkpoint to resume, or None."""
    began = time.time()
    if dist.is_initialized():  # rank 0 has written the stop: every rank reads the same files
        dist.barrier()
    heals = heals_of(run_dir)
    index = replay.stopping_detection(run_dir, step)
    detection = replay.detections(run_dir)[index]
    record = {"step": step, "kind": "heal", "event": index, "detection": _brief(detection)}
    bound = bound_reached(heals, cfg)
    if bound is not None:  # no diagnosis to pay for
        return _stop(run_dir, record, bound)
    try:
        result = diagnose(run_dir, index, cfg.divergence.heal.batches)
    except Exception as err:  # a heal that cannot diagnose stops; the run's record stays
        return _stop(run_dir, record, f"the diagnosis failed: {type(err).__name__}: {err}")
    checkpoint = Path(result["checkpoint"])
    rollback = layout.step_of(checkpoint)
    mechanism = result["mechanisms"][0]["name"]
    batch = result["suspect_batch"]
    position = batch["position"] if batch else None
    at = Situation(cfg, rollback, position, _attn_logit_max(run_dir, rollback))
    chosen = choose(mechanism, detection, heals, at)
    record.update(
        cause=result["cause"],
        confidence=result["confidence"],
        mechanism=mechanism,
        diagnosis=str(run_dir / f"diagnosis-{result['index']}" / "report.md"),
    )
    if isinstance(chosen, str):
        if mechanism == "undetermined":  # say why the diagnosis could not tell
            chosen = f"the diagnosis could not tell the cause: {result['cause_evidence']}"
        return _stop(run_dir, record, chosen)
    _record(run_dir, {**record, **_healed(chosen, checkpoint, rollback, step, len(heals), began)})
    return checkpoint


def _healed(
    remedy: Remedy, checkpoint: Path, rollback: int, step: int, made: int, began: float
) -> dict[str, Any]:
    return {
        "action": "heal",
        "remedy": remedy.name,
        "text": remedy.text,
        "changes": remedy.changes,
        "checkpoint": str(checkpoint),
        "rollback_to": rollback,
        "steps_lost": step - rollback,
        "heal": made + 1,
        "minutes": (time.time() - began) / 60,
    }


def _stop(run_dir: Path, record: dict[str, Any], reason: str) -> None:
    """Record why the run stops instead of healing."""
    _record(run_dir, {**record, "action": "stop", "reason": reason})


def _record(run_dir: Path, record: dict[str, Any]) -> None:
    """Rank 0 appends the event; every rank then reads the same events.jsonl."""
    if int(dist.get_rank() if dist.is_initialized() else 0) == 0:
        append_record(run_dir, {**record, "time": time.time()})
        print(_line(record), flush=True)
    if dist.is_initialized():
        dist.barrier()


def _line(record: dict[str, Any]) -> str:
    d = record["detection"]
    head = f"heal: {d['kind']} of {d['metric']} at step {record['step']}"
    if record["action"] == "stop":
        return f"{head}: stopping, because {record['reason']}"
    return (
        f"{head}, {record['cause']} ({record['mechanism']}): {record['text']}; back to step "
        f"{record['rollback_to']} ({record['steps_lost']} steps lost)"
    )


def _brief(detection: dict[str, Any]) -> dict[str, Any]:
    return {k: detection.get(k) for k in ("kind", "metric", "value", "threshold")}


def _attn_logit_max(run_dir: Path, step: int) -> float | None:
    """The largest attention logit the run recorded at or before `step` (its last reading)."""
    readings = [
        line["attn_logit_max"]
        for line in read_jsonl(run_dir / "metrics.jsonl")
        if line.get("step", 0) <= step and isinstance(line.get("attn_logit_max"), (int, float))
    ]
    return float(readings[-1]) if readings else None
