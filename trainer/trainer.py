"""The run: a `Trainer` builds everything a config asks for, then trains it to its end.

`run(cfg)` is what `python train.py`, a SLURM task, a replay and a diagnosis all call. It opens
the run directory (resuming the latest checkpoint, or saying a finished run has nothing to do)
and hands the rest to `Trainer`, whose loop reads as nanoGPT's does: lr, step, log, evaluate,
divergence action, checkpoint. Each of those jobs is a named method below, and the state they
share (step, tokens, loader, watch, checkpointer) lives on the trainer, not in closures.
"""

import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from checkpoint.manager import (
    Checkpointer,
    CheckpointError,
    HarnessState,
    needs_universal,
    read_harness,
    step_of,
)
from checkpoint.preemption import PreemptionFlag
from checkpoint.resume import (
    choose_zero_stage,
    optimizer_state_fits,
    resume_reason,
    select_init,
    select_resume,
)
from common.run_lock import RunLock, RunLockError
from configs.schema import TrainConfig
from data.dataset import DataError
from data.loader import BatchLoader, resolve_dataset, validation_batches
from launch.distributed import DistEnv, init_distributed, unwatch_peers, watch_peers
from model import GPT
from monitor.divergence import DivergenceWatch
from monitor.perf import Throughput, math_mode, set_tf32
from monitor.policy import Action
from monitor.run_record import RunRecord, is_complete, read_summary
from monitor.sharpness import SharpnessProbe
from monitor.telemetry import Telemetry
from optim.adam_lr import adam_effective_lr
from optim.ema import WeightEMA
from optim.engine import StepScalars, UpdateGate, initialize, set_lr, with_global_batch
from optim.forms import form_metrics, mark_start
from optim.schedule import lr_at
from trainer.step import evaluate, metrics_line, train_step


def run(cfg: TrainConfig, stop_step: int | None = None, locked: bool = False) -> dict[str, Any]:
    """Train `cfg` to the end (or to a divergence stop or preemption); return the summary.

    `stop_step` ends the loop after that step without changing the run itself (the LR schedule
    still follows `train.max_steps`); `postmortem.replay` re-runs a stretch of a run with it.
    `locked`: the caller holds the run's lock (`heal.run`, across the restarts of its heals).
    A run already complete at `train.max_steps` is left as it is. On any exception the run
    record is closed with status `failed` and the error (see `RunRecord.fail`).
    """
    env = init_distributed(cfg.run.device, cfg.run.collective_timeout_s)
    cfg = with_global_batch(cfg, env.world_size)
    run_dir = Path(cfg.run.out_dir) / cfg.run.name
    lock = None if locked else hold_run_lock(run_dir, env)  # before anything is read or written
    try:
        return _run(cfg, env, run_dir, lock, stop_step)
    finally:
        if lock is not None:
            lock.release()


def hold_run_lock(run_dir: Path, env: DistEnv) -> RunLock | None:
    """Rank 0, the writer, takes the run's lock (`common.run_lock`); if it cannot, every rank
    raises the same one-line `RunLockError`, so no rank waits on a peer that left."""
    lock, error = None, ""
    if env.is_main:
        try:
            lock = RunLock(run_dir).acquire()
        except RunLockError as err:
            error = str(err)
    if env.world_size > 1:
        shared = [error]
        dist.broadcast_object_list(shared, src=0)
        error = shared[0]
    if error:
        raise RunLockError(error)
    return lock


def _run(
    cfg: TrainConfig, env: DistEnv, run_dir: Path, lock: RunLock | None, stop_step: int | None
) -> dict[str, Any]:
    """`run` with the lock held."""
    ckpt = Checkpointer(run_dir, cfg.checkpoint, env.rank, env.world_size)
    cfg, zero_note = choose_zero_stage(cfg, env.world_size, ckpt)
    resume_from = select_resume(ckpt, cfg, env.world_size)  # best first; [] starts afresh
    previous = read_summary(run_dir) if resume_from else None
    if stop_step is None and is_complete(previous, cfg):
        if env.is_main:
            print(f"{run_dir} is complete ({cfg.train.max_steps} steps): nothing to do")
        return previous
    init_from = select_init(cfg, resume_from)  # another run's checkpoint, for a new run only
    data_dir = resolve_dataset(cfg.data)  # before the record: it notes the data's loss floor
    record = RunRecord(run_dir, cfg, env, data_dir, previous)
    if lock is not None and lock.took_over:
        record.message(lock.takeover_note())
    try:
        universal = loads_universal(cfg, env, resume_from, init_from)
        trainer = Trainer(cfg, env, ckpt, record, data_dir, universal, stop_step, zero_note)
        trainer.start(resume_from, init_from)
        return trainer.train()
    except BaseException as err:
        record.fail(err)
        raise


