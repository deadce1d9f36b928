"""Shared fixtures: one process group per test session, a tiny config, GPU skipping."""

import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(scope="session")
def dist_env():
    """A one-rank gloo process group on the CPU, as `python train.py` gets."""
    from launch.distributed import init_distributed

    return init_distributed("cpu")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
