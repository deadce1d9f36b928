"""Train the tiny GPT with every decay form on ZeRO 0-3 in one process group; rank 0 saves the
losses, rule-firing fractions and final fp32 weights of each to the file named on the command
line. Run alone (one rank) or under torchrun: one launch covers every stage and form.

    python -m tests.optim.zero_forms OUT.pt
    python -m torch.distributed.run --standalone --nproc-per-node 2 -m tests.optim.zero_forms OUT.pt
"""

import sys

import torch
import torch.distributed as dist

from configs import load_config
from launch.distributed import close_distributed, init_distributed
from model import GPT
from optim.engine import UpdateGate, initialize, set_lr
from optim.forms import form_metrics, mark_start
from optim.schedule import lr_at
from tests.helpers import tiny_overrides

STEPS = 8
GLOBAL_BATCH = 4
# (optim.name, weight decay): the new forms (adam_l2_loss: adam_l2 with l2_form=loss), then the
# plain ones they are compared with
RUNS = [
    ("adamw_indep", 0.1),
    ("adamp", 0.1),
    ("adam_spd", 0.5),
    ("adam_l2_loss", 0.05),
    ("adamw", 0.1),
    ("adam_l2", 0.0),
]
STAGED = ("adamw_indep", "adamp", "adam_spd", "adam_l2_loss")
STAGES = (0, 1, 2, 3)
# A delta above the paper's 0.1, so that on this small GPT some tensors are projected and some not
ADAMP_DELTA = 3.0


def batches(vocab: int, block: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    shape = (GLOBAL_BATCH, block)
    return [
        (
            torch.randint(0, vocab, shape, generator=gen),
            torch.randint(0, vocab, shape, generator=gen),
        )
        for _ in range(STEPS)
    ]


def config(name: str, weight_decay: float, stage: int, world_size: int):
    overrides = {
        "zero_stage": stage,
        "precision": "fp32",
        "train.micro_batch_size": GLOBAL_BATCH // world_size,
        "train.max_steps": STEPS,
        "optim.lr": 1e-2,
        "optim.min_lr": 1e-3,
        "optim.warmup_steps": 3,
        "optim.grad_clip": 0.0,  # DeepSpeed's and torch's clip factors differ by an ulp
        "optim.weight_decay": weight_decay,
        "optim.adamp_delta": ADAMP_DELTA,
        "optim.name": {"adam_spd": "adamw", "adam_l2_loss": "adam_l2"}.get(name, name),
        "optim.l2_form": "loss" if name == "adam_l2_loss" else "grad",
    }
    cfg = load_config(None, tiny_overrides(**overrides))
    if name == "adam_spd":  # theta_0 is set here from the initial weights, not from init_from
        cfg = cfg.model_copy(update={"optim": cfg.optim.model_copy(update={"name": name})})
    return cfg


def train(name: str, weight_decay: float, stage: int, env) -> dict:
    cfg = config(name, weight_decay, stage, env.world_size)
    torch.manual_seed(cfg.run.seed)
    engine, optimizer = initialize(GPT(cfg.model), cfg, env.world_size, env.device)
    gate = UpdateGate(engine, optimizer, cfg)
    mark_start(optimizer)
    share = GLOBAL_BATCH // env.world_size
    losses, fired = [], []
    for step, (x, y) in enumerate(batches(cfg.model.vocab_size, cfg.model.block_size)):
        rows = slice(env.rank * share, (env.rank + 1) * share)
        set_lr(engine.optimizer, lr_at(step, cfg.optim, STEPS))
        loss = engine(x[rows], y[rows]).loss
        engine.backward(loss)
        gate.begin(step, loss.detach())
        engine.step()
        losses.append(gate.finish().loss)
        fired.append(form_metrics(optimizer))
    return {"losses": losses, "fired": fired, "weights": full_weights(engine, stage)}


def full_weights(engine, stage: int) -> dict[str, torch.Tensor]:
    params = dict(engine.module.named_parameters())
    if stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(params.values())):
            return {n: p.detach().clone() for n, p in params.items()}
    return {n: p.detach().clone() for n, p in params.items()}


def main(out: str) -> None:
    env = init_distributed("cpu")
    results = {}
    for name, weight_decay in RUNS:
        for stage in STAGES if name in STAGED else (0,):
            results[name, stage] = train(name, weight_decay, stage, env)
    if env.rank == 0:
        torch.save({"world_size": env.world_size, "results": results}, out)
    if dist.is_initialized():
        dist.barrier()
    close_distributed()


if __name__ == "__main__":
    main(sys.argv[1])
