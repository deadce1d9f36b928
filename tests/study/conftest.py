"""Synthetic run directories in the trainer's on-disk format (docs/run_directory.md).

The losses follow `curve(step, final)`, which starts at exactly 10.0 at step 0 and ends at exactly
`final` at step 20, so tests can state expected table values by hand.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

NUM_STEPS = 20
INITIAL_LOSS = 10.0

BASE_CONFIG: dict[str, Any] = {
    "run": {"name": "x", "out_dir": "runs", "seed": 1337, "device": "cpu"},
    "model": {"size": "tiny", "n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 128},
    "data": {"dataset": "builtin"},
    "optim": {
        "name": "adamw",
        "lr": 3.0e-3,
        "min_lr": 3.0e-4,
        "warmup_steps": 5,
        "schedule": "cosine",
        "weight_decay": 0.1,
        "betas": [0.9, 0.95],
        "eps": 1.0e-8,
        "grad_clip": 1.0,
    },
    "train": {"max_steps": NUM_STEPS, "micro_batch_size": 16, "grad_accum_steps": 1},
    "precision": "bf16",
    "bf16_flash": "fa2",  # every run since issue 20 records it
    "zero_stage": 0,
    "divergence": {"policy": "record"},
    "wandb": {"mode": "offline", "group": "g"},
    "meta": {"git_commit": "abc1234", "world_size": 1, "torch": "2.13.0"},
}


def curve(step: int, final: float) -> float:
    """10.0 at step 0, `final` at step NUM_STEPS, a parabola in between."""
    return final + (INITIAL_LOSS - final) * (1 - step / NUM_STEPS) ** 2


def train_line(step: int, loss: Any, **extra: Any) -> dict[str, Any]:
    """A metrics line with the core keys of docs/run_directory.md; tok_per_s = 1000 + 10 * step."""
    line = {
        "step": step,
        "tokens": step * 2048,
        "loss": loss,
        "lr": 3e-3,
        "grad_norm": 1.0 + 0.1 * step,
        "param_norm": 100.0 + step,
        "param_norm/decay": 90.0 + step,
        "param_norm/no_decay": 10.0,
        "eff_lr/decay": 3e-3 / (90.0 + step),
        "eff_lr/no_decay": 3e-4,
        "attn_logit_max": 5.0 + step,
        "log_z": 0.1 * step,
        "tok_per_s": 1000.0 + 10 * step,
        "mfu": 0.01,
        "time": 1700000000.0 + step,
    }
    line.update(extra)
    return line


def event(step: int, kind: str, **extra: Any) -> dict[str, Any]:
    """An events.jsonl object; detections also get metric, value, threshold, detail."""
    record: dict[str, Any] = {"step": step, "kind": kind, "time": 1700000000.0 + step}
    if kind in ("nonfinite", "spike", "drift", "attn_logit", "output_logit"):
        record.update(metric="loss", value=9.5, threshold=6.0, detail="z=7.1")
    record.update(extra)
    return record


def write_run(
    root: Path,
    name: str,
    config: dict[str, Any],
    lines: list[dict[str, Any]],
    events: list[dict[str, Any]] = (),
    summary: dict[str, Any] | None = None,
    tail: str = "",
) -> Path:
    """A run directory; `tail` is appended raw after the lines (a killed writer's partial line)."""
    path = root / name
    path.mkdir(parents=True)
    config = copy.deepcopy(config)
    config["run"]["name"] = name
    config["run"]["out_dir"] = str(root)
    (path / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    (path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines) + tail)
    (path / "events.jsonl").write_text("".join(json.dumps(x) + "\n" for x in events))
    if summary is not None:
        (path / "summary.json").write_text(json.dumps(summary))
    return path


def config_with(**dotted: Any) -> dict[str, Any]:
    """BASE_CONFIG with `section__key=value` overrides (`optim__lr=1e-3`, `precision="fp32"`)."""
    config = copy.deepcopy(BASE_CONFIG)
    for key, value in dotted.items():
        *sections, last = key.split("__")
        node = config
        for section in sections:
            node = node[section]
        node[last] = value
    return config


@pytest.fixture(scope="session")
def sweep_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four runs: weight_decay {0, 0.1} x precision {bf16, fp32}, each with a quirk.

    - wd0-bf16: clean; eval lines are separate lines at steps 10 and 20. Final loss 3.3.
    - wd0.1-bf16: spike at step 10, rollback at 12 back to 8, steps 9..20 logged again; the first
      timeline is 0.05 higher (and 9.5 at the spike). Final loss 3.25, eval merged into lines.
    - wd0-fp32: spike at 14, NaN loss and inf grad norm at 15, stopped there: diverged.
    - wd0.1-fp32: no summary.json, a drift at step 6, killed while writing step 19.
    """
    root = tmp_path_factory.mktemp("sweep")
    (root / "sweep.yaml").write_text("grid:\n  optim.weight_decay: [0.0, 0.1]\n")
    (root / "logs").mkdir()  # not a run: ignored

    lines = [train_line(s, curve(s, 3.3)) for s in range(NUM_STEPS + 1)]
    lines.insert(11, {"step": 10, "val_loss": 5.0})
    lines.append({"step": 20, "val_loss": 3.4})
    write_run(
        root,
        "wd0-bf16",
        config_with(optim__weight_decay=0.0),
        lines,
        [event(10, "checkpoint")],
        {
            "status": "completed",
            "steps": 20,
            "final_loss": 3.3,
            "final_val_loss": 3.4,
            "divergences": 0,
            "first_divergence_step": None,
        },
    )

    first = [train_line(s, curve(s, 3.25) + 0.05) for s in range(13)]
    first[10] = train_line(10, 9.5, val_loss=5.5)
    second = [train_line(s, curve(s, 3.25)) for s in range(9, NUM_STEPS + 1)]
    second[1]["val_loss"] = 4.9  # step 10
    second[-1]["val_loss"] = 3.35
    write_run(
        root,
        "wd0.1-bf16",
        config_with(),
        first + second,
        [
            event(10, "spike"),
            event(12, "rollback", to_step=8),
            event(
                12,
                "heal",
                action="heal",
                detection={"kind": "spike", "metric": "loss"},
                cause="state",
                mechanism="optimizer",
                text="lr x 0.1 for steps 8-207, then the schedule",
                rollback_to=8,
                steps_lost=4,
            ),
        ],
        {
            "status": "completed",
            "steps": 20,
            "final_loss": 3.25,
            "final_val_loss": 3.35,
            "divergences": 1,
            "first_divergence_step": 10,
        },
    )

    lines = [train_line(s, curve(s, 3.2)) for s in range(15)]
    lines.append(train_line(15, "nan", grad_norm="inf", log_z=None))
    write_run(
        root,
        "wd0-fp32",
        config_with(optim__weight_decay=0.0, precision="fp32"),
        lines,
        [
            event(14, "spike"),
            event(15, "nonfinite", metric="loss", value="nan"),
            event(15, "stop"),
            event(
                14,
                "diagnosis",
                event=0,
                status="done",
                cause="state",
                confidence="medium",
                mechanism="optimizer",
            ),
        ],
        {
            "status": "diverged",
            "steps": 15,
            "final_loss": "nan",
            "final_val_loss": None,
            "divergences": 2,
            "first_divergence_step": 14,
        },
    )

    lines = [train_line(s, curve(s, 3.4)) for s in range(19)]
    write_run(
        root,
        "wd0.1-fp32",
        config_with(precision="fp32"),
        lines,
        [event(6, "drift"), event(10, "checkpoint")],
        None,
        tail='{"step": 19, "loss": 3.4',
    )
    return root


# (optimizer, lr) -> (status, final loss) of the LR grid; min_lr follows lr (lr / 10).
LR_GRID: dict[tuple[str, float], tuple[str, Any]] = {
    ("adamw", 1e-3): ("completed", 4.0),
    ("adamw", 3e-3): ("completed", 3.5),
    ("adamw", 1e-2): ("completed", 12.0),  # worse than the initial loss: counts as 10.0
    ("adam_l2", 1e-3): ("completed", 4.2),
    ("adam_l2", 3e-3): ("diverged", "nan"),  # non-finite: counts as 10.0
    ("adam_l2", 1e-2): ("diverged", 6.0),  # diverged, finite: counts as 10.0
}


@pytest.fixture(scope="session")
def lr_sweep_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six runs: optim.name {adamw, adam_l2} x optim.lr {1e-3, 3e-3, 1e-2}, see LR_GRID."""
    root = tmp_path_factory.mktemp("lr_sweep")
    for (optimizer, lr), (status, final) in LR_GRID.items():
        config = config_with(optim__name=optimizer, optim__lr=lr, optim__min_lr=lr / 10)
        end = final if isinstance(final, float) else 5.0
        lines = [train_line(s, curve(s, end)) for s in range(NUM_STEPS)]
        lines.append(train_line(NUM_STEPS, final))
        diverged = status == "diverged"
        summary = {
            "status": status,
            "steps": NUM_STEPS,
            "final_loss": final,
            "final_val_loss": None,
            "divergences": int(diverged),
            "first_divergence_step": NUM_STEPS if diverged else None,
        }
        events = [event(NUM_STEPS, "spike")] if diverged else []
        write_run(root, f"{optimizer}-lr{lr:g}", config, lines, events, summary)
    return root


@pytest.fixture
def make_run(tmp_path: Path) -> Callable[..., Path]:
    """Write one run directory under tmp_path: `make_run(name, [(step, loss), ...], summary=...)`.

    Each (step, loss) becomes a full train line; other keywords go to `write_run`.
    """

    def make(name: str, losses: list[tuple[int, Any]], **kwargs: Any) -> Path:
        config = kwargs.pop("config", BASE_CONFIG)
        lines = [train_line(step, loss) for step, loss in losses]
        return write_run(tmp_path, name, config, lines, **kwargs)

    return make
