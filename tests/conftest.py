"""Shared fixtures: one process group per test session, a tiny config, GPU skipping.

CPU kernel paths. bf16 autocast and some fp32 kernels take another code path on each CPU kind,
so a bf16 value, step or layer measured on one machine is not a property of the code: tests
assert only what holds on every path (an exact comparison runs in fp32, or is bounded by bf16's
rounding with the derivation beside it). `make test` prints the path first; `make test-paths`
reruns the bf16-sensitive tests (tests/monitor, tests/postmortem, tests/optim/test_engine.py,
the bf16 attention heal of tests/heal/test_loop.py)
under each path below the machine's own (`python -m postmortem.kernel_path --lower-paths`):

| CPU kind seen                  | native (ATen / oneDNN)   | simulated below it                 |
|--------------------------------|--------------------------|------------------------------------|
| Intel with AMX                 | AVX512 / AVX512_CORE_AMX | AVX512_CORE_BF16, AVX512_CORE,     |
|                                |                          | AVX2 (ATen avx512, avx512, avx2),  |
|                                |                          | default                            |
| AMD EPYC, AVX-512 BF16, no AMX | AVX512 / AVX512_CORE_BF16| AVX512_CORE, AVX2, default         |
| AMD EPYC, AVX2 only            | AVX2 / AVX2              | default (ATen's scalar kernels)    |

`default` is ATEN_CPU_CAPABILITY=default; the oneDNN rows set ONEDNN_MAX_CPU_ISA with the ATen
capability of that CPU kind.
"""

import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture
def torch_linear(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch's own F.linear: a ZeRO 3 engine built earlier in this process leaves DeepSpeed's
    memory-efficient linear bound to it, which the bf16 emulation refuses (model/tensor_core.py)."""
    monkeypatch.setattr(torch.nn.functional, "linear", torch._C._nn.linear)


@pytest.fixture(scope="session")
def dist_env():
    """A one-rank gloo process group on the CPU, as `python train.py` gets."""
    from launch.distributed import init_distributed

    return init_distributed("cpu")


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory: pytest.TempPathFactory):
    """A tiny run `python train.py` trained to its end: 5 steps, checkpoints every 2 (so step 5
    is the end-of-run save). Made once; tests must leave it as it is (copy it to change it)."""
    from tests.helpers import finished_run_args, run_cli

    run_dir = tmp_path_factory.mktemp("finished") / "tiny"
    proc = run_cli(*finished_run_args(run_dir))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
