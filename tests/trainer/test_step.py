"""Host syncs of one training step: every tensor-to-host read of `trainer.step.train_step` on
the real engine and gate, counted by who makes it (`bench.syncs`)."""

import pytest
import torch

from bench.syncs import by_owner, counted_reads, table
from configs import load_config
from model import GPT
from monitor.telemetry import Telemetry
from optim import engine as engine_module
from optim.engine import UpdateGate, initialize
from tests.helpers import tiny_overrides
from trainer.step import train_step


@pytest.mark.parametrize("accum", [1, 2])
@pytest.mark.parametrize("stage", [0, 1, 2])
def test_a_non_log_step_makes_one_host_sync_of_its_own(dist_env, monkeypatch, stage, accum):
    """The harness's own reads on a non-log step: 1, the gate's (the step's loss and grad norm
    in one `tolist`), for any number of micro-batches.

    The optimizer is built as on a GPU (torch's fused Adam: its step counters stay on the
    device, so torch.optim reads none; the CPU's `foreach` path reads each CPU-resident
    counter, which is no device sync). What DeepSpeed reads, on ZeRO 1 and 2 (none on ZeRO 0):
    - `is_invalid_grad_norm(scaled_global_grad_norm)` in `DeepSpeedZeroOptimizer.step`: its
      overflow check, made when the optimizer's dtype is not bf16 (ours is fp32 master weights);
    - `is_invalid_grad_norm(clip_norm)` in `unscale_and_clip_grads`, once per parameter group
      (2), when `gradient_clipping` > 0.
    ZeRO 0 on one rank avoids all three (the gate clips there). Not counted here, on a GPU only:
    the loader's blocking host-to-device copies (one per micro-batch input and target) and
    DeepSpeed's throughput timer's `cuda.synchronize()` per forward and step, which the
    generated config turns off.
    """
    real_choice = engine_module.adam_choice
    monkeypatch.setattr(engine_module, "adam_choice", lambda o, device: real_choice(o, "cuda"))
    cfg = load_config(None, tiny_overrides(zero_stage=stage, **{"train.grad_accum_steps": accum}))
    torch.manual_seed(cfg.run.seed)
    engine, optimizer = initialize(GPT(cfg.model), cfg, 1, dist_env.device)
    gate = UpdateGate(engine, optimizer, cfg)
    telemetry = Telemetry(engine.module, cfg.optim.grad_clip)
    gen = torch.Generator().manual_seed(0)

    def batches():
        shape = (2 * accum, cfg.train.micro_batch_size, cfg.model.block_size)
        tokens = torch.randint(0, cfg.model.vocab_size, shape, generator=gen)
        return list(zip(tokens[::2], tokens[1::2], strict=True))

    train_step(engine, gate, telemetry, batches(), 1, log_step=False)  # first-step set-up
    step_batches = batches()
    with counted_reads() as counts:
        scalars, _ = train_step(engine, gate, telemetry, step_batches, 2, log_step=False)
    assert scalars.applied
    print(f"\nhost reads of a non-log step, ZeRO {stage}, {accum} micro-batch(es):")
    print(table(counts))
    harness = [(name, where.split()[-1]) for owner, name, where in counts if owner == "harness"]
    assert harness == [("tolist", "_decide")]  # the gate's read: the step's loss and grad norm
    assert by_owner(counts) == {"deepspeed": 0 if stage == 0 else 3, "torch": 0, "harness": 1}


def test_log_steps_and_evaluation_do_not_recompile(dist_env):
    """Compiled (dynamo's eager backend: the graphs without the CPU compiler), a run settles on
    three graphs: the training forward, the log step's telemetry forward, and evaluation under
    no_grad. A second round of the same steps compiles nothing and breaks no graph."""
    from torch._dynamo.utils import counters

    from trainer.step import evaluate

    torch._dynamo.reset()
    counters.clear()
    cfg = load_config(None, tiny_overrides(zero_stage=0))
    torch.manual_seed(cfg.run.seed)
    engine, optimizer = initialize(GPT(cfg.model), cfg, 1, dist_env.device)
    engine.compile(backend="eager")
    gate = UpdateGate(engine, optimizer, cfg)
    telemetry = Telemetry(engine.module, cfg.optim.grad_clip)
    gen = torch.Generator().manual_seed(0)

    def batch():
        shape = (2, cfg.train.micro_batch_size, cfg.model.block_size)
        x, y = torch.randint(0, cfg.model.vocab_size, shape, generator=gen)
        return x, y

    def one_round(step: int) -> None:
        train_step(engine, gate, telemetry, [batch()], step, log_step=False)
        scalars, output = train_step(engine, gate, telemetry, [batch()], step + 1, log_step=True)
        telemetry.read(1e-3, scalars.grad_norm, output)
        evaluate(engine, [(batch(), cfg.train.micro_batch_size)], 4, dist_env.device)

    one_round(1)
    compiled = counters["stats"]["unique_graphs"], counters["frames"]["total"]
    one_round(3)
    assert counters["stats"]["unique_graphs"] == compiled[0] == 3
    assert counters["frames"]["total"] == compiled[1]
    assert not counters["graph_break"]
    torch._dynamo.reset()
