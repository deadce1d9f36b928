"""Weight-decay telemetry, read on log steps only: norms by group and layer type (and, with
`per_layer`, by transformer block), effective LR, update-to-weight ratio, clipping,
attention-logit and log Z readings; for the slingshot watch, the output layer's norm
(`param_norm/output`, the tied wte/lm_head matrix), its growth per step, and the softmax-collapse
readings of the logits (`softmax_saturated`, `zero_sum_residual`).

Flash attention's bf16 mechanism (Qiu & Yao 2025; model/flash.py), on the steps of the logit
telemetry, per layer: `attn_tie_frac/layer{i}`, the fraction of rows with two or more P_bar
that round to 1 in bf16; `attn_delta_bias/layer{i}`, the mean signed error of FA2's delta
against an fp32 shadow, relative to mean |delta|, with `attn_delta_coherence/layer{i}` (+-1:
one-signed) and `attn_delta_bias_sum/layer{i}`, the running sum of the readings since this
process started (a resumed run starts it again; the readings themselves rebuild it); and
`attn_wq_norm/layer{i}`, `attn_wk_norm/layer{i}`: the spectral norm of each head's W_Q and W_K
(a list over heads). Cost: +137 ms on a log step of 1.31 s (10%) at the default config (4 layers,
4 heads, 128 wide, context 128, 16 sequences), one thread on 2 shared cores of an AVX2-only AMD
EPYC under load (docs/proxy_study/flash_backward.md); other steps pay nothing.

Under ZeRO 3 a parameter's data lives in per-rank shards (`ds_tensor`); squares are summed over
the shards and all-reduced, so every stage reports the same norms. The spectral norms need whole
matrices: each layer's c_attn weight is gathered in turn (a collective: every rank reads).
"""

import math
import re
from contextlib import nullcontext
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from optim.groups import layer_type


def _local_tensors(model: nn.Module) -> list[tuple[str, torch.Tensor, bool]]:
    """(name, the locally held data, whether it is a shard) for every trainable parameter."""
    out = []
    for name, param in model.named_parameters():
        if hasattr(param, "ds_tensor"):
            out.append((name, param.ds_tensor.detach(), True))
        else:
            out.append((name, param.detach(), False))
    return out


def _qk_spectral_norms(model: nn.Module) -> torch.Tensor | None:
    """(n_layer, 2, nh) spectral norms of each head's W_Q and W_K (None for a model without
    GPT's blocks); under ZeRO 3 each layer's c_attn weight is gathered while it is read."""
    blocks = getattr(getattr(model, "transformer", None), "h", None)
    if blocks is None:
        return None
    norms = []
    for block in blocks:
        weight = block.attn.c_attn.weight
        if hasattr(weight, "ds_tensor"):
            import deepspeed

            gathered = deepspeed.zero.GatheredParameters([weight])
        else:
            gathered = nullcontext()
        with gathered:
            norms.append(block.attn.qk_spectral_norms())
    return torch.stack(norms)


def _decay_names(model: nn.Module) -> set[str]:
    """The decay group of `optim.groups.split_decay` (every matrix and embedding). Once ZeRO 3
    has partitioned the model its parameters are empty placeholders, so this reads the full
    shape, `ds_shape`, where `split_decay` would read the placeholder's."""
    return {
        name
        for name, param in model.named_parameters()
        if param.requires_grad and len(getattr(param, "ds_shape", param.shape)) >= 2
    }


def _output_name(model: nn.Module) -> str | None:
    """The name under which the output layer's weight (lm_head, tied to wte) is listed."""
    head = getattr(model, "lm_head", None)
    for name, param in model.named_parameters():
        if head is not None and param is head.weight:
            return name
    return None


_BLOCK = re.compile(r"(?:^|\.)h\.(\d+)\.")


