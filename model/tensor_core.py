"""GPU bf16 arithmetic on any CPU: tensor-core matmuls emulated with fp32 kernels.

`bf16_kernels: emulated` (with `precision: bf16`) runs the model's forward under
`TensorCoreBF16` instead of the CPU's bf16 autocast. Why: a CPU's own bf16 kernels differ from
machine to machine (AVX2 converts and accumulates in fp32, AVX-512 BF16 and AMX take dot
products in hardware, ATen's elementwise kernels round at other places), and one seed on two
such paths differed by 0.3 nat (issue 11), more than the effects under study. A GPU under bf16
autocast does one thing: each matmul reads bf16 operands, accumulates their exact products in
fp32 and rounds the result to bf16; softmax, norms and the loss stay in fp32; flash attention
rounds the probabilities to bf16 before multiplying them by the values. Rounding the operands
and results of fp32 kernels reproduces that on every CPU: a product of two bf16 numbers is exact
in fp32, so only the order of accumulation differs from a GPU's. Gradients are rounded where a
GPU's backward matmuls read them in bf16.

The mode intercepts the two ops through which GPT multiplies activations: `F.linear` (every
projection and the LM head) and `F.scaled_dot_product_attention` (as flash attention computes
it, forward and backward: model/flash.py, in the variant the config key `bf16_flash` names).
Everything else runs in fp32, as it would under a GPU's autocast; the weights, the gradients
handed to the optimizer and Adam's state stay fp32.
"""

import math
from functools import partial
from typing import Any

import torch
import torch.nn as nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from model.flash import FlashVariant, flash_attention, to_bf16


class _RoundBF16(torch.autograd.Function):
    """x rounded to the nearest bf16 (ties to even), kept in x's dtype; the gradient likewise."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return to_bf16(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return to_bf16(grad)


def round_bf16(x: torch.Tensor) -> torch.Tensor:
    """Round to bf16 in the forward and the backward pass (a GPU's bf16 operand or result)."""
    return _RoundBF16.apply(x)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None):
    """A tensor-core GEMM: bf16 operands, fp32 accumulation, the bias added in fp32, bf16 out."""
    b = None if bias is None else round_bf16(bias)
    return round_bf16(F.linear(round_bf16(x), round_bf16(weight), b))


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    flash: FlashVariant = "fa2",
) -> torch.Tensor:
    """SDPA as flash attention computes it in bf16, forward and backward (model/flash.py)."""
    if enable_gqa:
        raise ValueError("the tensor-core emulation has no grouped-query attention")
    q, k, v = round_bf16(q), round_bf16(k), round_bf16(v)
    scale = 1.0 / math.sqrt(q.size(-1)) if scale is None else scale
    return flash_attention(q, k, v, scale, flash, is_causal, attn_mask, dropout_p)


class TensorCoreBF16(TorchFunctionMode):
    """While active, `F.linear` and SDPA compute as a GPU's bf16 tensor cores do (module doc).

    Args:
        flash: the flash attention variant (model/flash.py); `fa2` is a GPU's.
    """

    def __init__(self, flash: FlashVariant = "fa2") -> None:
        super().__init__()
        # torch's own kernels, whatever F.linear has been rebound to since
        self.ops = {
            torch._C._nn.linear: linear,
            torch._C._nn.scaled_dot_product_attention: partial(attention, flash=flash),
        }

    def __enter__(self) -> "TensorCoreBF16":
        if F.linear is not torch._C._nn.linear:
            # DeepSpeed ZeRO 3's memory-efficient linear rebinds F.linear for the whole process
            # to an autograd function whose GEMMs the mode cannot round
            raise RuntimeError(
                f"F.linear is {F.linear.__qualname__}, not torch's: the tensor-core emulation "
                "cannot see its GEMMs (a ZeRO 3 engine with memory_efficient_linear was built "
                "in this process); build emulated engines in a fresh process"
            )
        return super().__enter__()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        # the mode is off inside this method, so the fp32 kernels below are not intercepted again
        return self.ops.get(func, func)(*args, **(kwargs or {}))


def emulate_tensor_cores(module: nn.Module, flash: FlashVariant = "fa2") -> None:
    """Every forward of `module` from now on runs under `TensorCoreBF16(flash)` (hooks: state
    dicts, parameter names and DeepSpeed's own hooks are unchanged)."""
    mode = TensorCoreBF16(flash)

    def enter(*_: Any) -> None:  # a pre-hook that returned the mode would replace the inputs
        mode.__enter__()

    def leave(*_: Any) -> None:
        mode.__exit__(None, None, None)

    module.register_forward_pre_hook(enter)
    module.register_forward_hook(leave, always_call=True)
