"""Throughput figures: tokens per second and model FLOPs utilisation against the GPU's peak."""

import time

import torch

# Dense bf16 peak FLOP/s by device-name fragment (tensor cores, no sparsity).
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "A10G": 125e12,
    "L40S": 362e12,
    "L4": 121e12,
    "V100": 125e12,
}


def peak_flops(device: torch.device) -> float | None:
    """The device's dense bf16 peak, or None (CPU, unknown GPU): then no MFU is reported."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for fragment, flops in PEAK_BF16_FLOPS.items():
        if fragment in name:
            return flops
    return None


def mfu(flops_per_token: float, tokens_per_s_per_device: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation of one device (6N + 12·L·H·d_head·T FLOPs per token)."""
    if peak is None:
        return None
    return flops_per_token * tokens_per_s_per_device / peak


class Throughput:
    """Tokens per second, step time and MFU over the steps since the previous reading."""

    def __init__(self, tokens_per_step: int, flops_per_token: float, env, start_step: int) -> None:
        self.tokens_per_step = tokens_per_step
        self.flops_per_token = flops_per_token
        self.world_size = env.world_size
        self.device = env.device
        self.peak = peak_flops(env.device)
        self.last_time = time.time()
        self.last_step = start_step

    def read(self, step: int) -> dict[str, float | None]:
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
        if self.device.type == "cuda":
            line["peak_mem_mb"] = torch.cuda.max_memory_allocated(self.device) / 2**20
        self.last_time, self.last_step = now, step
        return line
