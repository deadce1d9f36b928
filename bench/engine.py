"""Training-step throughput of our engine against plain torch, measured in one process.

    python -m bench.engine                          # the default config's model, on the CPU
    python -m bench.engine --precision bf16 --compile --model gpt2   # on a GPU, with MFU
    python -m bench.engine --sweep configs/sweeps/stream_wd.yaml     # a sweep's proxy model

The reference is the step a torch user writes by hand: the same `model.GPT`, the same parameter
groups, `torch.optim.AdamW` (`foreach` on a CPU, `fused` on a GPU, as the harness's),
`clip_grad_norm_`, bf16 through `torch.autocast`. Ours is `optim.engine.initialize` (DeepSpeed,
ZeRO stage of the config) plus the `UpdateGate`, driven by `trainer.step.train_step`, the
function the training loop calls. Both train on the same fixed batch from the same initial
weights. After warmup the two are timed in alternating rounds (ABBA order), so drift in the
machine's speed (other processes, frequency scaling) falls on both alike.
"""

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from configs import load_config
from configs.schema import TrainConfig
from launch.distributed import init_distributed
from model import GPT
from monitor.divergence import DivergenceWatch
from monitor.perf import math_mode, mfu, peak_flops, set_tf32
from monitor.telemetry import Telemetry
from optim.engine import UpdateGate, initialize, set_lr
from optim.groups import param_groups
from trainer.step import train_step

# --model tiny: a quick smoke run; default: the model of configs/default.yaml; the GPT-2 sizes
# (at their 1024-token context) for a GPU.
TINY = {
    "model.n_layer": 2,
    "model.n_head": 2,
    "model.n_embd": 64,
    "model.block_size": 64,
    "train.micro_batch_size": 8,
}
PRESETS = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
LR = 1e-4  # small and constant: the measured steps stay far from any instability


def bench_config(args: argparse.Namespace) -> TrainConfig:
    overrides = {
        "precision": args.precision,
        "train.compile": args.compile,
        "wandb.mode": "disabled",
    }
    if args.model == "tiny":
        overrides.update(TINY)
    elif args.model in PRESETS:
        overrides.update({"model.size": args.model, "model.block_size": 1024})
    if args.zero_stage is not None:
        overrides["zero_stage"] = args.zero_stage
    if args.micro_batch_size is not None:
        overrides["train.micro_batch_size"] = args.micro_batch_size
    if args.vocab_size is not None:  # e.g. GPT-2's 50304: the embedding's share of the step
        overrides["model.vocab_size"] = args.vocab_size
    base, sweep_overrides = None, []
    if args.sweep:  # the sweep's model, batch and data; the flags above still apply
        from launch.sweep import load_sweep, override_text

        sweep = load_sweep(args.sweep)
        base = sweep.base
        sweep_overrides = [override_text(k, v) for k, v in sweep.overrides.items()]
    cfg = load_config(base, sweep_overrides + [f"{k}={v}" for k, v in overrides.items()])
    if "zero_stage" not in cfg.model_fields_set:  # the stage a fresh run on one rank chooses
        cfg = cfg.model_copy(update={"zero_stage": 0})  # (checkpoint.resume.choose_zero_stage)
    return cfg


def reference_step(cfg: TrainConfig, device: torch.device, batch) -> Callable[[], Any]:
    """One plain-torch training step, as a closure over its model and optimizer."""
    torch.manual_seed(cfg.run.seed)
    model = GPT(cfg.model).to(device)
    o = cfg.optim
    kernel = {"fused": True} if device.type == "cuda" else {"foreach": True}  # as the harness
    optimizer = torch.optim.AdamW(
        param_groups(model, o.weight_decay), lr=LR, betas=o.betas, eps=o.eps, **kernel
    )
    forward = model.forward
    if cfg.train.compile:
        forward = torch.compile(model)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")
    x, y = batch

    def step() -> torch.Tensor:
        for group in optimizer.param_groups:
            group["lr"] = LR
        with autocast:
            loss = forward(x, y).loss
        loss.backward()
        if o.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def engine_step(
    cfg: TrainConfig, device: torch.device, batch, monitor: bool = False
) -> Callable[[], Any]:
    """One step of the harness: DeepSpeed engine, update gate, `trainer.step.train_step`
    (a non-log step). With `monitor`, as in a run: the divergence watch sees every step through
    the gate, and every `train.log_interval`-th step is a log step whose telemetry it reads."""
    torch.manual_seed(cfg.run.seed)
    model = GPT(cfg.model)
    engine, optimizer = initialize(model, cfg, 1, device)
    if cfg.train.compile:
        engine.compile()
    watch = DivergenceWatch(cfg.divergence, emit=lambda event: None) if monitor else None
    gate = UpdateGate(engine, optimizer, cfg, veto=watch.veto if watch else None)
    telemetry = Telemetry(engine.module, cfg.optim.grad_clip, logits=cfg.telemetry.enabled)
    count = 0

    def step() -> float:
        nonlocal count
        count += 1
        set_lr(engine.optimizer, LR)
        log_step = watch is not None and count % cfg.train.log_interval == 0
        scalars, output = train_step(engine, gate, telemetry, [batch], count, log_step)
        if log_step:
            watch.observe_telemetry(count, telemetry.read(LR, scalars.grad_norm, output))
        return scalars.loss

    return step


