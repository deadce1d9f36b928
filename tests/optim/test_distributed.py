"""Real multi-process runs: 2 ranks on ZeRO 1-3 train exactly like 1 rank with the same global
batch and report the same validation loss, only rank 0 writes the run files, and a failure on one
rank ends the run with its rank named. Also which device each rank takes.

Each run is `torchrun --standalone` (or `python train.py`) in a subprocess on the CPU (gloo).
"""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.helpers import tiny_overrides

ROOT = Path(__file__).resolve().parents[2]
STEPS = 10
# A process group set up earlier in this pytest process (the `dist_env` fixture) leaves its
# rendezvous in os.environ; a child must make its own. One thread per process: two ranks on two
# cores, and no OpenMP threads spinning against other processes.
RENDEZVOUS = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}
ENV = {k: v for k, v in os.environ.items() if k not in RENDEZVOUS}
ENV.update(WANDB_MODE="disabled", OMP_NUM_THREADS="1")
TIMEOUT_S = 180


def overrides(out_dir: Path, name: str, **extra) -> list[str]:
    """The tiny model on the compact built-in corpus (the default 10,240-row vocabulary)."""
    return tiny_overrides(
        **{
            "data.dataset": "builtin-compact",
            "model.vocab_size": 10240,
            "precision": "fp32",
            "train.max_steps": STEPS,
            "train.log_interval": 1,
            "train.eval_interval": 0,
            "data.eval_sequences": 7,  # 4 + 3 on one rank, 4 and 3 + 1 padding on two
            "checkpoint.interval": 0,
            "run.out_dir": out_dir,
            "run.name": name,
            **extra,
        }
    )


def train(args: list[str], ranks: int, timeout_s: float = TIMEOUT_S):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    launcher += [f"--nproc-per-node={ranks}"]
    cmd = [*launcher, "train.py", *args] if ranks > 1 else [sys.executable, "train.py", *args]
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout_s)


# The weight EMA rides along, its validation loss compared at the end.
EMA = {"train.ema": 0.5}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def train_losses(run_dir: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in read_jsonl(run_dir / "metrics.jsonl") if "loss" in m}


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("dist")


