"""What the divergence monitor costs per training step: `python -m bench.monitor [key=value ...]`.

One training run of a tiny GPT on the CPU (the default config's data; `key=value` overrides
change the model or batch) whose steps alternate between these settings:
    on       every detector (`DivergenceWatch`), the logit telemetry forward (attention logits,
             log Z), the norm telemetry and a metrics line: a log step at `log_interval=1`;
    off      no detectors, no telemetry, no metrics line: a step far from any log step with
             `divergence.enabled=false`, `telemetry.enabled=false`;
    nologit  `on` without the logit telemetry forward, to show what that forward costs;
    detect   every detector on, not a log step: what most steps of a run are.
A run's figure weighs them as a run does: `detect` on all steps but each log_interval-th (`on`).
After the alternating steps, `--sharpness-reps` measurements of Adam's preconditioned sharpness
(`monitor.sharpness`, on `telemetry.sharpness_batch_size` sequences) are timed on the same
model; their cost is given in training steps (`off`) and per step of a run measuring every
`--sharpness-interval` steps (`telemetry.sharpness_interval` is 0, off, by default).
Every step runs what the training loop runs around `trainer.step.train_step` (lr, update gate
with its one host read of loss and grad norm, summary.json); a log step adds the loop's log-step
body.
The settings alternate step by step in ABBA order, so drift in the machine's speed (other
processes, frequency scaling) falls on all alike; the figure is the ratio of the median step
times, on / off, in wall time and in this process's CPU time.
"""

import argparse
import contextlib
import io
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from configs import load_config
from configs.schema import TrainConfig
from data.loader import BatchLoader, resolve_dataset
from launch.distributed import init_distributed
from model import GPT
from monitor.divergence import DivergenceWatch
from monitor.perf import Throughput, math_mode
from monitor.run_record import RunRecord
from monitor.sharpness import SharpnessProbe
from monitor.telemetry import Telemetry
from optim.engine import UpdateGate, initialize, set_lr
from optim.schedule import lr_at
from trainer.step import metrics_line, train_step

# the `tiny` preset (2 layers, 2 heads, 64 wide) with a short context
TINY = {
    "model.size": "tiny",
    "model.n_layer": "null",
    "model.n_head": "null",
    "model.n_embd": "null",
    "model.block_size": 64,
    "train.micro_batch_size": 8,
    "run.device": "cpu",
}


def bench_config(out_dir: Path, overrides: Sequence[str]) -> TrainConfig:
    values = {
        **TINY,
        "train.log_interval": 1,
        "optim.schedule": "constant",
        "divergence.policy": "record",
        "wandb.mode": "disabled",
        "run.out_dir": out_dir,
        "run.name": "monitor-bench",
        "telemetry.sharpness_interval": 1,  # the probe reads its batch; steps never call it
    }
    return load_config(None, [f"{k}={v}" for k, v in values.items()] + list(overrides))