def timed(
    step: Callable[[], Any], num_steps: int, device: torch.device
) -> tuple[float, float, Any]:
    """(wall seconds, process CPU seconds) per step over `num_steps` steps, and the last loss."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start, start_cpu = time.perf_counter(), time.process_time()
    for _ in range(num_steps):
        loss = step()
    sync()
    wall_s, cpu_s = time.perf_counter() - start, time.process_time() - start_cpu
    return wall_s / num_steps, cpu_s / num_steps, loss


def build_parser() -> argparse.ArgumentParser:
    """The command line of `python -m bench.engine`."""
    parser = argparse.ArgumentParser(prog="python -m bench.engine", description=__doc__)
    parser.add_argument("--steps", type=int, default=16, help="timed steps of each, after warmup")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps of each first")
    parser.add_argument(
        "--round-steps",
        type=int,
        default=None,
        help="steps per timed round (default: 1 on the CPU; 10 on a GPU, where a round must be "
        "long enough to show whether the host waits for the device)",
    )
    parser.add_argument("--model", choices=("tiny", "default", *PRESETS), default="default")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument(
        "--zero-stage",
        type=int,
        choices=(0, 1, 2, 3),
        default=None,
        help="default: the config's stage if it sets one, else 0, as a run on one rank",
    )
    parser.add_argument("--micro-batch-size", type=int, default=None)
    parser.add_argument("--vocab-size", type=int, default=None, help="model.vocab_size")
    parser.add_argument("--compile", action="store_true", help="torch.compile both (GPU)")
    parser.add_argument(
        "--sweep", help="time the base config of this sweep file (with --model default)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, float | None]:
    """Print the tokens/s of both steps and their ratio; return the figures."""
    args = build_parser().parse_args(argv)

    cfg = bench_config(args)
    env = init_distributed(cfg.run.device)
    device = env.device
    if device.type == "cuda" and cfg.precision == "fp32":
        set_tf32(cfg.tf32)
    gen = torch.Generator().manual_seed(0)
    shape = (cfg.train.micro_batch_size, cfg.model.block_size)
    vocab = cfg.model.vocab_size
    batch = tuple(torch.randint(0, vocab, shape, generator=gen).to(device) for _ in range(2))
    tokens_per_step = shape[0] * shape[1]

    steps = {
        "reference": reference_step(cfg, device, batch),
        "engine": engine_step(cfg, device, batch),
    }
    for step in steps.values():
        timed(step, args.warmup, device)
    round_steps = args.round_steps or (10 if device.type == "cuda" else 1)
    num_rounds = max(2, args.steps // round_steps)
    wall: dict[str, list[float]] = {name: [] for name in steps}
    cpu: dict[str, list[float]] = {name: [] for name in steps}
    last_loss: dict[str, Any] = {}
    for r in range(num_rounds):
        order = list(steps) if r % 2 == 0 else list(reversed(steps))  # ABBA: cancels linear drift
        for name in order:
            seconds, cpu_seconds, last_loss[name] = timed(steps[name], round_steps, device)
            wall[name].append(seconds)
            cpu[name].append(cpu_seconds)

    with torch.device("meta"):  # the count only: no memory, no init
        flops_per_token = GPT(cfg.model).flops_per_token()
    peak = peak_flops(device, math_mode(cfg))
    m = cfg.model
    print(
        f"bench.engine: torch {torch.__version__}, {platform.machine()}, "
        f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs visible, device {device}"
        + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
    )
    print(
        f"model {m.n_layer}L {m.n_head}H {m.n_embd}C ctx {m.block_size}, micro batch "
        f"{shape[0]}, {cfg.precision}, ZeRO {cfg.zero_stage}, compile {cfg.train.compile}; "
        f"{args.warmup} warmup + {num_rounds} rounds of {round_steps} timed step(s) each, "
        "alternating; medians over rounds"
    )
    figures: dict[str, float | None] = {}
    for name in steps:
        seconds = statistics.median(wall[name])
        tok_per_s = tokens_per_step / seconds
        util = mfu(flops_per_token, tok_per_s, peak)
        quartiles = statistics.quantiles(wall[name], n=4)
        spread = (quartiles[2] - quartiles[0]) / seconds
        figures[f"{name}_tok_per_s"] = tok_per_s
        figures[f"{name}_cpu_s_per_step"] = statistics.median(cpu[name])
        figures[f"{name}_mfu"] = util
        print(
            f"  {name:<10} {1000 * seconds:9.1f} ms/step  {tok_per_s:11,.0f} tok/s"
            f"  (interquartile spread {100 * spread:4.1f}%;"
            f" CPU {1000 * statistics.median(cpu[name]):.0f} ms/step)"
            + (f"  MFU {100 * util:.1f}%" if util is not None else "")
        )
    # the same work: the same weights after the same updates on the same batch
    losses = {name: float(loss) for name, loss in last_loss.items()}  # host sync
    figures.update({f"{name}_final_loss": loss for name, loss in losses.items()})
    print(f"  final losses: reference {losses['reference']:.6f}, engine {losses['engine']:.6f}")
    figures["ratio"] = figures["engine_tok_per_s"] / figures["reference_tok_per_s"]
    figures["cpu_ratio"] = figures["reference_cpu_s_per_step"] / figures["engine_cpu_s_per_step"]
    print(f"  ratio ours / reference: {figures['ratio']:.3f} tok/s", end="")
    print(f" ({figures['cpu_ratio']:.3f} by CPU time per step)" if device.type == "cpu" else "")
    return figures


if __name__ == "__main__":
    main()
