"""The written diagnosis: report.md, diagnosis.json and the timeline figure (rank 0 only)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from common.files import write_json_atomic, write_text_atomic
from postmortem.signals import signal_series, steps_before
from study.compare import markdown_table

MAX_DRAWN = 10  # departed series in the figure, earliest first


def write_report(
    out: Path, result: dict[str, Any], lines: Sequence[dict[str, Any]], step: int
) -> None:
    """diagnosis.json, timeline.png (when some series departed) and report.md into `out`."""
    write_json_atomic(out / "diagnosis.json", result)
    figure = timeline_figure(out / "timeline.png", result["timeline"], lines, step)
    write_text_atomic(out / "report.md", markdown(result, figure))


def timeline_figure(
    path: Path, departures: Sequence[dict[str, Any]], lines: Sequence[dict[str, Any]], step: int
) -> Path | None:
    """The departed series over steps, each divided by its baseline, on one log axis, with the
    departures marked and the detection step drawn."""
    if not departures:
        return None
    from study.plots import new_figure, palette, save_figure

    series = signal_series(lines)
    drawn = _drawn(departures)
    start = min(d["step"] for d in drawn)
    first = max(0, start - max(10, step - start))
    fig, (ax,) = new_figure(1)
    handles, texts = [], []
    for d, color in zip(drawn, palette(len(drawn)), strict=True):
        points = [(s, v) for s, v in series[d["series"]] if first <= s <= step]
        base = d["baseline"] if d["baseline"] and math.isfinite(d["baseline"]) else 1.0
        ratios = [v / base if math.isfinite(v) and v > 0 else math.nan for _, v in points]
        (line,) = ax.plot([s for s, _ in points], ratios, color=color, lw=1.3)
        if math.isfinite(d["value"]) and d["value"] > 0:
            ax.plot(d["step"], d["value"] / base, "o", color=color, mec="black", ms=7)
        handles.append(line)
        texts.append(f"{d['series']} (left at {d['step']})")
    ax.axvline(step, color="black", ls="--", lw=1)
    ax.set_yscale("log")
    ax.set_ylabel("value / its baseline (median)")
    ax.set_title(f"departures from baseline; dashed: the detection at step {step}")
    return save_figure(fig, path, handles, texts, "Which signal departed first")


def _drawn(departures: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Up to MAX_DRAWN departures: the first of each kind of series (loss, grad norm, norms,
    update ratios, attention logits, ...), then the next ones, in departure order."""
    firsts, seen = [], set()
    for d in departures:
        family = d["series"].split("/")[0]
        if family not in seen:
            seen.add(family)
            firsts.append(d)
    rest = [d for d in departures if d not in firsts]
    chosen = (firsts + rest)[:MAX_DRAWN]
    return sorted(chosen, key=lambda d: departures.index(d))


