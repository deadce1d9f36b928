"""Submit one training run through submitit: SLURM (multi-node), or locally with the same code.

    python -m launch.slurm configs/gpt2.yaml optim.lr=6e-4 --nodes 2 --gpus-per-node 8 \\
        --partition gpu --time 24:00:00
    python -m launch.slurm configs/default.yaml --executor local --gpus-per-node 0 \\
        --tasks-per-node 2

The config is loaded and validated here, in the submitting process, so a typo fails before
anything is queued. The job runs one task per GPU (`--tasks-per-node` on CPU-only clusters);
each task derives the torch.distributed rendezvous from its environment (`launch.env`) and
calls `trainer.run(config)` in-process. The run directory is made absolute before submission,
so every attempt of the job, on any node, writes to the same place.

Preemption, time limits and requeue
-----------------------------------
Three parties handle signals inside a task, installed in this order:

1. submitit (before our code runs): SIGTERM and SIGCONT are logged and ignored; its
   "requeue" signal (SIGUSR2 unless SUBMITIT_PREEMPT_SIGNAL says otherwise; sbatch sends it
   `--signal-delay` seconds before the time limit, `job._interrupt()` sends SIGTERM then it)
   runs `checkpoint_and_try_requeue`: on rank 0 it pickles `TrainTask.checkpoint()`, calls
   `scontrol requeue` and exits on the spot, by raising SystemExit from wherever the main
   thread happens to be. Left alone, that would requeue without a fresh checkpoint and lose
   every step since the last periodic save.
2. `TrainTask` replaces that SIGUSR2 handler with `_RequeueOnSignal`, which only records the
   request and forwards it to the harness's own handler, so the harness saves first.
3. `trainer.run` installs its handlers for SIGUSR1 and SIGTERM: they make the loop save a
   checkpoint at the next step boundary, log a `preempt` event and return status
   `preempted`. SIGTERM now reaches the harness instead of submitit's ignore.

When `trainer.run` returns `preempted` and a requeue was asked for, rank 0 runs submitit's
original handler itself: the checkpoint is on disk by then, so the requeued job (same job id,
same pickled config with `checkpoint.resume=auto`) resumes from it in the same run directory,
and so continues the same wandb run (monitor/sinks.py derives the wandb id from the absolute
run directory, which is why the out_dir is made absolute before submitting). Other ranks
exit without writing a submitit result, so no stale result of the interrupted attempt is
left to be read. SLURM signals every task, so every rank's loop is told; the loop must stop
all ranks at the same step, since the save is collective.

A SIGALRM timer covers a loop that cannot answer. Not listening yet (imports, DeepSpeed init)
or any more (teardown): look again after a few seconds, then let submitit requeue at once
(nothing new to save). Listening but not stopping within `grace_s` (a hung collective, a long
evaluation): submitit requeues from the last complete checkpoint before SLURM's hard kill.
SIGTERM alone (scancel, or SLURM's own preemption) lets the harness save but never requeues:
SLURM decides that. As `job._interrupt()` sends SIGTERM first, a fast loop may save and return
before submitit's signal lands, so a `preempted` return waits a few seconds for it. The debug
executor runs in-process with no signal handling at all.
"""

import argparse
import os
import re
import shlex
import shutil
import signal
import sys
import time
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import submitit
from submitit.core.job_environment import SignalHandler
from submitit.core.utils import DelayedSubmission, FailedJobError, FailedSubmissionError

from configs import ConfigError, load_config
from configs.schema import TrainConfig
from launch import env

REPO_ROOT = Path(__file__).resolve().parents[1]
EXECUTORS = ("slurm", "local", "debug")
LOCAL_SIGNAL_DELAY_S = 30  # submitit's LocalExecutor default (AutoExecutor cannot change it)
# Requested per GPU task unless --cpus-per-task / --mem say otherwise: a GPU rank's loader,
# compile workers and host-side kernels. CPU-only tasks (small clusters, tests) keep the
# cluster's defaults, which a fixed request could exceed on a small node.
CPUS_PER_GPU_TASK, MEM_GB_PER_GPU_TASK = 8, 64


def run_dir_of(config: TrainConfig) -> Path:
    """The run directory `<run.out_dir>/<run.name>`."""
    return Path(config.run.out_dir) / config.run.name


# ------------------------------------------------------------------------------------------
# Inside the job


