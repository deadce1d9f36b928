"""What a sweep's runs still to do will cost: FLOPs per run, then GPU-hours or CPU minutes.

With the sweep's `tokens_per_second` (per GPU, measured at the base config's model) the estimate
is GPU-seconds, scaled to each run's FLOPs per token; without one it is CPU seconds from the
CPU cost model below. `Cost.line` is the line `python -m launch.sweep` asks to confirm against.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

from configs.schema import TrainConfig

if TYPE_CHECKING:
    from launch.sweep import Run, Sweep

# CPU cost model: model FLOPs at a fixed rate, plus fixed costs per step, per run (imports,
# DeepSpeed init) and per checkpoint of a small model, fitted to one-thread runs of a small GPT
# (the fit, its machine and its runs: docs/launching.md). Wider models and batches use the cores
# better, so for them it is an upper bound.
CPU_FLOPS_PER_S, CPU_STEP_S, CPU_RUN_S, CPU_CHECKPOINT_S = 10e9, 0.02, 10.0, 0.5


@functools.lru_cache(maxsize=64)
def flops_per_token(model_json: str) -> float:
    """Training FLOPs per token (6N + attention) of `ModelConfig` JSON, as train.py's MFU."""
    import torch

    from model import GPT
    from model.config import ModelConfig

    with torch.device("meta"):  # no memory, no init time, even for gpt2-xl
        return GPT(ModelConfig.model_validate_json(model_json)).flops_per_token()


def run_work(config: TrainConfig, ranks: int, steps_done: int = 0) -> tuple[float, int, int]:
    """(training + eval FLOPs, steps, checkpoints) still to do in one run on `ranks` ranks."""
    t = config.train
    sequences = t.micro_batch_size * ranks * config.model.block_size
    steps = max(0, t.max_steps - steps_done)
    evals = steps // t.eval_interval + 1 if t.eval_interval else 1
    fpt = flops_per_token(config.model.model_dump_json())
    flops = steps * sequences * t.grad_accum_steps * fpt
    # evaluation: a forward only, over the global validation set
    flops += evals * config.data.eval_sequences * config.model.block_size * fpt / 3
    interval = config.checkpoint.interval
    return flops, steps, (steps // interval if interval else 0) + (steps_done == 0)


@dataclass
class Cost:
    """What the runs still to do will take."""

    flops: float
    seconds: dict[str, float]  # by run name: GPU-seconds (all ranks), or CPU seconds
    gpu: bool
    note: str

    def line(self, runs: list[Run], ranks: int) -> str:
        """The one line the user confirms against."""
        total, longest = sum(self.seconds.values()), max(self.seconds.values(), default=0)
        head = f"cost: {len(self.seconds)} of {len(runs)} runs to do, {self.flops:.2e} FLOPs"
        if not self.gpu:  # a bound: see CPU_FLOPS_PER_S
            return f"{head}, at most about {total / 60:,.1f} minutes {self.note}"
        hours = f"{total / 3600:,.1f} GPU-hours {self.note}"
        return f"{head}, {hours} (longest run {longest / 3600 / ranks:,.1f} h on {ranks} GPU(s))"


def estimate(runs: list[Run], sweep: Sweep, ranks: int = 1, cpu_flops: float = 0.0) -> Cost:
    """GPU-seconds at the sweep's per-GPU throughput (measured at the base config's model,
    scaled to each run's FLOPs per token); without one, CPU seconds from the CPU cost model."""
    speed, cpu_flops = sweep.tokens_per_second, cpu_flops or CPU_FLOPS_PER_S
    work = {r.name: run_work(r.config, ranks, r.steps_done) for r in runs if r.state != "done"}
    flops = sum(w[0] for w in work.values())
    if speed:
        base = sweep.base_config()
        rate = speed * flops_per_token(base.model.model_dump_json())
        note = f"at {speed:,.0f} tok/s per GPU for the base config"
        return Cost(flops, {n: w[0] / rate for n, w in work.items()}, True, note)
    seconds = {
        n: CPU_RUN_S + f / cpu_flops + steps * CPU_STEP_S + saves * CPU_CHECKPOINT_S
        for n, (f, steps, saves) in work.items()
    }
    note = f"on this CPU, in turn ({cpu_flops / 1e9:g} GFLOP/s, {CPU_STEP_S:g} s/step, "
    note += f"{CPU_RUN_S:g} s/run: a bound, wide models run faster; --cpu-gflops sets the rate)"
    return Cost(flops, seconds, False, note)