def batch_text(batch: dict[str, Any], shown: int) -> str:
    """'loader position P (epoch E): N windows of FILE, tokens [a, b), ... and M more'."""
    ranges = ", ".join(f"[{a}, {b})" for a, b in batch["token_ranges"][:shown])
    more = len(batch["token_ranges"]) - shown
    return (
        f"loader position {batch['position']} (epoch {batch['epoch']}): "
        f"{len(batch['windows'])} windows of `{batch['file']}`, tokens {ranges}"
        + (f" and {more} more" if more > 0 else "")
    )


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def markdown(result: dict[str, Any], figure: Path | None) -> str:
    """The report: verdict, then each step's evidence, the mechanisms and the cost."""
    e, r = result["event"], result["reproduce"]
    detected = e["step"]
    sections = [
        f"# Diagnosis of detection {result['index']}: {e['kind']} of {e['metric']} "
        f"at step {detected}\n",
        f"{result['summary']}\n",
        f"Run: `{result['run_dir']}`, {result['world_size']} rank(s); replays from "
        f"`{result['checkpoint']}`"
        + (f" ({result['checkpoint_note']})" if result.get("checkpoint_note") else "")
        + f". Detection: {e['metric']} = {_fmt(e['value'])} "
        f"(threshold {_fmt(e['threshold'])}): {e['detail']}\n",
        "## 1. Reproducible or transient\n",
        "Replayed with the same batches, the detection "
        + ("recurred" if r["reproduced"] else "did not recur")
        + "; the replay was "
        + _exactness(r["exact"])
        + "\n",
    ]
    if r["mismatches"]:
        sections.append(
            "\n".join(
                f"- {m['key']} at step {m['step']}: recorded {m['recorded']!r}, "
                f"replayed {m['replayed']!r}"
                for m in r["mismatches"][:10]
            )
            + "\n"
        )
    at = r["at_detection"]
    sections.append(
        f"At step {detected}: "
        + ", ".join(
            f"{k} recorded {v['recorded']!r}, replayed {v['replayed']!r}" for k, v in at.items()
        )
        + ".\n"
    )
    sections.append(
        f"## 2. Data or state\n\n**{result['cause']}** ({result['confidence']} confidence): "
        f"{result['cause_evidence']}.\n"
    )
    rows = [
        [
            p["name"],
            str(p["start_step"]),
            "-" if p["position"] is None else str(p["position"]),
            str(p["stop_step"]),
            "yes" if p["blew_up"] else "no",
        ]
        for p in result["replays"]
    ]
    headers = ["replay", "from step", "loader position", "to step", "blew up"]
    sections.append(markdown_table(headers, rows) + "\n")
    batch = result["suspect_batch"]
    if batch:
        sections.append(f"Suspect batch: {batch_text(batch, 8)} (all in diagnosis.json).\n")
    sections.append("## 3. Which signal departed first\n")
    if result["timeline"]:
        headers = ["series", "left its baseline at step", "steps before the detection"]
        rows = [
            [d["series"], str(d["step"]), str(detected - d["step"])]
            + [_fmt(d[k]) for k in ("baseline", "value", "z")]
            for d in result["timeline"]
        ]
        sections.append(markdown_table([*headers, "baseline", "value", "robust z"], rows) + "\n")
    else:
        sections.append("No series left its baseline up to the detection.\n")
    if figure is not None:
        sections.append(f"![timeline]({figure.name})\n")
    sections.append("## 4. Likely mechanism\n")
    for i, m in enumerate(result["mechanisms"], 1):
        fixes = "; ".join(m["remedies"]) or "none proposed"
        sections.append(
            f"{i}. **{m['name']}** ({m['confidence']} confidence): {m['evidence']}. "
            f"Remedies: {fixes}."
        )
    c = result["cost"]
    sections.append(
        f"\n## Cost\n\n{c['replays']} replays, {c['steps_replayed']} steps replayed, "
        f"{c['minutes']:.2f} minutes.\n"
    )
    return "\n".join(sections)


def _exactness(exact: bool | None) -> str:
    """How the replay compared with the run: bitwise, not, or not at all (it never reached the
    detection's step, so it compared nothing)."""
    if exact is None:
        return "never compared: it did not reach the detection's step."
    return "exact (losses and grad norms equal bitwise)." if exact else "not exact:"


def summary_text(result: dict[str, Any]) -> str:
    """The one-paragraph answer: cause, mechanism, first departures, remedies, cost."""
    e, top = result["event"], result["mechanisms"][0]
    cause = result["cause"]
    head = f"Detection {result['index']} ({e['kind']} of {e['metric']} at step {e['step']}) "
    if cause in ("data", "state"):
        head += f"is reproducible and {cause}-caused ({result['confidence']} confidence): "
    elif cause == "transient":
        head += f"is transient ({result['confidence']} confidence): "
    else:
        head += "has an undetermined cause: "
    parts = [head + result["cause_evidence"] + "."]
    batch = result["suspect_batch"]
    if cause == "data" and batch:
        parts.append(f"The batch is {batch_text(batch, 3)}.")
    if cause == "state":
        parts.append(f"Likely mechanism: {top['name']} ({top['confidence']}): {top['evidence']}.")
    departed = result["timeline"][:3]
    if departed:
        parts.append(
            "First departures: "
            + "; ".join(
                f"{d['series']} at step {d['step']} ({steps_before(e['step'] - d['step'])} "
                "the detection)"
                for d in departed
            )
            + "."
        )
    if top["remedies"]:
        parts.append("Try: " + "; ".join(top["remedies"]) + ".")
    c = result["cost"]
    parts.append(
        f"Cost: {c['replays']} replays, {c['steps_replayed']} steps, {c['minutes']:.1f} minutes."
    )
    return " ".join(parts)