class _RequeueOnSignal:
    """Turns submitit's requeue signal into "save first, then requeue" (see module docstring).

    A timer (SIGALRM) covers the two ways the harness can fail to answer: it is not listening
    yet (imports, init) or not any more (tearing down), checked again after `RECHECK_S`; or it
    does not stop within `grace_s`, after which submitit requeues without waiting.
    """

    RECHECK_S = 5.0

    def __init__(
        self, signum: int, submitit_handler: Callable[..., Any], rank: int, grace_s: float
    ) -> None:
        self.signum = signum
        self.submitit_handler = submitit_handler
        self.rank = rank
        self.grace_s = grace_s
        self.requested = False  # submitit's signal arrived while training
        self.forwarded = False  # the harness was told
        self.finished = False  # trainer.run returned

    @classmethod
    def install(cls, rank: int, grace_s: float) -> "_RequeueOnSignal | None":
        """Take over submitit's requeue signal; None when submitit handles no signals (debug)."""
        signum = submitit.JobEnvironment._usr_sig()
        handler = signal.getsignal(signum)
        if not isinstance(getattr(handler, "__self__", None), SignalHandler):
            return None
        guard = cls(signum, handler, rank, grace_s)
        signal.signal(signum, guard._on_signal)
        signal.signal(signal.SIGALRM, guard._on_timer)
        return guard

    def _forward(self, frame: types.FrameType | None) -> bool:
        """Hand the request to the harness's preemption handler, if it is listening."""
        harness = signal.getsignal(signal.SIGUSR1)  # checkpoint.preemption's, during the loop
        if not callable(harness):
            return False
        harness(self.signum, frame)  # the loop saves at the next step boundary and returns
        self.forwarded = True
        signal.setitimer(signal.ITIMER_REAL, self.grace_s)
        return True

    def _on_signal(self, signum: int, frame: types.FrameType | None) -> None:
        if self.requested:
            return
        self.requested = True
        print(f"[launch] {signal.Signals(signum).name}: checkpoint, then requeue", flush=True)
        if self.finished:
            return  # trainer.run has returned: __call__ decides from its final status
        if not self._forward(frame):
            signal.setitimer(signal.ITIMER_REAL, self.RECHECK_S)

    def _on_timer(self, signum: int, frame: types.FrameType | None) -> None:
        if self.finished:
            return
        if not self.forwarded and self._forward(frame):
            return
        print("[launch] no checkpoint in time: requeue from the last complete one", flush=True)
        self.submitit_handler(self.signum, frame)  # rank 0 requeues and exits; others log

    def stop_timer(self) -> None:
        """Called when trainer.run returns: later signals are only recorded."""
        self.finished = True
        signal.setitimer(signal.ITIMER_REAL, 0)

    def wait_for_request(self, timeout_s: float) -> bool:
        """Whether submitit's signal arrives within `timeout_s`: a preemption sends SIGTERM
        first, and a fast loop can save and return before the second signal lands."""
        deadline = time.monotonic() + timeout_s
        while not self.requested and time.monotonic() < deadline:
            time.sleep(0.05)  # the handler runs in this thread, between sleeps
        return self.requested

    def requeue(self) -> NoReturn:
        """Rank 0: submitit's checkpoint-and-requeue (exits); other ranks exit quietly."""
        if self.rank == 0:
            self.submitit_handler(self.signum, None)  # pickles checkpoint(), requeues, exits
        sys.exit(0)  # no result pickle: the requeued attempt writes this task's result


class TrainTask(submitit.helpers.Checkpointable):
    """One rank of the job: rendezvous from the environment, then `trainer.run(config)`."""

    def __init__(
        self,
        config: TrainConfig,
        workdir: str,
        master_port: int | None = None,
        grace_s: float = 60.0,
    ) -> None:
        self.config = config
        self.workdir = workdir
        self.master_port = master_port
        self.grace_s = grace_s

    def __call__(self) -> dict[str, Any]:
        os.chdir(self.workdir)  # relative config paths (data.data_dir) mean what they meant
        job_env = submitit.JobEnvironment()
        rendezvous = env.from_job_environment(job_env, self.master_port)
        env.apply(rendezvous)
        if "OMP_NUM_THREADS" not in os.environ:
            # Otherwise every rank starts one thread per core of the node.
            threads = env.omp_threads(os.environ, rendezvous.local_world_size)
            os.environ["OMP_NUM_THREADS"] = str(threads)
        print(f"[launch] {job_env} rendezvous {rendezvous}", flush=True)
        guard = _RequeueOnSignal.install(rendezvous.rank, self.grace_s)

        try:
            summary = self.train(self.config)
        finally:
            if guard is not None:
                guard.stop_timer()
        status = summary.get("status") if isinstance(summary, dict) else None
        if guard is not None and status == "preempted":
            if guard.wait_for_request(guard.RECHECK_S):
                guard.requeue()
        return summary

    def train(self, config: TrainConfig) -> dict[str, Any]:
        """`heal.run`, imported late: torch and deepspeed load only inside the job; as
        `python train.py` does, it diagnoses or heals a divergence stop when the config asks."""
        import heal
        from launch.distributed import close_distributed

        summary = heal.run(config)
        close_distributed()
        return summary

    def checkpoint(self, *args: Any, **kwargs: Any) -> DelayedSubmission:
        """The requeued attempt: the same task, resuming from the run dir's latest checkpoint."""
        config = self.config.model_copy(deep=True)
        # 'never' would restart from scratch; a start path would drop the progress made since,
        # once the run dir holds a checkpoint of its own (checkpoint/manager.py's pointer).
        has_own = (run_dir_of(config) / "checkpoints" / "latest").is_file()
        if config.checkpoint.resume == "never" or has_own:
            config.checkpoint.resume = "auto"
        task = type(self)(config, self.workdir, self.master_port, self.grace_s)
        return DelayedSubmission(task, *args, **kwargs)


