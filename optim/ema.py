"""An exponential moving average of the weights, evaluated beside them (the paper's `loss_ema`).

Why a full copy and ZeRO 0-2 only: on those stages every rank holds the whole updated model
after each step, so the EMA is the same on every rank and world size, and evaluating it is
copying it into the model's parameters and back (in place: ZeRO 1-2's parameters are views
into flat buffers). ZeRO 3 holds only shards, and parameters below its persistence threshold
stay gathered outside DeepSpeed's control; the config refuses that combination.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


class WeightEMA:
    """ema <- decay * ema + (1 - decay) * w after every step, starting from the initial weights."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.shadow = [p.detach().float().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        """Fold in the weights after this step's update (applied or not: every step counts)."""
        weights = [p.detach().float() for p in self.params]
        torch._foreach_lerp_(self.shadow, weights, 1.0 - self.decay)

    @contextmanager
    @torch.no_grad()
    def swapped_in(self) -> Iterator[None]:
        """The model holds the EMA weights inside the block, its own ones again after it."""
        saved = [p.detach().clone() for p in self.params]
        for p, e in zip(self.params, self.shadow, strict=True):
            p.copy_(e)
        try:
            yield
        finally:
            for p, s in zip(self.params, saved, strict=True):
                p.copy_(s)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "shadow": self.shadow}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """`None`: the checkpoint has no EMA (made without one); it restarts from the weights."""
        source = [p.detach().float() for p in self.params] if state is None else state["shadow"]
        for e, s in zip(self.shadow, source, strict=True):
            e.copy_(s)
