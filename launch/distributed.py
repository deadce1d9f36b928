"""Process-group setup shared by `python train.py`, torchrun and SLURM jobs."""

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch

from configs import ConfigError

# A rank that dies leaves the others blocked in a collective; this bounds how long they wait.
COLLECTIVE_TIMEOUT = timedelta(minutes=10)


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def pick_device(preference: str) -> torch.device:
    """This rank's device: `cuda:LOCAL_RANK` when it sees all of the node's GPUs (torchrun,
    `srun --gpus-per-node`), `cuda:0` when it sees one (`srun --gpus-per-task=1`)."""
    if preference == "cuda" and not torch.cuda.is_available():
        raise ConfigError("run.device=cuda but no CUDA device is visible (use run.device=cpu)")
    if preference == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    local_rank, count = int(os.environ.get("LOCAL_RANK", 0)), torch.cuda.device_count()
    index = local_rank if count > 1 else 0
    if index >= count:
        raise RuntimeError(
            f"LOCAL_RANK={local_rank} but this process sees {count} CUDA devices "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): "
            "start one rank per GPU"
        )
    return torch.device("cuda", index)


def init_distributed(preference: str) -> DistEnv:
    """Join (or, alone, create) the process group: gloo on the CPU, nccl on GPUs.

    `python train.py` with no launcher gets a one-rank group on a free local port, so the code
    path is the same for one rank and many.
    """
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    device = pick_device(preference)
    # DeepSpeed picks its accelerator at import time; it must agree with our device.
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if device.type == "cuda" else "cpu")
    import deepspeed

    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(
            dist_backend="nccl" if device.type == "cuda" else "gloo",
            timeout=COLLECTIVE_TIMEOUT,
            verbose=False,
        )
    return DistEnv(
        rank=int(os.environ["RANK"]),
        local_rank=int(os.environ["LOCAL_RANK"]),
        world_size=int(os.environ["WORLD_SIZE"]),
        device=device,
    )


def close_distributed() -> None:
    """Leave the process group together: a rank exiting with gloo's threads still running can
    abort in C++ ("terminate called without an active exception") and fail its launcher."""
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
