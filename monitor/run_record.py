"""The run's record: config.yaml, metrics, events and summary on rank 0, mirrored to wandb."""

import json
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import yaml

from common.files import json_safe, read_jsonl, write_text_atomic
from configs import flatten_config
from configs.schema import TrainConfig
from data.ngram import loss_floor
from launch.distributed import DistEnv
from monitor.device_path import device_path
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


def read_summary(run_dir: Path) -> dict[str, Any] | None:
    """The run directory's summary.json, or None if it has none (or none that reads)."""
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) else None


CONFIG_HISTORY = "config_history.jsonl"
# Keys that say where or how a run is watched, not what it trains: changing them is no new
# config (every rerun may move its output or turn wandb on).
_NOT_RUN_KEYS = ("wandb.", "run.out_dir", "checkpoint.resume", "checkpoint.force_resume")


def read_config_history(run_dir: Path) -> list[dict[str, Any]]:
    """config_history.jsonl: one line per start whose config changed, oldest first; each has
    the start's `step`, the `changed` keys (old, new), `force_resume` and the whole `config`."""
    return read_jsonl(Path(run_dir) / CONFIG_HISTORY)


def config_entry_at(run_dir: Path, step: int) -> dict[str, Any] | None:
    """The history entry whose config trained `step` (the last start before it), or None for
    a run made before the history was kept."""
    earlier = [entry for entry in read_config_history(run_dir) if entry["step"] < step]
    return earlier[-1] if earlier else None


def changed_config(before: dict[str, Any] | None, after: dict[str, Any]) -> dict[str, list]:
    """{dotted key: [old, new]} for each key of the run's config that changed."""
    if before is None:
        return {}
    old, new = flatten_config(before), flatten_config(after)
    return {
        key: [old.get(key), new.get(key)]
        for key in sorted(old.keys() | new.keys())
        if old.get(key) != new.get(key) and not key.startswith(_NOT_RUN_KEYS)
    }


def is_complete(summary: dict[str, Any] | None, cfg: TrainConfig) -> bool:
    """Whether a run with this summary has already trained all of `cfg`'s steps."""
    return (
        summary is not None
        and summary.get("status") == "completed"
        and summary.get("steps") == cfg.train.max_steps
    )


class RunRecord:
    """Everything a run writes about itself; silent on ranks other than 0.

    `previous` is the summary of the run being resumed: its final losses stand until this
    process logs new ones, and a failure before this process has written a summary leaves a
    completed one as it is.
    """

    def __init__(
        self,
        run_dir: Path,
        cfg: TrainConfig,
        env: DistEnv,
        data_dir: Path,
        previous: dict[str, Any] | None,
    ):
        self.active = env.is_main
        self.run_dir = run_dir
        self.cfg = cfg
        self.sinks: list[Any] = []
        self.progress: Progress | None = None
        self.previous = previous or {}
        self.written: dict[str, Any] | None = None  # the last summary this process wrote
        self.lost: str | None = None  # the line of a lost peer (`lost_peer`), if one was
        self._summary_lock = threading.Lock()  # `lost_peer` writes from the heartbeat thread
        self.final_loss: float | None = self.previous.get("final_loss")
        self.final_val_loss: float | None = self.previous.get("final_val_loss")
        if not self.active:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        kernel_path = device_path(env.device, cfg.bf16_kernels == "emulated")
        if cfg.bf16_kernels == "emulated":  # beside `bf16`: which flash numerics it emulates
            kernel_path["bf16_flash"] = cfg.bf16_flash
        meta = {
            **versions(env.world_size),
            "kernel_path": kernel_path,
            "data": loss_floor(data_dir, cfg.model.block_size),
        }
        resolved = {**cfg.model_dump(mode="json"), "meta": meta}
        if cfg.wandb.mode != "disabled":  # first: a wandb that cannot start changes no file
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
        self.resolved = resolved  # written by `begin`, once the start has succeeded
        self.files = RunFiles(run_dir)
        self.sinks.append(self.files)
        if not (run_dir / "summary.json").exists():  # a summary from the start: its block is
            self.files.summary({**self._empty(), "status": "running", "time": time.time()})

    def begin(self, step: int, force: bool) -> None:
        """The start succeeded at `step`: write config.yaml (a failed start leaves the record as
        it was) and, when the config differs from the one in force before, append it to
        config_history.jsonl with the keys changed, and say so in a `config` event."""
        if not self.active:
            return
        config = self.cfg.model_dump(mode="json")
        history = read_config_history(self.run_dir)
        changed = changed_config(history[-1]["config"] if history else None, config)
        if changed or not history:
            entry = {"step": step, "changed": changed, "force_resume": force, "config": config}
            with open(self.run_dir / CONFIG_HISTORY, "a") as f:
                f.write(json.dumps(json_safe(entry)) + "\n")
            if history:  # the event names the change; the history keeps the whole config
                note = {"changed": changed, "force_resume": force}
                self.event({"step": step, "kind": "config", "time": time.time(), **note})
        write_text_atomic(
            self.run_dir / "config.yaml", yaml.safe_dump(self.resolved, sort_keys=False)
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
            "record_only_detections": watch.record_only,
            "time": time.time(),
        }
        self._write(summary)
        return summary

    def _write(self, summary: dict[str, Any]) -> None:
        if self.active:
            with self._summary_lock:
                for sink in self.sinks:
                    sink.summary(summary)
                self.written = summary

    def lost_peer(self, line: str) -> None:
        """The heartbeat found a peer gone (`launch.distributed.watch_peers`, which has printed
        the line): record the run failed now, while this process lives (NCCL may abort it at
        the collective timeout); a later `fail` keeps the line as the error."""
        self.lost = line
        if self.active:
            self._write(self._failed(line))

    def fail(self, err: BaseException) -> None:
        """After an exception: summary `failed` with the error, then close everything.

        A completed run's summary is left as it is when this process has not written one yet
        (a rerun that failed at start-up did not change the run).
        """
        if self.written is not None or self.previous.get("status") != "completed":
            failed = self._failed(self.lost or f"{type(err).__name__}: {err}")
            try:
                self._write(failed)
            except OSError:  # a full disk must not hide the error that filled it
                brief = {k: failed[k] for k in ("status", "steps", "error", "time")}
                self.files.summary_in_place(brief)
        try:
            self.close()
        except OSError:  # buffered lines that no longer fit: the summary above has the error
            pass

    def _failed(self, error: str) -> dict[str, Any]:
        """The summary of this run failed now with `error`: the last one written (or resumed),
        with its newest losses."""
        failed = {**self._empty(), **self.previous, **(self.written or {}), "status": "failed"}
        failed.update(final_loss=self.final_loss, final_val_loss=self.final_val_loss)
        return {**failed, "error": error, "time": time.time()}

    @staticmethod
    def _empty() -> dict[str, Any]:
        """The summary of a run that has trained no step."""
        return {
            "steps": 0,
            "final_loss": None,
            "final_val_loss": None,
            "divergences": 0,
            "first_divergence_step": None,
            "record_only_detections": 0,
        }

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()
            self.progress = None
        for sink in self.sinks:
            sink.close()
        self.sinks = []
