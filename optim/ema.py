"""An exponential moving average of the weights, evaluated beside them (the paper's `loss_ema`).

Why it is kept where the step writes: on ZeRO 0-2 every rank holds the whole updated model after
each step, so the EMA is a whole copy, the same on every rank. On ZeRO 3 a rank holds only its
partition (`ds_tensor`) of each parameter, updated in place by the step, so the EMA is kept of
that partition: sharded like the weights, and elementwise, so the same numbers on any world size.
Evaluating the EMA is copying it into those tensors and back, in place (ZeRO 1-2's parameters are
views into flat buffers; ZeRO 3 gathers a parameter from its `ds_tensor` at use, except its
persistent small ones, kept gathered, whose whole data is swapped too). Checkpoints hold the
whole EMA (`state_dict` gathers the partitions), so a resume may change the world size.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


def _held(param: nn.Parameter) -> torch.Tensor:
    """What this rank holds of `param` and the step updates: ZeRO 3's partition, or the whole."""
    return param.ds_tensor if hasattr(param, "ds_tensor") else param


def _gathered(param: nn.Parameter) -> bool:
    """A ZeRO 3 parameter kept whole between uses (persistent): its data is swapped as well."""
    return hasattr(param, "ds_tensor") and param.data.numel() == param.ds_numel


class WeightEMA:
    """ema <- decay * ema + (1 - decay) * w after every step, starting from the initial weights."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.held = [_held(p) for p in self.params]
        self.shadow = [h.detach().float().clone() for h in self.held]

    @torch.no_grad()
    def update(self) -> None:
        """Fold in the weights after this step's update (applied or not: every step counts)."""
        torch._foreach_lerp_(self.shadow, [h.detach().float() for h in self.held], 1 - self.decay)

    @contextmanager
    @torch.no_grad()
    def swapped_in(self) -> Iterator[None]:
        """The model holds the EMA weights inside the block, its own ones again after it."""
        targets = list(self.held)
        values = list(self.shadow)
        for p, h, e in zip(self.params, self.held, self.shadow, strict=True):
            if _gathered(p):
                targets.append(p.data)
                values.append(self._whole(p, h, e))
        saved = [t.clone() for t in targets]
        for t, v in zip(targets, values, strict=True):
            t.copy_(v)
        try:
            yield
        finally:
            for t, v in zip(targets, saved, strict=True):
                t.copy_(v)

    def state_dict(self) -> dict[str, Any]:
        """The whole EMA, by parameter; collective on ZeRO 3 (every rank must call it)."""
        triples = zip(self.params, self.held, self.shadow, strict=True)
        shadow = [self._whole(p, h, e) for p, h, e in triples]
        return {"decay": self.decay, "shadow": shadow}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """`None`: the checkpoint has no EMA (made without one); it restarts from the weights."""
        for i, (p, h, e) in enumerate(zip(self.params, self.held, self.shadow, strict=True)):
            if state is None:
                e.copy_(h)
            elif h is p:
                e.copy_(state["shadow"][i])
            else:  # this rank's partition: ZeRO 3 pads the flattened tensor to equal parts
                group = p.ds_process_group
                start = dist.get_rank(group) * e.numel()
                whole = state["shadow"][i].reshape(-1)[start : start + e.numel()]
                e.zero_()[: whole.numel()].copy_(whole)

    @staticmethod
    def _whole(param: nn.Parameter, held: torch.Tensor, ema: torch.Tensor) -> torch.Tensor:
        if held is param:
            return ema
        group = param.ds_process_group
        parts = [torch.empty_like(ema) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, ema, group=group)
        return torch.cat(parts)[: param.ds_numel].view(param.ds_shape)
