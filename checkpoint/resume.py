"""Which checkpoints a run may resume from, and whether its config may continue them."""

from pathlib import Path
from typing import Any

from checkpoint.manager import (
    DIVERGED_PREFIX,
    Checkpointer,
    CheckpointError,
    HarnessState,
    _barrier,
    read_harness,
    warn,
)
from configs import flatten_config
from configs.schema import TrainConfig

# Keys whose change would silently make a different run; the rest (steps, intervals, logging,
# checkpointing, monitoring) may change on resume.
RUN_DEFINING = ("model", "optim", "precision", "data.dataset", "run.seed", "zero_stage")


def changed_keys(saved: dict[str, Any], cfg: TrainConfig, world_size: int) -> list[str]:
    """Run-defining keys that differ between a checkpoint's config and `cfg`.

    The global batch counts as one key: how it is split into ranks and accumulation steps may
    change (the data order depends only on the global batch), its size may not.
    """
    old = flatten_config(saved)
    new = flatten_config(cfg.model_dump(mode="json"))
    changed = [
        f"{key} ({old.get(key)!r} -> {new.get(key)!r})"
        for key in sorted(set(old) | set(new))
        if key.startswith(RUN_DEFINING) and old.get(key) != new.get(key)
    ]
    old_batch = saved["train"]["micro_batch_size"] * saved["train"]["grad_accum_steps"]
    new_batch = cfg.train.micro_batch_size * cfg.train.grad_accum_steps * world_size
    if old_batch * saved.get("world_size", 1) != new_batch:
        changed.append("global batch (train.micro_batch_size x train.grad_accum_steps x ranks)")
    return changed


def choose_zero_stage(
    cfg: TrainConfig, world_size: int, ckpt: Checkpointer
) -> tuple[TrainConfig, str]:
    """The run's ZeRO stage where the user set none (on the command line or in the config
    file): the stage of the checkpoint it resumes (a run keeps its stage), else ZeRO 0 on one
    rank, else the schema's default. Returns the config and a note for the start-up line.

    On one rank ZeRO 1 is pure overhead (a second fp32 copy, bucket copies, a one-rank
    all-reduce, three host syncs per step), and the update gate clips under ZeRO 0.
    """
    if "zero_stage" in cfg.model_fields_set:
        return cfg, ""
    saved = _resumed_stage(cfg, ckpt)
    if saved is not None:
        stage, note = saved, "as the checkpoint it resumes"
    elif world_size == 1:
        stage, note = 0, "chosen for one rank"
    else:
        return cfg, ""
    note = f" ({note}; set zero_stage to choose)"
    return cfg.model_copy(update={"zero_stage": stage}), note


def _resumed_stage(cfg: TrainConfig, ckpt: Checkpointer) -> int | None:
    """The ZeRO stage of the checkpoint a resume would load first; None for a fresh start
    (an unreadable one is left to `select_resume` to report)."""
    mode = cfg.checkpoint.resume
    paths = [] if mode == "never" else ckpt.candidates() if mode == "auto" else [Path(mode)]
    for path in paths:
        try:
            return read_harness(path)["zero_stage"]
        except CheckpointError:
            continue
    return None


def select_resume(ckpt: Checkpointer, cfg: TrainConfig, world_size: int) -> list[Path]:
    """The checkpoints to try, best first; empty for a fresh start.

    `resume=auto` offers every published checkpoint from `latest` back (the loader falls back
    along this list when one does not load); `never` none; a path exactly that one. The config
    is checked against the first, before anything is built or written.
    """
    mode = cfg.checkpoint.resume
    if mode == "never":
        clear_for_fresh_start(ckpt, cfg.run.move_aside)
        return []
    if mode != "auto":
        path = Path(mode)
        check_compatible(read_harness(path), cfg, world_size, path)
        return [path]
    usable = []
    for path in ckpt.candidates():
        try:
            read_harness(path)
        except CheckpointError as err:
            if ckpt.rank == 0:
                warn(f"skipping unreadable checkpoint: {err}")
            continue
        usable.append(path)
    if not usable and ckpt.published():
        raise CheckpointError(
            f"checkpoints exist in {ckpt.dir} but none has a readable harness.json; to start "
            "afresh use a new run.name, or checkpoint.resume=never run.move_aside=true"
        )
    if usable:
        check_compatible(read_harness(usable[0]), cfg, world_size, usable[0])
    return usable