# ------------------------------------------------------------------------------------------
# Submitting


@dataclass
class LaunchOptions:
    """Resources and executor of one submission (the CLI flags)."""

    executor: str = "slurm"
    nodes: int = 1
    gpus_per_node: int = 0
    tasks_per_node: int | None = None  # default: gpus_per_node, or 1 without GPUs
    cpus_per_task: int | None = None  # default: `task_cpus`
    time_min: int = 60
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    mem_gb: float | None = None  # per node; default: `node_mem_gb`
    exclusive: bool = False
    folder: str | None = None  # default: <run dir>/submitit
    signal_delay_s: int = 120
    max_timeouts: int = 3
    master_port: int | None = None
    array_parallelism: int | None = None  # array tasks running at once (SLURM's %N); all if None
    extra: dict[str, Any] = field(default_factory=dict)  # more submitit parameters

    @property
    def num_tasks_per_node(self) -> int:
        """One rank per GPU unless told otherwise."""
        if self.tasks_per_node is not None:
            return self.tasks_per_node
        return self.gpus_per_node or 1

    @property
    def task_cpus(self) -> int | None:
        """CPUs per task: SLURM's default is one, which starves a GPU rank's loader and
        kernels; None (the cluster's default) for CPU-only tasks."""
        if self.cpus_per_task is not None or not self.gpus_per_node:
            return self.cpus_per_task
        return CPUS_PER_GPU_TASK

    @property
    def node_mem_gb(self) -> float | None:
        """Memory per node: `--mem`, else a default per GPU task (a cluster's own default may
        be a few GB per CPU); None (the cluster's default) for CPU-only tasks."""
        if self.mem_gb is not None or not self.gpus_per_node:
            return self.mem_gb
        return MEM_GB_PER_GPU_TASK * self.num_tasks_per_node

    def check(self) -> None:
        """Raise ValueError (one line) for combinations no executor can run."""
        if self.executor not in EXECUTORS:
            choices = ", ".join(EXECUTORS)
            raise ValueError(f"unknown executor '{self.executor}' (choose from {choices})")
        if self.nodes < 1:
            raise ValueError(f"--nodes must be >= 1, got {self.nodes}")
        if self.num_tasks_per_node < 1:
            raise ValueError(f"--tasks-per-node must be >= 1, got {self.num_tasks_per_node}")
        if self.gpus_per_node and self.num_tasks_per_node != self.gpus_per_node:
            raise ValueError(
                f"--tasks-per-node ({self.num_tasks_per_node}) must equal --gpus-per-node "
                f"({self.gpus_per_node}): one rank per GPU"
            )
        if self.executor != "slurm" and self.nodes != 1:
            raise ValueError(f"--executor {self.executor} runs on this machine: use --nodes 1")
        if self.executor == "debug" and self.num_tasks_per_node != 1:
            raise ValueError("--executor debug runs one task, in this process: --tasks-per-node 1")
        if submitit.JobEnvironment.USR_SIG in ("USR1", "TERM"):
            raise ValueError(
                f"SUBMITIT_PREEMPT_SIGNAL={submitit.JobEnvironment.USR_SIG} is the harness's own "
                "preemption signal: leave it unset (USR2)"
            )
        if self.array_parallelism is not None and self.array_parallelism < 1:
            raise ValueError(f"--array-parallelism must be >= 1, got {self.array_parallelism}")
        if self.executor == "slurm" and shutil.which("srun") is None:
            raise ValueError("no 'srun' on PATH: not a SLURM node (try --executor local)")


