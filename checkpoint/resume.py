"""Which checkpoint a run starts from, and whether its config may continue it."""

import warnings
from pathlib import Path
from typing import Any

from checkpoint.manager import Checkpointer, CheckpointError, HarnessState, read_harness
from configs.schema import TrainConfig

# Keys whose change would silently make a different run; the rest (steps, intervals, logging,
# checkpointing, monitoring) may change on resume.
RUN_DEFINING = ("model", "optim", "precision", "data.dataset", "run.seed", "zero_stage")


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and key != "extra":
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def changed_keys(saved: dict[str, Any], cfg: TrainConfig, world_size: int) -> list[str]:
    """Run-defining keys that differ between a checkpoint's config and `cfg`."""
    old = _flatten(saved)
    new = _flatten(cfg.model_dump(mode="json"))
    changed = [
        key
        for key in sorted(set(old) | set(new))
        if key.startswith(RUN_DEFINING) and old.get(key) != new.get(key)
    ]
    old_batch = saved["train"]["micro_batch_size"] * saved["train"]["grad_accum_steps"]
    new_batch = cfg.train.micro_batch_size * cfg.train.grad_accum_steps * world_size
    if old_batch * saved.get("world_size", 1) != new_batch:
        changed.append("global batch (train.micro_batch_size x train.grad_accum_steps x ranks)")
    return changed


def select_resume(ckpt: Checkpointer, cfg: TrainConfig) -> Path | None:
    """The checkpoint to resume from: `resume=auto` takes the newest readable one."""
    mode = cfg.checkpoint.resume
    if mode == "never":
        return None
    if mode != "auto":
        path = Path(mode)
        read_harness(path)  # a one-line CheckpointError if it is not a checkpoint
        return path
    candidates = ckpt.complete()
    latest = ckpt.latest()
    if latest is not None and latest in candidates:
        candidates.remove(latest)
        candidates.append(latest)
    for path in reversed(candidates):
        try:
            read_harness(path)
            return path
        except CheckpointError as err:
            warnings.warn(f"skipping unreadable checkpoint: {err}", stacklevel=2)
    return None


def check_compatible(state: HarnessState, cfg: TrainConfig, world_size: int, path: Path) -> None:
    changed = changed_keys({**state["config"], "world_size": state["world_size"]}, cfg, world_size)
    if changed and not cfg.checkpoint.force_resume:
        raise CheckpointError(
            f"checkpoint {path} was made with a different {', '.join(changed)}; resuming would "
            "silently change the run (use a new run.name, or checkpoint.force_resume=true)"
        )
