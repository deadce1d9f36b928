"""The README and docs/ as a reader uses them: every command runs as written, every link resolves.

Each line of a fenced ```bash block in README.md and docs/**/*.md is classified:
- runnable here: `python -m MODULE ...`, `python SCRIPT.py ...`, and single-node `torchrun ...
  train.py` / `torchrun ... -m MODULE`. The program runs with `--help`, or with the line's own
  arguments plus `--dry-run` where it has one (DRY_RUN), and must exit 0;
- not runnable here, with the reason (SKIPPED, multi-node torchrun);
- anything else fails the test until it is classified here.

Programs run in this process (runpy), so torch and DeepSpeed are imported once; identical
invocations run once. Leading `VAR=value` assignments are dropped, and the body of a one-line
`for VAR in a b c; do` loop is checked once per value.
"""

from __future__ import annotations

import contextlib
import io
import re
import runpy
import shlex
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]

# Programs with a --dry-run that checks the line's own arguments without running anything.
DRY_RUN = {"launch.sweep"}

# First words of lines that cannot run in a test, and why.
SKIPPED = {
    "make": "installs packages, then trains or runs the whole suite",
    "pip": "installs packages",
    "srun": "needs a SLURM cluster",
    "sbatch": "needs a SLURM cluster",
    "wandb": "talks to wandb.ai",
}
MULTI_NODE = "torchrun over several nodes needs the other hosts"

# Module names the docs used before the packages moved (issue 21); none may come back.
RETIRED = re.compile(
    r"\b(monitor\.(replay|diagnose|kernel_path|signals|aeos|bench|diagnosis_report)"
    r"|optim\.bench|data\.bench|train\.run|DESIGN\.md)\b"
)

ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
FOR_LOOP = re.compile(r"^for (\w+) in ([^;]+); do$")


@dataclass(frozen=True)
class Command:
    where: str  # doc:line
    text: str  # the line as written (loop variables expanded)
    program: str | None  # "train.py" or a module name; None when skipped
    argv: tuple[str, ...]  # what the program runs with here
    skipped: str | None = None  # why it cannot run here


