"""Weight-decay telemetry, read on log steps only: norms by group and layer type, effective LR,
update-to-weight ratio, clipping, attention-logit and log Z readings.

Under ZeRO 3 a parameter's data lives in per-rank shards (`ds_tensor`); squares are summed over
the shards and all-reduced, so every stage reports the same norms.
"""

import math
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from optim.groups import layer_type, split_decay


def _local_tensors(model: nn.Module) -> list[tuple[str, torch.Tensor, bool]]:
    """(name, the locally held data, whether it is a shard) for every trainable parameter."""
    out = []
    for name, param in model.named_parameters():
        if hasattr(param, "ds_tensor"):
            out.append((name, param.ds_tensor.detach(), True))
        else:
            out.append((name, param.detach(), False))
    return out


class Telemetry:
    """Collects the study's per-group numbers on log steps; costs nothing on other steps."""

    def __init__(self, model: nn.Module, grad_clip: float, logits: bool = True):
        self.model = model
        self.logits = logits
        self.grad_clip = grad_clip
        self.decay_names = set(split_decay(model)[0])
        self._before: dict[str, torch.Tensor] | None = None
        self.steps = 0
        self.clipped = 0
        self.skipped = 0

    def count(self, applied: bool, clipped: bool) -> None:
        """Every step: counts for the clip fraction and skipped steps since the last log."""
        self.steps += 1
        self.clipped += int(clipped)
        self.skipped += int(not applied)

    def snapshot(self) -> None:
        """Before the update of a log step: remember the weights to measure the update."""
        self._before = {n: t.float().clone() for n, t, _ in _local_tensors(self.model)}

    def _buckets(self, name: str) -> tuple[str, str]:
        return ("decay" if name in self.decay_names else "no_decay"), layer_type(name)

    @torch.no_grad()
    def read(self, lr: float, grad_norm: float, output: Any | None) -> dict[str, Any]:
        """The telemetry fields of a metrics line (a host sync: log steps only)."""
        squares: dict[str, torch.Tensor] = {}
        updates: dict[str, torch.Tensor] = {}
        sharded = False
        for name, data, is_shard in _local_tensors(self.model):
            sharded |= is_shard
            sq = data.float().pow(2).sum()
            for key in self._buckets(name):
                squares[key] = squares.get(key, 0) + sq
                if self._before is not None:
                    delta = (data.float() - self._before[name]).pow(2).sum()
                    updates[key] = updates.get(key, 0) + delta
        keys = sorted(squares)
        stacked = torch.stack([squares[k] for k in keys] + [updates.get(k, torch.zeros(())) for k in keys])
        if sharded and dist.is_initialized():
            dist.all_reduce(stacked)
        values = stacked.sqrt().tolist()  # host sync
        norms, deltas = dict(zip(keys, values[: len(keys)])), dict(zip(keys, values[len(keys) :]))
        line: dict[str, Any] = {
            "param_norm": math.sqrt(sum(norms[k] ** 2 for k in ("decay", "no_decay") if k in norms))
        }
        for key, norm in norms.items():
            line[f"param_norm/{key}"] = norm
            if key in ("decay", "no_decay"):
                line[f"eff_lr/{key}"] = lr / norm if norm > 0 else math.nan
                if self._before is not None:
                    line[f"update_ratio/{key}"] = deltas[key] / norm if norm > 0 else math.nan
        clip = self.grad_clip
        line["grad_norm_clipped"] = min(grad_norm, clip) if clip > 0 else grad_norm
        line["clip_frac"] = self.clipped / max(1, self.steps)
        line["skipped_steps"] = self.skipped
        if output is not None and output.attn_logit_max is not None:
            per_layer = output.attn_logit_max.float().tolist()
            line["attn_logit_max"] = max(per_layer)
            line["attn_logit_max/layers"] = per_layer
        if output is not None and output.log_z is not None:
            line["log_z"] = float(output.log_z)
        self._before = None
        self.steps = self.clipped = self.skipped = 0
        return line
