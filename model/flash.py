"""Flash attention's bf16 numerics, forward and backward, computed in fp32 kernels.

Why: the one published mechanism of bf16 blow-ups in the paper's setting (Qiu & Yao 2025, "Why
Low-Precision Transformer Training Fails"; ../shared/reference/bf16.md) lives in flash
attention's backward. FA2 (Dao 2023, algorithms 1 and 2) computes delta = rowsum(dO * O) from the
stored bf16 output O. Where a few keys carry a row (ties at the row max: several unnormalised
probabilities P_bar exactly 1), O sits on or beside bf16 points, its rounding errors stop
averaging out, and with V and dO of a dominant sign delta errs the same way in most rows (the
tie case of tests/model/test_flash.py); so does dS = P * (dP - delta), which feeds W_Q's
gradient. Autograd through an fp32 softmax has an exact delta and cannot show this.

`FlashAttention` reproduces FA2 on bf16 inputs: fp32 scores from bf16 q and k; P_bar =
exp(S - rowmax) in fp32, its row sum l in fp32, P_bar rounded to bf16 before P_bar V (fp32
accumulation); O normalised by l in fp32, then rounded to bf16; the log-sum-exp (LSE) kept. The
backward reads dO in bf16, computes delta from the stored bf16 O, recomputes P = exp(S - LSE) in
fp32, and forms dV = bf16(P)^T dO, dP = dO V^T, dS = P * (dP - delta) rounded to bf16, then
dQ = dS K * scale and dK = dS^T Q * scale with fp32 accumulation; dQ, dK and dV are written out
in bf16, as FA2 writes them in the inputs' dtype.

Variants (the config key `bf16_flash`); a GPU's flash kernel (FlashAttention-2, and torch's SDPA
flash backend, which is FA2) is `fa2`, the default:
- `fa2`: as above.
- `fp32_delta`: Qiu & Yao's first fix: delta from the fp32 O (before its rounding to bf16).
- `dynamic_max`: their second fix: where more than one fp32 score lies within 1e-3 of a row's
  max m, the row is shifted by 2m (m > 0) or 0 (m < 0) instead of m, so no P_bar is exactly 1.
  Past m ~ 87 the largest P_bar, exp(-m), falls below fp32's normal range and loses precision;
  past m ~ 104 it is 0 and the row is NaN (their kernel clamps l at 1e-10 and returns 0).
- `all_bf16`: the reference code's pure-PyTorch kernel run in bf16 (`attention.py` of
  ucker/why-low-precision-training-fails): every intermediate (scores, their max, P_bar, row
  sums, O, LSE, delta, dS, dQ, dK) is rounded to bf16 after each operation. The aggressive bound.

Tiling (FA2 visits keys in blocks with a running max) is left out. In the backward it changes
only the order of fp32 accumulation, since P is recomputed from the final LSE. In the forward it
does more than fp32 rounding: a block seen before its row's max rounds exp(S - running max) to
bf16, not exp(S - max). Measured against 64-key blocks (tests/model/test_flash.py; T = 256,
hs = 64, causal, random inputs): 11% of O's entries move, by at most 0.88 of the bf16 error bound
and by 0.47 of the error (L2) both have against fp64; exact ties at the row max round alike, and
on the tie case delta's bias is unchanged (sign coherence -0.470 tiled, -0.473 untiled). Which
blocks a GPU uses depends on the kernel (FA2's forward walks them from the diagonal back, 64 or
128 keys by head size and GPU), so no one tiling is "the GPU's"; untiled is the row-max limit.
`all_bf16` matches the reference kernel, up to the order of fp32 accumulation, for up to its
512-key blocks (the proxy's context is 256); past that it also rounds its running row sum and O
between blocks.
"""

from typing import Any, NamedTuple, get_args

import torch

from model.config import FlashVariant

FLASH_VARIANTS: tuple[str, ...] = get_args(FlashVariant)
TIE_WINDOW = 1e-3  # dynamic_max: scores this close to the row max count as tied (Qiu & Yao)


def to_bf16(x: torch.Tensor) -> torch.Tensor:
    """x rounded to the nearest bf16 (ties to even), kept in x's dtype; no autograd."""
    return x.to(torch.bfloat16).to(x.dtype)


class FlashForward(NamedTuple):
    """What a flash forward stores: O in bf16, O in fp32 before that rounding, the LSE."""

    out: torch.Tensor
    out_fp32: torch.Tensor
    lse: torch.Tensor


def scores(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: float,
    is_causal: bool = False,
    attn_mask: torch.Tensor | None = None,
    rounded: bool = False,
) -> torch.Tensor:
    """(..., T, S) attention scores q.k * scale, fp32 (or `rounded` to bf16 after each op),
    masked positions -inf. Causal masks align at the top left, as SDPA's do."""
    s = q @ k.transpose(-2, -1)
    s = to_bf16(to_bf16(s) * scale) if rounded else s * scale
    if is_causal:
        T, S = s.shape[-2:]
        s = s.masked_fill(~torch.ones(T, S, dtype=torch.bool, device=s.device).tril(), -torch.inf)
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        s = s.masked_fill(~attn_mask, -torch.inf)
    elif attn_mask is not None:
        s = s + attn_mask
    return s


def dynamic_max(s: torch.Tensor) -> torch.Tensor:
    """Qiu & Yao's tie-avoiding row max of fp32 scores s (..., T, S): (..., T, 1)."""
    m = s.amax(dim=-1, keepdim=True)
    tied = (s >= m - TIE_WINDOW).sum(dim=-1, keepdim=True) > 1
    shifted = torch.where(m > 0, 2 * m, torch.where(m < 0, torch.zeros_like(m), m))
    return torch.where(tied, shifted, m)