def bash_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, logical line) of every fenced bash block; continuations joined."""
    lines, inside, pending, start = [], False, "", 0
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        stripped = raw.strip()
        if stripped.startswith("```"):
            inside = not inside and stripped == "```bash"
            continue
        if not inside or not stripped:
            continue
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        lines.append((start, pending + stripped))
        pending = ""
    return lines


def expanded(lines: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """The lines with `for VAR in ...; do` ... `done` unrolled (one level, no nesting)."""
    out, loop = [], None
    for number, line in lines:
        match = FOR_LOOP.match(line)
        if match:
            loop = (match.group(1), match.group(2).split())
        elif line == "done":
            loop = None
        elif loop is None:
            out.append((number, line))
        else:
            name, values = loop
            for value in values:
                out.append((number, re.sub(rf"\$\{{?{name}\}}?", value, line)))
    return out


def classify(where: str, line: str) -> Command:
    words = shlex.split(line, comments=True)
    while words and ENV_ASSIGNMENT.match(words[0]):
        words.pop(0)
    if not words:
        return Command(where, line, None, (), skipped="a comment")
    if words[0] in SKIPPED:
        return Command(where, line, None, (), skipped=SKIPPED[words[0]])
    if words[0] == "torchrun":
        nodes = [w.split("=", 1)[1] for w in words if w.startswith("--nnodes=")]
        nodes += [words[i + 1] for i, w in enumerate(words[:-1]) if w == "--nnodes"]
        if any(n != "1" for n in nodes):
            return Command(where, line, None, (), skipped=MULTI_NODE)
        start = next((i for i, w in enumerate(words) if w == "-m" or w.endswith(".py")), None)
        words = ["python", *words[start:]] if start is not None else words
    if words[0] in ("python", "python3") and len(words) > 1:
        if words[1] == "-m" and len(words) > 2:
            program, args = words[2], words[3:]
        elif words[1].endswith(".py"):
            program, args = words[1], words[2:]
        else:
            program, args = None, []
        if program is not None:
            if program in DRY_RUN:
                argv = (*args, *([] if "--dry-run" in args else ["--dry-run"]))
            else:
                argv = ("--help",)
            return Command(where, line, program, argv)
    raise AssertionError(
        f"{where}: unclassified command '{line}': make it runnable, or add its first word to "
        "tests/test_docs.py's SKIPPED with the reason"
    )


def collect() -> list[Command]:
    commands = []
    for path in DOCS:
        name = path.relative_to(ROOT)
        for number, line in expanded(bash_lines(path)):
            try:
                commands.append(classify(f"{name}:{number}", line))
            except AssertionError as err:  # reported by test_every_command_is_classified
                commands.append(Command(f"{name}:{number}", line, None, (), skipped=f"!{err}"))
    return commands


COMMANDS = collect()
RUNS: dict[tuple[str, tuple[str, ...]], Command] = {}
for _command in COMMANDS:
    if _command.program is not None:
        RUNS.setdefault((_command.program, _command.argv), _command)


def run_program(program: str, argv: tuple[str, ...]) -> tuple[int, str]:
    """Run `python program argv` (a script path or `-m` module) here; (exit status, output)."""
    output = io.StringIO()
    code: object = 0
    old_argv = sys.argv
    sys.argv = [program, *argv]
    try:
        with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # runpy: "found in sys.modules" when re-run
                if program.endswith(".py"):
                    runpy.run_path(str(ROOT / program), run_name="__main__")
                else:
                    runpy.run_module(program, run_name="__main__", alter_sys=True)
    except SystemExit as exit_:
        code = exit_.code
    finally:
        sys.argv = old_argv
    if code is None:
        code = 0
    if not isinstance(code, int):  # sys.exit("message")
        output.write(str(code))
        code = 1
    return code, output.getvalue()


def test_every_command_is_classified():
    unknown = [c.skipped[1:] for c in COMMANDS if c.skipped and c.skipped.startswith("!")]
    assert not unknown, "\n".join(unknown)
    assert RUNS, "no runnable command found in README.md and docs/"


@pytest.mark.parametrize(("program", "argv"), list(RUNS), ids=[" ".join((p, *a)) for p, a in RUNS])
def test_documented_command_runs(program, argv, monkeypatch):
    """When this fails, fix the doc line (or the program) that the message names."""
    monkeypatch.chdir(ROOT)  # the docs' paths are relative to the repository root
    command = RUNS[(program, argv)]
    code, output = run_program(program, argv)
    ran = f"{program} {' '.join(argv)}"
    assert code == 0, f"{command.where}: '{command.text}', run as `{ran}`:\n{output[-3000:]}"


def test_the_readme_opens_with_the_two_commands():
    first = next(line for _, line in bash_lines(ROOT / "README.md"))
    second = [line for _, line in bash_lines(ROOT / "README.md")][1]
    assert shlex.split(first, comments=True) == ["make", "train"]
    assert shlex.split(second, comments=True) == ["make", "test"]


def test_the_readme_is_a_front_door():
    """Deep sections belong in docs/; the README links to them."""
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250


def test_every_relative_link_resolves():
    broken = []
    for path in DOCS:
        text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)  # links, not code
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"^[a-z]+:", target) or target.startswith("#"):
                continue  # a URL or an anchor in the same page
            if not (path.parent / target.split("#")[0]).exists():
                broken.append(f"{path.relative_to(ROOT)}: {target}")
    assert not broken, "\n".join(broken)


def test_no_retired_module_name():
    found = [
        f"{path.relative_to(ROOT)}:{number}: {match.group(0)}"
        for path in DOCS
        for number, line in enumerate(path.read_text().splitlines(), 1)
        for match in RETIRED.finditer(line)
    ]
    assert not found, "\n".join(found)
