"""Which parameters decay, and which layer type each parameter belongs to (for telemetry)."""

from typing import Any

import torch
from torch import nn

GROUP_NAMES = ("decay", "no_decay")


def layer_type(name: str) -> str:
    """The telemetry bucket of a GPT-2 parameter name: attn, mlp, embed or norm."""
    if ".attn." in name and ("_ln" not in name):
        return "attn"
    if ".mlp." in name:
        return "mlp"
    if name.endswith(("wte.weight", "wpe.weight", "lm_head.weight")):
        return "embed"
    return "norm"


def split_decay(model: nn.Module) -> tuple[list[str], list[str]]:
    """Names of decayed parameters (every matrix and embedding) and the rest (gains, biases).

    Tied parameters appear once, under their first name, as `named_parameters` yields them.
    """
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(name)
    return decay, no_decay


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """The two optimizer groups, in `GROUP_NAMES` order; both optimizer kinds use the same ones."""
    params = dict(model.named_parameters())
    decay, no_decay = split_decay(model)
    return [
        {"params": [params[n] for n in decay], "weight_decay": weight_decay, "name": "decay"},
        {"params": [params[n] for n in no_decay], "weight_decay": 0.0, "name": "no_decay"},
    ]


@torch.no_grad()
def norms_by_bucket(model: nn.Module) -> dict[str, torch.Tensor]:
    """Squared L2 norms of the parameters by decay group and by layer type, as 0-dim tensors.

    Squares, so that ranks holding ZeRO-3 shards can sum them before the square root.
    """
    decay, _ = split_decay(model)
    decay = set(decay)
    sums: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters():
        sq = param.detach().float().pow(2).sum()
        for key in ("decay" if name in decay else "no_decay", layer_type(name)):
            sums[key] = sums[key] + sq if key in sums else sq
    return sums
