"""The run's record: config.yaml, metrics, events and summary on rank 0, mirrored to wandb."""

import subprocess
import time
from pathlib import Path
from typing import Any

import yaml

from configs.schema import TrainConfig
from data.ngram import loss_floor
from launch.distributed import DistEnv
from monitor.kernel_path import device_path
from monitor.sinks import Progress, RunFiles, WandbSink


def versions(world_size: int) -> dict[str, Any]:
    import deepspeed
    import torch

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).resolve().parent,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {
        "torch": str(torch.__version__),
        "deepspeed": deepspeed.__version__,
        "git_commit": commit or None,
        "world_size": world_size,
    }


def wandb_tags(cfg: TrainConfig) -> list[str]:
    """The tags that let the wandb UI compare runs of the study."""
    o = cfg.optim
    return [o.name, cfg.precision, f"wd={o.weight_decay:g}", f"lr={o.lr:g}", f"seed={cfg.run.seed}"]


def wandb_group(cfg: TrainConfig) -> str:
    """`wandb.group`, else the run's setting without its seed, so that seeds group together."""
    if cfg.wandb.group:
        return cfg.wandb.group
    m, o = cfg.model, cfg.optim
    return f"{m.n_layer}L{m.n_embd}C-{o.name}-{cfg.precision}-wd{o.weight_decay:g}-lr{o.lr:g}"


class RunRecord:
    """Everything a run writes about itself; silent on ranks other than 0."""

    def __init__(
        self, run_dir: Path, cfg: TrainConfig, env: DistEnv, data_dir: Path, resuming: bool
    ):
        self.active = env.is_main
        self.run_dir = run_dir
        self.cfg = cfg
        self.sinks: list[Any] = []
        self.progress: Progress | None = None
        self.first_detection_step: int | None = None
        self.final_loss: float | None = None
        self.final_val_loss: float | None = None
        if not self.active:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        meta = {
            **versions(env.world_size),
            "kernel_path": device_path(env.device),
            "data": loss_floor(data_dir, cfg.model.block_size),
        }
        resolved = {**cfg.model_dump(mode="json"), "meta": meta}
        (run_dir / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
        self.sinks.append(RunFiles(run_dir))
        if cfg.wandb.mode != "disabled":
            self.sinks.append(
                WandbSink(
                    cfg.wandb,
                    run_dir,
                    cfg.run.name,
                    resolved,
                    wandb_tags(cfg),
                    group=wandb_group(cfg),
                )
            )

    def message(self, text: str) -> None:
        if self.active:
            (self.progress.message if self.progress else print)(text)

    def metrics(self, line: dict[str, Any]) -> None:
        if not self.active:
            return
        if "loss" in line:
            self.final_loss = line["loss"]
            if self.progress is None:
                self.progress = Progress(self.cfg.train.max_steps, line["step"] - 1)
            self.progress.update(line)
        if "val_loss" in line:
            self.final_val_loss = line["val_loss"]
            self.message(f"step {line['step']}: val loss {line['val_loss']:.4f}")
        for sink in self.sinks:
            sink.metrics(line)

    def event(self, event: dict[str, Any]) -> None:
        if not self.active:
            return
        if "metric" in event:
            self.message(
                f"step {event['step']}: {event['kind']} {event['metric']}={event['value']} "
                f"(threshold {event['threshold']})"
            )
        for sink in self.sinks:
            sink.event(event)

    def summary(self, status: str, steps: int, watch) -> dict[str, Any]:
        summary = {
            "status": status,
            "steps": steps,
            "final_loss": self.final_loss,
            "final_val_loss": self.final_val_loss,
            "divergences": watch.count,
            "first_divergence_step": watch.first_detection_step,
            "time": time.time(),
        }
        if self.active:
            for sink in self.sinks:
                sink.summary(summary)
        return summary

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()
        for sink in self.sinks:
            sink.close()