def clear_for_fresh_start(ckpt: Checkpointer, move_aside: bool) -> None:
    """Make sure a fresh start (`checkpoint.resume=never`) does not mix into an earlier run.

    A run directory that holds a run (checkpoints, metrics or events) is refused, or with
    `move_aside` renamed to `<name>.old-N` first (rank 0, the others wait).
    """
    run_dir = ckpt.dir.parent
    held = [p.name for p in (run_dir / "metrics.jsonl", run_dir / "events.jsonl") if _nonempty(p)]
    held += ["checkpoints"] if ckpt.published() else []
    if not held:
        return
    aside = next(
        path
        for n in range(1, 10_000)
        if not (path := run_dir.with_name(f"{run_dir.name}.old-{n}")).exists()
    )
    if not move_aside:
        raise CheckpointError(
            f"{run_dir} already holds a run ({', '.join(held)}); checkpoint.resume=never would "
            f"mix a new run into it: use a new run.name, or add run.move_aside=true to move the "
            f"old run to {aside} first"
        )
    _barrier()  # every rank has looked before rank 0 moves it
    if ckpt.rank == 0:
        run_dir.rename(aside)
        warn(f"moved the earlier run in {run_dir} to {aside}")
    _barrier()


def _nonempty(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 0


def resume_reason(cfg: TrainConfig, previous: dict[str, Any] | None) -> str:
    """Why a run resumes where it does, for its `resume` event."""
    if cfg.checkpoint.resume != "auto":
        return "checkpoint.resume names it"
    if previous is not None and previous.get("status") == "diverged":
        return (
            f"restart after the divergence stop at step {previous.get('steps')}: from the last "
            f"good checkpoint (the diverged state stays in {DIVERGED_PREFIX}step_*)"
        )
    return "the latest checkpoint"


def select_init(cfg: TrainConfig, resume_from: list[Path]) -> Path | None:
    """The checkpoint `checkpoint.init_from` names, for a run that has none of its own yet.

    A requeued or restarted run resumes its own checkpoints instead. Only the model must match:
    the rest (learning rate, schedule, steps, even weight decay) is what a new run changes.
    """
    if resume_from or cfg.checkpoint.init_from is None:
        return None
    path = Path(cfg.checkpoint.init_from)
    saved = flatten_config({"model": read_harness(path)["config"]["model"]})
    new = flatten_config({"model": cfg.model.model_dump(mode="json")})
    changed = [f"{k} ({saved.get(k)!r} -> {new.get(k)!r})" for k in new if saved.get(k) != new[k]]
    if changed:
        raise CheckpointError(
            f"checkpoint.init_from={path} holds another model: {', '.join(changed)}"
        )
    return path


def optimizer_state_fits(saved: HarnessState, zero_stage: int) -> bool:
    """Whether a run at `zero_stage`, on any number of ranks, can take the optimizer state of a
    checkpoint with harness state `saved`: saved as it is, or through DeepSpeed's universal form
    (ZeRO 1-3 to ZeRO 1-3). ZeRO 0 keeps it whole and ZeRO 1-3 in rank partitions, and neither
    reads the other's, so between ZeRO 0 and another stage only the weights can go."""
    old = saved["zero_stage"]
    return old == zero_stage or (old > 0 and zero_stage > 0)


def check_compatible(state: HarnessState, cfg: TrainConfig, world_size: int, path: Path) -> None:
    """Refuse a resume whose config would silently make another run (unless forced)."""
    changed = changed_keys({**state["config"], "world_size": state["world_size"]}, cfg, world_size)
    if changed and not cfg.checkpoint.force_resume:
        raise CheckpointError(
            f"checkpoint {path} was made with a different {', '.join(changed)}; resuming would "
            "silently change the run (use a new run.name, or checkpoint.force_resume=true)"
        )
