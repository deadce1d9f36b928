"""Real training runs for the checkpoint tests: in this process, as `python train.py` or torchrun.

Every run is the tiny GPT on the built-in corpus, fp32 on the CPU, logging every step, so a
run's `metrics.jsonl` holds the exact loss of every step and its last checkpoint the weights.
"""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import torch

REPO = Path(__file__).resolve().parents[2]
MAX_STEPS = 8
INTERVAL = 2  # checkpoints at 0, 2, 4, 6, 8
GLOBAL_BATCH = 4
TIMEOUT_S = 240
ATTEMPTS = 3  # of an interrupted run, for when the signal comes after its last step
# The decay forms' runs: a learning rate at which, within 8 steps, AdamP projects some matrices
# (at a delta above the paper's 0.1) and SPD's pull-back test passes for some tensors.
FORM_EXTRA = {
    "optim.lr": 1e-2,
    "optim.min_lr": 1e-3,
    "optim.warmup_steps": 2,
    "optim.adamp_delta": 3.0,
}
# Run variants that are not decay forms: their overrides besides FORM_EXTRA.
VARIANTS = {"ema": {"optim.name": "adamw", "train.ema": 0.9, "train.eval_interval": 3}}


def overrides(run_dir: Path, zero_stage: int, world_size: int = 1, **extra: object) -> list[str]:
    """The dotted overrides of a test run; the global batch is 4 sequences on any world size."""
    values: dict[str, object] = {
        "model.n_layer": 2,
        "model.n_head": 2,
        "model.n_embd": 16,
        "model.block_size": 16,
        "train.micro_batch_size": GLOBAL_BATCH // world_size,
        "train.max_steps": MAX_STEPS,
        "train.log_interval": 1,
        "train.eval_interval": 0,
        "checkpoint.interval": INTERVAL,
        "zero_stage": zero_stage,
        "precision": "fp32",
        "run.device": "cpu",
        "run.out_dir": run_dir.parent,
        "run.name": run_dir.name,
        "data.dataset": "builtin-compact",
        "data.data_dir": REPO / "data" / "cache",
        "data.eval_sequences": GLOBAL_BATCH,
        "wandb.mode": "disabled",
    }
    values.update(extra)
    return [f"{key}={value}" for key, value in values.items()]


def run_here(run_dir: Path, zero_stage: int, **extra: object) -> dict:
    """Train in this process (one rank; the caller holds the `dist_env` group); the summary."""
    from configs import load_config
    from trainer import run

    return run(load_config(None, overrides(run_dir, zero_stage, **extra)))


def env(world_size: int) -> dict[str, str]:
    """The subprocess environment: CPU DeepSpeed, no wandb, and the thread count of this
    process on one rank (so its numbers match in-process runs bit for bit), one per rank else."""
    threads = torch.get_num_threads() if world_size == 1 else 1
    values = {**os.environ, "DS_ACCELERATOR": "cpu", "WANDB_MODE": "disabled"}
    values.update(OMP_NUM_THREADS=str(threads), PYTHONWARNINGS="default")
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_PORT"):
        values.pop(key, None)  # set in this process by the `dist_env` fixture
    return values


def command(run_dir: Path, zero_stage: int, world_size: int = 1, **extra: object) -> list[str]:
    args = ["train.py", *overrides(run_dir, zero_stage, world_size, **extra)]
    if world_size == 1:
        return [sys.executable, *args]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    return [*launcher, f"--nproc-per-node={world_size}", *args]


def train(
    run_dir: Path, zero_stage: int, world_size: int = 1, **extra: object
) -> subprocess.CompletedProcess:
    """`python train.py` (one rank) or torchrun (several) to the end."""
    return subprocess.run(
        command(run_dir, zero_stage, world_size, **extra),
        cwd=REPO,
        env=env(world_size),
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )


class Interrupted:
    """A run that gets `sig` once it has logged a random step past the first periodic checkpoint.

    It starts at once and a watcher thread sends the signal, so the caller may do other work
    (the reference run) meanwhile. SIGKILL goes to every process of the run at once, torchrun's
    workers included (they run in sessions of their own), as when a node is lost; SIGTERM to
    the launcher only, as a scheduler sends it.
    On a loaded machine the run may log its last step before the watcher sees the target one;
    such an attempt proves nothing, so `wait` starts the run again from an empty directory.
    """

    def __init__(
        self,
        run_dir: Path,
        zero_stage: int,
        world_size: int,
        sig: signal.Signals,
        seed: int,
        **extra: object,
    ):
        self.run_dir, self.sig = run_dir, sig
        self.command = command(run_dir, zero_stage, world_size, **extra)
        self.env = env(world_size)
        self.target = random.Random(seed).randint(INTERVAL + 1, MAX_STEPS - 2)
        self._start()

    def _start(self) -> None:
        self.signalled_at = 0
        self.proc = subprocess.Popen(
            self.command,
            cwd=REPO,
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.watcher = threading.Thread(target=self._watch, daemon=True)
        self.watcher.start()

    def _watch(self) -> None:
        deadline = time.monotonic() + TIMEOUT_S
        while self.proc.poll() is None and time.monotonic() < deadline:
            logged = last_step(self.run_dir)
            if logged >= self.target:
                self.signalled_at = logged
                if self.sig == signal.SIGKILL:
                    kill_tree(self.proc.pid)
                else:
                    self.proc.send_signal(self.sig)
                return
            time.sleep(0.01)

    def _finish(self) -> str:
        """Wait for this attempt's process and watcher; the process's stderr."""
        try:
            _, stderr = self.proc.communicate(timeout=TIMEOUT_S)
        finally:
            if self.proc.poll() is None:
                kill_tree(self.proc.pid)
        self.watcher.join()
        return stderr

    def wait(self) -> tuple[int, int]:
        """(returncode, the last step logged when the signal went out)."""
        for attempt in range(1, ATTEMPTS + 1):
            stderr = self._finish()
            missed = self.proc.returncode == 0 and self.signalled_at == 0
            if not (missed or self.signalled_at >= MAX_STEPS) or attempt == ATTEMPTS:
                break
            shutil.rmtree(self.run_dir)
            self._start()
        assert self.target <= self.signalled_at < MAX_STEPS, (
            f"no signal between steps {self.target} and {MAX_STEPS} in {ATTEMPTS} attempts "
            f"(the last at step {self.signalled_at}): {stderr[-3000:]}"
        )
        return self.proc.returncode, self.signalled_at


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants, the descendants first."""
    root = psutil.Process(pid)
    for proc in [*root.children(recursive=True), root]:
        try:
            proc.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass


def last_step(run_dir: Path) -> int:
    """The last step logged so far; a line the run is still writing is left out."""
    from common.files import read_jsonl

    return max((record["step"] for record in read_jsonl(run_dir / "metrics.jsonl")), default=0)


def losses(run_dir: Path) -> dict[int, tuple[float, float, float]]:
    """(loss, grad_norm, lr) by step; a step logged again after a resume counts by its last line."""
    by_step = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            by_step[record["step"]] = (record["loss"], record["grad_norm"], record["lr"])
    return by_step


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def events(run_dir: Path, kind: str) -> list[dict]:
    lines = (run_dir / "events.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["kind"] == kind]


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """The consolidated fp32 weights of the run's last checkpoint (at MAX_STEPS)."""
    from checkpoint.export import consolidated_state_dict, find_checkpoint

    return consolidated_state_dict(find_checkpoint(run_dir, MAX_STEPS))
