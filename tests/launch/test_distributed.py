"""A lost peer: two real rank processes (gloo), one killed or frozen mid-run. The other must
leave its collective within `run.collective_timeout_s`, with one line naming the lost rank, and
the same command then resumes the run from its last checkpoint."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.launch.slurm_cluster import free_port
from tests.launch.test_multinode import COMMON, RENDEZVOUS_KEYS

REPO_ROOT = Path(__file__).resolve().parents[2]
STEPS = 60
TIMEOUT_S = 20  # run.collective_timeout_s of these runs
WAIT_S = 300  # far above the timeout, far below torch's 10-minute default


def rank_env(base: dict[str, str], rank: int, port: int) -> dict[str, str]:
    """What SLURM or a multi-node launcher gives one rank of a 2-rank job."""
    environ = {k: v for k, v in base.items() if not k.startswith("SLURM_")}
    for key in RENDEZVOUS_KEYS & environ.keys():
        environ.pop(key)
    rendezvous = {"RANK": rank, "LOCAL_RANK": rank, "WORLD_SIZE": 2, "LOCAL_WORLD_SIZE": 2}
    rendezvous.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    return {**environ, **{k: str(v) for k, v in rendezvous.items()}}


def start_ranks(args: list[str], logs: Path, base: dict[str, str]) -> list[subprocess.Popen]:
    port = free_port()
    procs = []
    for rank in (0, 1):
        with (logs / f"rank{rank}.log").open("wb") as out:
            procs.append(
                subprocess.Popen(
                    [sys.executable, "train.py", *args],
                    cwd=REPO_ROOT,
                    env=rank_env(base, rank, port),
                    stdout=subprocess.DEVNULL,
                    stderr=out,
                )
            )
    return procs


def latest_step(run_dir: Path) -> int:
    latest = run_dir / "checkpoints" / "latest"
    return int(latest.read_text().removeprefix("step_")) if latest.is_file() else -1


@pytest.mark.slow
@pytest.mark.parametrize(
    ("victim", "how"),
    [(1, signal.SIGKILL), (1, signal.SIGSTOP), (0, signal.SIGKILL)],
    ids=["rank1-killed", "rank1-frozen", "rank0-killed"],
)
def test_lost_peer_is_named_and_the_run_resumes(tmp_path, cpu_train_env, victim, how):
    run_dir = tmp_path / "run"
    args = [
        *COMMON,
        f"train.max_steps={STEPS}",
        "checkpoint.interval=5",
        f"run.collective_timeout_s={TIMEOUT_S}",
        f"run.out_dir={tmp_path}",
        "run.name=run",
    ]
    base = {**os.environ, **cpu_train_env}
    procs = start_ranks(args, tmp_path, base)
    while latest_step(run_dir) < 10:  # a checkpoint to come back to
        assert all(p.poll() is None for p in procs), (tmp_path / "rank0.log").read_text()
        time.sleep(0.2)
    os.kill(procs[victim].pid, how)
    survivor = 1 - victim
    try:
        assert procs[survivor].wait(timeout=WAIT_S) == 1
    finally:
        procs[victim].kill()
        procs[victim].wait()
    saved = latest_step(run_dir)
    assert 10 <= saved < STEPS

    err = (tmp_path / f"rank{survivor}.log").read_text()
    errors = [line for line in err.splitlines() if line.startswith(f"rank {survivor}: ")]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert errors[0].startswith(f"rank {survivor}: error: lost rank {victim} (")
    assert errors[0].endswith("rerun to resume from the last checkpoint")
    if survivor == 0:  # rank 0 keeps the record
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["status"] == "failed" and summary["steps"] < STEPS

    # the same command resumes from the last checkpoint and finishes
    again = start_ranks(args, tmp_path, base)
    assert [p.wait(timeout=WAIT_S) for p in again] == [0, 0], (tmp_path / "rank0.log").read_text()
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    resumes = [e for e in events if e["kind"] == "resume"]
    assert [Path(e["path"]).name for e in resumes] == [f"step_{saved:08d}"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == STEPS


@pytest.mark.slow
def test_a_frozen_peer_is_named_and_recorded_long_before_the_timeout(tmp_path, cpu_train_env):
    """Under NCCL a collective waiting on a lost peer ends in an abort at the timeout, with no
    exception to report: the heartbeat's watch must name the peer and record the run failed
    while the survivor still waits. Here gloo waits as NCCL would (timeout 300 s, rank 1
    frozen): the line and the summary come within seconds of `run.lost_peer_s`."""
    run_dir = tmp_path / "run"
    args = [*COMMON, "train.max_steps=5000", "checkpoint.interval=5", "run.lost_peer_s=5"]
    args += ["run.collective_timeout_s=300", f"run.out_dir={tmp_path}", "run.name=run"]
    procs = start_ranks(args, tmp_path, {**os.environ, **cpu_train_env})
    try:
        while latest_step(run_dir) < 5:
            assert all(p.poll() is None for p in procs), (tmp_path / "rank0.log").read_text()
            time.sleep(0.2)
        os.kill(procs[1].pid, signal.SIGSTOP)
        frozen = time.time()
        summary = run_dir / "summary.json"
        while json.loads(summary.read_text())["status"] != "failed":
            assert time.time() - frozen < 60 and procs[0].poll() is None
            time.sleep(0.2)
        assert procs[0].poll() is None  # still in its collective, as under NCCL before the abort
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
    error = json.loads(summary.read_text())["error"]
    assert error.startswith("rank 0: error: lost rank 1 (no heartbeat for 5 s")
    assert error in (tmp_path / "rank0.log").read_text()


def alive(pattern: str) -> list[int]:
    """PIDs of the processes whose command line holds `pattern`."""
    found = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout
    return [int(pid) for pid in found.split()]


@pytest.mark.slow
def test_workers_of_a_killed_torchrun_save_and_stop(tmp_path, cpu_train_env):
    """`kill -9` on torchrun used to leave both ranks training to the end, unwatched, beside
    any rerun. The kernel now sends each worker SIGTERM as its launcher dies: they save at
    the same step and stop (`preempted`), and a rerun resumes there."""
    run_dir = tmp_path / "orphans"
    args = [*COMMON, "train.max_steps=2000", "checkpoint.interval=500"]
    args += [f"run.out_dir={tmp_path}", "run.name=orphans", "train.log_interval=1"]
    launcher = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
        + ["train.py", *args],
        cwd=REPO_ROOT,
        env={**os.environ, **cpu_train_env},
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "torchrun.log").open("wb"),
    )
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + WAIT_S
    while (not metrics.exists() or len(metrics.read_text().splitlines()) < 4) and (
        time.time() < deadline
    ):
        assert launcher.poll() is None, (tmp_path / "torchrun.log").read_text()[-3000:]
        time.sleep(0.2)
    launcher.kill()
    launcher.wait()
    workers = f"run.out_dir={tmp_path}"  # in each worker's command line
    assert alive(workers), "no worker to watch"
    deadline = time.time() + WAIT_S
    while alive(workers) and time.time() < deadline:
        time.sleep(0.5)
    assert alive(workers) == [], "the workers trained on after torchrun was killed"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "preempted" and 3 <= summary["steps"] < 500
    assert latest_step(run_dir) == summary["steps"]
