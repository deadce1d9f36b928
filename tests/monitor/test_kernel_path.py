"""`monitor.kernel_path`: the oneDNN ISA ladder and its cap, and what a run records."""

import os
import subprocess
import sys

import pytest
import torch
import yaml

from monitor.kernel_path import FLAGS, kernel_path, main, onednn_isa
from tests.helpers import finished_run_args, run_cli

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
    code = "from monitor.kernel_path import kernel_path; print(kernel_path()['path'])"
    env_run = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "ATEN_CPU_CAPABILITY": "default"},
        capture_output=True,
        text=True,
        check=True,
    )
    assert env_run.stdout.strip().startswith("aten:DEFAULT onednn:")


def test_an_emulated_bf16_run_records_the_emulation(tmp_path) -> None:
    run_dir = tmp_path / "emulated"
    args = finished_run_args(
        run_dir, precision="bf16", bf16_kernels="emulated", bf16_flash="dynamic_max"
    )
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    meta = yaml.safe_load((run_dir / "config.yaml").read_text())["meta"]
    assert meta["kernel_path"]["path"] == kernel_path()["path"]  # an fp32 run's: comparable
    assert meta["kernel_path"]["bf16"] == "tensor-core emulation in fp32 kernels"
    assert meta["kernel_path"]["bf16_flash"] == "dynamic_max"  # model/flash.py's variant


def test_bf16_distances_of_a_run(finished_run, capsys, torch_linear) -> None:
    """Autocast, the tensor-core emulation and fp32 at the run's last checkpoint: each bf16
    gradient is off fp32 by bf16's error (well above fp32's, well below 1)."""
    assert main([str(finished_run), "--batches", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    distances = dict(line.rsplit(": ", 1) for line in lines if " vs " in line)
    assert set(distances) >= {"native vs emulated", "native vs fp32", "emulated vs fp32"}
    assert 1e-4 < float(distances["emulated vs fp32"]) < 0.1
    assert 1e-4 < float(distances["native vs fp32"]) < 0.1


def test_ops_of_two_paths_compared(tmp_path, capsys) -> None:
    """ATen's scalar kernels against this CPU's: every op within bf16's reach of the other, and
    a path against itself identical."""
    native, scalar = tmp_path / "native.pt", tmp_path / "default.pt"
    for out, env in ((native, {}), (scalar, {"ATEN_CPU_CAPABILITY": "default"})):
        code = f"from monitor.kernel_path import main; main(['--ops', {str(out)!r}])"
        subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, check=True)
    assert main(["--ops-compare", str(native), str(scalar)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("aten:") and " against aten:DEFAULT " in lines[0]
    rel = {
        line.split(":")[0]: float(line.split("relative difference ")[1].split(",")[0])
        for line in lines[1:]
    }
    assert set(rel) == {
        "sdpa (bf16)",
        "gelu (bf16)",
        "linear (bf16)",
        "softmax (bf16)",
        "layer_norm (fp32)",
    }
    assert all(value < 4e-3 for value in rel.values())  # under one bf16 place (2^-8)
    assert main(["--ops-compare", str(native), str(native)]) == 0
    same = capsys.readouterr().out.splitlines()[1:]
    assert all("relative difference 0.00e+00, 0.00% of outputs differ" in line for line in same)
