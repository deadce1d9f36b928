"""Two "nodes" of one rank each under real torchrun equal one rank with accumulation."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from launch import env
from tests.launch.slurm_cluster import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
STEPS = 10
COMMON = [
    "model.size=tiny",
    "model.n_layer=2",
    "model.n_head=2",
    "model.n_embd=32",
    "model.block_size=32",
    "train.micro_batch_size=4",
    f"train.max_steps={STEPS}",
    "train.log_interval=1",
    "optim.warmup_steps=2",  # large updates early, so any divergence of the two runs shows
    "train.eval_interval=0",
    "data.dataset=builtin-compact",
    "data.eval_sequences=4",
    "telemetry.enabled=false",
    "checkpoint.interval=0",
    "wandb.mode=disabled",
]
TIMEOUT_S = 400
RENDEZVOUS_KEYS = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK"} | {
    "MASTER_ADDR",
    "MASTER_PORT",
}


def losses(run_dir: Path) -> dict[int, float]:
    """Step -> loss, the last line of each step winning (the run-directory rule)."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            out[record["step"]] = record["loss"]
    return out


def start(argv: list[str], log: Path, environ: dict[str, str]) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(argv, cwd=REPO_ROOT, env=environ, stdout=out, stderr=out)


@pytest.mark.slow
def test_two_nodes_equal_one_rank(tmp_path: Path, cpu_train_env: dict[str, str]) -> None:
    environ = {**os.environ, **cpu_train_env}
    for key in [k for k in environ if k.startswith("SLURM_") or k in RENDEZVOUS_KEYS]:
        environ.pop(key)  # e.g. the test session's own one-rank group must not leak in
    port = free_port()
    two = [*COMMON, f"run.out_dir={tmp_path}", "run.name=two_nodes"]
    procs = {
        f"node{rank}": start(
            env.torchrun_argv(
                "train.py", two, num_nodes=2, node_rank=rank, master_port=port, nproc_per_node=1
            ),
            tmp_path / f"node{rank}.log",
            environ,
        )
        for rank in (0, 1)
    }
    # The same global batch of 8 sequences on one rank: 4 per micro-step, 2 micro-steps.
    one = [*COMMON, f"run.out_dir={tmp_path}", "run.name=one_rank", "train.grad_accum_steps=2"]
    procs["single"] = start([sys.executable, "train.py", *one], tmp_path / "single.log", environ)
    try:
        codes = {name: proc.wait(timeout=TIMEOUT_S) for name, proc in procs.items()}
    except subprocess.TimeoutExpired:
        codes = {}
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
    logs = "\n".join(
        f"--- {name}\n" + "\n".join((tmp_path / f"{name}.log").read_text().splitlines()[-20:])
        for name in procs
    )
    assert codes and all(code == 0 for code in codes.values()), f"{codes}\n{logs}"

    two_nodes, one_rank = losses(tmp_path / "two_nodes"), losses(tmp_path / "one_rank")
    assert sorted(two_nodes) == sorted(one_rank) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert two_nodes[step] == pytest.approx(one_rank[step], abs=1e-5), step
    config = (tmp_path / "two_nodes" / "config.yaml").read_text()
    assert "world_size: 2" in config
