"""launch.env: nodelist expansion, the rendezvous of every rank of a 2 x 4 job, the port."""

import os
import subprocess
import sys

import pytest

from launch import env

# What `srun` (Slurm 22.05) exported to the tasks of `sbatch --nodes 2 --ntasks-per-node 4`
# on gpu[07-08], job 4242: the keys shared by all tasks, then the ones that differ.
JOB_ENV = {
    "SLURM_CLUSTER_NAME": "research",
    "SLURM_CPUS_ON_NODE": "32",
    "SLURM_JOBID": "4242",
    "SLURM_JOB_ID": "4242",
    "SLURM_JOB_NAME": "gpt2",
    "SLURM_JOB_NODELIST": "gpu[07-08]",
    "SLURM_JOB_NUM_NODES": "2",
    "SLURM_JOB_PARTITION": "gpu",
    "SLURM_NNODES": "2",
    "SLURM_NODELIST": "gpu[07-08]",
    "SLURM_NPROCS": "8",
    "SLURM_NTASKS": "8",
    "SLURM_NTASKS_PER_NODE": "4",
    "SLURM_STEPID": "0",
    "SLURM_STEP_ID": "0",
    "SLURM_STEP_NODELIST": "gpu[07-08]",
    "SLURM_STEP_NUM_NODES": "2",
    "SLURM_STEP_NUM_TASKS": "8",
    "SLURM_STEP_TASKS_PER_NODE": "4(x2)",
    "SLURM_SUBMIT_DIR": "/home/me/harness",
    "SLURM_SUBMIT_HOST": "login1",
    "SLURM_TASKS_PER_NODE": "4(x2)",
}
# (SLURMD_NODENAME, SLURM_NODEID, SLURM_PROCID, SLURM_LOCALID, SLURM_GTIDS) per task
TASKS = [
    ("gpu07", 0, 0, 0, "0,1,2,3"),
    ("gpu07", 0, 1, 1, "0,1,2,3"),
    ("gpu07", 0, 2, 2, "0,1,2,3"),
    ("gpu07", 0, 3, 3, "0,1,2,3"),
    ("gpu08", 1, 4, 0, "4,5,6,7"),
    ("gpu08", 1, 5, 1, "4,5,6,7"),
    ("gpu08", 1, 6, 2, "4,5,6,7"),
    ("gpu08", 1, 7, 3, "4,5,6,7"),
]
PORT = 20000 + 4242  # PORT_BASE + job id mod PORT_SPAN
# (RANK, LOCAL_RANK, GROUP_RANK) every task must end up with; the rest is shared.
EXPECTED = [(0, 0, 0), (1, 1, 0), (2, 2, 0), (3, 3, 0), (4, 0, 1), (5, 1, 1), (6, 2, 1), (7, 3, 1)]


def task_env(index: int) -> dict[str, str]:
    nodename, nodeid, procid, localid, gtids = TASKS[index]
    return {
        **JOB_ENV,
        "SLURMD_NODENAME": nodename,
        "SLURM_NODEID": str(nodeid),
        "SLURM_PROCID": str(procid),
        "SLURM_LOCALID": str(localid),
        "SLURM_GTIDS": gtids,
        "SLURM_TOPOLOGY_ADDR": nodename,
    }


@pytest.mark.parametrize("index", range(8))
def test_every_rank_of_a_2x4_job(index: int) -> None:
    rank, local_rank, node_rank = EXPECTED[index]
    variables: dict[str, str] = {}
    env.apply(env.from_slurm_env(task_env(index)), variables)
    assert variables == {
        "MASTER_ADDR": "gpu07",
        "MASTER_PORT": str(PORT),
        "RANK": str(rank),
        "LOCAL_RANK": str(local_rank),
        "WORLD_SIZE": "8",
        "LOCAL_WORLD_SIZE": "4",
        "GROUP_RANK": str(node_rank),
    }


