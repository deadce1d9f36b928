"""Rewrite the config-key table of docs/config.md from the schema: `python -m configs.readme`.

The table lives between the `<!-- config-keys:start -->` and `<!-- config-keys:end -->` markers;
everything outside them is left as it is. tests/test_train_cli.py fails when the table is stale.
"""

import argparse
import sys
from pathlib import Path

from configs import key_table

START, END = "<!-- config-keys:start -->", "<!-- config-keys:end -->"
CONFIG_DOC = Path(__file__).resolve().parent.parent / "docs" / "config.md"


def table_block(text: str) -> str:
    """The text between the markers (without them), stripped of surrounding newlines."""
    head, found, rest = text.partition(START)
    body, found_end, _ = rest.partition(END)
    if not found or not found_end:
        raise ValueError(f"no '{START}' ... '{END}' block")
    return body.strip("\n")


def render(text: str) -> str:
    """`text` with the block between the markers replaced by the current `key_table()`."""
    table_block(text)  # both markers present
    head, _, rest = text.partition(START)
    _, _, tail = rest.partition(END)
    return f"{head}{START}\n{key_table()}\n{END}{tail}"


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
        print(f"{path}: config-key table rewritten")
    else:
        print(f"{path}: config-key table already current")
    return 0


if __name__ == "__main__":
    sys.exit(main())
