"""Train a GPT-2 through DeepSpeed ZeRO, watching for loss divergences.

    python train.py                                        # default config: small GPT, CPU
    python train.py configs/gpt2_owt.yaml optim.weight_decay=0.3 precision=bf16
    torchrun --nproc-per-node 8 train.py configs/gpt2_owt.yaml  # one node, 8 ranks
    python -m launch.slurm configs/gpt2_owt.yaml --nodes 4 --gpus-per-node 8  # SLURM

Everything a run writes lands in <run.out_dir>/<run.name>/ (see README, "The run directory").
"""

import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from checkpoint.manager import Checkpointer, CheckpointError, HarnessState, read_harness
from checkpoint.preemption import PreemptionFlag
from checkpoint.resume import check_compatible, select_resume
from configs import ConfigError, load_config, to_yaml
from configs.schema import TrainConfig
from data.loader import BatchLoader, resolve_dataset, validation_batches
from launch.distributed import init_distributed
from model import GPT
from monitor.divergence import DivergenceWatch
from monitor.perf import mfu, peak_flops
from monitor.policy import Action
from monitor.run_record import RunRecord
from monitor.telemetry import Telemetry
from optim.engine import UpdateGate, build_optimizer, deepspeed_config, set_lr
from optim.groups import param_groups
from optim.schedule import lr_at


