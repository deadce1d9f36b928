"""Read run directories (docs/run_directory.md) into `Run` objects for cross-run studies.

This module only reads the files the trainer writes; it never imports training code, so a report
can be made on a laptop from copied run directories. Readers follow the run directory's rule:
files are appended and never rewritten, so a step logged twice (resume, rollback) keeps its last
line, and a line that a killed process left half-written is skipped.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import yaml

# Event kinds that are detections (a divergence signal), as opposed to actions and bookkeeping.
DETECTION_KINDS = ("nonfinite", "spike", "drift", "attn_logit", "output_logit", "slingshot")
# Config keys that name where a run writes or logs, not what it trains: never a "difference".
IGNORED_KEYS = {"run.name", "run.out_dir", "checkpoint.resume", "checkpoint.force_resume"}
IGNORED_PREFIXES = ("meta.", "wandb.")
# Recorded facts that are part of the experiment all the same: runs on different CPU kernel
# paths are never one cell (monitor/device_path.py says why).
KERNEL_PATH_KEY = "meta.kernel_path.path"
FLOOR_KEY = "meta.data.loss_floor"
# Keys that eval-only metrics lines carry besides `val_*`; anything else makes a line a train line.
_EVAL_LINE_KEYS = {"step", "time", "tokens"}
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
_NONFINITE = {"nan": math.nan, "inf": math.inf, "+inf": math.inf, "-inf": -math.inf}
MISSING = object()  # stands for a config key that a run does not have


class StudyError(ValueError):
    """Input that cannot be studied; the message is one line for the user."""


@dataclass
class Run:
    """One run directory, read back: config, metrics by step, eval losses, events, summary.

    Config, metric lines, events and summary stay dicts: they are the run's files as written,
    free-form by design, since a run of any age may hold keys newer or older than
    configs.schema and must still be read.
    """

    name: str
    path: Path
    config: dict[str, Any]
    flat_config: dict[str, Any]
    metrics: dict[int, dict[str, Any]]  # train lines by step, the last line of each step
    val: dict[int, float]  # val_loss by step, the last eval line of each step
    events: list[dict[str, Any]]
    summary: dict[str, Any]  # summary.json, with fields it lacks computed from the other files
    notes: list[str] = field(default_factory=list)  # things the reader had to work around
    # config_history.jsonl: one entry per start that changed the config (a resume with a new
    # lr, a heal), each with its `step` and whole `config`; config.yaml is only the last
    config_history: list[dict[str, Any]] = field(default_factory=list)

    def config_at(self, step: int) -> dict[str, Any]:
        """The flat config that trained `step` (the last start before it); config.yaml's for a
        run without a history."""
        earlier = [e for e in self.config_history if e.get("step", 0) < step]
        if not earlier or not isinstance(earlier[-1].get("config"), dict):
            return self.flat_config
        return _with_defaults(earlier[-1]["config"])

    def series(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """Steps and float values of a metric (NaN where a line has null or a non-number)."""
        steps = [s for s in sorted(self.metrics) if key in self.metrics[s]]
        values = [to_float(self.metrics[s][key]) for s in steps]
        return np.asarray(steps, dtype=np.int64), np.asarray(values, dtype=np.float64)

    def val_series(self) -> tuple[np.ndarray, np.ndarray]:
        """Steps and validation losses."""
        steps = sorted(self.val)
        return np.asarray(steps, dtype=np.int64), np.asarray([self.val[s] for s in steps])

    def metric_keys(self) -> set[str]:
        """Every metric key that appears on some train line."""
        return {key for line in self.metrics.values() for key in line}

    @property
    def detections(self) -> list[dict[str, Any]]:
        """Events that are divergence detections (not actions such as skip or rollback)."""
        return [e for e in self.events if e.get("kind") in DETECTION_KINDS]

    @property
    def initial_loss(self) -> float:
        """The first finite logged training loss (NaN if none): the baseline for LR sensitivity."""
        _, losses = self.series("loss")
        finite = losses[np.isfinite(losses)]
        return float(finite[0]) if finite.size else math.nan

    @property
    def kernel_path(self) -> str | None:
        """The CPU kernel path the run recorded (None for runs made before it was recorded)."""
        return self.flat_config.get(KERNEL_PATH_KEY)

    @property
    def loss_floor(self) -> float:
        """The best loss any model can reach on the run's data (NaN where unknown)."""
        return to_float(self.flat_config.get(FLOOR_KEY))

    @property
    def mean_tok_per_s(self) -> float:
        """Mean throughput over the logged lines with a finite `tok_per_s` (NaN if none)."""
        _, values = self.series("tok_per_s")
        finite = values[np.isfinite(values)]
        return float(finite.mean()) if finite.size else math.nan