def flash_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    variant: FlashVariant = "fa2",
    is_causal: bool = False,
    attn_mask: torch.Tensor | None = None,
    keep: torch.Tensor | None = None,
) -> FlashForward:
    """FA2's forward on bf16-valued q, k, v (..., T, hs); `keep`: dropout's scaled keep mask,
    applied to P_bar after its rounding (the row sum is taken before dropout, as FA2 does)."""
    rounded = variant == "all_bf16"
    s = scores(q, k, scale, is_causal, attn_mask, rounded)
    m = dynamic_max(s) if variant == "dynamic_max" else s.amax(dim=-1, keepdim=True)
    if rounded:  # each op's result in bf16, as the reference kernel computes in its input dtype
        p_bar = to_bf16(torch.exp(to_bf16(s - m)))
        row_sum = to_bf16(p_bar.sum(dim=-1, keepdim=True))
        p_v = to_bf16((p_bar if keep is None else to_bf16(p_bar * keep)) @ v)
        out = to_bf16(p_v / row_sum)
        return FlashForward(out, out, to_bf16(to_bf16(row_sum.log()) + m))
    p_bar = torch.exp(s - m)
    row_sum = p_bar.sum(dim=-1, keepdim=True)  # fp32, before P_bar's rounding
    p_bar = to_bf16(p_bar) if keep is None else to_bf16(p_bar) * keep
    out_fp32 = (p_bar @ v) / row_sum
    return FlashForward(to_bf16(out_fp32), out_fp32, m + row_sum.log())


def delta_rows(
    grad_out: torch.Tensor, forward: FlashForward, variant: FlashVariant = "fa2"
) -> torch.Tensor:
    """FA2's delta = rowsum(dO * O) (..., T, 1) from bf16 dO and the stored O (fp32 O under
    `fp32_delta`; under `all_bf16` the product and the sum are rounded too)."""
    if variant == "all_bf16":
        return to_bf16(to_bf16(grad_out * forward.out).sum(dim=-1, keepdim=True))
    out = forward.out_fp32 if variant == "fp32_delta" else forward.out
    return (grad_out * out).sum(dim=-1, keepdim=True)


class FlashAttention(torch.autograd.Function):
    """FA2's forward and backward in bf16 (module doc): apply(q, k, v, scale, variant,
    is_causal, attn_mask, keep) on bf16-valued fp32 tensors; returns O, bf16-valued."""

    @staticmethod
    def forward(
        ctx: Any,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        scale: float,
        variant: FlashVariant,
        is_causal: bool,
        attn_mask: torch.Tensor | None,
        keep: torch.Tensor | None,
    ) -> torch.Tensor:
        forward = flash_forward(q, k, v, scale, variant, is_causal, attn_mask, keep)
        ctx.save_for_backward(q, k, v, attn_mask, keep, *forward)
        ctx.scale, ctx.variant, ctx.is_causal = scale, variant, is_causal
        return forward.out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        q, k, v, attn_mask, keep, *stored = ctx.saved_tensors
        forward, scale, variant = FlashForward(*stored), ctx.scale, ctx.variant
        d_out = to_bf16(grad_out)
        delta = delta_rows(d_out, forward, variant)
        rounded = variant == "all_bf16"
        s = scores(q, k, scale, ctx.is_causal, attn_mask, rounded)
        if rounded:
            p = to_bf16(torch.exp(to_bf16(s - forward.lse)))
            p_kept = p if keep is None else to_bf16(p * keep)
            d_p = to_bf16(d_out @ v.transpose(-2, -1))
            d_p = d_p if keep is None else to_bf16(d_p * keep)
            d_s = to_bf16(to_bf16(p * scale) * to_bf16(d_p - delta))  # scale folded in
            grads = d_s @ k, d_s.transpose(-2, -1) @ q, p_kept.transpose(-2, -1) @ d_out
        else:
            p = torch.exp(s - forward.lse)  # fp32, from the LSE: no second softmax
            p_kept = to_bf16(p) if keep is None else to_bf16(p) * keep
            d_p = d_out @ v.transpose(-2, -1)
            d_p = d_p if keep is None else d_p * keep
            d_s = to_bf16(p * (d_p - delta))  # read in bf16 by the dQ and dK GEMMs
            grads = (d_s @ k) * scale, (d_s.transpose(-2, -1) @ q) * scale
            grads = (*grads, p_kept.transpose(-2, -1) @ d_out)
        return (*(to_bf16(g) for g in grads), None, None, None, None, None)


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    variant: FlashVariant = "fa2",
    is_causal: bool = False,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Flash attention of bf16-valued q, k, v (..., T, hs) as `variant` computes it."""
    keep = None
    if dropout_p > 0:  # one mask for the forward and the backward, as FA2's seeded RNG gives
        keep = (torch.rand(*q.shape[:-1], k.size(-2), device=q.device) >= dropout_p) / (
            1 - dropout_p
        )
    return FlashAttention.apply(q, k, v, scale, variant, is_causal, attn_mask, keep)


def tie_rows(s: torch.Tensor) -> torch.Tensor:
    """Rows of fp32 scores s (..., T, S) with two or more P_bar = exp(s - rowmax) that round to
    1 in bf16 (FA2's ties: scores equal to the max or within about 2^-9 of it): bool (..., T)."""
    p_bar = torch.exp(s - s.amax(dim=-1, keepdim=True))
    return (to_bf16(p_bar) == 1).sum(dim=-1) >= 2
