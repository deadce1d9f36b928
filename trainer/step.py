"""What one training step and one evaluation do, apart from the loop that calls them.

Kept beside the trainer rather than inside it because the benchmarks (`bench/`) and the
telemetry tests time and check exactly these functions, with no run directory around them.
"""

from typing import Any

import torch

from monitor.telemetry import Telemetry
from optim.engine import StepScalars, UpdateGate


def train_step(engine, gate: UpdateGate, telemetry: Telemetry, batches, step: int, log_step: bool):
    """Forward and backward over the micro-batches, then one (gated) optimizer update.

    DeepSpeed wants `engine.step()` after every micro-batch and updates at the last one; the gate
    is armed with the step's mean loss just before that last call.
    """
    loss_sum, first_output = None, None
    for micro_step, (x, y) in enumerate(batches):
        output = engine(x, y, telemetry=log_step and micro_step == 0 and telemetry.logits_due(step))
        if micro_step == 0:
            first_output = output
        engine.backward(output.loss)
        loss = output.loss.detach()
        loss_sum = loss if loss_sum is None else loss_sum + loss
        if micro_step == len(batches) - 1:
            gate.begin(step, loss_sum / len(batches))
            if log_step:
                telemetry.snapshot()
        engine.step()
    scalars = gate.finish()
    telemetry.count(scalars.applied, scalars.clipped)
    return scalars, first_output


@torch.no_grad()
def evaluate(
    engine,
    batches: list[tuple[tuple[torch.Tensor, torch.Tensor], int]],
    num_sequences: int,
    device: torch.device,
) -> float:
    """Mean validation loss over the global set: each micro-batch's mean weighted by its real
    sequences (the rest is padding), summed over ranks, divided by the set's size."""
    engine.module.eval()
    total = torch.zeros((), device=device)
    for (x, y), sequences in batches:
        loss = engine(x, y).loss.float()  # every rank runs every forward (ZeRO-3 gathers)
        if sequences:  # padding only: its mean is 0/0
            total += loss * sequences
    engine.module.train()
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(total)
    return total.item() / num_sequences  # host sync


def metrics_line(
    step: int, tokens: int, lr: float, scalars: StepScalars, telemetry: dict[str, Any]
) -> dict[str, Any]:
    """One metrics.jsonl line of a log step: the gate's scalars, then the telemetry."""
    line = {"step": step, "tokens": tokens, "loss": scalars.loss, "lr": lr}
    return {**line, "grad_norm": scalars.grad_norm, **telemetry}
