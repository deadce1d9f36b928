"""Train a GPT-2 through DeepSpeed ZeRO, watching for loss divergences.

    python train.py                                        # default config: small GPT, CPU
    python train.py configs/gpt2_owt.yaml optim.weight_decay=0.3 precision=bf16
    torchrun --nproc-per-node 8 train.py configs/gpt2_owt.yaml  # one node, 8 ranks
    python -m launch.slurm configs/gpt2_owt.yaml --nodes 4 --gpus-per-node 8  # SLURM

Everything a run writes lands in <run.out_dir>/<run.name>/ (see README, "The run directory").
"""

import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from checkpoint.manager import (
    Checkpointer,
    CheckpointError,
    HarnessState,
    needs_universal,
    read_harness,
    step_of,
)
from checkpoint.preemption import PreemptionFlag
from checkpoint.resume import resume_reason, select_init, select_resume
from configs import ConfigError, key_table, load_config
from configs.schema import TrainConfig
from data.loader import BatchLoader, resolve_dataset, validation_batches
from data.prepare import DataError
from launch.distributed import DistEnv, close_distributed, init_distributed, lost_peer_error
from model import GPT
from monitor.divergence import DivergenceWatch
from monitor.perf import Throughput
from monitor.policy import Action
from monitor.run_record import RunRecord, is_complete, read_summary
from monitor.sharpness import SharpnessProbe
from monitor.telemetry import Telemetry
from optim.adam_lr import adam_effective_lr
from optim.ema import WeightEMA
from optim.engine import StepScalars, UpdateGate, initialize, set_lr
from optim.forms import form_metrics, mark_start
from optim.schedule import lr_at


def run(cfg: TrainConfig, stop_step: int | None = None) -> dict[str, Any]:
    """Train `cfg` to the end (or to a divergence stop or preemption); return the summary.

    `stop_step` ends the loop after that step without changing the run itself (the LR schedule
    still follows `train.max_steps`); `monitor.replay` re-runs a stretch of a run with it.
    A run already complete at `train.max_steps` is left as it is. On any exception the run
    record is closed with status `failed` and the error (see `RunRecord.fail`).
    """
    # -----------------------------------------------------------------------------------------
    # distributed init, run directory, the checkpoint to resume from
    env = init_distributed(cfg.run.device, cfg.run.collective_timeout_s)
    run_dir = Path(cfg.run.out_dir) / cfg.run.name
    ckpt = Checkpointer(run_dir, cfg.checkpoint, env.rank, env.world_size)
    resume_from = select_resume(ckpt, cfg, env.world_size)  # best first; [] starts afresh
    previous = read_summary(run_dir) if resume_from else None
    if stop_step is None and is_complete(previous, cfg):
        if env.is_main:
            print(f"{run_dir} is complete ({cfg.train.max_steps} steps): nothing to do")
        return previous
    init_from = select_init(cfg, resume_from)  # another run's checkpoint, for a new run only
    data_dir = resolve_dataset(cfg.data)  # before the record: it notes the data's loss floor
    record = RunRecord(run_dir, cfg, env, data_dir, previous)
    try:
        return train_run(cfg, env, ckpt, resume_from, init_from, data_dir, record, stop_step)
    except BaseException as err:
        record.fail(err)
        raise


