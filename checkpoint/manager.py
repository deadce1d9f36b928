"""Atomic checkpoints of the DeepSpeed engine plus the harness state, retention and resume.

On-disk layout under `<run_dir>/checkpoints/`:
    step_00000100/        DeepSpeed's files, `rng_rank{r}.pt` per rank, `ema.pt` (train.ema),
                          `manifest.json` (size and CRC32 of every file), `harness.json` (last)
    step_.../KEEP         present on checkpoints retention must never delete (reasons inside)
    step_.../universal/   DeepSpeed's universal form, made on demand for a world-size change
    diverged_step_.../    the state at a divergence stop: kept, never resumed automatically
    damaged_step_.../     a checkpoint a resume found damaged and passed over (DAMAGED says why):
                          set aside, so neither retention nor a later save of its step erases it
    latest                the tag of the newest complete checkpoint (replaced atomically)
A checkpoint is written under `.partial-<tag>` and renamed only once every rank has finished,
so a crash at any moment leaves the previous checkpoint loadable; leftovers of a crashed save
are ignored and removed by the next save. Loading verifies the manifest first, so a truncated
or corrupted file is found before DeepSpeed reads it, identically on every rank.
"""

import json
import os
import pickle
import random
import shutil
import subprocess
import sys
import traceback
import warnings
import zlib
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
import torch
import torch.distributed as dist

from checkpoint import layout
from checkpoint.config import CheckpointConfig
from checkpoint.layout import (
    DAMAGED_FILE,
    DAMAGED_PREFIX,
    DIVERGED_PREFIX,
    HARNESS_FILE,
    KEEP_FILE,
    LATEST_FILE,
    MANIFEST_FILE,
    PARTIAL_PREFIX,
    UNIVERSAL_DIR,
    step_of,
    tag_for,
)
from common.files import write_json_atomic, write_text_atomic

_CHUNK_BYTES = 16 << 20
_TORCH_WRITER = os.path.join("torch", "serialization.py")  # torch.save's module


class OptimizerKind(TypedDict):
    name: str  # optim.name: adamw | adam_l2 | adamw_indep | adamp | adam_spd
    decoupled: bool
    weight_decay: float


class HarnessState(TypedDict):
    """Everything besides the engine that an exact resume needs."""

    step: int
    tokens: int
    loader: dict[str, Any]
    monitor: dict[str, Any]
    optimizer: OptimizerKind
    config: dict[str, Any]
    world_size: int
    zero_stage: int


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message says which and what to do."""


def _write_failure(err: BaseException, directory: Path) -> str | None:
    """What made a save fail to write, in a few words, or None if `err` is not a failed write:
    an OSError says it itself; torch's writer turns a short write into a RuntimeError of its
    own whose text varies ('unexpected pos', 'iostream error', ...), so a RuntimeError raised
    inside `torch.save` counts, with the disk's free space as the evidence."""
    if isinstance(err, OSError):
        return str(err)
    frames = traceback.extract_tb(err.__traceback__)
    if not any(frame.filename.endswith(_TORCH_WRITER) for frame in frames):
        return None
    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        return f"torch could not write the file: {err}"
    return f"torch could not write the file: {err}; {free / 2**20:.1f} MiB free on that disk"


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _gather(value: Any) -> list[Any]:
    """Every rank's `value` (a picklable object), in rank order; `[value]` without a group."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [value]
    values: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def rng_state() -> dict[str, Any]:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def load_rng_file(path: Path) -> dict[str, Any]:
    """An `rng_rank{r}.pt` file, loaded weights-only: a checkpoint from elsewhere cannot run code.

    Beyond tensors and Python scalars it holds numpy's generator state (a uint32 array), whose
    reconstruction is the one non-tensor type allowed.
    """
    numpy_types = [np.ndarray, np.dtype, type(np.dtype(np.uint32)), _numpy_reconstruct()]
    try:
        with torch.serialization.safe_globals(numpy_types):
            return torch.load(path, weights_only=True)
    except (OSError, RuntimeError, pickle.UnpicklingError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(f"{path} is not a loadable RNG state ({first})") from None


def _numpy_reconstruct() -> Any:
    """numpy's array unpickler, whose module moved in numpy 2 (`numpy._core`)."""
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def file_crc32(path: Path) -> int:
    """CRC32 of a file, read in chunks (about 1 GB/s: cheap next to writing the file)."""
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK_BYTES):
            crc = zlib.crc32(chunk, crc)
    return crc