@pytest.fixture(scope="module")
def reference(out_dir) -> dict[int, float]:
    """One rank, micro-batch 4 x 2 accumulation steps: the same 8-sequence global batch."""
    extra = {"train.grad_accum_steps": 2, **EMA}
    proc = train(overrides(out_dir, "ref", **extra), ranks=1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = train_losses(out_dir / "ref")
    assert sorted(losses) == list(range(1, STEPS + 1))
    return losses


@pytest.mark.slow
def test_global_batch_size_keeps_the_run_on_two_ranks(out_dir, reference):
    """train.global_batch_size=8 with micro-batches of 2: 4 accumulation steps on one rank, 2 on
    two. The two-rank run (ZeRO 2, overlap_comm on) trains like the 1-rank reference (4 x 2)."""
    extra = {"train.global_batch_size": 8, "train.micro_batch_size": 2, "zero_stage": 2, **EMA}
    proc = train(overrides(out_dir, "global", **extra), ranks=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "(2 x 16 x 2 accumulation x 2 ranks)" in proc.stdout
    losses = train_losses(out_dir / "global")
    assert sorted(losses) == list(range(1, STEPS + 1))
    for step, loss in reference.items():
        assert losses[step] == pytest.approx(loss, abs=1e-5), step


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_two_ranks_match_one_rank(out_dir, reference, stage):
    name = f"zero{stage}"
    proc = train(overrides(out_dir, name, zero_stage=stage, **EMA), ranks=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = out_dir / name
    ref_val, val = (
        [m for m in read_jsonl(d / "metrics.jsonl") if "val_loss" in m][-1]
        for d in (out_dir / "ref", run_dir)
    )
    assert val["val_loss"] == pytest.approx(ref_val["val_loss"], abs=1e-5)
    assert val["val_loss_ema"] == pytest.approx(ref_val["val_loss_ema"], abs=1e-5)
    assert val["val_loss_ema"] != val["val_loss"]

    losses = train_losses(run_dir)
    assert sorted(losses) == list(range(1, STEPS + 1))
    for step, loss in reference.items():
        assert losses[step] == pytest.approx(loss, abs=1e-5), step
    assert losses[STEPS] < losses[1]  # it trains at all

    # rank 0 alone wrote the record: one line per step, one config saying 2 ranks
    steps = [m["step"] for m in read_jsonl(run_dir / "metrics.jsonl") if "loss" in m]
    assert steps == list(range(1, STEPS + 1))
    assert sorted(p.name for p in out_dir.glob(f"{name}*/config.yaml")) == ["config.yaml"]
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["meta"]["world_size"] == 2
    assert config["zero_stage"] == stage
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == STEPS
    assert summary["final_loss"] == pytest.approx(reference[STEPS], abs=1e-5)
    # the validation set is global: the same 7 sequences on 1 rank and on 2 (one padding row)
    ref_summary = json.loads((out_dir / "ref" / "summary.json").read_text())
    assert summary["final_val_loss"] == pytest.approx(ref_summary["final_val_loss"], abs=1e-6)
    assert proc.stdout.count(f"step {STEPS}/{STEPS}") == 1  # progress printed once, by rank 0


@pytest.mark.slow
def test_failure_on_one_rank_names_it_and_stops_the_run(tmp_path):
    """Rank 1 runs on a "node" whose copy of the dataset is stale (train.bin truncated): it fails
    with a one-line DataError once the engine is built, while rank 0 goes on into the first
    checkpoint's barrier. The run must end promptly, non-zero, saying which rank failed why."""
    from data.config import DataConfig
    from data.loader import resolve_dataset

    stale = tmp_path / "stale"
    corpus = DataConfig(dataset="builtin-compact", data_dir=str(ROOT / "data" / "cache"))
    shutil.copytree(resolve_dataset(corpus), stale)
    with open(stale / "train.bin", "r+b") as f:
        f.truncate(100_000)
    # torchrun starts the same command on every rank; the shell gives rank 1 its node's path
    per_rank = 'if [ "$LOCAL_RANK" = 1 ]; then set -- "$@" "data.dataset=$STALE"; fi; exec "$@"'
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    cmd += ["--no-python", "bash", "-c", per_rank, "bash", sys.executable, "train.py"]
    cmd += overrides(tmp_path, "broken")

    start = time.monotonic()
    proc = subprocess.run(
        cmd,
        cwd=ROOT,
        env={**ENV, "STALE": str(stale)},
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    elapsed = time.monotonic() - start

    assert proc.returncode != 0
    assert elapsed < 120  # not the 10-minute collective timeout
    assert "rank 1: error: token file" in proc.stderr and "truncated" in proc.stderr
    # rank 0, left alone in a collective, fails too, and records it
    assert "rank 0: " in proc.stderr
    summary = json.loads((tmp_path / "broken" / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["steps"] == 0


@pytest.mark.parametrize(
    ("local_rank", "visible", "expected"),
    [("0", 8, "cuda:0"), ("3", 8, "cuda:3"), ("3", 1, "cuda:0"), ("5", 4, None)],
)
def test_rank_device_with_all_or_one_visible_gpu(monkeypatch, local_rank, visible, expected):
    """torchrun shows every rank all the node's GPUs; `srun --gpus-per-task=1` shows one."""
    import torch

    from launch.distributed import pick_device

    monkeypatch.setenv("LOCAL_RANK", local_rank)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    if expected is None:
        with pytest.raises(RuntimeError, match="LOCAL_RANK=5 but this process sees 4"):
            pick_device("auto")
    else:
        assert pick_device("auto") == torch.device(expected)
    assert pick_device("cpu") == torch.device("cpu")
