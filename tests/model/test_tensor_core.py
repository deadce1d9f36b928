"""`model.tensor_core`: a GPU's bf16 tensor-core arithmetic, emulated with fp32 kernels."""

import os
import subprocess
import sys

import pytest
import torch
from torch.nn import functional as F

from model import GPT
from model.config import ModelConfig
from model.tensor_core import TensorCoreBF16, attention, emulate_tensor_cores, linear, round_bf16
from tests.helpers import ROOT

pytestmark = pytest.mark.usefixtures("torch_linear")

CONFIG = ModelConfig(vocab_size=256, n_layer=2, n_head=2, n_embd=32, block_size=32, bias=True)


def is_bf16(t: torch.Tensor) -> bool:
    """Every value of the fp32 tensor t is a bf16 number."""
    return torch.equal(t, t.bfloat16().float())


def bf16_ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| in units of bf16's last place at b (8 significant bits)."""
    exponent = torch.frexp(b.abs().clamp_min(1e-30)).exponent
    return (a - b).abs() / torch.ldexp(torch.ones_like(b), exponent - 8)


def test_round_bf16_rounds_to_nearest_even_both_ways() -> None:
    x = torch.tensor([1.0 + 2**-8, 1.0 + 3 * 2**-8, 1.0 + 2**-9, -3.14159], requires_grad=True)
    y = round_bf16(x)
    assert y.tolist() == [1.0, 1.0 + 2**-6, 1.0, -3.140625]  # ties go to the even neighbour
    y.backward(torch.tensor([1.0 + 2**-8, 0.1, 1.0, 1.0]))
    assert x.grad.tolist() == [1.0, torch.tensor(0.1).bfloat16().item(), 1.0, 1.0]


def test_linear_is_an_exactly_rounded_bf16_gemm() -> None:
    """bf16 operands, exact products, accumulation in higher precision, one rounding at the end:
    an fp64 GEMM of the rounded operands, rounded once, agrees to the last bf16 place."""
    gen = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(s, generator=gen) for s in ((64, 96), (48, 96), (48,)))
    out = linear(x, w, b)
    rx, rw, rb = (t.bfloat16().double() for t in (x, w, b))
    exact = (rx @ rw.T + rb).float()
    assert is_bf16(out)
    assert bf16_ulps(out, exact).max() <= 0.5 + 1e-3  # rounding once: half a place at most
    assert not torch.equal(out, F.linear(x, w, b))  # fp32's answer differs


def test_attention_rounds_where_flash_attention_does() -> None:
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 2, 16, 8, generator=gen) for _ in range(3))
    out = attention(q, k, v, is_causal=True)
    rq, rk, rv = (t.bfloat16().double() for t in (q, k, v))
    scores = (rq @ rk.transpose(-2, -1)) / 8**0.5
    scores = scores.masked_fill(~torch.ones(16, 16, dtype=torch.bool).tril(), float("-inf"))
    # flash rounds the unnormalised probabilities exp(s - rowmax) and divides by their exact sum
    p_bar = (scores - scores.amax(-1, keepdim=True)).exp()
    exact = ((p_bar.float().bfloat16().double() @ rv) / p_bar.sum(-1, keepdim=True)).float()
    assert is_bf16(out)
    assert bf16_ulps(out, exact).max() <= 1.0
    reference = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert 1e-4 < (out - reference).norm() / reference.norm() < 1e-2  # bf16's error, not more
    mask = torch.ones(16, 16, dtype=torch.bool).tril()
    assert torch.equal(attention(q, k, v, attn_mask=mask), out)


def test_gpt_under_the_mode_rounds_every_gemm_and_its_gradients() -> None:
    torch.manual_seed(0)
    model = GPT(CONFIG)
    x, y = torch.randint(0, 256, (2, 2, 32)).unbind(0)
    fp32 = model(x, y).loss
    with TensorCoreBF16():
        out = model(x, y)
    out.loss.backward()
    assert is_bf16(out.logits)  # the LM head's GEMM result
    assert out.logits.dtype == torch.float32  # the loss and softmax stay fp32
    assert 0 < abs(out.loss.item() - fp32.item()) < 0.05
    fc = model.transformer.h[0].mlp.c_fc
    assert is_bf16(fc.weight.grad) and is_bf16(fc.bias.grad)  # bf16 GEMM outputs, as on a GPU
    assert fc.weight.dtype == torch.float32


def test_emulate_tensor_cores_hooks_every_forward_and_leaves_the_rest_alone() -> None:
    torch.manual_seed(0)
    model = GPT(CONFIG)
    names = list(model.state_dict())
    x, y = torch.randint(0, 256, (2, 2, 32)).unbind(0)
    with TensorCoreBF16():
        expected = model(x, y).loss
    emulate_tensor_cores(model)
    assert torch.equal(model(x, y).loss, expected)
    assert list(model.state_dict()) == names
    assert not is_bf16(F.linear(x.float(), torch.randn(4, 32)))  # off outside the forward


CHILD = """
import torch
from model import GPT
from model.config import ModelConfig
from model.tensor_core import TensorCoreBF16
torch.manual_seed(0)
model = GPT(ModelConfig(vocab_size=256, n_layer=2, n_head=2, n_embd=32, block_size=32))
x, y = torch.randint(0, 256, (2, 8, 32)).unbind(0)
with TensorCoreBF16():
    model(x, y).loss.backward()
torch.save(torch.cat([p.grad.flatten() for p in model.parameters()]), {out!r})
"""


def test_emulation_is_the_same_on_every_aten_kernel_path(tmp_path) -> None:
    """The point of the emulation: ATen's vectorized and scalar kernels give the same bf16
    gradients up to rare one-place rounding flips, where bf16 autocast's paths may differ."""
    grads = []
    for capability in ("default", torch.backends.cpu.get_cpu_capability().lower()):
        out = tmp_path / f"{capability}.pt"
        env = {**os.environ, "ATEN_CPU_CAPABILITY": capability, "OMP_NUM_THREADS": "1"}
        code = CHILD.format(out=str(out))
        subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, check=True)
        grads.append(torch.load(out))
    a, b = grads
    assert (a - b).norm() / b.norm() < 2e-3  # bf16's own error is ~5e-3 (the test above)


def test_a_rebound_f_linear_is_refused(monkeypatch) -> None:
    """ZeRO 3's memory-efficient linear rebinds F.linear process-wide; the emulation says so."""
    monkeypatch.setattr(F, "linear", lambda x, w, b=None: x @ w.T)
    with pytest.raises(RuntimeError, match="cannot see its GEMMs"):
        with TensorCoreBF16():
            pass