class Telemetry:
    """Collects the study's per-group numbers on log steps; costs nothing on other steps.

    Args:
        model: the engine's module (its parameters may be ZeRO-3 shards).
        grad_clip: the configured clip, for `grad_norm_clipped`.
        logits: run the logit telemetry forward (attention logits, log Z) on log steps.
        interval: with `logits`, only on log steps that are multiples of it; 0: every log step.
        per_layer: also report norms and update ratios per transformer block (`layer{i}`).
    """

    def __init__(
        self,
        model: nn.Module,
        grad_clip: float,
        logits: bool = True,
        interval: int = 0,
        per_layer: bool = False,
    ):
        self.model = model
        self.logits = logits
        self.interval = interval
        self.per_layer = per_layer
        self.grad_clip = grad_clip
        self.decay_names = _decay_names(model)
        self.output_name = _output_name(model)
        self._output_norm: float | None = None  # at the previous reading, for its growth rate
        self._delta_bias_sum: dict[int, float] = {}  # per layer, over the readings so far
        self._before: dict[str, torch.Tensor] | None = None
        self.steps = 0
        self.clipped = 0
        self.skipped = 0

    def count(self, applied: bool, clipped: bool) -> None:
        """Every step: counts for the clip fraction and skipped steps since the last log."""
        self.steps += 1
        self.clipped += int(clipped)
        self.skipped += int(not applied)

    def logits_due(self, step: int) -> bool:
        """Whether the log step `step` also runs the logit telemetry forward."""
        return self.logits and (self.interval == 0 or step % self.interval == 0)

    def snapshot(self) -> None:
        """Before the update of a log step: remember the weights to measure the update."""
        self._before = {n: t.float().clone() for n, t, _ in _local_tensors(self.model)}

    def _buckets(self, name: str) -> tuple[str, ...]:
        """The norm buckets of a parameter: its decay group, its layer type, maybe its block."""
        buckets = ("decay" if name in self.decay_names else "no_decay"), layer_type(name)
        if name == self.output_name:  # the slingshot watch's norm
            buckets = (*buckets, "output")
        block = _BLOCK.search(name) if self.per_layer else None
        return buckets if block is None else (*buckets, f"layer{block.group(1)}")

    @torch.no_grad()
    def read(self, lr: float, grad_norm: float, output: Any | None) -> dict[str, Any]:
        """The telemetry fields of a metrics line (a host sync: log steps only)."""
        squares: dict[str, torch.Tensor] = {}
        updates: dict[str, torch.Tensor] = {}
        sharded = False
        for name, data, is_shard in _local_tensors(self.model):
            sharded |= is_shard
            # fused norms, no temporaries: this runs on every log step
            sq = torch.linalg.vector_norm(data, dtype=torch.float32).square()
            delta = None
            if self._before is not None:  # the snapshot is ours and read once: subtract in place
                delta = torch.linalg.vector_norm(self._before[name].sub_(data)).square()
            for key in self._buckets(name):
                squares[key] = squares.get(key, 0) + sq
                if delta is not None:
                    updates[key] = updates.get(key, 0) + delta
        keys = sorted(squares)
        zero = squares[keys[0]].new_zeros(())  # no update measured (no snapshot this step)
        stacked = torch.stack([squares[k] for k in keys] + [updates.get(k, zero) for k in keys])
        if sharded and dist.is_initialized():
            dist.all_reduce(stacked)
        # the logit readings ride along, so a log step reads everything in one transfer
        attn = output.attn_logit_max if output is not None else None
        log_z = output.log_z if output is not None else None
        collapse = output.softmax_collapse if output is not None else None
        flash = output.attn_flash if output is not None else None
        qk_norms = _qk_spectral_norms(self.model) if attn is not None else None
        parts = [stacked.sqrt()] + [
            t.detach().float().reshape(-1)
            for t in (attn, log_z, collapse, flash, qk_norms)
            if t is not None
        ]
        values = torch.cat([p.to(stacked.device) for p in parts]).tolist()  # host sync
        norms = dict(zip(keys, values[: len(keys)], strict=True))
        deltas = dict(zip(keys, values[len(keys) : 2 * len(keys)], strict=True))
        readings = values[2 * len(keys) :]
        line: dict[str, Any] = {
            "param_norm": math.sqrt(sum(norms[k] ** 2 for k in ("decay", "no_decay") if k in norms))
        }
        for key, norm in norms.items():
            line[f"param_norm/{key}"] = norm
            if key in ("decay", "no_decay"):
                line[f"eff_lr/{key}"] = lr / norm if norm > 0 else math.nan
            if self._before is not None:  # |w_after - w_before| / |w_after|
                line[f"update_ratio/{key}"] = deltas[key] / norm if norm > 0 else math.nan
        clip = self.grad_clip
        line["grad_norm_clipped"] = min(grad_norm, clip) if clip > 0 else grad_norm
        line["clip_frac"] = self.clipped / max(1, self.steps)
        line["skipped_steps"] = self.skipped
        if attn is not None:
            per_layer, readings = readings[: attn.numel()], readings[attn.numel() :]
            line["attn_logit_max"] = max(per_layer)
            line["attn_logit_max/layers"] = per_layer
        if log_z is not None:
            line["log_z"], readings = readings[0], readings[1:]
        if collapse is not None:
            line["softmax_saturated"], readings = readings[0], readings[1:]
            line["zero_sum_residual"], readings = readings[0], readings[1:]
        if flash is not None:
            line.update(self._flash_readings(readings[: flash.numel()]))
            readings = readings[flash.numel() :]
        if qk_norms is not None:
            heads = qk_norms.size(-1)
            for layer in range(qk_norms.size(0)):
                at = 2 * heads * layer
                line[f"attn_wq_norm/layer{layer}"] = readings[at : at + heads]
                line[f"attn_wk_norm/layer{layer}"] = readings[at + heads : at + 2 * heads]
        if "output" in norms:
            line.update(self._output_growth(norms["output"]))
        self._before = None
        self.steps = self.clipped = self.skipped = 0
        return line

    def _flash_readings(self, values: list[float]) -> dict[str, float]:
        """The per-layer tie and delta keys from (tie fraction, delta bias, coherence) triples."""
        line = {}
        for layer in range(len(values) // 3):
            tie, bias, coherence = values[3 * layer : 3 * layer + 3]
            line[f"attn_tie_frac/layer{layer}"] = tie
            line[f"attn_delta_bias/layer{layer}"] = bias
            line[f"attn_delta_coherence/layer{layer}"] = coherence
            if math.isfinite(bias):  # NaN: this forward had no backward
                self._delta_bias_sum[layer] = self._delta_bias_sum.get(layer, 0.0) + bias
            line[f"attn_delta_bias_sum/layer{layer}"] = self._delta_bias_sum.get(layer, 0.0)
        return line

    def _output_growth(self, norm: float) -> dict[str, float]:
        """The output layer's relative norm growth per step since the previous reading."""
        previous, self._output_norm = self._output_norm, norm
        if previous is None or previous <= 0 or self.steps == 0:
            return {}
        return {"output_norm_growth": (norm / previous - 1) / self.steps}
