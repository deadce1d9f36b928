"""Rewrite the config-key list of docs/config.md from the schema: `python -m configs.readme`.

The list lives between the `<!-- config-keys:start -->` and `<!-- config-keys:end -->` markers;
everything outside them is left as it is. tests/test_train_cli.py fails when the list is stale.
`train.py --help` prints the same keys as a table (`configs.key_table`).
"""

import argparse
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import yaml
from pydantic import BaseModel

START, END = "<!-- config-keys:start -->", "<!-- config-keys:end -->"
CONFIG_DOC = Path(__file__).resolve().parent.parent / "docs" / "config.md"


def _keys(model: type[BaseModel], instance: BaseModel, prefix: str) -> Iterator[tuple]:
    """(dotted key, default as YAML, description) of every leaf key, in schema order."""
    for name, field in model.model_fields.items():
        value = getattr(instance, name)
        if isinstance(value, BaseModel):
            yield from _keys(type(value), value, f"{prefix}{name}.")
            continue
        default = yaml.safe_dump(value, default_flow_style=True).strip()
        yield f"{prefix}{name}", default.removesuffix("...").strip(), field.description or ""


def key_list() -> str:
    """Every config key as markdown: a heading per section, one item per key, lines <= 100."""
    from configs.schema import TrainConfig

    lines: list[str] = []
    heading = None
    for key, default, description in _keys(TrainConfig, TrainConfig(), ""):
        section = f"`{key.split('.')[0]}`" if "." in key else "Top-level keys"
        if section != heading:
            lines += [*([""] if lines else []), f"### {section}", ""]
            heading = section
        item = f"- `{key}` = `{default}`: {description}".rstrip(": ")
        lines += textwrap.wrap(
            item, width=100, subsequent_indent="  ", break_long_words=False, break_on_hyphens=False
        )
    return "\n".join(lines)


def table_block(text: str) -> str:
    """The text between the markers (without them), stripped of surrounding newlines."""
    head, found, rest = text.partition(START)
    body, found_end, _ = rest.partition(END)
    if not found or not found_end:
        raise ValueError(f"no '{START}' ... '{END}' block")
    return body.strip("\n")


def render(text: str) -> str:
    """`text` with the block between the markers replaced by the current `key_list()`."""
    table_block(text)  # both markers present
    head, _, rest = text.partition(START)
    _, _, tail = rest.partition(END)
    return f"{head}{START}\n{key_list()}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m configs.readme", description=__doc__)
    parser.add_argument(
        "path", nargs="?", type=Path, default=CONFIG_DOC, help="markdown file (docs/config.md)"
    )
    path = parser.parse_args(argv).path
    text = path.read_text()
    try:
        updated = render(text)
    except ValueError as err:
        print(f"error: {path}: {err}", file=sys.stderr)
        return 2
    if updated != text:
        path.write_text(updated)
        print(f"{path}: config-key list rewritten")
    else:
        print(f"{path}: config-key list already current")
    return 0


if __name__ == "__main__":
    sys.exit(main())