def make_executor(options: LaunchOptions, folder: Path, job_name: str) -> submitit.AutoExecutor:
    """A submitit executor with the job's resources; slurm_* keys are ignored off SLURM."""
    kwargs: dict[str, Any] = {}
    if options.executor == "slurm":
        kwargs["slurm_max_num_timeout"] = options.max_timeouts
    executor = submitit.AutoExecutor(folder=folder, cluster=options.executor, **kwargs)
    # The job imports `configs`, `launch` and `train` from this checkout wherever it starts.
    setup = [f"export PYTHONPATH={shlex.quote(str(REPO_ROOT))}${{PYTHONPATH:+:$PYTHONPATH}}"]
    params: dict[str, Any] = {
        "name": job_name,
        "nodes": options.nodes,
        "tasks_per_node": options.num_tasks_per_node,
        "timeout_min": options.time_min,
        "cpus_per_task": options.task_cpus,
        "mem_gb": options.node_mem_gb,
        "slurm_partition": options.partition,
        "slurm_account": options.account,
        "slurm_qos": options.qos,
        "slurm_constraint": options.constraint,
        "slurm_signal_delay_s": options.signal_delay_s,
        "slurm_setup": setup,
        "local_setup": setup,
    }
    if options.gpus_per_node:  # `--gpus-per-node=0` is rejected by clusters without GPU gres
        params["gpus_per_node"] = options.gpus_per_node
    if options.exclusive:
        params["slurm_exclusive"] = True
    if options.array_parallelism is not None:
        params["slurm_array_parallelism"] = options.array_parallelism
    params.update(options.extra)
    executor.update_parameters(**{k: v for k, v in params.items() if v is not None})
    return executor


def prepare_config(config: TrainConfig) -> TrainConfig:
    """A copy with an absolute run directory, the same for every attempt on every node."""
    config = config.model_copy(deep=True)
    config.run.out_dir = str(Path(config.run.out_dir).resolve())
    return config


def _task(config: TrainConfig, options: LaunchOptions) -> TrainTask:
    """The job's callable for `config`, with the time it has to save before a kill."""
    # Time to save between the signal and the kill, less a margin for the requeue itself.
    delay_s = options.signal_delay_s if options.executor == "slurm" else LOCAL_SIGNAL_DELAY_S
    grace_s = max(10.0, delay_s - 20.0)
    return TrainTask(prepare_config(config), os.getcwd(), options.master_port, grace_s)


def submit(config: TrainConfig, options: LaunchOptions) -> submitit.Job:
    """Submit `config` as one job with `options`; returns the submitit job."""
    options.check()
    task = _task(config, options)
    folder = Path(options.folder) if options.folder else run_dir_of(task.config) / "submitit"
    executor = make_executor(options, folder.resolve(), config.run.name)
    return executor.submit(task)


def submit_array(
    configs: list[TrainConfig], options: LaunchOptions, folder: Path, name: str
) -> list[submitit.Job]:
    """Submit the runs `configs` as ONE SLURM job array (`sbatch --array=0-N%P`), one array
    task per run, each with `options`' resources; returns one submitit job per run, in order.

    Every array task is a job of its own for signals and requeue (`JOBID_TASK`), so each keeps
    the save-then-requeue of `TrainTask`, and its rendezvous port is derived from that id.
    `folder` (`options.folder` wins) holds the array's submitit logs and pickles.
    """
    options.check()
    if options.executor != "slurm":
        raise ValueError(f"a job array needs --executor slurm, not '{options.executor}'")
    if options.master_port is not None and len(configs) > 1:
        raise ValueError("--master-port would be shared by every array task: leave it unset")
    folder = Path(options.folder) if options.folder else folder
    executor = make_executor(options, folder.resolve(), name)
    with executor.batch():
        jobs = [executor.submit(_task(config, options)) for config in configs]
    return jobs


