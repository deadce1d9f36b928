"""`monitor.device_path`: the oneDNN ISA ladder and its cap, the path in force, the lower paths."""

import os
import subprocess
import sys

import pytest
import torch

from monitor.device_path import FLAGS, kernel_path, lower_paths, onednn_isa

AMX_CPU = ["avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16"]


@pytest.mark.parametrize(
    ("flags", "cap", "isa"),
    [
        (AMX_CPU, None, "AVX512_CORE_AMX"),
        (AMX_CPU, "AVX512_CORE", "AVX512_CORE"),  # issue 11's "no bf16 instructions" path
        (AMX_CPU, "avx512_core_bf16", "AVX512_CORE_BF16"),
        (["avx2", "fma"], None, "AVX2"),
        (["avx2", "fma"], "AVX512_CORE_AMX", "AVX2"),  # a cap above the CPU changes nothing
        (["avx2", "fma"], "nonsense", "AVX2"),
        ([], None, "none"),
    ],
)
def test_onednn_isa(flags: list[str], cap: str | None, isa: str) -> None:
    assert onednn_isa(flags, cap) == isa


def test_kernel_path_of_this_process() -> None:
    path = kernel_path()
    assert set(path["cpu_flags"]) <= set(FLAGS)
    assert path["aten_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert path["sdpa"]["bf16"] in ("FLASH_ATTENTION", "MATH", "EFFICIENT_ATTENTION")
    assert path["path"] == (
        f"aten:{path['aten_cpu_capability']} onednn:{path['onednn_isa']} "
        f"sdpa:{path['sdpa']['bf16']}"
    )


def test_the_environment_sets_the_path() -> None:
    """ATEN_CPU_CAPABILITY=default is honoured by torch and recorded as in force."""
    code = "from monitor.device_path import kernel_path; print(kernel_path()['path'])"
    env_run = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "ATEN_CPU_CAPABILITY": "default"},
        capture_output=True,
        text=True,
        check=True,
    )
    assert env_run.stdout.strip().startswith("aten:DEFAULT onednn:")


@pytest.mark.parametrize(
    ("flags", "paths"),
    [
        (
            AMX_CPU,
            [
                "AVX512_CORE_BF16 avx512",
                "AVX512_CORE avx512",
                "AVX2 avx2",
                "- default",
            ],
        ),
        (
            ["avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16"],
            ["AVX512_CORE avx512", "AVX2 avx2", "- default"],
        ),
        (["avx2", "fma"], ["- default"]),
        ([], ["- default"]),
    ],
)
def test_lower_paths_are_the_rungs_below_this_cpu(flags: list[str], paths: list[str]) -> None:
    """issue 19's matrix: each CPU kind simulates every path seen so far below its own."""
    got = [
        f"{env.get('ONEDNN_MAX_CPU_ISA', '-')} {env['ATEN_CPU_CAPABILITY']}"
        for env in lower_paths(flags)
    ]
    assert got == paths
