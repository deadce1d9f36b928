"""The torch.distributed rendezvous of one task, computed from SLURM's or submitit's environment.

Everything here is a pure function of its inputs (an environment mapping or a submitit
`JobEnvironment`), so every rank of a job computes the same MASTER_ADDR and MASTER_PORT without
talking to the others: the address is the first host of the allocation, the port a hash of the
job id. `apply` is the only function that touches `os.environ`.

The variables set are the ones `torchrun` sets and `trainer.run` reads: MASTER_ADDR, MASTER_PORT,
RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE and GROUP_RANK (the node index).
"""

import os
import re
import shutil
import subprocess
import zlib
from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Protocol

# Ports below Linux's ephemeral range (32768-60999), so a rendezvous port never collides with
# the source port of some outgoing connection on the master node.
PORT_BASE = 20000
PORT_SPAN = 12000


@dataclass(frozen=True)
class Rendezvous:
    """Where rank 0's TCPStore listens and who this process is among the job's ranks."""

    master_addr: str
    master_port: int
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    node_rank: int

    def as_env(self) -> dict[str, str]:
        """The torchrun-style variables, as strings."""
        return {
            "MASTER_ADDR": self.master_addr,
            "MASTER_PORT": str(self.master_port),
            "RANK": str(self.rank),
            "LOCAL_RANK": str(self.local_rank),
            "WORLD_SIZE": str(self.world_size),
            "LOCAL_WORLD_SIZE": str(self.local_world_size),
            "GROUP_RANK": str(self.node_rank),
        }


class JobEnvironmentLike(Protocol):
    """The part of `submitit.JobEnvironment` used here (a Protocol so tests need no job)."""

    @property
    def job_id(self) -> str: ...
    @property
    def hostnames(self) -> Sequence[str]: ...
    @property
    def num_tasks(self) -> int: ...
    @property
    def num_nodes(self) -> int: ...
    @property
    def node(self) -> int: ...
    @property
    def global_rank(self) -> int: ...
    @property
    def local_rank(self) -> int: ...


# ------------------------------------------------------------------------------------------
# SLURM's compressed lists


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are outside brackets: 'a[1,2],b' -> ['a[1,2]', 'b']."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in node list '{text}'")
        elif char == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth != 0:
        raise ValueError(f"unbalanced '[' in node list '{text}'")
    parts.append(text[start:])
    return [part for part in (p.strip() for p in parts) if part]


