"""Strict JSON, atomic file writes and the JSON-lines reader: the primitives of every record.

The run record (`monitor/`), the checkpoints (`checkpoint/`) and the sweeps' plans (`launch/`)
all write files that a reader (or a crash) may meet at any moment; here they share one way to
write them, and their readers one way to read an appended file whose writer may have died
mid-line. This module imports nothing of the harness, so any layer may use it.
"""

import json
import math
import os
from collections.abc import Mapping
from numbers import Integral, Real
from pathlib import Path
from typing import Any


def json_number(value: float) -> float | str:
    """A float as strict JSON allows it: non-finite values become 'nan', 'inf' or '-inf'."""
    value = float(value)
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return value


def json_safe(value: Any) -> Any:
    """A copy of a metrics value (nested dicts/lists of numbers and strings) that is strict JSON.

    Raises TypeError for anything else, so a tensor slipping into the evidence fails loudly here
    instead of later in `json.dumps`.
    """
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, Integral):
        return int(value)
    if isinstance(value, Real):
        return json_number(float(value))
    if isinstance(value, Mapping):
        return {str(key): json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(item) for item in value]
    raise TypeError(f"cannot store a {type(value).__name__} as JSON evidence: {value!r}")


def write_text_atomic(path: Path, text: str) -> None:
    """Replace `path` in one rename, so a reader or a crash never sees half a file."""
    partial = path.with_name(path.name + ".partial")
    try:
        partial.write_text(text)
        os.replace(partial, path)
    except BaseException:  # a full disk, say: never leave half a file behind
        partial.unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, data: Any) -> None:
    """`write_text_atomic` of `data` as strict JSON (non-finite floats as 'nan', 'inf')."""
    write_text_atomic(path, json.dumps(json_safe(data), indent=2) + "\n")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The objects of a JSON-lines file, in order; a torn last line (a crash) is left out."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records
