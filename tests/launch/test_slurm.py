"""launch.slurm: the CLI's checks, the signal hand-over, and real jobs on a one-node cluster;
launch.sweep's job arrays there too."""

import json
import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import submitit
import yaml
from submitit.core.job_environment import SignalHandler

from configs import load_config
from launch import env, slurm, sweep
from tests.launch.slurm_cluster import SlurmCluster

# A tiny run on the compact built-in corpus (10,240-row vocabulary from the default config).
TINY = [
    "model.size=tiny",
    "model.n_layer=2",
    "model.n_head=2",
    "model.n_embd=32",
    "model.block_size=32",
    "train.micro_batch_size=4",
    "train.log_interval=1",
    "train.eval_interval=0",
    "data.dataset=builtin-compact",
    "data.eval_sequences=4",
    "telemetry.enabled=false",
    "wandb.mode=disabled",
    "checkpoint.interval=5",
]
JOB_TIMEOUT_S = 150


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ------------------------------------------------------------------------------------------
# Command line (no cluster)


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"run": {"out_dir": str(tmp_path / "runs"), "name": "cli"}}))
    return path


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--executor", "bogus"], "unknown executor 'bogus' (choose from slurm, local, debug)"),
        (["--nodes", "0"], "argument --nodes: expected a positive integer, got '0'"),
        (["--nodes", "two"], "argument --nodes: expected a positive integer, got 'two'"),
        (["--executor", "local", "--nodes", "2"], "--executor local runs on this machine"),
        (["--gpus-per-node", "4", "--tasks-per-node", "2"], "must equal --gpus-per-node (4)"),
        (["--executor", "local", "optim.lrr=1"], "unknown config key 'optim.lrr'"),
        (["--executor", "local", "--time", "soon"], "bad time 'soon'"),
    ],
)
def test_cli_one_line_errors(
    argv: list[str], message: str, config_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        slurm.main([str(config_file), *argv])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert message in err and err.count("\n") == 1, err
    assert not (config_file.parent / "runs").exists()  # nothing was submitted


def test_cli_missing_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        slurm.main([str(tmp_path / "nope.yaml"), "--executor", "local"])
    err = capsys.readouterr().err
    assert "nope.yaml' does not exist" in err and err.count("\n") == 1


@pytest.mark.parametrize(
    ("text", "minutes"),
    [("90", 90), ("1:30", 2), ("2:00:00", 120), ("1-0", 1440), ("1-2:30", 1590), ("0:10", 1)],
)
def test_parse_time(text: str, minutes: int) -> None:
    assert slurm.parse_time_min(text) == minutes


@pytest.mark.parametrize(("text", "gb"), [("64G", 64), ("64GB", 64), ("512M", 0.5), ("2", 2)])
def test_parse_mem(text: str, gb: float) -> None:
    assert slurm.parse_mem_gb(text) == gb


def test_requeued_attempt_resumes(tmp_path: Path) -> None:
    """The pickled next attempt resumes in the run dir even if the first said resume=never."""
    config = slurm.prepare_config(
        load_config(None, [f"run.out_dir={tmp_path}", "checkpoint.resume=never"])
    )
    delayed = slurm.TrainTask(config, str(tmp_path)).checkpoint()
    assert delayed.function.config.checkpoint.resume == "auto"
    assert Path(delayed.function.config.run.out_dir).is_absolute()


# ------------------------------------------------------------------------------------------
# The signal hand-over, in this process


class _FakeSubmitit(SignalHandler):
    """submitit's handler with its requeue replaced by a record of the call."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def checkpoint_and_try_requeue(self, signum: int, frame: Any = None) -> None:
        self.calls.append(signum)


@pytest.fixture
def signal_state() -> Iterator[_FakeSubmitit]:
    """submitit's requeue handler installed as in a job; every handler restored afterwards."""
    signums = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGALRM)
    saved = {s: signal.getsignal(s) for s in signums}
    fake = _FakeSubmitit()
    signal.signal(submitit.JobEnvironment._usr_sig(), fake.checkpoint_and_try_requeue)
    yield fake
    signal.setitimer(signal.ITIMER_REAL, 0)
    for s, handler in saved.items():
        signal.signal(s, handler)


def _wait_until(condition: Any, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)


def test_signal_goes_to_the_harness_first(signal_state: _FakeSubmitit) -> None:
    received: list[int] = []
    guard = slurm._RequeueOnSignal.install(rank=0, grace_s=30)
    assert guard is not None
    signal.signal(signal.SIGUSR1, lambda signum, frame: received.append(signum))
    os.kill(os.getpid(), submitit.JobEnvironment._usr_sig())
    _wait_until(lambda: received)
    assert guard.requested and guard.forwarded and received
    assert signal_state.calls == []  # submitit waits until the harness has saved
    guard.stop_timer()