def run(cfg: TrainConfig) -> dict[str, Any]:
    """Train `cfg` to the end (or to a divergence stop or preemption); return the summary."""
    # -----------------------------------------------------------------------------------------
    # distributed init, run directory, the checkpoint to resume from
    env = init_distributed(cfg.run.device)
    import deepspeed  # after init_distributed has chosen DeepSpeed's accelerator

    run_dir = Path(cfg.run.out_dir) / cfg.run.name
    ckpt = Checkpointer(run_dir, cfg.checkpoint, env.rank, env.world_size)
    resume_path = select_resume(ckpt, cfg)
    record = RunRecord(run_dir, cfg, env, resuming=resume_path is not None)
    if cfg.tf32 and env.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

    # -----------------------------------------------------------------------------------------
    # model and engine: every rank builds the same initial weights from the run seed
    torch.manual_seed(cfg.run.seed)
    model = GPT(cfg.model)
    flops_per_token = model.flops_per_token()
    optimizer = build_optimizer(param_groups(model, cfg.optim.weight_decay), cfg, env.device)
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=deepspeed_config(cfg, env.world_size)
    )
    if cfg.train.compile:
        engine.compile()

    # -----------------------------------------------------------------------------------------
    # data: the same global batch sequence on any number of ranks
    data_dir = resolve_dataset(cfg.data)
    loader = BatchLoader(
        data_dir / "train.bin",
        block_size=cfg.model.block_size,
        micro_batch_size=cfg.train.micro_batch_size,
        grad_accum_steps=cfg.train.grad_accum_steps,
        rank=env.rank,
        world_size=env.world_size,
        seed=cfg.run.seed,
    )
    val_batches = validation_batches(
        data_dir / "val.bin",
        block_size=cfg.model.block_size,
        micro_batch_size=cfg.train.micro_batch_size,
        num_batches=cfg.data.eval_batches,
        rank=env.rank,
        world_size=env.world_size,
    )
    tokens_per_step = loader.global_batch_size * cfg.model.block_size
    record.message(
        f"{model.num_params() / 1e6:.2f}M parameters, {tokens_per_step:,} tokens per step "
        f"({cfg.train.micro_batch_size} x {cfg.model.block_size} x {cfg.train.grad_accum_steps} "
        f"accumulation x {env.world_size} ranks), ZeRO {cfg.zero_stage}, {cfg.precision}, "
        f"{cfg.optim.name} wd={cfg.optim.weight_decay}"
    )

    # -----------------------------------------------------------------------------------------
    # monitors and resume
    watch = DivergenceWatch(cfg.divergence, emit=record.event)
    gate = UpdateGate(engine, optimizer, cfg, veto=watch.veto)
    telemetry = Telemetry(engine.module, cfg.optim.grad_clip)
    preemption = PreemptionFlag().install()
    step, tokens = 0, 0

    def harness_state() -> HarnessState:
        o = cfg.optim
        return HarnessState(
            step=step,
            tokens=tokens,
            loader=loader.state_dict(),
            monitor=watch.state_dict(),
            optimizer={"name": o.name, "decoupled": o.name == "adamw", "weight_decay": o.weight_decay},
            config=cfg.model_dump(mode="json"),
            world_size=env.world_size,
            zero_stage=cfg.zero_stage,
        )

    def restore(path: Path) -> None:
        nonlocal step, tokens
        state = ckpt.load(engine, path)
        step, tokens = state["step"], state["tokens"]
        loader.load_state_dict(state["loader"])
        watch.load_state_dict(state["monitor"])

    if resume_path is not None:
        check_compatible(read_harness(resume_path), cfg, env.world_size, resume_path)
        restore(resume_path)
        record.event({"step": step, "kind": "resume", "time": time.time(), "path": str(resume_path)})
    else:
        ckpt.save(engine, harness_state())  # the first "last good" checkpoint

    # -----------------------------------------------------------------------------------------
    # the training loop: one iteration is one optimizer update over the global batch
    peak = peak_flops(env.device)
    status = "completed"
    step_start = time.time()
    while step < cfg.train.max_steps:
        if preemption.requested:
            ckpt.save(engine, harness_state())
            record.event({"step": step, "kind": "preempt", "time": time.time(),
                          "signal": preemption.signal_name})
            status = "preempted"
            break
        lr = lr_at(step, cfg.optim, cfg.train.max_steps)
        set_lr(engine.optimizer, lr)
        log_step = (step + 1) % cfg.train.log_interval == 0 or step + 1 == cfg.train.max_steps
        batches = loader.next_step()
        loss_sum = torch.zeros((), device=env.device)
        for micro_step, (x, y) in enumerate(batches):
            x, y = x.to(env.device, non_blocking=True), y.to(env.device, non_blocking=True)
            want_telemetry = log_step and micro_step == 0 and cfg.telemetry.enabled
            output = engine(x, y, telemetry=want_telemetry)
            if micro_step == 0:
                first_output = output
            engine.backward(output.loss)
            loss_sum += output.loss.detach()
            if micro_step == len(batches) - 1:
                gate.begin(step, loss_sum / len(batches))
                if log_step:
                    telemetry.snapshot()
            engine.step()
        scalars = gate.finish()
        telemetry.count(scalars.applied, scalars.clipped)
        if not scalars.applied:
            record.event({"step": step, "kind": "skip", "time": time.time(),
                          "loss": scalars.loss, "grad_norm": scalars.grad_norm})
        step += 1
        tokens += tokens_per_step

        if log_step:
            now = time.time()
            line = {"step": step, "tokens": tokens, "loss": scalars.loss, "lr": lr,
                    "grad_norm": scalars.grad_norm}
            line.update(telemetry.read(lr, scalars.grad_norm, first_output if cfg.telemetry.enabled else None))
            elapsed = now - step_start
            steps_done = cfg.train.log_interval if step % cfg.train.log_interval == 0 else step % cfg.train.log_interval
            line["step_time_ms"] = 1000 * elapsed / steps_done
            line["tok_per_s"] = tokens_per_step * steps_done / elapsed
            line["mfu"] = mfu(flops_per_token, line["tok_per_s"] / env.world_size, peak)
            if env.device.type == "cuda":
                line["peak_mem_mb"] = torch.cuda.max_memory_allocated(env.device) / 2**20
            line["time"] = now
            watch.observe_telemetry(step, line)
            record.metrics(line)
            step_start = time.time()

        if cfg.train.eval_interval and step % cfg.train.eval_interval == 0 or step == cfg.train.max_steps:
            record.metrics({"step": step, "tokens": tokens, "val_loss": evaluate(engine, val_batches, env.device), "time": time.time()})

        action = watch.take_pending()
        if action == Action.STOP:
            ckpt.save(engine, harness_state())
            record.event({"step": step, "kind": "stop", "time": time.time()})
            status = "diverged"
            break
        if action == Action.ROLLBACK:
            anomaly_step = watch.first_detection_step
            good = ckpt.before(anomaly_step if anomaly_step is not None else step)
            if good is None:
                raise CheckpointError("no checkpoint from before the anomaly to roll back to")
            ckpt.pin(good, f"last good before detection at step {anomaly_step}")
            restore(good)
            loader.skip(cfg.divergence.rollback_skip_batches)
            record.event({"step": step, "kind": "rollback", "time": time.time(),
                          "path": str(good), "skipped_batches": cfg.divergence.rollback_skip_batches})
            continue
        if watch.first_detection_step is not None:
            good = ckpt.before(watch.first_detection_step)
            if good is not None:
                ckpt.pin(good, f"last good before detection at step {watch.first_detection_step}")
        if cfg.checkpoint.interval and step % cfg.checkpoint.interval == 0:
            path = ckpt.save(engine, harness_state())
            record.event({"step": step, "kind": "checkpoint", "time": time.time(), "path": str(path)})
        record.summary(status="running", steps=step, watch=watch)

    preemption.uninstall()
    summary = record.summary(status=status, steps=step, watch=watch)
    record.close()
    return summary


@torch.no_grad()
def evaluate(engine, batches: list[tuple[torch.Tensor, torch.Tensor]], device: torch.device) -> float:
    """Mean validation loss over the fixed batches of every rank."""
    engine.module.eval()
    total = torch.zeros((), device=device)
    for x, y in batches:
        total += engine(x.to(device), y.to(device)).loss.float()
    engine.module.train()
    total /= len(batches)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(total, op=torch.distributed.ReduceOp.AVG)
    return total.item()  # host sync


def main(argv: list[str] | None = None) -> int:
    """CLI: `train.py [CONFIG.yaml] [section.key=value ...]`; bad input is a one-line error."""
    args = sys.argv[1:] if argv is None else argv
    path = args[0] if args and "=" not in args[0] else None
    overrides = args[1:] if path is not None else args
    try:
        cfg = load_config(path, overrides)
        summary = run(cfg)
    except (ConfigError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0 if summary["status"] in ("completed", "preempted", "diverged") else 1


if __name__ == "__main__":
    sys.exit(main())
