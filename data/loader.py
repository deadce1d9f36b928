"""Token files to batches: the rank-sharded, resumable training loader and fixed eval batches.

A prepared dataset directory holds `train.bin` and `val.bin` (see `data.prepare`). The tokens are
cut into non-overlapping windows of `block_size + 1` tokens (stride `block_size`, so a window's
last token is the next one's first); the targets are the inputs shifted by one.

Batch order. Epoch e visits every window once, in the order of a PCG64 permutation seeded by
(seed, e). Concatenating the epochs gives one endless list of windows; global batch p is
entries [p*G, (p+1)*G) with G = micro_batch_size * grad_accum_steps * world_size. Rank r takes
the contiguous r-th 1/world_size of it and cuts that into its micro-batches in order. So the
sequence of global batches depends only on (data, block_size, seed, G), not on how G is split
across ranks and accumulation steps, and resuming needs only the position p.
"""

from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data.builtin import prepare_builtin, prepare_builtin_compact
from data.config import DataConfig
from data.dataset import META_FILE, OPENWEBTEXT, DataError, file_sha256, read_meta
from data.tokenizer import VOCAB_SIZE

Batch = tuple[torch.Tensor, torch.Tensor]


def resolve_dataset(cfg: DataConfig) -> Path:
    """The prepared directory that `data.dataset` names; prepares the built-in corpus if needed."""
    if cfg.dataset in ("builtin", "builtin-compact", OPENWEBTEXT) and Path(cfg.data_dir).is_file():
        raise DataError(
            f"data.data_dir={cfg.data_dir} is a file: it must be a directory (of prepared "
            "datasets), or a path that does not exist yet"
        )
    if cfg.dataset == "builtin":
        return prepare_builtin(cfg.data_dir)
    if cfg.dataset == "builtin-compact":
        return prepare_builtin_compact(cfg.data_dir)
    if cfg.dataset == OPENWEBTEXT:
        path = Path(cfg.data_dir) / OPENWEBTEXT
        if not (path / META_FILE).is_file():
            raise DataError(
                f"openwebtext is not prepared in {path}; run "
                f"`python -m data.prepare openwebtext --out {path}` first"
            )
        return path
    path = Path(cfg.dataset)
    if not (path / META_FILE).is_file():
        raise DataError(
            f"data.dataset={cfg.dataset!r} is not 'builtin', 'builtin-compact', 'openwebtext' "
            f"or a prepared directory (no {META_FILE} in it): run `python -m data.prepare`"
        )
    return path


def open_tokens(
    path: str | Path, *, vocab_size: int = VOCAB_SIZE, verify_sha256: bool = False
) -> np.ndarray:
    """Memory-map a uint16 token file after checking it; raises `DataError` on any problem.

    The size is checked against the `meta.json` beside the file (when there is one) on every
    open; the sha256, which reads the whole file, only with `verify_sha256`.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"token file {path} does not exist")
    num_bytes = path.stat().st_size
    if num_bytes == 0:
        raise DataError(f"token file {path} is empty")
    if num_bytes % 2:
        raise DataError(f"token file {path} has an odd size ({num_bytes} bytes): corrupt")
    entry = _meta_entry(path)
    if entry is not None:
        if entry["num_tokens"] != num_bytes // 2:
            raise DataError(
                f"token file {path} holds {num_bytes // 2} tokens but {META_FILE} says "
                f"{entry['num_tokens']}: truncated or replaced"
            )
        if verify_sha256 and file_sha256(path) != entry["sha256"]:
            raise DataError(f"token file {path} does not match the sha256 in {META_FILE}")
    tokens = np.memmap(path, dtype="<u2", mode="r")
    tokenizer_vocab = _meta_vocab_size(path)
    if tokenizer_vocab is None or tokenizer_vocab > vocab_size:
        # Without a meta.json vouching for the tokenizer, read every id once (for OpenWebText
        # that is 18 GB per rank, which a prepared directory's meta.json spares).
        _check_ids(tokens, vocab_size, str(path))
    return tokens


def _meta_vocab_size(path: Path) -> int | None:
    meta = read_meta(path.parent)
    return None if meta is None else meta.get("vocab_size")


def _meta_entry(path: Path) -> dict[str, Any] | None:
    meta = read_meta(path.parent)
    splits = {} if meta is None else meta.get("splits", {})
    return next((entry for entry in splits.values() if entry.get("file") == path.name), None)


def _check_ids(tokens: np.ndarray, vocab_size: int, name: str) -> None:
    if len(tokens) and (max_id := int(tokens.max())) >= vocab_size:
        padded = -(-(max_id + 1) // 64) * 64  # embedding rows rounded up to 64, as GPT-2's 50304
        raise DataError(
            f"{name} holds token id {max_id} >= model.vocab_size {vocab_size}: set "
            f"model.vocab_size={padded} (or more) for this dataset"
        )


def _load_tokens(source: str | Path | np.ndarray, vocab_size: int, block_size: int) -> np.ndarray:
    if isinstance(source, np.ndarray):
        tokens, name = source, "the token array"
        _check_ids(tokens, vocab_size, name)
    else:
        tokens, name = open_tokens(source, vocab_size=vocab_size), str(source)
    if len(tokens) < block_size + 1:
        raise DataError(
            f"{name} has {len(tokens)} tokens, fewer than block_size + 1 = {block_size + 1}"
        )
    return tokens


def _check_layout(*, rank: int, world_size: int, **counts: int) -> None:
    for name, value in {"world_size": world_size, **counts}.items():
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")


def _gather(
    tokens: np.ndarray,
    window_ids: np.ndarray,
    block_size: int,
    device: torch.device | str | None,
    pin_memory: bool,
) -> Batch:
    """The (x, y) pair of int64 (len(window_ids), block_size) tensors for these windows."""
    return _to_device(_host_batch(tokens, window_ids, block_size, pin_memory), device, pin_memory)


def _host_batch(
    tokens: np.ndarray, window_ids: np.ndarray, block_size: int, pin_memory: bool
) -> Batch:
    """`_gather`'s host half: read the windows (page faults of the memory map included)."""
    index = window_ids[:, None] * block_size + np.arange(block_size + 1)
    rows = torch.from_numpy(tokens[index].astype(np.int64))
    x, y = rows[:, :-1].contiguous(), rows[:, 1:].contiguous()
    if pin_memory:
        x, y = x.pin_memory(), y.pin_memory()
    return x, y


