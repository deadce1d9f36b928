"""`common.run_lock`: one writer per run directory, in one process and across real processes."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common.run_lock import STALE_S, RunLock, RunLockError, read_note
from tests.helpers import ROOT, cli_env, finished_run_args


def test_a_second_holder_is_refused_with_the_first_ones_name(tmp_path: Path) -> None:
    first = RunLock(tmp_path).acquire()
    with pytest.raises(RunLockError) as refused:
        RunLock(tmp_path).acquire()  # flock is per open file: a second open in-process conflicts
    message = str(refused.value)
    assert f"PID {os.getpid()} on {socket.gethostname()} since " in message
    assert "\n" not in message and message.startswith(str(tmp_path))
    first.release()
    again = RunLock(tmp_path).acquire()
    assert again.took_over is None  # a release leaves no note: nothing was taken over
    again.release()
    assert (tmp_path / "run.lock").read_text() == ""


def test_a_dead_holders_note_is_taken_over(tmp_path: Path) -> None:
    """The note of a process that died holding the lock (its flock went with it)."""
    note = {"pid": 999999, "host": socket.gethostname(), "started": "2026-12-01T10:00:00"}
    (tmp_path / "run.lock").write_text(json.dumps(note) + "\n")
    lock = RunLock(tmp_path).acquire()
    assert lock.took_over is not None and lock.took_over["pid"] == 999999
    assert read_note(tmp_path / "run.lock")["pid"] == os.getpid()
    lock.release()


@pytest.mark.parametrize(("age_s", "refused"), [(1.0, True), (STALE_S + 60, False)])
def test_another_hosts_fresh_note_is_refused_even_where_flock_is_local(
    tmp_path: Path, age_s: float, refused: bool
) -> None:
    """A `nolock` NFS mount: flock does not see the other host's holder, its heartbeat does."""
    path = tmp_path / "run.lock"
    path.write_text(json.dumps({"pid": 42, "host": "node-b", "started": "then"}) + "\n")
    beat = time.time() - age_s
    os.utime(path, (beat, beat))
    if refused:
        with pytest.raises(RunLockError, match="PID 42 on node-b since then"):
            RunLock(tmp_path).acquire()
        assert read_note(path)["host"] == "node-b"  # the holder's note is left as it was
    else:
        lock = RunLock(tmp_path).acquire()
        assert lock.took_over["host"] == "node-b"
        lock.release()


def test_the_heartbeat_refreshes_the_note(tmp_path: Path) -> None:
    lock = RunLock(tmp_path, heartbeat_s=0.05).acquire()
    old = time.time() - 100
    os.utime(tmp_path / "run.lock", (old, old))
    deadline = time.time() + 10
    while read_note(tmp_path / "run.lock")["heartbeat"] < old + 50 and time.time() < deadline:
        time.sleep(0.05)
    assert read_note(tmp_path / "run.lock")["heartbeat"] > old + 50
    lock.release()


@pytest.mark.slow
def test_two_starts_of_one_run_one_is_refused_and_the_other_untouched(tmp_path: Path) -> None:
    """issue 22: two `train.py` of one run.name used to interleave metrics.jsonl line by line."""
    run_dir = tmp_path / "dup"
    args = finished_run_args(run_dir, **{"train.max_steps": 100000, "checkpoint.interval": 0})
    first = subprocess.Popen(
        [sys.executable, *map(str, args)],
        cwd=ROOT,
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 240
    while not metrics.exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert metrics.exists(), "the first run never wrote a metrics line"
    second = subprocess.run(
        [sys.executable, *map(str, args), "optim.lr=0.01"],
        cwd=ROOT,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert first.poll() is None, "the first run ended before the second start: no race tested"
    first.send_signal(signal.SIGINT)  # Ctrl-C: it saves where it is and stops
    _, err = first.communicate(timeout=240)
    assert first.returncode == 130, err[-2000:]
    assert second.returncode == 2
    assert len(second.stderr.strip().splitlines()) == 1, second.stderr
    assert f"is being written by PID {first.pid} on {socket.gethostname()}" in second.stderr
    lines = [json.loads(line) for line in metrics.read_text().splitlines()]
    steps = [line["step"] for line in lines if "loss" in line]
    assert steps == list(range(1, len(steps) + 1))  # one writer: every step once, in order
    config = (run_dir / "config.yaml").read_text()
    assert "lr: 0.01" not in config  # the refused start wrote nothing