def to_float(value: Any) -> float:
    """A metric value as float: JSON numbers, "nan"/"inf" strings; null or other text -> NaN."""
    if isinstance(value, bool) or value is None:
        return math.nan
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _NONFINITE:
            return _NONFINITE[text]
        if text in ("infinity", "+infinity", "-infinity"):
            return math.inf if not text.startswith("-") else -math.inf
        if _NUMBER.fullmatch(text):
            return float(text)
    return math.nan


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config -> {"optim.lr": 0.001, ...}; lists become tuples so values can be compared.

    YAML 1.1 reads `3e-4` (no dot) as a string, so number-looking strings become floats,
    except under `meta` (a git commit such as `1234e56` is text).
    """
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, dotted + "."))
        elif isinstance(value, list):
            flat[dotted] = tuple(value)
        elif isinstance(value, str) and _NUMBER.fullmatch(value.strip()) and dotted[:5] != "meta.":
            flat[dotted] = float(value)
        else:
            flat[dotted] = value
    return flat


# The run's config history, as monitor/run_record.py writes it.
CONFIG_HISTORY = "config_history.jsonl"


def _read_jsonl(path: Path, notes: list[str]) -> list[dict[str, Any]]:
    """Objects of a JSON-lines file, skipping lines that do not parse (a killed writer's last)."""
    if not path.is_file():
        return []
    records, bad = [], 0
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(record, dict):
            records.append(record)
        else:
            bad += 1
    if bad:
        notes.append(f"{path.name}: skipped {bad} line(s) that are not whole JSON objects")
    return records


def _step(record: dict[str, Any]) -> int | None:
    step = record.get("step")
    if isinstance(step, bool) or not isinstance(step, int | float) or not math.isfinite(step):
        return None
    return int(step)


def _read_metrics(
    path: Path, notes: list[str]
) -> tuple[dict[int, dict[str, Any]], dict[int, float]]:
    """Train lines and eval losses by step.

    A step's last line wins. Beyond that, a train line whose step goes back (resume, rollback)
    starts a new timeline: lines of the abandoned one at that step or later are dropped, so a
    resumed run that stopped earlier does not keep the old run's tail.
    """
    metrics: dict[int, dict[str, Any]] = {}
    val: dict[int, float] = {}
    last_step = -1
    for record in _read_jsonl(path, notes):
        step = _step(record)
        if step is None:
            continue
        is_train = any(k not in _EVAL_LINE_KEYS and not k.startswith("val_") for k in record)
        if is_train:
            if step < last_step:
                metrics = {s: line for s, line in metrics.items() if s < step}
                val = {s: v for s, v in val.items() if s < step}
            last_step = step
            metrics[step] = record
        if "val_loss" in record:
            val[step] = to_float(record["val_loss"])
    return metrics, val


def _computed_summary(
    metrics: dict[int, dict[str, Any]], val: dict[int, float], events: list[dict[str, Any]]
) -> dict[str, Any]:
    """What summary.json would say, from the other files (status cannot be known)."""
    train_steps = sorted(metrics)
    detections = [e for e in events if e.get("kind") in DETECTION_KINDS and _step(e) is not None]
    # a record-only detection (a grad-norm spike the loss did not follow) is no divergence; a
    # loss that followed one began at it (as monitor.detectors.began_at, which sits above study)
    detection_steps = [
        int((e.get("facts") or {}).get("grad_norm_step", _step(e)))
        for e in detections
        if e.get("actionable", True)
    ]
    loss_steps = [s for s in train_steps if "loss" in metrics[s]]
    return {
        "status": "unknown",
        "steps": train_steps[-1] if train_steps else None,
        "final_loss": to_float(metrics[loss_steps[-1]]["loss"]) if loss_steps else None,
        "final_val_loss": val[max(val)] if val else None,
        "divergences": len(detection_steps),
        "first_divergence_step": min(detection_steps) if detection_steps else None,
        "record_only_detections": len(detections) - len(detection_steps),
    }


def _merge_summary(path: Path, computed: dict[str, Any], notes: list[str]) -> dict[str, Any]:
    """summary.json where it has a value, computed values elsewhere; notes where they disagree."""
    summary_path = path / "summary.json"
    if not summary_path.is_file():
        notes.append("no summary.json: status unknown, other fields computed from the logs")
        return dict(computed)
    try:
        written = json.loads(summary_path.read_text())
    except json.JSONDecodeError:
        notes.append("summary.json is not valid JSON: fields computed from the logs")
        return dict(computed)
    if not isinstance(written, dict):
        notes.append("summary.json is not an object: fields computed from the logs")
        return dict(computed)
    merged = dict(computed)
    merged.update({k: v for k, v in written.items() if v is not None})
    for key in ("final_loss", "final_val_loss"):  # "nan" strings -> float
        if merged[key] is not None:
            merged[key] = to_float(merged[key])
    for key in ("steps", "final_loss", "divergences"):
        mine, theirs = computed.get(key), written.get(key)
        if mine is None or theirs is None:
            continue
        a, b = to_float(mine), to_float(theirs)
        if math.isfinite(a) and math.isfinite(b) and not math.isclose(a, b, rel_tol=1e-6):
            notes.append(f"summary.json has {key}={theirs} but the logs give {mine} (stale?)")
    return merged


@lru_cache(maxsize=1)
def schema_defaults() -> dict[str, Any]:
    """Every config key's default, flattened. A run made before a key existed ran as its default
    says (a new key defaults to the old behaviour), so a run that lacks the key is read with it:
    otherwise the key would seem to vary and split runs that differ in nothing."""
    from configs.schema import TrainConfig

    return flatten(TrainConfig().model_dump(mode="json"))


# An emulated bf16 run made before `bf16_flash` existed computed attention's backward through
# autograd's fp32 softmax, not as any flash kernel: reading it as the key's default (`fa2`) would
# pool it with runs of another backward.
FORWARD_ONLY_FLASH = "forward-only (before bf16_flash)"


def _with_defaults(config: dict[str, Any]) -> dict[str, Any]:
    """The run's flat config, with the defaults of keys newer than the run (`schema_defaults`)."""
    flat = {**schema_defaults(), **flatten(config)}
    if "bf16_flash" not in config and flat.get("bf16_kernels") == "emulated":
        flat["bf16_flash"] = FORWARD_ONLY_FLASH
    return flat


def load_run(path: str | Path) -> Run:
    """Read one run directory; a missing config.yaml is a StudyError."""
    path = Path(path)
    config_path = path / "config.yaml"
    if not config_path.is_file():
        raise StudyError(f"'{path}' is not a run directory (no config.yaml)")
    try:
        config = yaml.safe_load(config_path.read_text()) or {}
    except yaml.YAMLError:
        raise StudyError(f"'{config_path}' is not valid YAML") from None
    if not isinstance(config, dict):
        raise StudyError(f"'{config_path}' must hold a mapping of sections")
    notes: list[str] = []
    if not (path / "metrics.jsonl").is_file():
        notes.append("no metrics.jsonl")
    metrics, val = _read_metrics(path / "metrics.jsonl", notes)
    events = [e for e in _read_jsonl(path / "events.jsonl", notes) if _step(e) is not None]
    summary = _merge_summary(path, _computed_summary(metrics, val, events), notes)
    history = [e for e in _read_jsonl(path / CONFIG_HISTORY, notes) if _step(e) is not None]
    notes += [_changed_note(entry) for entry in history[1:] if entry.get("changed")]
    return Run(
        name=path.name,
        path=path,
        config=config,
        flat_config=_with_defaults(config),
        metrics=metrics,
        val=val,
        events=events,
        summary=summary,
        notes=notes,
        config_history=history,
    )


def _changed_note(entry: dict[str, Any]) -> str:
    """'config changed at step S: key old -> new, ...': the run's config is not one throughout,
    and its table row shows config.yaml's, the last."""
    changes = ", ".join(
        f"{key} {pair[0]!r} -> {pair[1]!r}"
        for key, pair in entry["changed"].items()
        if isinstance(pair, list) and len(pair) == 2
    )
    return f"config changed at step {entry['step']}: {changes}"


def _is_run_dir(path: Path) -> bool:
    return (path / "config.yaml").is_file()


def load_runs(paths: Iterable[str | Path]) -> list[Run]:
    """Runs from any mix of run directories and sweep directories (whose subdirectories are runs).

    Order follows the arguments, a sweep's runs sorted by name; a run given twice is read once.
    """
    run_dirs: list[Path] = []
    for arg in paths:
        path = Path(arg)
        if not path.exists():
            raise StudyError(f"'{path}' does not exist")
        if not path.is_dir():
            raise StudyError(f"'{path}' is a file, not a run or sweep directory")
        if _is_run_dir(path):
            run_dirs.append(path)
            continue
        children = sorted(p for p in path.iterdir() if p.is_dir() and _is_run_dir(p))
        if not children:
            raise StudyError(
                f"'{path}' is neither a run directory (no config.yaml) "
                "nor a sweep directory (no subdirectory with a config.yaml)"
            )
        run_dirs.extend(children)
    seen: set[Path] = set()
    runs = []
    for run_dir in run_dirs:
        if run_dir.resolve() not in seen:
            seen.add(run_dir.resolve())
            runs.append(load_run(run_dir))
    if not runs:
        raise StudyError("no runs given")
    return runs


def canonical(value: Any) -> str:
    """A hashable, order-stable stand-in so 0.1 == 0.1 and lists compare by content."""
    if value is MISSING:
        return "<missing>"
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # 1 and 1.0 are the same setting
    return json.dumps(value, sort_keys=True, default=str)


def ignored(key: str) -> bool:
    """Whether a config key is bookkeeping (names, paths, logging), not part of the experiment."""
    if key == KERNEL_PATH_KEY:
        return False
    return key in IGNORED_KEYS or any(key.startswith(p) for p in IGNORED_PREFIXES)


def varying_keys(runs: Sequence[Run]) -> list[str]:
    """Dotted config keys whose values differ across runs (a key absent in some runs differs)."""
    keys = sorted({k for run in runs for k in run.flat_config if not ignored(k)})
    return [
        key
        for key in keys
        if len({canonical(run.flat_config.get(key, MISSING)) for run in runs}) > 1
    ]


def format_value(value: Any) -> str:
    """Short text for a config value in a label: 0.0003, 1e-05, bf16, (0.9,0.95)."""
    if value is MISSING or value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple):
        return "(" + ",".join(format_value(v) for v in value) + ")"
    return str(value)


