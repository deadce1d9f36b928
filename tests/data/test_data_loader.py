"""The batch loader: seeded order, world-size independence, exact resume, and loud file errors."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from data.config import DataConfig
from data.dataset import DataError
from data.loader import BatchLoader, open_tokens, resolve_dataset, validation_batches

BLOCK = 8
NUM_WINDOWS = 50
# Token t sits at position t, so a row's first token divided by BLOCK is its window id.
TOKENS = np.arange(NUM_WINDOWS * BLOCK + 1, dtype=np.uint16)


def _window_ids(batches: list[tuple[torch.Tensor, torch.Tensor]]) -> list[int]:
    ids = []
    for x, y in batches:
        assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape
        assert torch.equal(x[:, 1:], y[:, :-1]) and torch.equal(y[:, -1], x[:, -1] + 1)
        assert torch.equal(x, x[:, :1] + torch.arange(BLOCK))  # one contiguous window per row
        ids.extend((x[:, 0] // BLOCK).tolist())
    return ids


def _loader(seed: int = 0, **layout: int) -> BatchLoader:
    return BatchLoader(TOKENS, block_size=BLOCK, seed=seed, **{"micro_batch_size": 12, **layout})


def test_same_seed_same_batches_other_seed_differs() -> None:
    a, b, c = _loader(seed=1), _loader(seed=1), _loader(seed=2)
    for _ in range(6):
        batch_a = a.next_step()
        assert _window_ids(batch_a) == _window_ids(b.next_step())
        assert len(batch_a) == 1 and batch_a[0][0].shape == (12, BLOCK)
    assert _window_ids(a.next_step()) != _window_ids(c.next_step())


def test_each_epoch_is_a_permutation_of_all_windows() -> None:
    loader = _loader(seed=3, micro_batch_size=10)  # 10 divides 50: 5 steps per epoch
    epochs = [sum((_window_ids(loader.next_step()) for _ in range(5)), []) for _ in range(3)]
    assert all(sorted(epoch) == list(range(NUM_WINDOWS)) for epoch in epochs)
    assert epochs[0] != epochs[1] != epochs[2]
    assert loader.epoch == 3


# micro_batch_size x grad_accum_steps x world_size = 12 in every layout.
LAYOUTS = [(12, 1, 1), (4, 3, 1), (6, 1, 2), (3, 2, 2), (1, 6, 2), (3, 1, 4), (1, 3, 4)]


@pytest.mark.parametrize(("micro", "accum", "world"), LAYOUTS)
def test_global_batches_do_not_depend_on_the_layout(micro: int, accum: int, world: int) -> None:
    reference = _loader(seed=5)
    ranks = [
        _loader(seed=5, micro_batch_size=micro, grad_accum_steps=accum, rank=r, world_size=world)
        for r in range(world)
    ]
    for _ in range(10):  # 120 windows: two epoch wraps, one in the middle of a step (at 50)
        steps = [rank.next_step() for rank in ranks]
        assert all(len(step) == accum for step in steps)
        assert all(x.shape == (micro, BLOCK) for step in steps for x, _ in step)
        assert sum(map(_window_ids, steps), []) == _window_ids(reference.next_step())


def test_skip_equals_next_step_calls() -> None:
    stepped, skipped = _loader(seed=9, micro_batch_size=7), _loader(seed=9, micro_batch_size=7)
    for _ in range(11):
        stepped.next_step()
    skipped.skip(11)
    assert skipped.position == stepped.position == 11
    assert _window_ids(skipped.next_step()) == _window_ids(stepped.next_step())


def test_state_dict_resumes_the_exact_next_batch() -> None:
    run = _loader(seed=4, micro_batch_size=6, grad_accum_steps=2)
    for _ in range(7):
        run.next_step()
    state = run.state_dict()
    assert state == {
        "position": 7, "seed": 4, "global_batch_size": 12, "block_size": BLOCK, "num_windows": 50
    }  # fmt: skip
    state = json.loads(json.dumps(state))  # survives a checkpoint's serialization
    resumed = _loader(seed=4, micro_batch_size=6, grad_accum_steps=2)
    resumed.load_state_dict(state)
    expected = [_window_ids(run.next_step()) for _ in range(4)]
    assert [_window_ids(resumed.next_step()) for _ in range(4)] == expected
    # The same global batch on two ranks: rank 1 resumes with the second half.
    rank1 = _loader(seed=4, micro_batch_size=3, grad_accum_steps=2, rank=1, world_size=2)
    rank1.load_state_dict(state)
    reference = _loader(seed=4)
    reference.skip(7)
    assert _window_ids(rank1.next_step()) == _window_ids(reference.next_step())[6:]


def test_skipped_batches_are_never_read_and_the_position_moves_past_them() -> None:
    plain = _loader(seed=2, micro_batch_size=5)
    skipping = BatchLoader(TOKENS, block_size=BLOCK, seed=2, micro_batch_size=5, skip=[1, 2, 4])
    every = [_window_ids(plain.next_step()) for _ in range(6)]
    assert [_window_ids(skipping.next_step()) for _ in range(3)] == [every[0], every[3], every[5]]
    assert skipping.position == 6


def test_prefetching_reads_the_same_batches_across_skips_and_resumes() -> None:
    """The next step's windows are read on a background thread; a skip or a load in between
    moves the position away from what was read ahead, which is then read again."""
    layout = {"seed": 3, "micro_batch_size": 4, "grad_accum_steps": 2}
    plain = _loader(**layout)
    ahead = BatchLoader(TOKENS, block_size=BLOCK, prefetch=True, skip=[5], **layout)
    plain_skipping = BatchLoader(TOKENS, block_size=BLOCK, skip=[5], **layout)
    for loader in (plain, ahead, plain_skipping):
        loader.next_step()
        loader.skip(2)
    assert [_window_ids(ahead.next_step()) for _ in range(4)] == [
        _window_ids(plain_skipping.next_step()) for _ in range(4)
    ]
    state = plain.state_dict()
    ahead.load_state_dict(state)  # back: the batch read ahead is not this position's
    assert ahead.position == 3 and ahead._ahead is not None
    assert _window_ids(ahead.next_step()) == _window_ids(plain.next_step())


def test_load_state_dict_refuses_a_different_run() -> None:
    state = _loader(seed=4).state_dict()
    with pytest.raises(DataError, match="global batch of 12 sequences, this run has 8"):
        _loader(seed=4, micro_batch_size=8).load_state_dict(state)
    other_data = BatchLoader(TOKENS[:201], block_size=BLOCK, micro_batch_size=12, seed=4)
    with pytest.raises(DataError, match="another dataset or block_size"):
        other_data.load_state_dict(state)
    with pytest.raises(DataError, match="seed 4, this run has 5"):
        _loader(seed=5).load_state_dict(state)


def test_validation_set_is_global_and_split_evenly_across_ranks() -> None:
    def share(rank: int, world: int, num_sequences: int = 12) -> list[tuple[list[int], int]]:
        """(window ids of the real rows, real rows) of each micro-batch of this rank."""
        batches = validation_batches(
            TOKENS,
            block_size=BLOCK,
            micro_batch_size=3,
            num_sequences=num_sequences,
            rank=rank,
            world_size=world,
        )
        out = []
        for (x, y), real in batches:
            padding = (y == -1).all(dim=1)
            assert padding.tolist() == [False] * real + [True] * (len(y) - real)
            assert not (y[:real] == -1).any()  # real rows keep every target
            out.append((_window_ids([(x[:real], y[:real])]), real))
        return out

    def ids(shares: list[list[tuple[list[int], int]]]) -> list[int]:
        return [i for part in shares for batch, _ in part for i in batch]

    single = share(0, 1)
    assert share(0, 1) == single  # fixed
    assert ids([single]) == [0, 4, 8, 12, 16, 20, 25, 29, 33, 37, 41, 45]
    assert [real for _, real in single] == [3, 3, 3, 3]
    for world in (2, 3, 4, 5, 7):  # the same set on any world size, split into equal forwards
        shares = [share(rank, world) for rank in range(world)]
        assert ids(shares) == ids([single]), world
        assert len({len(part) for part in shares}) == 1, world
    # 12 over 5 ranks: 3 per rank, the last has 0 real rows; 12 over 7: 2 per rank
    assert [real for part in (share(r, 5) for r in range(5)) for _, real in part] == [3, 3, 3, 3, 0]
    assert [real for _, real in share(6, 7)] == [0]
    assert [real for _, real in share(0, 2, num_sequences=5)] == [3]
    assert [real for _, real in share(1, 2, num_sequences=5)] == [2]
    assert ids([share(0, 1, num_sequences=120)]) == [i * 50 // 120 for i in range(120)]  # repeats


def _write(path: Path, tokens: np.ndarray) -> Path:
    tokens.astype("<u2").tofile(path)
    return path


def _write_meta(path: Path, num_tokens: int, sha256: str = "0" * 64) -> None:
    split = {"file": path.name, "num_tokens": num_tokens, "sha256": sha256}
    path.with_name("meta.json").write_text(json.dumps({"splits": {"train": split}}))


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        open_tokens(tmp_path / "missing.bin")
    (tmp_path / "empty.bin").write_bytes(b"")
    with pytest.raises(DataError, match="is empty"):
        open_tokens(tmp_path / "empty.bin")
    (tmp_path / "odd.bin").write_bytes(b"\x01\x00\x02")
    with pytest.raises(DataError, match=r"odd size \(3 bytes\)"):
        open_tokens(tmp_path / "odd.bin")
    big = _write(tmp_path / "big.bin", np.array([1, 2, 50257, 3]))
    with pytest.raises(
        DataError, match="token id 50257 >= model.vocab_size 50257: set model.vocab_size=50304"
    ):
        open_tokens(big)
    assert open_tokens(big, vocab_size=50304).tolist() == [1, 2, 50257, 3]
    with pytest.raises(
        DataError, match="token id 9 >= model.vocab_size 5: set model.vocab_size=64"
    ):
        BatchLoader(np.array([1, 9, 2]), block_size=1, micro_batch_size=1, vocab_size=5)
    short = _write(tmp_path / "short.bin", np.arange(8))
    with pytest.raises(DataError, match="8 tokens, fewer than block_size \\+ 1 = 9"):
        BatchLoader(short, block_size=8, micro_batch_size=1)
    with pytest.raises(DataError, match="fewer than block_size"):
        validation_batches(short, block_size=8, micro_batch_size=1, num_sequences=1)


def test_meta_size_and_sha256_checks(tmp_path: Path) -> None:
    train = _write(tmp_path / "train.bin", np.arange(100))
    _write_meta(train, 99)
    with pytest.raises(DataError, match="holds 100 tokens but meta.json says 99"):
        open_tokens(train)
    _write_meta(train, 100)  # right size, wrong hash: only the optional full check sees it
    assert len(open_tokens(train)) == 100
    with pytest.raises(DataError, match="does not match the sha256"):
        open_tokens(train, verify_sha256=True)


def test_builtin_train_split(builtin_corpus: Path) -> None:
    loader = BatchLoader(
        builtin_corpus / "train.bin", block_size=64, micro_batch_size=4, grad_accum_steps=2
    )
    step = loader.next_step()
    assert [x.shape for x, _ in step] == [(4, 64), (4, 64)]
    assert all(torch.equal(x[:, 1:], y[:, :-1]) and int(y.max()) < 50257 for x, y in step)
    meta = json.loads((builtin_corpus / "meta.json").read_text())
    assert loader.num_windows == (meta["splits"]["train"]["num_tokens"] - 1) // 64
    open_tokens(builtin_corpus / "val.bin", verify_sha256=True)


def test_resolve_dataset(builtin_corpus: Path, tmp_path: Path) -> None:
    data_dir = builtin_corpus.parent
    assert resolve_dataset(DataConfig(dataset="builtin", data_dir=str(data_dir))) == builtin_corpus
    assert resolve_dataset(DataConfig(dataset=str(builtin_corpus))) == builtin_corpus
    with pytest.raises(DataError, match=r"python -m data.prepare openwebtext --out .*openwebtext"):
        resolve_dataset(DataConfig(dataset="openwebtext", data_dir=str(tmp_path)))
    with pytest.raises(DataError, match="'builtin-compact', 'openwebtext' or a prepared"):
        resolve_dataset(DataConfig(dataset=str(tmp_path)))