def build_steps(cfg: TrainConfig) -> tuple[dict[str, Callable[[], None]], Callable[[], None]]:
    """One step function per setting, all training the same model, as `trainer.run` builds it;
    and a function that closes the run record."""
    env = init_distributed(cfg.run.device)
    data_dir = resolve_dataset(cfg.data)
    record = RunRecord(Path(cfg.run.out_dir) / cfg.run.name, cfg, env, data_dir, previous=None)
    torch.manual_seed(cfg.run.seed)
    model = GPT(cfg.model)
    flops_per_token = model.flops_per_token()
    engine, optimizer = initialize(model, cfg, env.world_size, env.device)
    loader = BatchLoader(
        data_dir / "train.bin",
        vocab_size=cfg.model.vocab_size,
        device=env.device,
        block_size=cfg.model.block_size,
        micro_batch_size=cfg.train.micro_batch_size,
        grad_accum_steps=cfg.train.grad_accum_steps,
        seed=cfg.run.seed,
    )
    tokens_per_step = loader.global_batch_size * cfg.model.block_size
    watch = DivergenceWatch(cfg.divergence, emit=record.event)
    gate = UpdateGate(engine, optimizer, cfg, veto=watch.veto)
    telemetry = Telemetry(engine.module, cfg.optim.grad_clip, logits=True, interval=0)
    meter = Throughput(tokens_per_step, flops_per_token, env, start_step=0, mode=math_mode(cfg))
    probe = SharpnessProbe(cfg, engine, resolve_dataset(cfg.data) / "train.bin", 0, 1, env.device)
    step = 0

    def one_step(detectors: bool, log_step: bool, logits: bool) -> None:
        nonlocal step
        watch.enabled, telemetry.logits = detectors, logits
        lr = lr_at(step, cfg.optim, cfg.train.max_steps)
        set_lr(engine.optimizer, lr)
        scalars, output = train_step(
            engine, gate, telemetry, loader.next_step(), step + 1, log_step
        )
        step += 1
        if log_step:  # the training loop's log-step body
            fields = telemetry.read(lr, scalars.grad_norm, output)
            line = metrics_line(step, step * tokens_per_step, lr, scalars, fields)
            line.update(meter.read(step))
            watch.observe_telemetry(step, line)
            record.metrics(line)
        watch.take_pending()
        record.summary(status="running", steps=step, watch=watch)

    steps = {
        "on": lambda: one_step(detectors=True, log_step=True, logits=True),
        "off": lambda: one_step(detectors=False, log_step=False, logits=False),
        "nologit": lambda: one_step(detectors=True, log_step=True, logits=False),
        "detect": lambda: one_step(detectors=True, log_step=False, logits=False),
        "sharpness": lambda: probe.read(step),  # not a step: timed on its own
    }
    return steps, record.close


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Print the step time with the monitor on and off and their ratio; return the figures."""
    parser = argparse.ArgumentParser(prog="python -m bench.monitor", description=__doc__)
    parser.add_argument("--steps", type=int, default=200, help="timed steps of each setting")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps of each first")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument(
        "--sharpness-reps", type=int, default=3, help="timed sharpness measurements"
    )
    parser.add_argument(
        "--sharpness-interval", type=int, default=1000, help="interval its run figure assumes"
    )
    parser.add_argument("overrides", nargs="*", help="config overrides, key=value")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    settings = ("on", "off", "nologit", "detect")
    wall: dict[str, list[float]] = {setting: [] for setting in settings}
    cpu: dict[str, list[float]] = {setting: [] for setting in settings}
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
        cfg = bench_config(Path(tmp), args.overrides)
        steps, close = build_steps(cfg)
        for _ in range(args.warmup):
            for setting in settings:
                steps[setting]()
        for r in range(args.steps):
            for setting in settings if r % 2 == 0 else settings[::-1]:  # ABBA
                start_wall, start_cpu = time.perf_counter(), time.process_time()
                steps[setting]()
                wall[setting].append(time.perf_counter() - start_wall)
                cpu[setting].append(time.process_time() - start_cpu)
        sharpness_ms, sharpness_cpu_ms, hvps = [], [], []
        for _ in range(args.sharpness_reps):
            start_wall, start_cpu = time.perf_counter(), time.process_time()
            hvps.append(steps["sharpness"]()["sharpness_hvps"])
            sharpness_ms.append(1000 * (time.perf_counter() - start_wall))
            sharpness_cpu_ms.append(1000 * (time.process_time() - start_cpu))
        close()

    m = cfg.model
    print(
        f"bench.monitor: torch {torch.__version__}, {platform.machine()}, "
        f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs visible; model {m.n_layer}L "
        f"{m.n_head}H {m.n_embd}C ctx {m.block_size} vocab {m.vocab_size}, micro batch "
        f"{cfg.train.micro_batch_size}, {cfg.precision}, ZeRO {cfg.zero_stage}; "
        f"{args.steps} steps of each setting, alternating"
    )
    figures: dict[str, float] = {}
    for setting in settings:
        figures[f"{setting}_ms"] = 1000 * statistics.median(wall[setting])
        figures[f"{setting}_cpu_ms"] = 1000 * statistics.median(cpu[setting])
        print(
            f"  monitor {setting:<7} {figures[f'{setting}_ms']:8.2f} ms/step (median; "
            f"CPU {figures[f'{setting}_cpu_ms']:.2f} ms)"
        )
    for setting in (s for s in settings if s != "off"):
        figures[f"overhead_{setting}"] = ratio = figures[f"{setting}_ms"] / figures["off_ms"] - 1
        cpu_ratio = figures[f"{setting}_cpu_ms"] / figures["off_cpu_ms"] - 1
        print(f"  {setting} / off: {100 * ratio:+.1f}% per step (CPU time {100 * cpu_ratio:+.1f}%)")
    # a training run: every step is `detect` but each log_interval-th, which is `on`
    interval = load_config(None).train.log_interval
    run_ms = ((interval - 1) * figures["detect_ms"] + figures["on_ms"]) / interval
    figures["overhead_run"] = run_ms / figures["off_ms"] - 1
    print(
        f"  a run at the default log_interval={interval} / off: "
        f"{100 * figures['overhead_run']:+.1f}% per step"
    )
    if sharpness_ms:
        figures["sharpness_ms"] = statistics.median(sharpness_ms)
        figures["sharpness_cpu_ms"] = statistics.median(sharpness_cpu_ms)
        figures["sharpness_steps"] = figures["sharpness_ms"] / figures["off_ms"]
        cpu_steps = figures["sharpness_cpu_ms"] / figures["off_cpu_ms"]
        figures["overhead_sharpness"] = figures["sharpness_steps"] / args.sharpness_interval
        print(
            f"  sharpness: {figures['sharpness_ms']:.0f} ms per measurement (median of "
            f"{len(sharpness_ms)}; CPU {figures['sharpness_cpu_ms']:.0f} ms; "
            f"{statistics.median(hvps):.0f} Hessian-vector products on "
            f"{cfg.telemetry.sharpness_batch_size} sequences) = "
            f"{figures['sharpness_steps']:.1f} training steps (CPU time: {cpu_steps:.1f}); every "
            f"{args.sharpness_interval} steps: {100 * figures['overhead_sharpness']:+.1f}% per step"
        )
    return figures


if __name__ == "__main__":
    main()