def test_harness_not_listening_yet(signal_state: _FakeSubmitit) -> None:
    """Before the loop installs its handler: one more look, then submitit requeues."""
    guard = slurm._RequeueOnSignal.install(rank=0, grace_s=30)
    assert guard is not None
    guard.RECHECK_S = 0.05
    signal.signal(signal.SIGUSR1, signal.SIG_DFL)
    os.kill(os.getpid(), submitit.JobEnvironment._usr_sig())
    _wait_until(lambda: signal_state.calls)
    assert signal_state.calls and not guard.forwarded


def test_harness_that_does_not_stop_is_overridden(signal_state: _FakeSubmitit) -> None:
    guard = slurm._RequeueOnSignal.install(rank=0, grace_s=0.05)
    assert guard is not None
    signal.signal(signal.SIGUSR1, lambda signum, frame: None)
    os.kill(os.getpid(), submitit.JobEnvironment._usr_sig())
    _wait_until(lambda: signal_state.calls)
    assert guard.forwarded and signal_state.calls


def test_signal_after_the_loop_returned(signal_state: _FakeSubmitit) -> None:
    """SIGTERM alone stopped the loop; submitit's signal landing afterwards still requeues."""
    guard = slurm._RequeueOnSignal.install(rank=0, grace_s=30)
    assert guard is not None
    guard.stop_timer()
    assert not guard.wait_for_request(0.05)  # scancel or SLURM's own preemption: no requeue
    os.kill(os.getpid(), submitit.JobEnvironment._usr_sig())
    assert guard.wait_for_request(5.0) and not guard.forwarded
    assert signal_state.calls == []  # left to __call__, which requeues after the summary


def test_no_handover_outside_submitit(signal_state: _FakeSubmitit) -> None:
    """The debug executor installs no submitit handlers: nothing to take over."""
    signal.signal(submitit.JobEnvironment._usr_sig(), signal.SIG_DFL)
    assert slurm._RequeueOnSignal.install(rank=0, grace_s=30) is None


# ------------------------------------------------------------------------------------------
# Real jobs


def _logs(folder: Path) -> str:
    parts = []
    for path in sorted(folder.glob("*_log.*")):
        parts.append(f"--- {path.name}\n" + "\n".join(path.read_text().splitlines()[-25:]))
    return "\n".join(parts)


def wait_for_results(
    job: submitit.Job, cluster: SlurmCluster, timeout_s: float = JOB_TIMEOUT_S
) -> list[Any]:
    """The job's results, or a failure that shows the job's and the daemons' logs."""
    deadline = time.monotonic() + timeout_s
    while not job.done():
        if time.monotonic() > deadline:
            job.cancel(check=False)
            pytest.fail(
                f"job {job.job_id} not done after {timeout_s} s (state {job.state})\n"
                f"{_logs(job.paths.folder)}\n{cluster.logs()}"
            )
        time.sleep(1)
    try:
        return job.results()
    except Exception as err:  # a failed task: show why
        pytest.fail(f"job {job.job_id} failed: {err}\n{_logs(job.paths.folder)}")


@pytest.mark.slurm
def test_nodelist_expansion_matches_scontrol(slurm_cluster: SlurmCluster) -> None:
    nodelist = "gpu[01-03,07],cpu5,rack[1-2]-node[08-10]"
    assert env.scontrol_hostnames(nodelist) == env.expand_nodelist(nodelist)
    assert slurm_cluster.run("scontrol", "show", "hostnames", nodelist).split() == (
        env.expand_nodelist(nodelist)
    )


