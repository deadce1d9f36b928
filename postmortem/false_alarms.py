"""How often the divergence detectors fire on runs: `python -m postmortem.false_alarms RUN_DIR...`.

Replays the live watch's detectors (`monitor.detectors.DivergenceDetectors`) offline over each
run's metrics.jsonl and counts their detections per kind and metric, per 1,000 steps, with how
many of them are actionable (would make a `skip`, `rollback` or `stop` policy act). On a clean
run every detection is a false alarm.

The live watch sees the loss and grad norm of EVERY step, but metrics.jsonl holds log steps only,
so the replay is faithful only for a run logged every step (`train.log_interval=1`); a run logged
less often is replayed over its log steps and says so (`every` in the output). The attention-
and output-logit detectors get the telemetry lines, as they do live. The slingshot watch is not
replayed (it is fed per log line, so a run logged every step would feed it differently).

The detectors are configured from the run's own config.yaml, with `--set divergence.KEY=VALUE`
overrides to try other thresholds:

    python -m postmortem.false_alarms runs/calib/*                      # a table
    python -m postmortem.false_alarms RUN --set divergence.window=256 --json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from common.files import read_jsonl
from monitor.config import DivergenceConfig
from monitor.detectors import Detection, DivergenceDetectors


def _number(value: Any) -> float | None:
    """A metrics value as a float ('nan'/'inf' strings included); None when absent."""
    if value is None:
        return None
    return float(value)


def step_lines(metrics: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The training lines of a metrics.jsonl (the ones with a loss), in file order: a rolled
    back run repeats steps, and the replay sees them again as the live watch did."""
    return [line for line in metrics if "loss" in line and "step" in line]


def replay(lines: Sequence[Mapping[str, Any]], cfg: DivergenceConfig) -> list[Detection]:
    """Every detection the watch's detectors make over `lines` (training lines, in order)."""
    detectors = DivergenceDetectors.from_config(cfg)
    found: list[Detection] = []
    for line in lines:
        step, loss = int(line["step"]), _number(line["loss"])
        grad_norm = _number(line.get("grad_norm"))
        found += detectors.update(step, math.nan if loss is None else loss, grad_norm)
        attn, log_z = line.get("attn_logit_max/layers"), line.get("log_z")
        if attn is not None or log_z is not None:
            attn = None if attn is None else [float(v) for v in attn]
            found += detectors.update_telemetry(step, attn, _number(log_z))
    return found


def _label(detection: Detection) -> str:
    metric = detection.metric.split("/")[0]  # the attention layers count as one detector
    return f"{detection.kind}:{metric}"


def count(lines: Sequence[Mapping[str, Any]], detections: Sequence[Detection]) -> dict[str, Any]:
    """Steps replayed and, per detector (`kind:metric`), detections, actionable ones, their
    rate per 1,000 steps and first steps."""
    steps = [int(line["step"]) for line in lines]
    gaps = Counter(b - a for a, b in zip(steps, steps[1:], strict=False) if b > a)
    every = gaps.most_common(1)[0][0] if gaps else 1
    per: dict[str, dict[str, Any]] = {}
    for detection in detections:
        entry = per.setdefault(_label(detection), {"count": 0, "actionable": 0, "steps": []})
        entry["count"] += 1
        entry["actionable"] += int(detection.actionable)
        entry["steps"].append(detection.step)
    for entry in per.values():
        entry["per_1000_steps"] = 1000 * entry["count"] / max(len(steps), 1)
        entry["actionable_per_1000_steps"] = 1000 * entry["actionable"] / max(len(steps), 1)
    actionable = [d.step for d in detections if d.actionable]
    return {
        "steps": len(steps),
        "every": every,
        "detections": len(detections),
        "actionable": len(actionable),
        "first_actionable_step": actionable[0] if actionable else None,
        "by_detector": dict(sorted(per.items())),
    }


def run_config(run_dir: Path, overrides: Sequence[str] = ()) -> DivergenceConfig:
    """The divergence section of the run's config.yaml (the defaults where it has none), with
    `section.key=value` overrides applied."""
    from configs import parse_override, read_yaml

    path = run_dir / "config.yaml"
    section = dict(read_yaml(path).get("divergence") or {}) if path.is_file() else {}
    for text in overrides:
        key, value = parse_override(text)
        if key[0] != "divergence" or len(key) != 2:
            raise ValueError(f"--set takes divergence.KEY=VALUE, got {text!r}")
        section[key[1]] = value
    return DivergenceConfig(**section)


def false_alarms(run_dir: Path, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """`count` of one run directory's replayed detections."""
    lines = step_lines(read_jsonl(run_dir / "metrics.jsonl"))
    if not lines:
        raise ValueError(f"{run_dir}: no training lines in metrics.jsonl")
    return {"run": str(run_dir), **count(lines, replay(lines, run_config(run_dir, overrides)))}


def table(results: Sequence[Mapping[str, Any]]) -> str:
    """One row per run and detector: detections (actionable) and the rate per 1,000 steps."""
    rows = ["| run | steps | detector | detections | actionable | per 1,000 steps | first steps |"]
    rows.append("|---|---|---|---|---|---|---|")
    for result in results:
        run = Path(result["run"]).name
        if result["every"] != 1:
            run += f" (logged every {result['every']} steps)"
        if not result["by_detector"]:
            rows.append(f"| {run} | {result['steps']} | none | 0 | 0 | 0 | |")
        for label, entry in result["by_detector"].items():
            first = ", ".join(str(s) for s in entry["steps"][:5])
            rows.append(
                f"| {run} | {result['steps']} | {label} | {entry['count']} | "
                f"{entry['actionable']} | {entry['per_1000_steps']:.2f} | {first} |"
            )
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    """Exit 0; 1 when any run has an actionable detection (a clean run should have none)."""
    parser = argparse.ArgumentParser(
        prog="python -m postmortem.false_alarms", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("runs", nargs="+", type=Path, help="run directories")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="config override"
    )
    parser.add_argument("--json", action="store_true", help="one JSON object per run")
    args = parser.parse_args(argv)
    results = [false_alarms(run, args.set) for run in args.runs]
    if args.json:
        for result in results:
            print(json.dumps(result))
    else:
        print(table(results))
    return 1 if any(result["actionable"] for result in results) else 0


if __name__ == "__main__":
    sys.exit(main())