def _to_device(batch: Batch, device: torch.device | str | None, pin_memory: bool) -> Batch:
    """`_gather`'s device half: the copy, asynchronous from pinned memory."""
    if device is None:
        return batch
    return tuple(t.to(device, non_blocking=pin_memory) for t in batch)


# One background reader for every prefetching loader of the process (they take turns: a
# trainer, then a replay's); an idle reader costs nothing and is joined at exit.
_READER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batch-prefetch")


class BatchLoader:
    """This rank's micro-batches for each optimizer step, in the seeded order above.

    `source` is a token file (usually `<dataset>/train.bin`) or an in-memory array of ids.
    Pass `device` to move batches there; `pin_memory=True` makes that copy asynchronous.
    `prefetch=True` reads the next step's windows on a background thread while this step
    trains (the copy to the device stays on the caller's thread and stream); the batches are
    the same either way, since each is a pure function of its position. `skip`: global batches
    (positions) never read, each step moving on to the next one.
    """

    def __init__(
        self,
        source: str | Path | np.ndarray,
        *,
        block_size: int,
        micro_batch_size: int,
        grad_accum_steps: int = 1,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        vocab_size: int = VOCAB_SIZE,
        device: torch.device | str | None = None,
        pin_memory: bool = False,
        prefetch: bool = False,
        skip: Iterable[int] = (),
    ) -> None:
        _check_layout(
            block_size=block_size,
            micro_batch_size=micro_batch_size,
            grad_accum_steps=grad_accum_steps,
            rank=rank,
            world_size=world_size,
        )
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self._tokens = _load_tokens(source, vocab_size, block_size)
        self.block_size = block_size
        self.micro_batch_size = micro_batch_size
        self.grad_accum_steps = grad_accum_steps
        self.seed = seed
        self.num_windows = (len(self._tokens) - 1) // block_size
        self.global_batch_size = micro_batch_size * grad_accum_steps * world_size
        self._rank_offset = rank * micro_batch_size * grad_accum_steps
        self._device = device
        self._pin_memory = pin_memory
        self._position = 0
        self._skip = frozenset(skip)
        self._permutations: dict[int, np.ndarray] = {}
        self._prefetch = prefetch
        self._ahead: tuple[int, Future[list[Batch]]] | None = None  # (position, its reading)

    @property
    def position(self) -> int:
        """Optimizer steps taken: the index of the next global batch."""
        return self._position

    @property
    def epoch(self) -> int:
        """The epoch the next global batch starts in."""
        return self._position * self.global_batch_size // self.num_windows

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._permutations:
            if len(self._permutations) >= 2:  # a step spans at most a few epochs; keep it small
                self._permutations.pop(min(self._permutations))
            generator = np.random.Generator(np.random.PCG64([self.seed, epoch]))
            self._permutations[epoch] = generator.permutation(self.num_windows)
        return self._permutations[epoch]

    def _window_ids(self, start: int, count: int) -> np.ndarray:
        """Entries [start, start + count) of the endless list of windows, epoch after epoch."""
        parts = []
        while count > 0:
            epoch, offset = divmod(start, self.num_windows)
            part = self._permutation(epoch)[offset : offset + count]
            parts.append(part)
            start += len(part)
            count -= len(part)
        return np.concatenate(parts)

    def windows(self, position: int) -> np.ndarray:
        """The window ids of global batch `position`, all ranks' shares in rank order; window
        w is tokens [w * block_size, (w + 1) * block_size] of the token file."""
        return self._window_ids(position * self.global_batch_size, self.global_batch_size)

    def next_step(self) -> list[Batch]:
        """This rank's `grad_accum_steps` micro-batches (x, y) for the next optimizer step."""
        position = self._unskipped(self._position)
        host = self._take_ahead(position) or self._host_batches(position)
        self._position = position + 1
        if self._prefetch:
            ahead = self._unskipped(self._position)
            self._ahead = (ahead, _READER.submit(self._host_batches, ahead))
        return [_to_device(batch, self._device, self._pin_memory) for batch in host]

    def _unskipped(self, position: int) -> int:
        while position in self._skip:
            position += 1
        return position

    def _take_ahead(self, position: int) -> list[Batch] | None:
        """The prefetched batches if they are `position`'s (a skip or a load moves the position
        elsewhere); the reading is waited for either way, so only one thread reads at a time."""
        if self._ahead is None:
            return None
        (ahead, reading), self._ahead = self._ahead, None
        batches = reading.result()
        return batches if ahead == position else None

    def _host_batches(self, position: int) -> list[Batch]:
        """This rank's micro-batches of global batch `position`, on the host."""
        per_rank = self.micro_batch_size * self.grad_accum_steps
        window_ids = self._window_ids(
            position * self.global_batch_size + self._rank_offset, per_rank
        )
        return [
            _host_batch(
                self._tokens,
                window_ids[i : i + self.micro_batch_size],
                self.block_size,
                self._pin_memory,
            )
            for i in range(0, per_rank, self.micro_batch_size)
        ]

    def __iter__(self) -> Iterator[list[Batch]]:
        return self

    def __next__(self) -> list[Batch]:
        return self.next_step()

    def skip(self, num_steps: int) -> None:
        """Move past `num_steps` optimizer steps without reading them."""
        if num_steps < 0:
            raise ValueError(f"num_steps must be >= 0, got {num_steps}")
        self._position += num_steps

    def state_dict(self) -> dict[str, int]:
        """What a checkpoint needs to continue with exactly the next batch."""
        return {
            "position": self._position,
            "seed": self.seed,
            "global_batch_size": self.global_batch_size,
            "block_size": self.block_size,
            "num_windows": self.num_windows,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from `state`; refuses a state made with another batch size, data or seed."""
        if state["global_batch_size"] != self.global_batch_size:
            raise DataError(
                f"the loader state is for a global batch of {state['global_batch_size']} "
                f"sequences, this run has {self.global_batch_size} (micro_batch_size x "
                "grad_accum_steps x world_size); keep the global batch to resume"
            )
        if (state["block_size"], state["num_windows"]) != (self.block_size, self.num_windows):
            raise DataError(
                f"the loader state is for {state['num_windows']} windows of block_size "
                f"{state['block_size']}, this run has {self.num_windows} of {self.block_size}: "
                "another dataset or block_size"
            )
        if state["seed"] != self.seed:
            raise DataError(
                f"the loader state is for seed {state['seed']}, this run has {self.seed}"
            )
        self._position = state["position"]


def validation_batches(
    source: str | Path | np.ndarray,
    *,
    block_size: int,
    micro_batch_size: int,
    num_sequences: int,
    rank: int = 0,
    world_size: int = 1,
    vocab_size: int = VOCAB_SIZE,
    device: torch.device | str | None = None,
) -> list[tuple[Batch, int]]:
    """This rank's share of the fixed validation set, as micro-batches (x, y) with the number of
    real sequences in each.

    The set is `num_sequences` windows spread evenly over the split, the same for any world size,
    so the same weights give the same validation loss on 1 or N ranks. Rank r takes the r-th
    contiguous share of ceil(num_sequences / world_size) of them, cut into micro-batches of at
    most `micro_batch_size`: every rank runs the same number of forwards (ZeRO-3 needs that).
    Positions past the end of the set (on the last ranks) are padding whose targets are -1, which
    the loss ignores; weighting each micro-batch's mean loss by its real sequences makes the mean
    over the set exact. A split with fewer windows than `num_sequences` repeats some.
    """
    _check_layout(
        block_size=block_size,
        micro_batch_size=micro_batch_size,
        num_sequences=num_sequences,
        rank=rank,
        world_size=world_size,
    )
    tokens = _load_tokens(source, vocab_size, block_size)
    num_windows = (len(tokens) - 1) // block_size
    per_rank = -(-num_sequences // world_size)
    positions = np.arange(rank * per_rank, (rank + 1) * per_rank)
    real = positions < num_sequences
    window_ids = np.where(real, positions, 0) * num_windows // num_sequences
    batches = []
    for i in range(0, per_rank, micro_batch_size):
        rows = slice(i, i + micro_batch_size)
        x, y = _gather(tokens, window_ids[rows], block_size, device, False)
        padding = torch.from_numpy(~real[rows]).to(y.device)
        batches.append(((x, y.masked_fill(padding[:, None], -1)), int(real[rows].sum())))
    return batches
