"""Helpers shared by tests."""

import hashlib
import os
import subprocess
import sys
from pathlib import Path


def tiny_overrides(**extra) -> list[str]:
    """Overrides for a model small enough that a test step takes milliseconds."""
    base = {
        "model.n_layer": 2,
        "model.n_head": 2,
        "model.n_embd": 32,
        "model.block_size": 16,
        "model.vocab_size": 128,
        "train.micro_batch_size": 4,
        "wandb.mode": "disabled",
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


ROOT = Path(__file__).resolve().parents[1]
# A process group set up earlier in this pytest process (the `dist_env` fixture) leaves its
# rendezvous in os.environ; a child must make its own.
RENDEZVOUS = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}


def cli_env(**extra: str) -> dict[str, str]:
    """The environment of a CLI subprocess: no inherited rendezvous, wandb off, one thread."""
    env = {k: v for k, v in os.environ.items() if k not in RENDEZVOUS}
    env.update(WANDB_MODE="disabled", OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", **extra)
    return env


def run_cli(*args: object, env: dict[str, str] | None = None, timeout_s: float = 300):
    """`python ARGS...` in the repository, as a user types it; the completed process."""
    return subprocess.run(
        [sys.executable, *map(str, args)],
        cwd=ROOT,
        env=env or cli_env(),
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


def finished_run_args(run_dir: Path, **extra: object) -> list[str]:
    """`train.py` overrides of a 5-step run checkpointing every 2 steps, on the compact corpus."""
    values: dict[str, object] = {
        "model.n_layer": 2,
        "model.n_head": 2,
        "model.n_embd": 16,
        "model.block_size": 16,
        "model.vocab_size": 10240,
        "train.micro_batch_size": 4,
        "train.max_steps": 5,
        "train.log_interval": 1,
        "train.eval_interval": 0,
        "checkpoint.interval": 2,
        "run.device": "cpu",
        "run.out_dir": run_dir.parent,
        "run.name": run_dir.name,
        "data.dataset": "builtin-compact",
        "data.data_dir": ROOT / "data" / "cache",
        "data.eval_sequences": 4,
        "wandb.mode": "disabled",
    }
    values.update(extra)
    return ["train.py", *(f"{key}={value}" for key, value in values.items())]


def tree_hash(*roots: Path) -> dict[str, str]:
    """sha256 of every file under `roots` (and the empty directories), by path."""
    found: dict[str, str] = {}
    for root in roots:
        for path in sorted(Path(root).rglob("*")):
            if path.is_file():
                found[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
            elif path.is_dir() and not any(path.iterdir()):
                found[str(path)] = "empty directory"
    return found