def train_run(
    cfg: TrainConfig,
    env: DistEnv,
    ckpt: Checkpointer,
    resume_from: list[Path],
    init_from: Path | None,
    data_dir: Path,
    record: RunRecord,
    stop_step: int | None,
) -> dict[str, Any]:
    """The run itself, from the model to the summary, with its record open."""
    if cfg.tf32 and env.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

    # -----------------------------------------------------------------------------------------
    # model and engine: every rank builds the same initial weights from the run seed
    torch.manual_seed(cfg.run.seed)
    model = GPT(cfg.model)
    flops_per_token = model.flops_per_token()
    # a checkpoint from another world size loads in DeepSpeed's universal form, which
    # DeepSpeed takes only at initialize
    source = resume_from[0] if resume_from else init_from
    universal = source is not None and needs_universal(
        read_harness(source), env.world_size, cfg.zero_stage
    )
    if universal and resume_from and cfg.optim.name == "adam_spd":
        raise CheckpointError(
            f"{source} holds adam_spd's starting weights, which DeepSpeed's universal checkpoint "
            "does not carry: resume it on the world size and ZeRO stage it was saved with"
        )
    engine, optimizer = initialize(model, cfg, env.world_size, env.device, universal)
    if cfg.train.compile:
        engine.compile()

    # -----------------------------------------------------------------------------------------
    # data: the same global batch sequence on any number of ranks
    shape = dict(
        block_size=cfg.model.block_size,
        micro_batch_size=cfg.train.micro_batch_size,
        vocab_size=cfg.model.vocab_size,
        rank=env.rank,
        world_size=env.world_size,
        device=env.device,
    )
    loader = BatchLoader(
        data_dir / "train.bin",
        grad_accum_steps=cfg.train.grad_accum_steps,
        seed=cfg.run.seed,
        **shape,
    )
    val_batches = validation_batches(
        data_dir / "val.bin", num_sequences=cfg.data.eval_sequences, **shape
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
    t = cfg.telemetry
    telemetry = Telemetry(engine.module, cfg.optim.grad_clip, t.enabled, t.interval, t.per_layer)
    sharpness = SharpnessProbe(
        cfg, engine, data_dir / "train.bin", env.rank, env.world_size, env.device
    )
    preemption = PreemptionFlag().install()
    ema = WeightEMA(engine.module, cfg.train.ema) if cfg.train.ema else None
    if ema:
        ckpt.track("ema", ema)
    step, tokens = 0, 0

    def harness_state() -> HarnessState:
        o = cfg.optim
        return HarnessState(
            step=step,
            tokens=tokens,
            loader=loader.state_dict(),
            monitor=watch.state_dict(),
            optimizer={
                "name": o.name,
                "decoupled": o.name != "adam_l2",
                "weight_decay": o.weight_decay,
            },
            config=cfg.model_dump(mode="json"),
            world_size=env.world_size,
            zero_stage=cfg.zero_stage,
        )

    def adopt(state: HarnessState, rollback: bool = False) -> None:
        nonlocal step, tokens
        step, tokens = state["step"], state["tokens"]
        loader.load_state_dict(state["loader"])
        watch.load_state_dict(state["monitor"], keep_counts=rollback)

    def restore(path: Path, rollback: bool = False) -> None:
        adopt(ckpt.load(engine, path), rollback)

    if resume_from:  # the newest checkpoint that loads; a damaged one is skipped with a warning
        resume_path, state = ckpt.resume(engine, resume_from)
        adopt(state)
        record.event(
            event(
                step,
                "resume",
                path=str(resume_path),
                from_world_size=state["world_size"],
                universal=universal,
                reason=resume_reason(cfg, record.previous or None),
            )
        )
    else:
        if init_from is not None:  # weights and optimizer state; step and monitors anew
            source = ckpt.load(engine, init_from, rng=False)
            mark_start(optimizer)  # adam_spd's theta_0: these weights
            try:  # the same data, batch and seed: go on to data the source run has not seen
                loader.load_state_dict(source["loader"])
            except DataError:
                pass  # another data order: it starts at its beginning
            record.event(
                event(
                    step,
                    "init_from",
                    path=str(init_from),
                    from_step=source["step"],
                    from_tokens=source["tokens"],
                    data_position=loader.position,
                )
            )
        ckpt.save(engine, harness_state())  # the first "last good" checkpoint

    # -----------------------------------------------------------------------------------------
    # the training loop: one iteration is one optimizer update over the global batch
    meter = Throughput(tokens_per_step, flops_per_token, env, start_step=step)
    status = "completed"
    end_step = cfg.train.max_steps if stop_step is None else min(stop_step, cfg.train.max_steps)
    pinned_for = None  # the detection whose last good checkpoint is pinned
    while step < end_step:
        if preemption.requested:
            ckpt.save(engine, harness_state())
            record.event(event(step, "preempt", signal=preemption.signal_name))
            status = "stopped" if preemption.by_user else "preempted"
            break
        lr = lr_at(step, cfg.optim, cfg.train.max_steps)
        set_lr(engine.optimizer, lr)
        log_step = (step + 1) % cfg.train.log_interval == 0 or step + 1 == end_step
        scalars, output = train_step(
            engine, gate, telemetry, loader.next_step(), step + 1, log_step
        )
        step, tokens = step + 1, tokens + tokens_per_step
        if ema:
            ema.update()
        if not scalars.applied:
            record.event(event(step, "skip", loss=scalars.loss, grad_norm=scalars.grad_norm))
        if log_step:
            telemetry_fields = telemetry.read(lr, scalars.grad_norm, output)
            line = metrics_line(step, tokens, lr, scalars, telemetry_fields)
            line["adam_eff_lr"] = adam_effective_lr(optimizer)  # the paper's Adam effective LR
            line.update(form_metrics(optimizer))
            line.update(sharpness.read(step))  # {} unless a sharpness step
            line.update(meter.read(step))
            watch.observe_telemetry(step, line)
            record.metrics(line)
        if (
            cfg.train.eval_interval and step % cfg.train.eval_interval == 0
        ) or step == cfg.train.max_steps:
            n_val = cfg.data.eval_sequences
            val = {"val_loss": evaluate(engine, val_batches, n_val, env.device)}
            if ema:  # the paper's loss_ema
                with ema.swapped_in():
                    val["val_loss_ema"] = evaluate(engine, val_batches, n_val, env.device)
            record.metrics({"step": step, "tokens": tokens, **val, "time": time.time()})

        action = watch.take_pending()
        if watch.first_detection_step not in (None, pinned_for):  # keep the last good state
            pinned_for = watch.first_detection_step
            good = ckpt.before(pinned_for)
            if good is not None:
                ckpt.pin(good, f"last good before the detection at step {pinned_for}")
        if action == Action.STOP:  # the diverged state is kept beside, never resumed by default
            path = ckpt.save(engine, harness_state(), diverged=True)
            record.event(event(step, "stop", path=str(path)))
            status = "diverged"
            break
        if action == Action.ROLLBACK:
            good = ckpt.before(watch.last_detection_step)
            restore(good, rollback=True)
            loader.skip(cfg.divergence.rollback_skip_batches)
            record.event(
                event(
                    step,
                    "rollback",
                    path=str(good),
                    to_step=step,
                    skipped_batches=cfg.divergence.rollback_skip_batches,
                )
            )
            continue
        if cfg.checkpoint.interval and step % cfg.checkpoint.interval == 0:
            path = ckpt.save(engine, harness_state())
            record.event(event(step, "checkpoint", path=str(path)))
        if log_step:
            record.summary(status="running", steps=step, watch=watch)

    preemption.uninstall()
    latest = ckpt.latest()
    if status == "completed" and stop_step is None and (latest is None or step_of(latest) != step):
        path = ckpt.save(engine, harness_state())  # the final weights, whatever the interval
        record.event(event(step, "checkpoint", path=str(path)))
    summary = record.summary(status=status, steps=step, watch=watch)
    record.close()
    if status == "diverged" and cfg.divergence.diagnose:  # the stop is saved: now ask why
        from monitor.diagnose import after_stop

        after_stop(record.run_dir, step)
    return summary


def event(step: int, kind: str, **fields: Any) -> dict[str, Any]:
    """One events.jsonl record."""
    return {"step": step, "kind": kind, "time": time.time(), **fields}


def metrics_line(
    step: int, tokens: int, lr: float, scalars: StepScalars, telemetry: dict[str, Any]
) -> dict[str, Any]:
    """One metrics.jsonl line of a log step: the gate's scalars, then the telemetry."""
    line = {"step": step, "tokens": tokens, "loss": scalars.loss, "lr": lr}
    return {**line, "grad_norm": scalars.grad_norm, **telemetry}


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


USAGE = """python train.py [CONFIG.yaml] [section.key=value ...]

CONFIG.yaml defaults to configs/default.yaml; the keys below override it. Running the same
command again resumes the run from its latest checkpoint (a finished run: nothing to do)."""


def main(argv: list[str] | None = None) -> int:
    """CLI: `train.py [CONFIG.yaml] [section.key=value ...]`; bad input is a one-line error.

    Exit status: 0 completed (or stopped by the divergence policy, or preempted and saved),
    2 a config, data or checkpoint the user must fix, 130 Ctrl-C, 1 anything else. Any other
    exception on any rank is reported as `rank N: Type: message` after its traceback, so that
    with several ranks the log says which one failed; the launcher (torchrun, srun) then stops
    the others. A collective that failed because a peer is gone is one line naming the lost rank.
    """
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] in ("-h", "--help"):
        print(f"{__doc__.strip()}\n\nusage: {USAGE}\n\n{key_table()}")
        return 0
    path = args[0] if args and "=" not in args[0] else None
    overrides = args[1:] if path is not None else args
    try:
        cfg = load_config(path, overrides)
        summary = run(cfg)
        close_distributed()
    except (ConfigError, CheckpointError, DataError) as err:
        print(f"{_rank_prefix()}error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C before the loop, or twice: nothing was saved
        print(f"{_rank_prefix()}error: interrupted before a checkpoint was saved", file=sys.stderr)
        return 130
    except Exception as err:
        lost = lost_peer_error(err)  # a collective that failed because a peer is gone
        if lost is None:
            traceback.print_exc()
        rank = os.environ.get("RANK", "0")
        print(lost or f"rank {rank}: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    if summary["status"] == "stopped":  # Ctrl-C, saved: a shell's `&&` chain stops too
        return 130
    return 0 if summary["status"] in ("completed", "preempted", "diverged") else 1


def _rank_prefix() -> str:
    """`rank N: ` when several ranks may print the same kind of line, else nothing."""
    return f"rank {os.environ['RANK']}: " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""


if __name__ == "__main__":
    sys.exit(main())
