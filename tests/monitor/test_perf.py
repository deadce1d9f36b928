"""The peak FLOP table, the peak a run's MFU is measured against, peak memory per log interval,
and the TF32 switch; on a CPU, with fake device names and fake memory counters."""

from types import SimpleNamespace

import pytest
import torch

from configs import load_config
from monitor import perf
from monitor.perf import Throughput, math_mode, peak_flops, peak_flops_of, set_tf32


@pytest.mark.parametrize(
    ("name", "bf16", "fp32"),
    [
        ("NVIDIA H100 80GB HBM3", 989e12, 67e12),  # SXM: the name says no form factor
        ("NVIDIA H100 PCIe", 756e12, 51e12),
        ("NVIDIA H100 NVL", 835e12, 60e12),
        ("NVIDIA H200", 989e12, 67e12),
        ("NVIDIA GH200 480GB", 989e12, 67e12),
        ("NVIDIA A100-SXM4-80GB", 312e12, 19.5e12),
        ("NVIDIA L4", 121e12, 30.3e12),
        ("NVIDIA L40S", 362e12, 91.6e12),
    ],
)
def test_peak_table_tells_the_cards_apart(name, bf16, fp32):
    assert peak_flops_of(name, "bf16") == bf16
    assert peak_flops_of(name, "fp32") == fp32


def test_an_unknown_card_or_a_cpu_has_no_peak(monkeypatch):
    assert peak_flops_of("Some Future GPU", "bf16") is None
    assert peak_flops(torch.device("cpu"), "bf16") is None
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "NVIDIA H100 PCIe")
    assert peak_flops(torch.device("cuda"), "tf32") == 378e12


@pytest.mark.parametrize(
    ("overrides", "mode"),
    [
        (["precision=bf16"], "bf16"),
        (["precision=bf16", "bf16_kernels=emulated"], "fp32"),  # fp32 kernels do the work
        (["precision=fp32"], "fp32"),
        (["precision=fp32", "tf32=true"], "tf32"),
    ],
)
def test_mfu_is_measured_against_the_run_s_math_mode(overrides, mode, monkeypatch):
    cfg = load_config(None, overrides)
    assert math_mode(cfg) == mode
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "NVIDIA H100 80GB HBM3")
    env = SimpleNamespace(world_size=1, device=torch.device("cuda"))
    meter = Throughput(1000, 6e6, env, start_step=0, mode=math_mode(cfg))
    assert meter.peak == {"bf16": 989e12, "tf32": 495e12, "fp32": 67e12}[mode]


def test_peak_memory_is_the_peak_of_each_log_interval(monkeypatch):
    """Each reading reports the peak since the previous one: a spike in the first interval
    does not stay in every later line."""
    peaks = iter([3 * 2**30, 2**30])
    resets = []
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "NVIDIA H100 PCIe")
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: next(peaks))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device: resets.append(1))
    meter = Throughput(1000, 6e6, SimpleNamespace(world_size=1, device=torch.device("cuda")), 0)
    assert [meter.read(s)["peak_mem_mb"] for s in (10, 20)] == [3072.0, 1024.0]
    assert len(resets) == 2


def test_tf32_uses_fp32_precision_where_torch_has_it(monkeypatch):
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    before = matmul.fp32_precision, conv.fp32_precision
    try:
        set_tf32(True)
        assert (matmul.fp32_precision, conv.fp32_precision) == ("tf32", "tf32")
        set_tf32(False)
        assert (matmul.fp32_precision, conv.fp32_precision) == ("ieee", "ieee")
    finally:
        matmul.fp32_precision, conv.fp32_precision = before
    old = SimpleNamespace(allow_tf32=False)  # a torch before fp32_precision
    monkeypatch.setattr(perf.torch.backends.cuda, "matmul", old)
    monkeypatch.setattr(perf.torch.backends.cudnn, "allow_tf32", False)
    set_tf32(True)
    assert old.allow_tf32 and torch.backends.cudnn.allow_tf32
