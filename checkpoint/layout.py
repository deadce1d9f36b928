"""Where a run's checkpoints are on disk and which one a resume takes: names and finding only.

`checkpoint.manager` saves and loads them (and says why the layout is what it is); this module
reads the directory and nothing else, without torch, so that a sweep's plan can say from the
files alone the step a rerun will really resume from.
"""

from pathlib import Path

HARNESS_FILE = "harness.json"
MANIFEST_FILE = "manifest.json"
KEEP_FILE = "KEEP"
LATEST_FILE = "latest"
PARTIAL_PREFIX = ".partial-"
DIVERGED_PREFIX = "diverged_"
DAMAGED_PREFIX = "damaged_"
DAMAGED_FILE = "DAMAGED"
UNIVERSAL_DIR = "universal"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def step_of(path: Path) -> int:
    """The step in a checkpoint directory's name (`step_00000100` -> 100)."""
    return int(path.name.removeprefix("step_"))


def published(directory: Path) -> list[Path]:
    """Every renamed (published) checkpoint directory, readable or not, oldest first."""
    if not directory.is_dir():
        return []
    found = [p for p in directory.glob("step_*") if p.is_dir() and p.name[5:].isdigit()]
    return sorted(found, key=step_of)


def complete(directory: Path) -> list[Path]:
    """Complete checkpoints (those with a harness file), oldest first."""
    return [p for p in published(directory) if (p / HARNESS_FILE).is_file()]


def pointer(directory: Path) -> Path | None:
    """The checkpoint `latest` names, if that is a published directory."""
    try:
        path = directory / (directory / LATEST_FILE).read_text().strip()
    except OSError:
        return None
    return path if path.name.startswith("step_") and path.is_dir() else None


def candidates(directory: Path) -> list[Path]:
    """Published checkpoints in the order a resume tries them: `latest` first, then older.

    Checkpoints newer than the one `latest` names are left out: they are from before a
    rollback, on the abandoned trajectory. Without a valid pointer, newest step first.
    """
    found = published(directory)
    pointed = pointer(directory)
    if pointed is None:
        return found[::-1]
    older = [p for p in found if step_of(p) < step_of(pointed)]
    return [pointed, *older[::-1]]


def latest(directory: Path) -> Path | None:
    """The checkpoint a resume tries first, if it is complete."""
    found = [p for p in candidates(directory) if (p / HARNESS_FILE).is_file()]
    return found[0] if found else None
