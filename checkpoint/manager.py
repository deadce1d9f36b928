"""Atomic checkpoints of the DeepSpeed engine plus the harness state, retention and resume.

On-disk layout under `<run_dir>/checkpoints/`:
    step_00000100/        DeepSpeed's files, `rng_rank{r}.pt` per rank, `harness.json` (last)
    latest                the tag of the newest complete checkpoint (replaced atomically)
    step_.../KEEP         present on checkpoints retention must never delete (reason inside)
A checkpoint is written under `.partial-<tag>` and renamed only once every rank has finished,
so a crash at any moment leaves the previous checkpoint loadable.
"""

import json
import os
import random
import shutil
import warnings
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
import torch
import torch.distributed as dist

from checkpoint.config import CheckpointConfig
from monitor.sinks import write_json_atomic

HARNESS_FILE = "harness.json"
KEEP_FILE = "KEEP"
PARTIAL_PREFIX = ".partial-"


class OptimizerKind(TypedDict):
    name: str  # adamw | adam_l2
    decoupled: bool
    weight_decay: float


class HarnessState(TypedDict):
    """Everything besides the engine that an exact resume needs."""

    step: int
    tokens: int
    loader: dict[str, Any]
    monitor: dict[str, Any]
    optimizer: OptimizerKind
    config: dict[str, Any]
    world_size: int
    zero_stage: int


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message says which and what to do."""


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Checkpointer:
    """Saves, finds, pins, prunes and loads the checkpoints of one run directory."""

    def __init__(self, run_dir: Path, cfg: CheckpointConfig, rank: int, world_size: int):
        self.dir = run_dir / "checkpoints"
        self.cfg = cfg
        self.rank = rank
        self.world_size = world_size

    # --- finding ---------------------------------------------------------------------------

    def complete(self) -> list[Path]:
        """Complete checkpoints (those with a harness file), oldest first."""
        if not self.dir.is_dir():
            return []
        found = [p for p in self.dir.glob("step_*") if (p / HARNESS_FILE).is_file()]
        return sorted(found, key=lambda p: p.name)

    def latest(self) -> Path | None:
        pointer = self.dir / "latest"
        if pointer.is_file():
            path = self.dir / pointer.read_text().strip()
            if (path / HARNESS_FILE).is_file():
                return path
        found = self.complete()
        return found[-1] if found else None

    def before(self, step: int) -> Path | None:
        """The newest complete checkpoint taken strictly before `step`."""
        earlier = [p for p in self.complete() if read_harness(p)["step"] < step]
        return earlier[-1] if earlier else None

    # --- saving ----------------------------------------------------------------------------

    def save(self, engine, state: HarnessState) -> Path:
        """Write a checkpoint of `engine` and `state` on every rank; publish it atomically."""
        tag = tag_for(state["step"])
        partial = self.dir / f"{PARTIAL_PREFIX}{tag}"
        if self.rank == 0:
            shutil.rmtree(partial, ignore_errors=True)
            self.dir.mkdir(parents=True, exist_ok=True)
        _barrier()
        engine.save_checkpoint(str(self.dir), tag=partial.name, save_latest=False)
        torch.save(rng_state(), partial / f"rng_rank{self.rank}.pt")
        _barrier()
        final = self.dir / tag
        if self.rank == 0:
            write_json_atomic(partial / HARNESS_FILE, state)
            if final.exists():  # the same step again, after a rollback: the newer one wins
                shutil.rmtree(final)
            os.replace(partial, final)
            write_text_atomic(self.dir / "latest", tag)
            self.prune()
        _barrier()
        return final

    def pin(self, path: Path, reason: str) -> None:
        """Keep `path` for the life of the run (a last-good checkpoint, a milestone)."""
        if self.rank == 0 and path.is_dir():
            with open(path / KEEP_FILE, "a") as f:
                f.write(reason + "\n")

    def prune(self) -> None:
        """Delete periodic checkpoints beyond the last `keep_last`, except pinned ones."""
        every = self.cfg.milestone_interval
        for path in self.complete()[: -self.cfg.keep_last]:
            step = read_harness(path)["step"]
            if (path / KEEP_FILE).exists() or (every and step % every == 0):
                continue
            shutil.rmtree(path, ignore_errors=True)

    # --- loading ---------------------------------------------------------------------------

    def load(self, engine, path: Path) -> HarnessState:
        """Restore `engine` and this rank's RNG from `path`; return the harness state."""
        state = read_harness(path)
        loaded, _ = engine.load_checkpoint(
            str(path.parent),
            tag=path.name,
            load_module_strict=True,
            load_optimizer_states=True,
            load_lr_scheduler_states=False,
        )
        if loaded is None:
            raise CheckpointError(f"DeepSpeed could not load checkpoint {path}")
        rng_file = path / f"rng_rank{self.rank}.pt"
        if state["world_size"] == self.world_size and rng_file.is_file():
            set_rng_state(torch.load(rng_file, weights_only=False))
        return state


def read_harness(path: Path) -> HarnessState:
    try:
        return json.loads((path / HARNESS_FILE).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"checkpoint {path} has no readable {HARNESS_FILE}: {err}") from None


def write_text_atomic(path: Path, text: str) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    os.replace(partial, path)


def warn(message: str) -> None:
    warnings.warn(message, stacklevel=2)
