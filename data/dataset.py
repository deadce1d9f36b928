"""The prepared-dataset contract: what a directory made by `python -m data.prepare` holds.

A prepared directory has `train.bin` and `val.bin` (little-endian uint16 token ids) and
`meta.json` (tokenizer, counts, split, sha256 of each file). It is written in a hidden sibling
and renamed into place, `meta.json` last, so a `meta.json` present means finished. Every maker
of such directories (text corpora, the built-in corpus, the n-gram stream) and every reader (the
loader, the run record) holds to this one module, which imports nothing heavier than the
standard library.
"""

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

FORMAT_VERSION = 1
META_FILE = "meta.json"
SPLITS = ("train", "val")
OPENWEBTEXT = "openwebtext"  # the one hub dataset `data.dataset` names; made by data.prepare


class DataError(ValueError):
    """A problem with the data the user can fix; the message is one line that says how."""


def read_meta(directory: Path) -> dict[str, Any] | None:
    """The `meta.json` of a prepared directory (None if it has none); one-line error if broken."""
    meta_path = Path(directory) / META_FILE
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(
            f"{meta_path} is unreadable ({err}): prepare the dataset again "
            "(python -m data.prepare ... --force)"
        ) from None
    if not isinstance(meta, dict) or not isinstance(meta.get("splits", {}), dict):
        raise DataError(f"{meta_path} is not a data.prepare meta.json: prepare the dataset again")
    return meta


def finish(
    work_dir: Path,
    out_dir: Path,
    meta: dict[str, Any],
    force: bool,
    inputs: Sequence[Path] = (),
) -> None:
    """Write `meta.json` into `work_dir` and rename it to `out_dir`.

    meta.json is written last: its presence is what marks a directory as finished.
    """
    with (work_dir / META_FILE).open("w") as out:
        out.write(json.dumps(meta, indent=2) + "\n")
        sync(out)
    install(work_dir, out_dir, force, inputs)


def check_writable(out_dir: Path, force: bool, inputs: Sequence[Path] = ()) -> None:
    """Refuse an output that would destroy something other than an earlier prepared dataset.

    `--force` replaces a prepared dataset (a directory with its meta.json) and nothing else:
    never an arbitrary directory or file, and never one that holds an input.
    """
    for path in inputs:
        if out_dir.resolve() in (path.resolve(), *path.resolve().parents):
            raise DataError(
                f"--out {out_dir} holds the input {path}: write the dataset to another directory"
            )
    if not out_dir.exists():
        return
    if (out_dir / META_FILE).is_file():
        if not force:
            raise DataError(
                f"{out_dir} already holds a prepared dataset; pass --force to replace it"
            )
        return
    if not out_dir.is_dir() or any(out_dir.iterdir()):
        raise DataError(
            f"{out_dir} exists and is not a prepared dataset (no {META_FILE}); --force replaces "
            "only a prepared dataset: choose a new or empty --out"
        )


def install(work_dir: Path, out_dir: Path, force: bool, inputs: Sequence[Path]) -> None:
    """Rename the finished `work_dir` to `out_dir`; an old output is removed only afterwards."""
    check_writable(out_dir, force, inputs)  # again: another process may have finished meanwhile
    if not out_dir.exists():
        work_dir.rename(out_dir)
        return
    old_dir = out_dir.with_name(f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}")
    out_dir.rename(old_dir)
    work_dir.rename(out_dir)
    if old_dir.is_dir():
        shutil.rmtree(old_dir)
    else:
        old_dir.unlink()


def sync(file: IO[Any]) -> None:
    """On disk before the rename, so a crash cannot leave a finished-looking directory."""
    file.flush()
    os.fsync(file.fileno())


def file_sha256(path: Path) -> str:
    """The sha256 of a file, read in 16 MiB pieces."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while piece := f.read(1 << 24):
            digest.update(piece)
    return digest.hexdigest()