def short_names(keys: Sequence[str]) -> dict[str, str]:
    """Last component of each dotted key, or the full key where two keys share the last one."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last, strict=True)}


def label(run: Run, keys: Sequence[str]) -> str:
    """`weight_decay=0.1 precision=bf16`: the run's values of `keys`, or its name if none."""
    if not keys:
        return run.name
    names = short_names(keys)
    return " ".join(f"{names[k]}={format_value(run.flat_config.get(k, MISSING))}" for k in keys)


def labels(runs: Sequence[Run], keys: Sequence[str] | None = None) -> list[str]:
    """One label per run from the varying keys, made unique with the run name if needed."""
    keys = varying_keys(runs) if keys is None else keys
    texts = [label(run, keys) for run in runs]
    unique = []
    for text, run in zip(texts, runs, strict=True):
        if texts.count(text) > 1:
            text = (
                f"{run.path.parent.name}/{run.name}" if text == run.name else f"{text} [{run.name}]"
            )
        unique.append(text)
    return unique


def report_dir(first: str, name: str, elsewhere: Path) -> Path:
    """`<sweep dir>/<name>` when `first` is a sweep directory, else `elsewhere`: a report is
    never written inside a run directory."""
    path = Path(first)
    if path.is_dir() and not (path / "config.yaml").is_file():
        return path / name
    return elsewhere
