"""Where metrics and events go: the run directory's files (the record), wandb and the terminal.

Only rank 0 writes. The files are the source of truth; wandb mirrors them and may be off.
"""

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from common.files import json_safe, write_json_atomic
from configs import ConfigError
from monitor.config import WandbConfig

# metrics.jsonl keys -> wandb names, namespaced and with units where they have one.
WANDB_NAMES = {
    "loss": "train/loss",
    "val_loss": "val/loss",
    "lr": "optim/lr",
    "grad_norm": "optim/grad_norm",
    "grad_norm_clipped": "optim/grad_norm_clipped",
    "clip_frac": "optim/clip_frac",
    "param_norm": "optim/param_norm",
    "tok_per_s": "perf/tokens_per_s",
    "mfu": "perf/mfu",
    "step_time_ms": "perf/step_time_ms",
    "peak_mem_mb": "perf/peak_mem_mb",
    "tokens": "train/tokens",
    "skipped_steps": "train/skipped_steps",
}


class RunFiles:
    """Appends to metrics.jsonl and events.jsonl and keeps summary.json current."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        self._metrics = open(run_dir / "metrics.jsonl", "a", buffering=1)
        self._events = open(run_dir / "events.jsonl", "a", buffering=1)

    def metrics(self, line: dict[str, Any]) -> None:
        self._metrics.write(json.dumps(json_safe(line)) + "\n")

    def event(self, event: dict[str, Any]) -> None:
        self._events.write(json.dumps(json_safe(event)) + "\n")

    def summary(self, summary: dict[str, Any]) -> None:
        write_json_atomic(self.run_dir / "summary.json", summary)

    def summary_in_place(self, summary: dict[str, Any]) -> None:
        """`summary` written over summary.json's own bytes: no new file, no rename, so no new
        block on a disk the run has filled (the file's first block is already its own). The
        last resort of a failure's record; a short summary keeps it within that block."""
        path = self.run_dir / "summary.json"
        with open(path, "r+" if path.exists() else "w") as f:
            f.write(json.dumps(json_safe(summary)) + "\n")
            f.truncate()
            f.flush()
            os.fsync(f.fileno())

    def close(self) -> None:
        self._metrics.close()
        self._events.close()


class WandbSink:
    """Mirrors metrics, events and the summary into one wandb run per run directory.

    Every event also lands in the wandb summary as `events/<kind>`: its fields (without the
    evidence window) and how many of its kind the run has had. Detections, rollbacks and stops
    are raised as wandb alerts too. The run id is derived from the run directory, so a resumed
    or requeued job continues the same wandb run instead of starting a new one.
    """

    ALERT_KINDS = ("rollback", "stop")

    def __init__(
        self,
        cfg: WandbConfig,
        run_dir: Path,
        name: str,
        config: dict,
        tags: list[str],
        group: str | None = None,
    ):
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        self._wandb = wandb
        self._counts: dict[str, int] = {}
        try:
            self.run = wandb.init(
                project=cfg.project,
                group=group or cfg.group,
                name=name,
                id=wandb_run_id(run_dir),
                resume="allow",
                dir=str(run_dir),
                mode=cfg.mode,
                config=config,
                tags=tags + cfg.tags,
                settings=wandb.Settings(console="off", x_disable_stats=True),
            )
        except wandb.errors.Error as err:  # no credentials, no network: the user's to fix
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise ConfigError(
                f"wandb.mode={cfg.mode} could not start wandb ({first}): run `wandb login` or "
                "set WANDB_API_KEY, or use wandb.mode=offline (sync later) or disabled"
            ) from None

    def metrics(self, line: dict[str, Any]) -> None:
        step = line["step"]
        payload = {WANDB_NAMES.get(k, f"telemetry/{k}"): v for k, v in line.items()}
        payload.pop("step", None)
        self.run.log(json_safe(payload), step=step)

    def event(self, event: dict[str, Any]) -> None:
        kind = event["kind"]
        self._counts[kind] = self._counts.get(kind, 0) + 1
        fields = {k: v for k, v in event.items() if k != "evidence"}
        self.run.summary[f"events/{kind}"] = json_safe({**fields, "count": self._counts[kind]})
        if "metric" not in event and kind not in self.ALERT_KINDS:
            return
        if "metric" in event:
            text = f"{event['metric']}={event['value']} (threshold {event['threshold']})"
            text += f": {event.get('detail', '')}"
        else:
            text = ", ".join(f"{k}={v}" for k, v in fields.items() if k not in ("kind", "time"))
        try:
            self.run.alert(
                title=f"{kind} at step {event['step']}",
                text=text,
                level=self._wandb.AlertLevel.ERROR
                if kind == "stop"
                else self._wandb.AlertLevel.WARN,
            )
        except Exception:  # an alert must never take the run down; the summary has the event
            pass

    def summary(self, summary: dict[str, Any]) -> None:
        for key, value in summary.items():
            self.run.summary[key] = json_safe(value)

    def close(self) -> None:
        self.run.finish()
        # wandb-core may still hold the run's records after `finish` and write them out only
        # when its service stops (at interpreter exit): stop it now, so that the offline run
        # file is complete once the run is over, also for a process that goes on running
        self._wandb.teardown()


def wandb_run_id(run_dir: Path) -> str:
    """A stable wandb id for a run directory (same directory, same wandb run)."""
    import hashlib

    return hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:16]


class Progress:
    """A progress bar on a terminal, plain log lines otherwise."""

    def __init__(self, total_steps: int, start_step: int):
        self.total = total_steps
        self.tty = sys.stderr.isatty()
        self.bar = None
        if self.tty:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)
        self.last_step = start_step
        self.start = time.time()

    def update(self, line: dict[str, Any]) -> None:
        step = line["step"]
        if self.bar is not None:
            self.bar.update(step - self.last_step)
            self.bar.set_postfix(loss=f"{line['loss']:.4f}", tok_s=f"{line['tok_per_s']:.0f}")
        else:
            extra = f" val {line['val_loss']:.4f}" if "val_loss" in line else ""
            print(
                f"step {step}/{self.total} loss {line['loss']:.4f}{extra} "
                f"lr {line['lr']:.2e} grad_norm {line['grad_norm']:.3f} "
                f"{line['tok_per_s']:.0f} tok/s",
                flush=True,
            )
        self.last_step = step

    def message(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
