"""The paper's Adam effective learning rate: the mean over weights of lr / (sqrt(v) + eps).

`eff_lr/<group>` (lr / ||w||, in monitor.telemetry) is the rotation speed of the weights; this
one is the per-coordinate step Adam takes per unit of first moment, the quantity the paper
reports for Adam (reference/paper.md). Coordinates whose second moment is exactly zero never had
a gradient (ZeRO's alignment padding of its flat partitions, for one) and are left out, or
their lr / eps would swamp the mean.

The median comes beside the mean: embedding rows that are rarely updated keep a tiny v and a
rate near lr / eps, and a few of them move the mean far more than the typical coordinate's.
"""

import math

import torch

# Coordinates reduced at a time: the temporaries of one chunk stay at a few 64 MB fp32 buffers
# whatever the tensor (GPT-2's embedding alone is 39M coordinates).
CHUNK = 1 << 24
# The median is read off a histogram of log10(rate), so that it all-reduces like the sums:
# 1e-12 to 1e4 in bins of 1/100 decade (2.3% wide); rates outside land in the end bins.
LOG_LOW, LOG_HIGH, BINS = -12.0, 4.0, 1600


@torch.no_grad()
def adam_effective_lr(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """`adam_eff_lr`, the mean of lr / (sqrt(v) + eps) over every coordinate Adam has stepped,
    on all ranks, and `adam_eff_lr_median`, its median to within a bin (2.3%); NaN before
    Adam's first step.

    Works on the optimizer `optim.engine.initialize` returns, whatever the ZeRO stage: its
    state holds each rank's (flat, partitioned) `exp_avg_sq`, keyed by tensors that ZeRO 3
    swaps in and out of the param groups, so the state is read directly (every group has the
    same lr and eps: the schedule sets them all). Sums and histogram stay on the device and are
    all-reduced together: one host read.
    """
    group = optimizer.param_groups[0]
    lr, eps = group["lr"], group["eps"]
    moments = [s["exp_avg_sq"] for s in optimizer.state.values() if "exp_avg_sq" in s]
    device = moments[0].device if moments else torch.device("cpu")
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # sum of rates, their count
    hist = torch.zeros(BINS, dtype=torch.float64, device=device)
    for v in moments:
        for chunk in v.detach().flatten().split(CHUNK):
            stepped = chunk > 0
            rate = torch.where(stepped, lr / (chunk.float().sqrt() + eps), 0.0)
            sums[0] += rate.sum(dtype=torch.float64)
            sums[1] += stepped.sum()
            logs = torch.where(stepped, rate.log10().clamp(LOG_LOW, LOG_HIGH), math.nan)
            hist += torch.histc(logs, BINS, LOG_LOW, LOG_HIGH).double()  # NaN not counted
    both = torch.cat([sums, hist])
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(both)  # nccl reduces on the GPU, where the state lives
    both = both.cpu()  # host sync
    total, count, hist = both[0].item(), both[1].item(), both[2:]
    if count == 0:
        return {"adam_eff_lr": math.nan, "adam_eff_lr_median": math.nan}
    return {"adam_eff_lr": total / count, "adam_eff_lr_median": _median(hist, count)}


def _median(hist: torch.Tensor, count: float) -> float:
    """The rate at the middle of the bin where the histogram's cumulative count reaches half."""
    middle = int(torch.searchsorted(hist.cumsum(0), torch.tensor(count / 2, dtype=hist.dtype)))
    width = (LOG_HIGH - LOG_LOW) / BINS
    return 10 ** (LOG_LOW + (middle + 0.5) * width)
