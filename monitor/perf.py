"""Throughput figures: tokens per second and model FLOPs utilisation against the GPU's peak."""

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