class Checkpointer:
    """Saves, finds, pins, prunes and loads the checkpoints of one run directory."""

    def __init__(self, run_dir: Path, cfg: CheckpointConfig, rank: int, world_size: int):
        self.dir = Path(run_dir) / "checkpoints"
        self.cfg = cfg
        self.rank = rank
        self.world_size = world_size
        # name -> state the same on every world size (state_dict, called on every rank, and
        # load_state_dict, which takes None for a checkpoint without it): rank 0 saves it as
        # `<name>.pt`, every rank loads it
        self.extras: dict[str, Any] = {}
        self.skipped: list[dict[str, str]] = []  # set aside by the last resume: path, error

    def track(self, name: str, obj: Any) -> None:
        """Save and restore `obj` with every checkpoint (the weight EMA)."""
        self.extras[name] = obj

    # --- finding ---------------------------------------------------------------------------

    def published(self) -> list[Path]:
        """Every renamed (published) checkpoint directory, readable or not, oldest first."""
        return layout.published(self.dir)

    def complete(self) -> list[Path]:
        """Complete checkpoints (those with a harness file), oldest first."""
        return layout.complete(self.dir)

    def pointer(self) -> Path | None:
        """The checkpoint `latest` names, if that is a published directory."""
        return layout.pointer(self.dir)

    def latest(self) -> Path | None:
        """The checkpoint a resume tries first, if it is complete."""
        return layout.latest(self.dir)

    def candidates(self) -> list[Path]:
        """Published checkpoints in the order a resume tries them (`layout.candidates`)."""
        return layout.candidates(self.dir)

    def before(self, step: int) -> Path | None:
        """The newest complete checkpoint taken strictly before `step`."""
        earlier = [p for p in self.complete() if step_of(p) < step]
        return earlier[-1] if earlier else None

    # --- saving ----------------------------------------------------------------------------

    def save(self, engine, state: HarnessState, diverged: bool = False) -> Path:
        """Write a checkpoint of `engine` and `state` on every rank; publish it atomically.

        A `diverged` state (a divergence stop) is written as `diverged_step_N`, outside the
        checkpoints that `latest`, resuming and retention see: a restart continues from the last
        good state, while the diverged one stays for forensics (`checkpoint.resume=PATH` loads it).
        """
        tag = DIVERGED_PREFIX * diverged + tag_for(state["step"])
        try:
            return self._save(engine, state, tag, diverged)
        except (OSError, RuntimeError) as err:  # a full disk, a quota, a vanished mount
            cause = _write_failure(err, self.dir)
            if cause is None:
                raise
            if self.rank == 0:
                self.remove_partials()  # the room it took, back
            last = self.latest()
            intact = f"{last.name} is intact" if last is not None else "no earlier one exists"
            raise CheckpointError(
                f"could not save checkpoint {tag} in {self.dir} ({cause}); {intact}: free "
                "space (or fix the directory), then run the same command again to resume"
            ) from err

    def _save(self, engine, state: HarnessState, tag: str, diverged: bool) -> Path:
        """`save` itself: write under `.partial-<tag>`, verify, rename, point `latest` at it."""
        partial = self.dir / f"{PARTIAL_PREFIX}{tag}"
        if self.rank == 0:
            self.dir.mkdir(parents=True, exist_ok=True)
            self.remove_partials()
        _barrier()
        engine.save_checkpoint(str(self.dir), tag=partial.name, save_latest=False)
        torch.save(rng_state(), partial / f"rng_rank{self.rank}.pt")
        for name, obj in self.extras.items():
            extra = obj.state_dict()  # on every rank: it may gather
            if self.rank == 0:
                torch.save(extra, partial / f"{name}.pt")
        _barrier()
        manifest = self._manifest(partial)
        final = self.dir / tag
        if self.rank == 0:
            write_json_atomic(partial / MANIFEST_FILE, manifest)
            write_json_atomic(partial / HARNESS_FILE, state)  # last: marks the files complete
            _fsync_dir(partial)
            if final.exists():  # the same step again, after a rollback: the newer one wins
                shutil.rmtree(final)
            os.replace(partial, final)
            if not diverged:
                write_text_atomic(self.dir / LATEST_FILE, tag)
            _fsync_dir(self.dir)
            self.prune()
        _barrier()
        return final

    def _manifest(self, directory: Path) -> dict[str, dict[str, int]]:
        """Size and CRC32 of every file in `directory`, the hashing shared out across ranks."""
        files = sorted(p for p in directory.iterdir() if p.is_file())
        files = files[self.rank :: self.world_size]
        mine = {f.name: {"bytes": f.stat().st_size, "crc32": file_crc32(f)} for f in files}
        return {k: v for part in _gather(mine) for k, v in sorted(part.items())}

    def remove_partials(self) -> None:
        """Delete what crashed saves or conversions left behind (rank 0, between saves)."""
        for path in self.dir.glob(f"{PARTIAL_PREFIX}*"):
            shutil.rmtree(path, ignore_errors=True)
        for path in self.dir.glob(f"step_*/{PARTIAL_PREFIX}*"):
            shutil.rmtree(path, ignore_errors=True)

    def pin(self, path: Path, reason: str) -> None:
        """Keep `path` for the life of the run (a last-good checkpoint); idempotent per reason."""
        if self.rank != 0 or not path.is_dir():
            return
        keep = path / KEEP_FILE
        reasons = keep.read_text().splitlines() if keep.is_file() else []
        if reason not in reasons:
            with open(keep, "a") as f:
                f.write(reason + "\n")

    def is_kept(self, path: Path) -> bool:
        """Pinned, or a milestone (every `milestone_interval` steps, step 0 excluded)."""
        every, step = self.cfg.milestone_interval, step_of(path)
        return (path / KEEP_FILE).exists() or bool(every and step > 0 and step % every == 0)

    def prune(self) -> None:
        """Delete complete checkpoints beyond the last `keep_last`, except kept ones.

        The one `latest` names is never deleted, nor are unreadable ones (a resume reports them).
        """
        pointed = self.pointer()
        for path in self.complete()[: -self.cfg.keep_last]:
            if path != pointed and not self.is_kept(path):
                shutil.rmtree(path, ignore_errors=True)

    # --- loading ---------------------------------------------------------------------------

    def resume(self, engine, candidates: list[Path]) -> tuple[Path, HarnessState]:
        """Load the first of `candidates` that loads, warning about each one that does not.

        Each one passed over is set aside as `damaged_<tag>` with its error (`self.skipped`
        lists them, for the resume event). Raises a one-line `CheckpointError` if none loads:
        checkpoints exist, so silently starting afresh would throw away the run.
        """
        failures: list[tuple[Path, str]] = []
        for path in candidates:
            try:
                state = self.load(engine, path)
            except CheckpointError as err:
                failures.append((path, str(err)))
                if self.rank == 0:
                    warn(f"{err}; trying the previous checkpoint")
                continue
            self.skipped = [self._set_aside(bad, error) for bad, error in failures]
            _barrier()
            return path, state
        raise CheckpointError(
            f"no checkpoint in {self.dir} could be loaded "
            f"({'; '.join(error for _, error in failures)}); to start "
            "afresh use a new run.name, or checkpoint.resume=never run.move_aside=true"
        )

    def _set_aside(self, path: Path, error: str) -> dict[str, str]:
        """Rank 0 renames a damaged checkpoint out of resume's and retention's sight, with a
        DAMAGED file saying why; returns where it went and the error."""
        aside = self.dir / f"{DAMAGED_PREFIX}{path.name}"
        if self.rank == 0 and path.is_dir():
            number = 1
            while aside.exists():  # damaged at this step before: keep every one
                aside, number = self.dir / f"{DAMAGED_PREFIX}{path.name}.{number}", number + 1
            (path / DAMAGED_FILE).write_text(error + "\n")
            os.replace(path, aside)
            _fsync_dir(self.dir)
        return {"path": str(aside), "error": error}

    def load(
        self, engine, path: Path, rng: bool = True, weights_only: bool = False
    ) -> HarnessState:
        """Restore `engine` and (with `rng`) this rank's RNG from `path`; return the harness state.
        `weights_only`: the model's weights alone; the optimizer keeps its fresh state.

        Every rank reaches the same verdict: a failure on any rank is a `CheckpointError` on all.
        """
        state = read_harness(path)
        self._verify(path)
        load_dir, tag = path.parent, path.name
        if getattr(engine, "load_universal_checkpoint", lambda: False)():
            load_dir, tag = path, self.universal(path).name
        # The config decides the hyperparameters, the checkpoint only the state: torch's
        # load_state_dict would bring back the saved ones (a forced change of weight decay would
        # not take), and DeepSpeed's ZeRO-3 universal load copies group 0's into every group
        # (decaying LayerNorm gains).
        # A group's `step` is state, not a hyperparameter: FusedAdam counts its steps there, and
        # a rollback that restored the later count would skew the bias correction.
        groups = engine.optimizer.param_groups
        hyper = [{k: v for k, v in g.items() if k not in ("params", "step")} for g in groups]
        error = None
        try:
            loaded, _ = engine.load_checkpoint(
                str(load_dir),
                tag=tag,
                load_module_strict=True,
                load_optimizer_states=not weights_only,
                load_lr_scheduler_states=False,
                load_module_only=weights_only,  # (ZeRO 1-3 then refresh their fp32 copies)
            )
            if loaded is None:
                error = "DeepSpeed found no model states in it"
        except Exception as err:  # DeepSpeed raises anything from torch.load to KeyError
            error = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        errors = [e for e in _gather(error) if e is not None]
        if errors:
            raise CheckpointError(f"checkpoint {path} did not load ({errors[0]})")
        _repair_optimizer(engine, hyper)
        for name, obj in self.extras.items():
            extra = path / f"{name}.pt"
            if not extra.is_file():
                obj.load_state_dict(None)
                continue
            # saved from any device (the saving rank's GPU, say): onto this rank's
            obj.load_state_dict(torch.load(extra, weights_only=True, map_location=engine.device))
        rng_file = path / f"rng_rank{self.rank}.pt"
        if rng and state["world_size"] == self.world_size and rng_file.is_file():
            set_rng_state(load_rng_file(rng_file))
        return state

    def _verify(self, path: Path) -> None:
        """Check every file against the manifest (the CRCs shared out across ranks)."""
        try:
            manifest = json.loads((path / MANIFEST_FILE).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise CheckpointError(
                f"checkpoint {path} has no readable {MANIFEST_FILE}: {err}"
            ) from None
        problem = None
        for i, (name, entry) in enumerate(sorted(manifest.items())):
            file = path / name
            if not file.is_file():
                problem = f"{name} is missing"
            elif (size := file.stat().st_size) != entry["bytes"]:
                problem = f"{name} has {size} bytes, {entry['bytes']} were written: truncated"
            elif i % self.world_size == self.rank and file_crc32(file) != entry["crc32"]:
                problem = f"{name} does not match its CRC32: corrupted"
            if problem:
                break
        problems = [p for p in _gather(problem) if p is not None]
        if problems:
            raise CheckpointError(f"checkpoint {path} is damaged: {problems[0]}")

    def universal(self, path: Path) -> Path:
        """`path` in DeepSpeed's universal (world-size independent) form, converted once."""
        target = path / UNIVERSAL_DIR
        error = None
        if self.rank == 0 and not (target / "zero").is_dir():
            error = to_universal(path, target)
        errors = [e for e in _gather(error) if e is not None]
        if errors:
            raise CheckpointError(
                f"checkpoint {path} could not be converted to a universal checkpoint: {errors[0]}"
            )
        return target


def _repair_optimizer(engine, hyper: list[dict[str, Any]]) -> None:
    """Undo two things a load does to the optimizer (DeepSpeed 0.19's ZeRO-3 universal load).

    It copies group 0's hyperparameters into every group, and gives every group one shared
    `step` tensor, which torch's Adam then advances once per group per step (wrong bias
    correction from the second step on). Hyperparameters come back from `hyper`, taken before
    the load; each state gets its own `step`.
    """
    for group, values in zip(engine.optimizer.param_groups, hyper, strict=True):
        group.update(values)
    base = getattr(engine.optimizer, "optimizer", engine.optimizer)
    for state in base.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


def to_universal(path: Path, target: Path) -> str | None:
    """Run DeepSpeed's `ds_to_universal` on `path` into `target`; an error line or None.

    A subprocess: the converter forks workers and prints progress, neither of which belongs in
    a training process. Written under a partial name and renamed, like a checkpoint.
    """
    partial = path / f"{PARTIAL_PREFIX}{UNIVERSAL_DIR}"
    shutil.rmtree(partial, ignore_errors=True)
    workers = str(max(1, min(4, os.cpu_count() or 1)))
    command = [
        sys.executable,
        "-m",
        "deepspeed.checkpoint.ds_to_universal",
        "--input_folder",
        str(path),
        "--output_folder",
        str(partial),
        "--inject_missing_state",
        "--num_extract_workers",
        workers,
        "--num_merge_workers",
        workers,
    ]
    env = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    (path / "latest_universal").unlink(missing_ok=True)  # the converter's own pointer
    if result.returncode != 0:
        shutil.rmtree(partial, ignore_errors=True)
        lines = (result.stderr or result.stdout).strip().splitlines()
        return lines[-1] if lines else f"ds_to_universal exited with {result.returncode}"
    os.replace(partial, target)
    return None


def needs_universal(harness: HarnessState | None, world_size: int, zero_stage: int) -> bool:
    """Whether resuming from `harness` needs DeepSpeed's universal checkpoint loading.

    ZeRO 1-3 partition the optimizer state by rank, so another world size (or, with
    `force_resume`, another stage) needs the conversion; ZeRO 0 saves it whole.
    """
    if harness is None or zero_stage == 0 or harness["zero_stage"] == 0:
        return False
    return harness["world_size"] != world_size or harness["zero_stage"] != zero_stage


def read_harness(path: Path) -> HarnessState:
    try:
        return json.loads((Path(path) / HARNESS_FILE).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"checkpoint {path} has no readable {HARNESS_FILE}: {err}") from None


def _fsync_dir(path: Path) -> None:
    """Make a rename durable (a crash of the node, not just the process)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def warn(message: str) -> None:
    warnings.warn(message, stacklevel=2)