def _expand_range(body: str, nodelist: str) -> list[str]:
    """'01-03,7' -> ['01', '02', '03', '7']; the low bound's width sets the zero padding."""
    out = []
    for item in body.split(","):
        low, sep, high = item.strip().partition("-")
        if not low.isdigit() or (sep and not high.isdigit()):
            raise ValueError(f"bad range '{item}' in node list '{nodelist}'")
        if not sep:
            out.append(low)
            continue
        if int(high) < int(low):
            raise ValueError(f"descending range '{item}' in node list '{nodelist}'")
        out += [f"{n:0{len(low)}d}" for n in range(int(low), int(high) + 1)]
    return out


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand SLURM's compressed host list: 'gpu[01-03,07],cpu5' -> gpu01 gpu02 gpu03 gpu07 cpu5.

    Written in Python (not `scontrol show hostnames`) so it works without a slurm.conf, in unit
    tests and on login nodes. Several bracket groups in one name expand as a product, leftmost
    slowest, as scontrol does: 'r[1-2]n[1-2]' -> r1n1 r1n2 r2n1 r2n2.
    """
    hosts: list[str] = []
    for pattern in _split_top_level(nodelist):
        names = [""]
        for literal, body in re.findall(r"([^\[]*)(?:\[([^\]]*)\])?", pattern):
            names = [name + literal for name in names]
            if body:
                suffixes = _expand_range(body, nodelist)
                names = [name + suffix for name in names for suffix in suffixes]
        hosts += names
    return hosts


def scontrol_hostnames(nodelist: str) -> list[str]:
    """`scontrol show hostnames`, falling back to `expand_nodelist` when scontrol is unusable."""
    if shutil.which("scontrol"):
        try:
            out = subprocess.run(
                ["scontrol", "show", "hostnames", nodelist],
                capture_output=True,
                text=True,
                timeout=10,
                check=True,
            ).stdout.split()
            if out:
                return out
        except (OSError, subprocess.SubprocessError):
            pass
    return expand_nodelist(nodelist)


def expand_tasks_per_node(spec: str) -> list[int]:
    """Expand SLURM_TASKS_PER_NODE: '4(x2),3' -> [4, 4, 3]."""
    counts: list[int] = []
    for item in spec.split(","):
        match = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", item)
        if match is None:
            raise ValueError(f"bad SLURM_TASKS_PER_NODE '{spec}'")
        counts += [int(match.group(1))] * int(match.group(2) or 1)
    return counts


# ------------------------------------------------------------------------------------------
# The rendezvous


def port_for_job(job_id: str | int) -> int:
    """A port in [PORT_BASE, PORT_BASE + PORT_SPAN) that every rank of the job derives alike.

    Numeric ids map by modulo, so consecutive jobs sharing a node never collide; others (array
    jobs '123_4', local or debug ids) by CRC32, which unlike `hash()` is the same in every process.
    """
    text = str(job_id).strip()
    if not text:
        raise ValueError("a job id is needed to derive the rendezvous port")
    number = int(text) if text.isdigit() else zlib.crc32(text.encode())
    return PORT_BASE + number % PORT_SPAN


def _get(environ: Mapping[str, str], *names: str, default: str | None = None) -> str:
    for name in names:
        if environ.get(name, "").strip():
            return environ[name].strip()
    if default is None:
        raise KeyError(f"none of {', '.join(names)} is set: not inside a SLURM task?")
    return default


def from_slurm_env(environ: Mapping[str, str], master_port: int | None = None) -> Rendezvous:
    """The rendezvous of the SLURM task whose environment is `environ` (one `srun` task).

    The step's values are preferred over the job's: a step may span fewer nodes than the
    allocation, and rank 0 runs on the first node of the step.
    """
    job_id = _get(environ, "SLURM_JOB_ID", "SLURM_JOBID")
    nodelist = _get(environ, "SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
    hosts = expand_nodelist(nodelist)
    world_size = int(_get(environ, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NPROCS"))
    node_rank = int(_get(environ, "SLURM_NODEID", default="0"))
    per_node_spec = _get(
        environ, "SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE", default=str(world_size)
    )
    per_node = expand_tasks_per_node(per_node_spec)
    if node_rank >= len(per_node):
        raise ValueError(f"SLURM_NODEID={node_rank} but SLURM_TASKS_PER_NODE='{per_node_spec}'")
    return Rendezvous(
        master_addr=hosts[0],
        master_port=master_port if master_port is not None else port_for_job(job_id),
        rank=int(_get(environ, "SLURM_PROCID")),
        local_rank=int(_get(environ, "SLURM_LOCALID", default="0")),
        world_size=world_size,
        local_world_size=per_node[node_rank],
        node_rank=node_rank,
    )


def from_job_environment(job_env: JobEnvironmentLike, master_port: int | None = None) -> Rendezvous:
    """The rendezvous from submitit's `JobEnvironment` (SLURM, local or debug executor).

    submitit launches the same number of tasks on every node, so the local world size is the
    total divided by the node count.
    """
    return Rendezvous(
        master_addr=list(job_env.hostnames)[0],
        master_port=master_port if master_port is not None else port_for_job(job_env.job_id),
        rank=job_env.global_rank,
        local_rank=job_env.local_rank,
        world_size=job_env.num_tasks,
        local_world_size=max(1, job_env.num_tasks // max(1, job_env.num_nodes)),
        node_rank=job_env.node,
    )


def apply(rendezvous: Rendezvous, environ: MutableMapping[str, str] | None = None) -> None:
    """Export the rendezvous into `environ` (default `os.environ`) for torch.distributed."""
    target = os.environ if environ is None else environ
    target.update(rendezvous.as_env())


def omp_threads(
    environ: Mapping[str, str], local_world_size: int, usable_cpus: int | None = None
) -> int:
    """Threads per rank: SLURM's CPUs per task, but never more than this process may run on;
    without it, the usable CPUs shared among the node's ranks (as torchrun does).

    `usable_cpus` (default: `os.sched_getaffinity(0)`) is what the cgroup and CPU binding allow,
    which `os.cpu_count()` ignores: it counts every core of the node, so eight ranks on a
    shared 128-core node would each start 16 threads on the 8 CPUs the job was given.
    """
    usable = len(os.sched_getaffinity(0)) if usable_cpus is None else usable_cpus
    per_task = environ.get("SLURM_CPUS_PER_TASK", "")
    if per_task.isdigit() and int(per_task) > 0:
        return max(1, min(int(per_task), usable))
    return max(1, usable // max(1, local_world_size))


def torchrun_argv(
    script: str,
    args: Sequence[str] = (),
    *,
    num_nodes: int = 1,
    nproc_per_node: int = 1,
    node_rank: int = 0,
    master_addr: str = "127.0.0.1",
    master_port: int = 29500,
) -> list[str]:
    """The `torchrun` command line of one node of a static (non-elastic) multi-node launch."""
    return [
        "torchrun",
        f"--nnodes={num_nodes}",
        f"--nproc-per-node={nproc_per_node}",
        f"--node-rank={node_rank}",
        f"--master-addr={master_addr}",
        f"--master-port={master_port}",
        script,
        *args,
    ]
