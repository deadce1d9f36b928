"""`python -m postmortem.kernel_path`: what a run records, its bf16 distances, op comparisons."""

import os
import subprocess
import sys

import yaml

from monitor.device_path import kernel_path
from postmortem.kernel_path import main
from tests.helpers import finished_run_args, run_cli

AMX_CPU = ["avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16"]


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
        code = f"from postmortem.kernel_path import main; main(['--ops', {str(out)!r}])"
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