def loads_universal(
    cfg: TrainConfig, env: DistEnv, resume_from: list[Path], init_from: Path | None
) -> bool:
    """Whether the checkpoint to start from was saved on another world size or ZeRO stage, so
    that DeepSpeed must load it in its universal form (which it takes only at initialize)."""
    source = resume_from[0] if resume_from else init_from
    if source is None or not needs_universal(read_harness(source), env.world_size, cfg.zero_stage):
        return False
    if resume_from and cfg.optim.name == "adam_spd":
        raise CheckpointError(
            f"{source} holds adam_spd's starting weights, which DeepSpeed's universal checkpoint "
            "does not carry: resume it on the world size and ZeRO stage it was saved with"
        )
    return True


class Trainer:
    """One run's model, engine, data and monitors, and the loop over its steps."""

    def __init__(
        self,
        cfg: TrainConfig,
        env: DistEnv,
        ckpt: Checkpointer,
        record: RunRecord,
        data_dir: Path,
        universal: bool = False,
        stop_step: int | None = None,
        zero_note: str = "",
    ) -> None:
        """Build the run's parts; `universal`: the checkpoint to start from is loaded in
        DeepSpeed's universal form (`loads_universal`); `zero_note`: why this ZeRO stage, for
        the start-up line (`choose_zero_stage`)."""
        self.cfg, self.env, self.ckpt, self.record = cfg, env, ckpt, record
        self.zero_note = zero_note
        self.universal = universal
        self.step, self.tokens = 0, 0
        last = cfg.train.max_steps
        self.end_step = last if stop_step is None else min(stop_step, last)
        self.stop_step = stop_step
        self.pinned_for: int | None = None  # the detection whose last good checkpoint is pinned
        self._build_engine()
        self._build_data(data_dir)
        self._build_monitors(data_dir)

    # ---------------------------------------------------------------------------------- build

    def _build_engine(self) -> None:
        """Model and engine: every rank builds the same initial weights from the run seed."""
        cfg, env = self.cfg, self.env
        if cfg.tf32 and env.device.type == "cuda":
            set_tf32(True)
        torch.manual_seed(cfg.run.seed)
        model = GPT(cfg.model)
        self.num_params, self.flops_per_token = model.num_params(), model.flops_per_token()
        self.engine, self.optimizer = initialize(
            model, cfg, env.world_size, env.device, self.universal
        )
        if cfg.train.compiles(env.device.type):
            self.engine.compile()

    def _build_data(self, data_dir: Path) -> None:
        """The same global batch sequence on any number of ranks, and the global validation set."""
        cfg, env = self.cfg, self.env
        shape = dict(
            block_size=cfg.model.block_size,
            micro_batch_size=cfg.train.micro_batch_size,
            vocab_size=cfg.model.vocab_size,
            rank=env.rank,
            world_size=env.world_size,
            device=env.device,
        )
        self.loader = BatchLoader(
            data_dir / "train.bin",
            grad_accum_steps=cfg.train.grad_accum_steps,
            seed=cfg.run.seed,
            skip=cfg.data.skip_batches,
            pin_memory=env.device.type == "cuda",
            prefetch=True,
            **shape,
        )
        self.val_batches = validation_batches(
            data_dir / "val.bin", num_sequences=cfg.data.eval_sequences, **shape
        )
        self.tokens_per_step = self.loader.global_batch_size * cfg.model.block_size
        self.record.message(
            f"{self.num_params / 1e6:.2f}M parameters, {self.tokens_per_step:,} tokens per step "
            f"({cfg.train.micro_batch_size} x {cfg.model.block_size} x "
            f"{cfg.train.grad_accum_steps} accumulation x {env.world_size} ranks), "
            f"ZeRO {cfg.zero_stage}{self.zero_note}, {cfg.precision}, "
            f"{cfg.optim.name} wd={cfg.optim.weight_decay}"
        )

    def _build_monitors(self, data_dir: Path) -> None:
        """The divergence watch and its update gate, telemetry, sharpness, preemption, EMA."""
        cfg, env, engine = self.cfg, self.env, self.engine
        self.watch = DivergenceWatch(cfg.divergence, emit=self.record.event)
        self.gate = UpdateGate(engine, self.optimizer, cfg, veto=self.watch.veto)
        t = cfg.telemetry
        self.telemetry = Telemetry(
            engine.module, cfg.optim.grad_clip, t.enabled, t.interval, t.per_layer
        )
        self.sharpness = SharpnessProbe(
            cfg, engine, data_dir / "train.bin", env.rank, env.world_size, env.device
        )
        self.preemption = PreemptionFlag().install()
        self.ema = WeightEMA(engine.module, cfg.train.ema) if cfg.train.ema else None
        if self.ema:
            self.ckpt.track("ema", self.ema)

    # ---------------------------------------------------------------------- state and start

    def harness_state(self) -> HarnessState:
        """What a checkpoint holds beside DeepSpeed's: counters, data position, monitors."""
        o = self.cfg.optim
        return HarnessState(
            step=self.step,
            tokens=self.tokens,
            loader=self.loader.state_dict(),
            monitor=self.watch.state_dict(),
            optimizer={"name": o.name, "decoupled": o.decoupled, "weight_decay": o.weight_decay},
            config=self.cfg.model_dump(mode="json"),
            world_size=self.env.world_size,
            zero_stage=self.cfg.zero_stage,
        )

    def adopt(self, state: HarnessState, rollback: bool = False) -> None:
        """Take a loaded checkpoint's counters, data position and monitor windows."""
        self.step, self.tokens = state["step"], state["tokens"]
        self.loader.load_state_dict(state["loader"])
        self.watch.load_state_dict(state["monitor"], keep_counts=rollback)

    def start(self, resume_from: list[Path], init_from: Path | None) -> None:
        """Resume the newest checkpoint that loads (a damaged one is set aside with a warning),
        or start from another run's weights, or afresh (a new run saves its first good state);
        then the record takes this start's config (`RunRecord.begin`)."""
        self._start(resume_from, init_from)
        self.record.begin(self.step, self.cfg.checkpoint.force_resume)

    def _start(self, resume_from: list[Path], init_from: Path | None) -> None:
        if resume_from:
            resume_path, state = self.ckpt.resume(self.engine, resume_from)
            self.adopt(state)
            self.emit(
                "resume",
                path=str(resume_path),
                from_world_size=state["world_size"],
                universal=self.universal,
                reason=resume_reason(self.cfg, self.record.previous or None),
                skipped=self.ckpt.skipped,  # damaged ones passed over, set aside
            )
            return
        if init_from is not None:
            self._init_from(init_from)
        self.ckpt.save(self.engine, self.harness_state())  # the first "last good" checkpoint

    def _init_from(self, path: Path) -> None:
        """Weights and optimizer state of another run (the weights alone where the optimizer
        state cannot cross from its ZeRO stage to ours); step and monitors anew."""
        saved = read_harness(path)
        fits = optimizer_state_fits(saved, self.cfg.zero_stage)
        if not fits:
            self.record.message(
                f"checkpoint.init_from: {path} was saved on ZeRO {saved['zero_stage']}, whose "
                f"optimizer state ZeRO {self.cfg.zero_stage} cannot read: its weights only, "
                "with a fresh optimizer"
            )
        source = self.ckpt.load(self.engine, path, rng=False, weights_only=not fits)
        mark_start(self.optimizer)  # adam_spd's theta_0: these weights
        try:  # the same data, batch and seed: go on to data the source run has not seen
            self.loader.load_state_dict(source["loader"])
        except DataError:
            pass  # another data order: it starts at its beginning
        self.emit(
            "init_from",
            path=str(path),
            from_step=source["step"],
            from_tokens=source["tokens"],
            data_position=self.loader.position,
            optimizer_state="loaded" if fits else "fresh",
        )

    # ------------------------------------------------------------------------------ the loop

    def train(self) -> dict[str, Any]:
        """The loop, while the heartbeat watches the other ranks (`watch_peers`)."""
        run = self.cfg.run
        watch_peers(min(run.lost_peer_s, run.collective_timeout_s / 2), self.record.lost_peer)
        try:
            return self._train()
        finally:
            unwatch_peers()

    def _train(self) -> dict[str, Any]:
        """The loop: one iteration is one optimizer update over the global batch."""
        self.meter = Throughput(
            self.tokens_per_step,
            self.flops_per_token,
            self.env,
            start_step=self.step,
            mode=math_mode(self.cfg),
        )
        status = "completed"
        while self.step < self.end_step:
            if self.preemption.requested:
                status = self.preempt()
                break
            lr = lr_at(self.step, self.cfg.optim, self.cfg.train.max_steps)
            log_step = self.is_log_step()
            scalars, output = self.train_step(lr, log_step)
            if log_step:
                self.log(lr, scalars, output)
            if self.is_eval_step():
                self.evaluate()
            action = self.watch.take_pending()
            self.pin_last_good()
            if action == Action.STOP:
                status = self.stop()
                break
            if action == Action.ROLLBACK:
                self.rollback()
                continue
            self.maybe_checkpoint()
            if log_step:
                self.record.summary(status="running", steps=self.step, watch=self.watch)
        return self.finish(status)

    def is_log_step(self) -> bool:
        """Every `train.log_interval` steps, and the last step of this stretch."""
        return (self.step + 1) % self.cfg.train.log_interval == 0 or self.step + 1 == self.end_step

    def is_eval_step(self) -> bool:
        """Every `train.eval_interval` steps (0: never), and the run's last step."""
        interval = self.cfg.train.eval_interval
        return (interval and self.step % interval == 0) or self.step == self.cfg.train.max_steps

    def train_step(self, lr: float, log_step: bool) -> tuple[StepScalars, Any]:
        """One gated update at `lr`; a withheld update is a `skip` event."""
        set_lr(self.engine.optimizer, lr)
        batches = self.loader.next_step()
        scalars, output = train_step(
            self.engine, self.gate, self.telemetry, batches, self.step + 1, log_step
        )
        self.step, self.tokens = self.step + 1, self.tokens + self.tokens_per_step
        if self.ema:
            self.ema.update()
        if not scalars.applied:
            self.emit("skip", loss=scalars.loss, grad_norm=scalars.grad_norm)
        return scalars, output

    def log(self, lr: float, scalars: StepScalars, output: Any) -> None:
        """A metrics line: the step's scalars, telemetry, optimizer forms, sharpness, speed;
        the divergence watch reads it before it is written."""
        line = metrics_line(
            self.step, self.tokens, lr, scalars, self.telemetry.read(lr, scalars.grad_norm, output)
        )
        line.update(adam_effective_lr(self.optimizer))  # the paper's Adam effective LR
        line.update(form_metrics(self.optimizer))
        line.update(self.sharpness.read(self.step))  # {} unless a sharpness step
        line.update(self.meter.read(self.step))
        self.watch.observe_telemetry(self.step, line)
        self.record.metrics(line)

    def evaluate(self) -> None:
        """The validation loss over the global set, and the weight EMA's (the paper's
        loss_ema) when one is kept."""
        n_val, device = self.cfg.data.eval_sequences, self.env.device
        val = {"val_loss": evaluate(self.engine, self.val_batches, n_val, device)}
        if self.ema:
            with self.ema.swapped_in():
                val["val_loss_ema"] = evaluate(self.engine, self.val_batches, n_val, device)
        self.record.metrics({"step": self.step, "tokens": self.tokens, **val, "time": time.time()})

    def pin_last_good(self) -> None:
        """After a run's first detection, keep the newest checkpoint from before it."""
        first = self.watch.first_detection_step
        if first in (None, self.pinned_for):
            return
        self.pinned_for = first
        good = self.ckpt.before(first)
        if good is not None:
            self.ckpt.pin(good, f"last good before the detection at step {first}")

    def stop(self) -> str:
        """The divergence policy's stop: the diverged state is kept beside, never resumed by
        default."""
        path = self.ckpt.save(self.engine, self.harness_state(), diverged=True)
        self.emit("stop", path=str(path))
        return "diverged"

    def rollback(self) -> None:
        """The policy's rollback: back to the checkpoint before the detection, past the next
        `divergence.rollback_skip_batches` batches."""
        good = self.ckpt.before(self.watch.last_detection_step)
        self.adopt(self.ckpt.load(self.engine, good), rollback=True)
        skipped = self.cfg.divergence.rollback_skip_batches
        self.loader.skip(skipped)
        self.emit("rollback", path=str(good), to_step=self.step, skipped_batches=skipped)

    def preempt(self) -> str:
        """SIGTERM/SIGUSR1 (preempted) or Ctrl-C (stopped): save, then leave the loop."""
        self.ckpt.save(self.engine, self.harness_state())
        self.emit("preempt", signal=self.preemption.signal_name)
        return "stopped" if self.preemption.by_user else "preempted"

    def maybe_checkpoint(self) -> None:
        """A periodic checkpoint every `checkpoint.interval` steps."""
        interval = self.cfg.checkpoint.interval
        if interval and self.step % interval == 0:
            self.checkpoint()

    def checkpoint(self) -> None:
        """Save a checkpoint of this step, and say so in a `checkpoint` event."""
        path = self.ckpt.save(self.engine, self.harness_state())
        self.emit("checkpoint", path=str(path))

    def emit(self, kind: str, **fields: Any) -> None:
        """One events.jsonl record of this step."""
        self.record.event({"step": self.step, "kind": kind, "time": time.time(), **fields})

    def finish(self, status: str) -> dict[str, Any]:
        """Save the final weights of a completed run (whatever the interval), write the
        summary and close the record."""
        self.preemption.uninstall()
        latest = self.ckpt.latest()
        completed = status == "completed" and self.stop_step is None
        if completed and (latest is None or step_of(latest) != self.step):
            self.checkpoint()  # the final weights, whatever the interval
        summary = self.record.summary(status=status, steps=self.step, watch=self.watch)
        self.record.close()
        return summary