# ------------------------------------------------------------------------------------------
# Command line


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _int_at_least(minimum: int, expected: str):
    """An argparse type for whole numbers >= `minimum`, with a one-line error."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"expected {expected}, got '{text}'")
        return value

    return parse


_positive_int = _int_at_least(1, "a positive integer")
_non_negative_int = _int_at_least(0, "an integer >= 0")


def parse_time_min(text: str) -> int:
    """SLURM's time formats (M, M:S, H:M:S, D-H, D-H:M, D-H:M:S) -> whole minutes, at least 1."""
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(f"bad time '{text}' (use minutes, H:M:S or D-H:M:S)")
    days, a, b, c = (int(g) if g is not None else None for g in match.groups())
    if days is not None:  # D-H[:M[:S]]
        seconds = days * 86400 + a * 3600 + (b or 0) * 60 + (c or 0)
    elif c is not None:  # H:M:S
        seconds = a * 3600 + b * 60 + c
    elif b is not None:  # M:S
        seconds = a * 60 + b
    else:  # M
        seconds = a * 60
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"time '{text}' must be positive")
    return max(1, -(-seconds // 60))


def parse_mem_gb(text: str) -> float:
    """'64G', '64GB', '500M', '1T' or a bare number of GB -> GB."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMGT]?)B?", text.strip().upper())
    if match is None:
        raise argparse.ArgumentTypeError(f"bad memory '{text}' (e.g. 64G or 500M)")
    scale = {"K": 1 / 1024**2, "M": 1 / 1024, "G": 1.0, "": 1.0, "T": 1024.0}[match.group(2)]
    return float(match.group(1)) * scale


def build_parser() -> argparse.ArgumentParser:
    """The `python -m launch.slurm` command line."""
    parser = _Parser(
        prog="launch.slurm",
        description="Submit one training run through submitit (SLURM, local or debug).",
    )
    parser.add_argument("config", help="YAML config (see configs/)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=3e-4")
    parser.add_argument("--executor", default="slurm", help="slurm (default), local or debug")
    parser.add_argument("--nodes", type=_positive_int, default=1)
    parser.add_argument("--gpus-per-node", type=_non_negative_int, default=0)
    parser.add_argument(
        "--tasks-per-node", type=_positive_int, help="ranks per node (default: one per GPU)"
    )
    parser.add_argument(
        "--cpus-per-task",
        type=_positive_int,
        help=f"default: {CPUS_PER_GPU_TASK} per GPU task, the cluster's default without GPUs",
    )
    parser.add_argument("--partition")
    parser.add_argument("--time", type=parse_time_min, default=60, help="minutes or D-H:M:S")
    parser.add_argument("--account")
    parser.add_argument("--qos")
    parser.add_argument("--constraint")
    parser.add_argument(
        "--mem",
        type=parse_mem_gb,
        help=f"memory per node, e.g. 64G (default: {MEM_GB_PER_GPU_TASK}G per GPU task, the "
        "cluster's default without GPUs)",
    )
    parser.add_argument("--exclusive", action="store_true")
    parser.add_argument("--folder", help="submitit logs and pickles (default: RUN_DIR/submitit)")
    parser.add_argument(
        "--signal-delay", type=_positive_int, default=120, help="seconds to save before the limit"
    )
    parser.add_argument("--max-timeouts", type=_non_negative_int, default=3)
    parser.add_argument("--master-port", type=_positive_int, help="default: derived from job id")
    parser.add_argument("--wait", action="store_true", help="block until the job ends")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Validate, submit, print the job id and the run dir; 0 on success."""
    parser = build_parser()
    args = parser.parse_intermixed_args(argv)
    options = LaunchOptions(
        executor=args.executor,
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        tasks_per_node=args.tasks_per_node,
        cpus_per_task=args.cpus_per_task,
        time_min=args.time,
        partition=args.partition,
        account=args.account,
        qos=args.qos,
        constraint=args.constraint,
        mem_gb=args.mem,
        exclusive=args.exclusive,
        folder=args.folder,
        signal_delay_s=args.signal_delay,
        max_timeouts=args.max_timeouts,
        master_port=args.master_port,
    )
    try:
        options.check()
        config = prepare_config(load_config(args.config, args.overrides))
    except (ConfigError, ValueError) as err:
        parser.error(str(err))
    try:
        job = submit(config, options)
    except (FailedJobError, FailedSubmissionError) as err:  # sbatch said no: show its reason
        lines = [line for line in str(err).splitlines() if line.strip()]
        parser.exit(1, f"{parser.prog}: error: submission failed: {lines[-1] if lines else err}\n")
    tasks = options.nodes * options.num_tasks_per_node
    print(f"job {job.job_id} ({options.executor}, {tasks} task(s) on {options.nodes} node(s))")
    print(f"run dir {run_dir_of(config)}")
    print(f"logs {job.paths.folder}")
    if not (args.wait or options.executor != "slurm"):
        return 0
    summary = job.results()[0]  # the debug executor runs the task here
    print(f"status {summary.get('status')} after {summary.get('steps')} steps")
    return 0 if summary.get("status") == "completed" else 1


if __name__ == "__main__":
    # Re-import under the package name so the pickled TrainTask is `launch.slurm.TrainTask`,
    # found by reference in the job, not `__main__.TrainTask` pickled by value.
    from launch.slurm import main as _main

    sys.exit(_main())