@pytest.mark.slurm
def test_two_task_job_trains(
    slurm_cluster: SlurmCluster,
    submitit_folder: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Through the CLI: 2 ranks (gloo) on one node train to the end with the real trainer.run."""
    steps = 10
    argv = [
        str(Path("configs/default.yaml").resolve()),
        *TINY,
        f"train.max_steps={steps}",
        f"run.out_dir={tmp_path / 'runs'}",
        "run.name=two_ranks",
        "--gpus-per-node=0",
        "--tasks-per-node=2",
        f"--partition={slurm_cluster.partition}",
        "--time=30",
        f"--folder={submitit_folder}",
    ]
    assert slurm.main(argv) == 0
    out = capsys.readouterr().out
    job_id = out.split()[1]
    run_dir = tmp_path / "runs" / "two_ranks"
    assert f"run dir {run_dir}" in out
    job = submitit.SlurmJob(folder=submitit_folder, job_id=job_id, tasks=[0, 1])

    summaries = wait_for_results(job, slurm_cluster)
    assert summaries[0]["status"] == "completed" and summaries[0]["steps"] == steps
    logged = [line["step"] for line in read_jsonl(run_dir / "metrics.jsonl") if "loss" in line]
    assert logged == list(range(1, steps + 1))
    meta = yaml.safe_load((run_dir / "config.yaml").read_text())["meta"]
    assert meta["world_size"] == 2
    # Every task exits after trainer.run (a hang at exit would hold the nodes to the time limit).
    deadline = time.monotonic() + 30
    while (state := job.get_info(mode="force").get("State")) != "COMPLETED":
        assert time.monotonic() < deadline, f"job state {state}\n{_logs(submitit_folder)}"
        time.sleep(1)


@pytest.mark.slurm
def test_preempted_job_requeues_and_resumes(
    slurm_cluster: SlurmCluster, submitit_folder: Path, tmp_path: Path
) -> None:
    """Preempted, then timed out, each after a periodic checkpoint: every time the job saves,
    requeues, resumes where it stopped, and in the end it has trained every step once."""
    steps = 30
    config = load_config(
        None, [*TINY, f"train.max_steps={steps}", f"run.out_dir={tmp_path}", "run.name=preempt"]
    )
    options = slurm.LaunchOptions(
        tasks_per_node=2,
        partition=slurm_cluster.partition,
        time_min=30,
        folder=str(submitit_folder),
    )
    job = slurm.submit(config, options)
    events = tmp_path / "preempt" / "events.jsonl"

    def wait_for_checkpoint(attempt: int) -> None:
        """Until the `attempt`-th attempt (one resume before it per requeue) saved periodically."""
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while True:
            kinds = [e["kind"] for e in read_jsonl(events)] if events.exists() else []
            resumes = [i for i, kind in enumerate(kinds) if kind == "resume"]
            since = kinds[resumes[-1] + 1 :] if resumes else kinds
            if len(resumes) == attempt - 1 and "checkpoint" in since:
                return
            if job.done() or time.monotonic() > deadline:
                logs = _logs(submitit_folder)
                pytest.fail(f"attempt {attempt}: no checkpoint in {kinds}\n{logs}")
            time.sleep(0.2)

    wait_for_checkpoint(attempt=1)
    job._interrupt()  # preemption: SIGTERM (to the harness), then submitit's USR2
    wait_for_checkpoint(attempt=2)
    job._interrupt(timeout=True)  # time limit: USR2 only, forwarded to the harness by launch

    summaries = wait_for_results(job, slurm_cluster)
    assert summaries[0]["status"] == "completed" and summaries[0]["steps"] == steps
    history = read_jsonl(events)
    preempts = [e for e in history if e["kind"] == "preempt"]
    resumes = [e["step"] for e in history if e["kind"] == "resume"]
    assert [e["step"] for e in preempts] == resumes, history
    assert len(resumes) == 2 and 0 < resumes[0] < resumes[1] < steps
    assert preempts[1]["signal"].startswith("SIGUSR2")
    last_line = {}
    for line in read_jsonl(tmp_path / "preempt" / "metrics.jsonl"):
        if "loss" in line:
            last_line[line["step"]] = line
    assert sorted(last_line) == list(range(1, steps + 1))
    log = (submitit_folder / f"{job.job_id}_0_log.out").read_text()
    assert log.count("Requeued job") == 2


@pytest.mark.slurm
def test_sweep_is_one_job_array_whose_tasks_requeue_and_finished_runs_are_skipped(
    slurm_cluster: SlurmCluster, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """4 runs as one array, 2 at a time; one task signalled mid-run saves, requeues and
    resumes; the other tasks are untouched; the same sweep again submits nothing."""
    steps = 20
    overrides = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in TINY)}
    sweep_file = tmp_path / "array.yaml"
    spec = {
        "name": "array",
        "base": str(Path("configs/default.yaml").resolve()),
        "overrides": {**overrides, "train.max_steps": steps},
        "grid": {"optim.weight_decay": [0.0, 0.1], "run.seed": [1, 2]},
    }
    sweep_file.write_text(yaml.safe_dump(spec))
    argv = [
        str(sweep_file),
        "--executor=slurm",
        "--yes",
        f"--out={tmp_path / 'runs'}",
        "--tasks-per-node=1",
        f"--partition={slurm_cluster.partition}",
        "--time=30",
        "--array-parallelism=2",
    ]
    assert sweep.main(argv) == 0
    out = capsys.readouterr().out
    submitted = re.findall(r"\] (\S+): job (\d+_\d+) \(array (\d+)\)", out)
    assert len(submitted) == 4 and len({array for _, _, array in submitted}) == 1, out
    array_id = submitted[0][2]
    assert [job_id for _, job_id, _ in submitted] == [f"{array_id}_{i}" for i in range(4)]
    shown = slurm_cluster.run("scontrol", "show", "job", array_id)
    assert "ArrayTaskThrottle=2" in shown, shown
    folder = tmp_path / "runs" / "array" / "submitit"
    jobs = {name: submitit.SlurmJob(folder=folder, job_id=job_id) for name, job_id, _ in submitted}

    victim = submitted[1][0]
    events = tmp_path / "runs" / "array" / victim / "events.jsonl"
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not (events.exists() and any(e["kind"] == "checkpoint" for e in read_jsonl(events))):
        if jobs[victim].done() or time.monotonic() > deadline:
            pytest.fail(f"{victim}: no periodic checkpoint\n{_logs(folder)}")
        time.sleep(0.2)
    # submitit's requeue signal (USR2), straight to the task as slurmd sends it before a time
    # limit: the harness saves, then the task requeues. Not `job._interrupt()`: scancel keeps
    # retrying a signal to an array task that SLURM answers "Job can not be altered now" while
    # it requeues, and so signals the next attempt too.
    array_task = {"SLURM_ARRAY_JOB_ID": array_id, "SLURM_ARRAY_TASK_ID": "1"}
    tasks = [
        proc
        for proc in psutil.process_iter(["name", "cmdline"])
        if proc.info["name"].startswith("python")  # not the srun that started it
        and "submitit.core._submit" in " ".join(proc.info["cmdline"] or [])
        and array_task.items() <= proc.environ().items()
    ]
    assert len(tasks) == 1, tasks
    tasks[0].send_signal(signal.SIGUSR2)

    for name, job in jobs.items():
        summary = wait_for_results(job, slurm_cluster, timeout_s=4 * JOB_TIMEOUT_S)[0]
        assert (summary["status"], summary["steps"]) == ("completed", steps), name
        history = read_jsonl(tmp_path / "runs" / "array" / name / "events.jsonl")
        kinds = [e["kind"] for e in history]
        if name == victim:
            preempt = [e["step"] for e in history if e["kind"] == "preempt"]
            resume = [e["step"] for e in history if e["kind"] == "resume"]
            assert len(preempt) == 1 and preempt == resume and 0 < resume[0] < steps, history
        else:
            assert "preempt" not in kinds and "resume" not in kinds, (name, kinds)
    log = (folder / f"{jobs[victim].job_id}_0_log.out").read_text()
    assert log.count("Requeued job") == 1

    assert sweep.main(argv) == 0  # again: every run has finished
    out = capsys.readouterr().out
    assert out.count("skip (finished)") == 4 and "nothing to do: every run has finished" in out


@pytest.mark.parametrize(
    ("flags", "cpus", "mem"),
    [
        ({"gpus_per_node": 8, "nodes": 2}, 8, "512GB"),  # 8 GPU tasks x 64 GB
        ({"tasks_per_node": 2, "cpus_per_task": 3}, 3, None),  # CPU tasks: as asked
        ({"gpus_per_node": 4, "cpus_per_task": 12, "mem_gb": 200.0}, 12, "200GB"),
    ],
)
def test_jobs_request_cpus_and_memory_per_task_by_default(
    tmp_path: Path, flags: dict[str, Any], cpus: int, mem: str
) -> None:
    """SLURM gives a task one CPU unless asked: a GPU job asks, and --cpus-per-task / --mem
    override the defaults. A CPU-only job asks only for what the flags say."""
    options = slurm.LaunchOptions(executor="slurm", **flags)
    parameters = slurm.make_executor(options, tmp_path, "job")._executor.parameters
    assert (parameters.get("cpus_per_task"), parameters.get("mem")) == (cpus, mem)
    cpu_only = slurm.LaunchOptions(executor="slurm", tasks_per_node=2)
    parameters = slurm.make_executor(cpu_only, tmp_path, "job")._executor.parameters
    assert "cpus_per_task" not in parameters and "mem" not in parameters


def test_cli_help_names_the_resource_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        slurm.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "default: 8 per GPU task, the cluster's default without GPUs" in text
    assert "default: 64G per GPU task, the cluster's default without GPUs" in text
