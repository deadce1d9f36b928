"""GPU paths (nccl, fused Adam, bf16 autocast on CUDA, torch.compile, MFU): run where CUDA is.

Skipped cleanly without a GPU (tests/conftest.py skips the `gpu` marker). The CPU run of the same
tiny config is the reference, so no golden number has to come from a machine we did not have.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import tiny_overrides

ROOT = Path(__file__).resolve().parents[1]
STEPS = 10


def train(tmp_path: Path, name: str, *extra: str) -> list[dict]:
    overrides = tiny_overrides(
        **{
            "data.dataset": "builtin-compact",
            "model.vocab_size": 10240,
            "train.max_steps": STEPS,
            "train.log_interval": 1,
            "train.eval_interval": 0,
            "checkpoint.interval": 0,
            "run.out_dir": tmp_path,
            "run.name": name,
        }
    )
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
    env["TORCH_CUDA_ARCH_LIST"] = env.get("TORCH_CUDA_ARCH_LIST", "9.0")
    done = subprocess.run(
        [sys.executable, "train.py", *overrides, *extra],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return [x for x in lines if "loss" in x]


@pytest.mark.gpu
def test_cuda_fp32_matches_cpu_and_reports_mfu(tmp_path):
    cpu = train(tmp_path, "cpu", "run.device=cpu")
    gpu = train(tmp_path, "gpu", "run.device=cuda", "tf32=false")
    assert [x["loss"] for x in gpu] == pytest.approx([x["loss"] for x in cpu], abs=2e-3)
    assert all(x["mfu"] is not None and 0 < x["mfu"] < 1 for x in gpu)  # a known GPU's peak
    assert all("peak_mem_mb" in x for x in gpu)


@pytest.mark.gpu
@pytest.mark.parametrize("zero_stage", [1, 3])
def test_cuda_bf16_fused_adam_learns(tmp_path, zero_stage):
    """bf16 autocast with torch's fused AdamW (the default; DeepSpeed's FusedAdam only with
    optim.fused_adam=deepspeed) on ZeRO 1 and 3: finite, and the loss falls."""
    gpu = train(
        tmp_path,
        f"bf16-z{zero_stage}",
        "run.device=cuda",
        "precision=bf16",
        f"zero_stage={zero_stage}",
    )
    losses = [x["loss"] for x in gpu]
    assert all(loss == loss for loss in losses) and losses[-1] < losses[0] - 0.5


@pytest.mark.gpu
def test_benchmark_with_compile_reports_ratio_and_mfu():
    done = subprocess.run(
        [sys.executable, "-m", "bench.engine", "--steps", "5", "--compile", "--precision", "bf16"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "MFU" in done.stdout and "ratio" in done.stdout
