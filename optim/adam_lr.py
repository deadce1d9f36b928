"""The paper's Adam effective learning rate: the mean over weights of lr / (sqrt(v) + eps).

`eff_lr/<group>` (lr / ||w||, in monitor.telemetry) is the rotation speed of the weights; this
one is the per-coordinate step Adam takes per unit of first moment, the quantity the paper
reports for Adam (reference/paper.md). Coordinates whose second moment is exactly zero never had
a gradient (ZeRO's alignment padding of its flat partitions, for one) and are left out, or
their lr / eps would swamp the mean.
"""

import math

import torch


@torch.no_grad()
def adam_effective_lr(optimizer: torch.optim.Optimizer) -> float:
    """Mean of lr / (sqrt(v) + eps) over every coordinate Adam has stepped, on all ranks.

    Works on the optimizer `optim.engine.initialize` returns, whatever the ZeRO stage: its
    state holds each rank's (flat, partitioned) `exp_avg_sq`, keyed by tensors that ZeRO 3
    swaps in and out of the param groups, so the state is read directly (every group has the
    same lr and eps: the schedule sets them all). The sums are all-reduced.
    """
    group = optimizer.param_groups[0]
    total = torch.zeros((), dtype=torch.float64)
    count = torch.zeros((), dtype=torch.float64)
    device = None
    for state in optimizer.state.values():
        v = state.get("exp_avg_sq")
        if v is None:
            continue
        device = v.device
        v = v[v > 0].double()
        total += (group["lr"] / (v.sqrt() + group["eps"])).sum().cpu()
        count += v.numel()
    if torch.distributed.is_initialized():
        both = torch.stack([total, count])
        if device is not None and device.type == "cuda":
            both = both.to(device)  # nccl reduces on the GPU
        torch.distributed.all_reduce(both)
        total, count = both.cpu()
    return float(total / count) if count > 0 else math.nan  # host sync