@pytest.mark.parametrize("index", range(8))
def test_submitit_job_environment_agrees(index: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """submitit's own SlurmJobEnvironment, read from the same task, gives the same rendezvous."""
    import submitit

    for key in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(key)
    for key, value in task_env(index).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    job_env = submitit.JobEnvironment()
    assert env.from_job_environment(job_env) == env.from_slurm_env(task_env(index))


def test_step_values_win_over_the_job_ones() -> None:
    """A step on the second node only: rank 0 of the step lives there."""
    variables = {
        **task_env(4),
        "SLURM_STEP_NODELIST": "gpu08",
        "SLURM_STEP_NUM_TASKS": "4",
        "SLURM_STEP_TASKS_PER_NODE": "4",
        "SLURM_NODEID": "0",
        "SLURM_PROCID": "0",
    }
    rdzv = env.from_slurm_env(variables)
    assert (rdzv.master_addr, rdzv.world_size, rdzv.rank, rdzv.local_world_size) == (
        "gpu08",
        4,
        0,
        4,
    )


def test_master_port_override() -> None:
    assert env.from_slurm_env(task_env(3), master_port=29500).master_port == 29500


def test_outside_slurm_is_a_clear_error() -> None:
    with pytest.raises(KeyError, match="SLURM_JOB_ID"):
        env.from_slurm_env({})


@pytest.mark.parametrize(
    ("nodelist", "hosts"),
    [
        ("gpu[01-03,07],cpu5", ["gpu01", "gpu02", "gpu03", "gpu07", "cpu5"]),
        ("node1", ["node1"]),
        ("a,b", ["a", "b"]),
        ("n[9-10]", ["n9", "n10"]),
        ("n[098-101]", ["n098", "n099", "n100", "n101"]),
        ("rack[1-2]-node[01-02]", ["rack1-node01", "rack1-node02", "rack2-node01", "rack2-node02"]),
        ("gpu-a100-[1,3]", ["gpu-a100-1", "gpu-a100-3"]),
        ("x[1-2]y", ["x1y", "x2y"]),
        ("login, gpu[7]", ["login", "gpu7"]),
    ],
)
def test_expand_nodelist(nodelist: str, hosts: list[str]) -> None:
    assert env.expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("bad", ["gpu[01-03", "gpu01]", "gpu[a-b]", "gpu[3-1]", "gpu[1-]"])
def test_bad_nodelist(bad: str) -> None:
    with pytest.raises(ValueError, match="node list"):
        env.expand_nodelist(bad)


def test_scontrol_fallback_without_slurm(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    assert env.scontrol_hostnames("gpu[1-2]") == ["gpu1", "gpu2"]


@pytest.mark.parametrize(
    ("spec", "counts"), [("4(x2)", [4, 4]), ("2", [2]), ("4(x2),3", [4, 4, 3]), ("1,2", [1, 2])]
)
def test_expand_tasks_per_node(spec: str, counts: list[int]) -> None:
    assert env.expand_tasks_per_node(spec) == counts


def test_uneven_tasks_per_node() -> None:
    """SLURM_TASKS_PER_NODE '3,2': the second node's ranks see a local world of 2."""
    variables = {
        **task_env(4),
        "SLURM_NTASKS": "5",
        "SLURM_STEP_NUM_TASKS": "5",
        "SLURM_STEP_TASKS_PER_NODE": "3,2",
        "SLURM_TASKS_PER_NODE": "3,2",
        "SLURM_PROCID": "3",
        "SLURM_LOCALID": "0",
    }
    rdzv = env.from_slurm_env(variables)
    assert (rdzv.rank, rdzv.world_size, rdzv.local_world_size, rdzv.node_rank) == (3, 5, 2, 1)


def test_port_is_deterministic_and_in_range() -> None:
    ports = {env.port_for_job(job_id) for job_id in range(1000, 1100)}
    assert len(ports) == 100  # consecutive jobs sharing a node never collide
    assert all(env.PORT_BASE <= p < env.PORT_BASE + env.PORT_SPAN for p in ports)
    assert env.port_for_job("1234") == env.port_for_job(1234) == env.PORT_BASE + 1234
    for job_id in ("1234_7", "DEBUG_140234", "98765"):
        assert env.PORT_BASE <= env.port_for_job(job_id) < env.PORT_BASE + env.PORT_SPAN
    with pytest.raises(ValueError):
        env.port_for_job("")


def test_port_is_the_same_in_another_process() -> None:
    """Not `hash()`: a process with another hash seed derives the same port for array ids."""
    code = "from launch import env; print(env.port_for_job('1234_7'))"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONHASHSEED": "12345"},
    ).stdout
    assert int(out) == env.port_for_job("1234_7")


def test_apply_sets_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    rdzv = env.from_slurm_env(task_env(5))
    for key in rdzv.as_env():
        monkeypatch.delenv(key, raising=False)
    env.apply(rdzv)
    assert (os.environ["RANK"], os.environ["MASTER_ADDR"]) == ("5", "gpu07")


def test_torchrun_argv() -> None:
    argv = env.torchrun_argv(
        "train.py", ["a=1"], num_nodes=2, node_rank=1, master_addr="10.0.0.1", master_port=1234
    )
    assert argv == [
        "torchrun",
        "--nnodes=2",
        "--nproc-per-node=1",
        "--node-rank=1",
        "--master-addr=10.0.0.1",
        "--master-port=1234",
        "train.py",
        "a=1",
    ]


@pytest.mark.parametrize(
    ("environ", "ranks", "usable", "threads"),
    [
        ({"SLURM_CPUS_PER_TASK": "8"}, 8, 64, 8),  # the job's CPUs, one share per task
        ({"SLURM_CPUS_PER_TASK": "8"}, 1, 4, 4),  # never more than the process may use
        ({}, 4, 16, 4),  # torchrun-like: the usable CPUs shared among the node's ranks
        ({}, 8, 4, 1),
        ({"SLURM_CPUS_PER_TASK": ""}, 2, 6, 3),
    ],
)
def test_omp_threads_come_from_the_cpus_this_process_may_use(environ, ranks, usable, threads):
    assert env.omp_threads(environ, ranks, usable) == threads


def test_omp_threads_read_the_affinity_not_the_core_count(monkeypatch):
    """os.cpu_count() counts the node's cores; a cgroup or CPU binding allows fewer."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2})
    monkeypatch.setattr(os, "cpu_count", lambda: 128)
    assert env.omp_threads({}, 1) == 3
