"""Which kernels this process computes with: recorded in every run's `config.yaml` (`meta`).

On the CPU the same config can take different kernel paths: ATen's vectorized kernels dispatch
on `ATEN_CPU_CAPABILITY` (AVX2 / AVX512), oneDNN's bf16 matmuls on the highest ISA the CPU has
below `ONEDNN_MAX_CPU_ISA` (AVX-512 BF16 and AMX do the products in bf16 hardware), and SDPA
picks a flash or a math kernel. One seed on two paths differed by 0.3 nat in bf16 (issue 11),
more than the effects under study, so `study` never pools runs of different paths into one
cell. On a GPU the path is the device name. `python -m postmortem.kernel_path` prints it and
measures what a path changes.
"""

import os
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

# CPU flags (as /proc/cpuinfo names them) that change which kernels run.
FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16")
ISA_ENV = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")
# oneDNN's ISA ladder, highest first, with the CPU flag each needs.
_ONEDNN_ISAS = (
    ("AVX512_CORE_AMX", "amx_bf16"),
    ("AVX512_CORE_BF16", "avx512_bf16"),
    ("AVX512_CORE_VNNI", "avx512_vnni"),
    ("AVX512_CORE", "avx512f"),
    ("AVX2", "avx2"),
)


def cpu_flags() -> tuple[str, list[str]]:
    """(model name, the FLAGS this CPU has), from /proc/cpuinfo ('' and [] where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "", []
    lines = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    present = set(lines.get("flags\t\t", lines.get("flags", "")).split())
    model = lines.get("model name\t", lines.get("model name", "")).strip()
    return model, [flag for flag in FLAGS if flag in present]


def onednn_isa(flags: list[str], max_isa: str | None) -> str:
    """The oneDNN ISA in force: the highest the CPU has, capped by ONEDNN_MAX_CPU_ISA."""
    ladder = [isa for isa, _ in _ONEDNN_ISAS]
    usable = [isa for isa, flag in _ONEDNN_ISAS if flag in flags]
    if max_isa and max_isa.upper() in ladder:
        usable = [isa for isa in usable if ladder.index(isa) >= ladder.index(max_isa.upper())]
    return usable[0] if usable else "none"


# The CPU paths seen so far, highest first: (oneDNN ISA cap, ATen capability, the CPU flag the
# path needs). An AMX CPU can simulate every path below its own; an AVX2-only one only ATen's
# scalar `default`, the bottom rung, which needs no flag.
_PATHS = (
    ("AVX512_CORE_AMX", "avx512", "amx_bf16"),
    ("AVX512_CORE_BF16", "avx512", "avx512_bf16"),
    ("AVX512_CORE", "avx512", "avx512f"),
    ("AVX2", "avx2", "avx2"),
)


def lower_paths(flags: list[str]) -> list[dict[str, str]]:
    """The environments that put this process on each kernel path below the CPU's own, highest
    first, ending with ATen's scalar kernels: what the bf16-sensitive tests run under
    (`make test-paths`) so that a test pinned to one CPU's kernels fails on any machine."""
    usable = [(isa, aten) for isa, aten, flag in _PATHS if flag in flags]
    lower = [{"ONEDNN_MAX_CPU_ISA": isa, "ATEN_CPU_CAPABILITY": aten} for isa, aten in usable[1:]]
    return [*lower, {"ATEN_CPU_CAPABILITY": "default"}]


def sdpa_backend(dtype: torch.dtype) -> str:
    """The SDPA kernel torch picks for causal attention of this dtype on the CPU."""
    from torch.nn.attention import SDPBackend

    q = torch.zeros(1, 2, 8, 16, dtype=dtype)
    return SDPBackend(torch._fused_sdp_choice(q, q, q, is_causal=True)).name


@lru_cache(maxsize=1)
def kernel_path() -> dict[str, Any]:
    """The CPU kernel path of this process; `path` is the one string that must match to pool."""
    model, flags = cpu_flags()
    env = {name: os.environ[name] for name in ISA_ENV if name in os.environ}
    max_isa = env.get("ONEDNN_MAX_CPU_ISA", env.get("DNNL_MAX_CPU_ISA"))
    aten = torch.backends.cpu.get_cpu_capability()
    isa = onednn_isa(flags, max_isa)
    sdpa = {"fp32": sdpa_backend(torch.float32), "bf16": sdpa_backend(torch.bfloat16)}
    return {
        "path": f"aten:{aten} onednn:{isa} sdpa:{sdpa['bf16']}",
        "cpu": model,
        "cpu_flags": flags,
        "aten_cpu_capability": aten,
        "onednn_isa": isa,
        "env": env,
        "sdpa": sdpa,
    }


def device_path(device: torch.device, emulated_bf16: bool = False) -> dict[str, Any]:
    """`kernel_path()` on the CPU; on a GPU the device name (its kernels are another matter).

    `emulated_bf16` (`bf16_kernels: emulated`): bf16 rounded inside fp32 kernels
    (model/tensor_core.py), noted as `bf16`. The path stays that of the fp32 kernels, the same as
    an fp32 run's on this machine, so claim 2 compares the two within one group; the config key
    `bf16_kernels` keeps native and emulated bf16 runs apart.
    """
    if device.type == "cuda":
        path = {"path": f"cuda:{torch.cuda.get_device_name(device)}"}
    else:
        path = dict(kernel_path())
    if emulated_bf16:
        path["bf16"] = "tensor-core emulation in fp32 kernels"
    return path
