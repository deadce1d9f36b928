"""Throughput figures: tokens per second and model FLOPs utilisation against the GPU's peak
in the run's math mode (bf16, TF32 or fp32)."""

import time

import torch

from configs.schema import TrainConfig

# Dense peak FLOP/s (no sparsity) by device-name fragment, from NVIDIA's datasheets: bf16 and
# TF32 on tensor cores, fp32 on the CUDA cores. Checked in this order, the first fragment found
# in the name wins, so the H100's PCIe and NVL cards (lower clocks and power) come before the SXM
# board, whose name carries no form factor ("NVIDIA H100 80GB HBM3"). GH200 matches "H200".
PEAK_FLOPS: list[tuple[str, dict[str, float]]] = [
    ("H100 NVL", {"bf16": 835e12, "tf32": 418e12, "fp32": 60e12}),
    ("H100 PCIe", {"bf16": 756e12, "tf32": 378e12, "fp32": 51e12}),
    ("H200 NVL", {"bf16": 835e12, "tf32": 418e12, "fp32": 60e12}),
    ("H100", {"bf16": 989e12, "tf32": 495e12, "fp32": 67e12}),
    ("H200", {"bf16": 989e12, "tf32": 495e12, "fp32": 67e12}),
    ("A100", {"bf16": 312e12, "tf32": 156e12, "fp32": 19.5e12}),
    ("A10G", {"bf16": 125e12, "tf32": 62.5e12, "fp32": 31.2e12}),
    ("L40S", {"bf16": 362e12, "tf32": 183e12, "fp32": 91.6e12}),
    ("L4", {"bf16": 121e12, "tf32": 60e12, "fp32": 30.3e12}),
    ("V100", {"bf16": 125e12, "tf32": 15.7e12, "fp32": 15.7e12}),  # fp16 tensor cores; no TF32
]


def math_mode(cfg: TrainConfig) -> str:
    """Which peak a run's matmuls can reach: bf16 (native autocast), else tf32 when it is on,
    else fp32. Emulated bf16 computes in fp32 kernels, so it is measured against theirs."""
    if cfg.precision == "bf16" and cfg.bf16_kernels == "native":
        return "bf16"
    return "tf32" if cfg.tf32 else "fp32"


def peak_flops_of(name: str, mode: str) -> float | None:
    """The dense peak of the GPU named `name` in math mode `mode`, or None when unknown."""
    for fragment, peaks in PEAK_FLOPS:
        if fragment in name:
            return peaks[mode]
    return None


def peak_flops(device: torch.device, mode: str = "bf16") -> float | None:
    """The device's dense peak in `mode` (`math_mode`), or None (CPU, unknown GPU): then no MFU
    is reported."""
    if device.type != "cuda":
        return None
    return peak_flops_of(torch.cuda.get_device_name(device), mode)


def set_tf32(enabled: bool) -> None:
    """TF32 for fp32 matmuls and convolutions on or off, through torch's `fp32_precision`
    settings where this torch has them (the `allow_tf32` flags are deprecated there). Kept
    beside the peak table: the math mode decides which peak the MFU is measured against."""
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):
        matmul.fp32_precision = torch.backends.cudnn.conv.fp32_precision = (
            "tf32" if enabled else "ieee"
        )
    else:
        matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled


def mfu(flops_per_token: float, tokens_per_s_per_device: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation of one device (6N + 12·L·H·d_head·T FLOPs per token)."""
    if peak is None:
        return None
    return flops_per_token * tokens_per_s_per_device / peak


class Throughput:
    """Tokens per second, step time and MFU over the steps since the previous reading."""

    def __init__(
        self,
        tokens_per_step: int,
        flops_per_token: float,
        env,
        start_step: int,
        mode: str = "bf16",
    ) -> None:
        """`mode`: the run's math mode (`math_mode`), which picks the peak of the MFU."""
        self.tokens_per_step = tokens_per_step
        self.flops_per_token = flops_per_token
        self.world_size = env.world_size
        self.device = env.device
        self.peak = peak_flops(env.device, mode)
        self.last_time = time.time()
        self.last_step = start_step

    def read(self, step: int) -> dict[str, float | None]:
        """Speed since the previous reading; on a GPU also its peak memory (then reset)."""
        now = time.time()
        steps = max(1, step - self.last_step)
        elapsed = max(now - self.last_time, 1e-9)
        tok_per_s = self.tokens_per_step * steps / elapsed
        line = {
            "tok_per_s": tok_per_s,
            "step_time_ms": 1000 * elapsed / steps,
            "mfu": mfu(self.flops_per_token, tok_per_s / self.world_size, self.peak),
            "time": now,
        }
        if self.device.type == "cuda":  # the peak since the previous reading, not the run's
            line["peak_mem_mb"] = torch.cuda.max_memory_allocated(self.device) / 2**20
            torch.cuda.reset_peak_memory_stats(self.device)
        self.last_time, self.last_step = now, step
        return line
