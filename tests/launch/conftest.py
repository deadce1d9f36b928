"""Fixtures of the launcher tests: a real SLURM cluster per session, CPU DeepSpeed settings."""

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.launch.slurm_cluster import SlurmCluster, missing_requirements


@pytest.fixture(scope="session")
def cpu_train_env() -> Iterator[dict[str, str]]:
    """Environment for training subprocesses and jobs: DeepSpeed on the CPU, no wandb.

    The JIT-built shm comm op is cached across sessions (~35 s cold, ~2 s warm), and one
    thread per rank keeps 2 ranks on 2 shared cores from fighting (and the numerics alike).
    """
    values = {
        "DS_ACCELERATOR": "cpu",
        "TORCH_EXTENSIONS_DIR": os.environ.get(
            "TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions")
        ),
        "WANDB_MODE": "disabled",
        "OMP_NUM_THREADS": "1",
    }
    with pytest.MonkeyPatch.context() as patch:
        for key, value in values.items():
            patch.setenv(key, value)
        yield values


@pytest.fixture(scope="session")
def slurm_cluster(
    tmp_path_factory: pytest.TempPathFactory, cpu_train_env: dict[str, str]
) -> Iterator[SlurmCluster]:
    """A running one-node cluster; SLURM_CONF is exported so sbatch, sacct and jobs find it.

    Jobs inherit the test process's environment (sbatch's default --export=ALL), which is how
    the CPU DeepSpeed settings reach them.
    """
    reason = missing_requirements()
    if reason:
        pytest.skip(reason)
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    cluster.start()
    try:
        with pytest.MonkeyPatch.context() as patch:
            for key, value in cluster.env.items():
                patch.setenv(key, value)
            yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def submitit_folder(tmp_path: Path) -> Path:
    """A fresh submitit folder per test: job ids restart at 1 on every new cluster."""
    return tmp_path / "submitit"
