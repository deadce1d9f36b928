"""`data.ngram`: Kneser-Ney values, the sampler against exact entropy rates, the stream's bytes."""

import json
from pathlib import Path

import numpy as np
import pytest

from data.dataset import DataError
from data.loader import BatchLoader
from data.ngram import NgramModel, entropy_rate, parse_count, prepare_ngram, window_floor
from data.prepare import main

SMALL = dict(group_chains=8, chain_tokens=500)


def _exact_entropy_rate(model: NgramModel) -> float:
    """-sum pi(s) P(w|s) ln P(w|s) over the chain whose states are the last order-1 tokens."""
    width, vocab = model.order - 1, model.vocab_size
    states = np.stack(np.meshgrid(*[np.arange(vocab)] * width, indexing="ij"), -1).reshape(
        -1, width
    )
    history = np.repeat(states, vocab, axis=0)
    tokens = np.tile(np.arange(vocab), len(states))
    log_p = model.log_prob(history, tokens).reshape(len(states), vocab)
    # state s = (h..., v) moves to (h[1:]..., v, w) with probability P(w | s)
    index = {tuple(s): i for i, s in enumerate(states.tolist())}
    transition = np.zeros((len(states), len(states)))
    for i, s in enumerate(states.tolist()):
        for w in range(vocab):
            transition[i, index[tuple(s[1:] + [w])]] += np.exp(log_p[i, w])
    values, vectors = np.linalg.eig(transition.T)
    pi = np.real(vectors[:, np.argmin(np.abs(values - 1))])
    pi /= pi.sum()
    return float(-(pi[:, None] * np.exp(log_p) * log_p).sum())


def test_kneser_ney_by_hand() -> None:
    # bigrams (0,1) x2, (1,0), (1,2): D2 = n1/(n1+2 n2) = 2/4; continuation counts all 1: D1 = 1,
    # so P1 is uniform; P(1|0) = (2 - 0.5)/2 + 0.5 * 1/2 * 1/3, P(0|0) = 0.5 * 1/2 * 1/3.
    model = NgramModel(np.array([0, 1, 0, 1, 2]), order=2, vocab_size=3, start_token=0)
    assert model.discounts == [1.0, 0.5]
    p = np.exp(model.log_prob(np.array([[0], [0], [2]]), np.array([1, 0, 1])))
    np.testing.assert_allclose(p, [0.75 + 1 / 12, 1 / 12, 1 / 3])


@pytest.mark.parametrize("order", [2, 3])
def test_probabilities_sum_to_one(order: int) -> None:
    rng = np.random.default_rng(0)
    model = NgramModel(rng.integers(0, 7, 300), order=order, vocab_size=7, start_token=0)
    history = np.repeat(rng.integers(0, 7, (20, order - 1)), 7, axis=0)
    p = np.exp(model.log_prob(history, np.tile(np.arange(7), 20))).reshape(20, 7)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=1e-12)


@pytest.mark.parametrize("order", [2, 3])
def test_entropy_rate_estimate_matches_the_exact_value(order: int) -> None:
    rng = np.random.default_rng(order)
    # skewed text-like counts over 5 ids, so the chain is far from uniform
    corpus = rng.choice(5, size=400, p=[0.5, 0.2, 0.15, 0.1, 0.05])
    model = NgramModel(corpus, order=order, vocab_size=5, start_token=0)
    estimate = entropy_rate(model, seed=0, chain_tokens=2000)
    exact = _exact_entropy_rate(model)
    assert 0.5 < exact < np.log(5)
    assert abs(estimate["nats"] - exact) < 4 * estimate["se"] + 1e-3
    assert estimate["se"] < 0.01


def test_stream_is_deterministic_and_extends(builtin_corpus: Path, tmp_path: Path) -> None:
    data_dir = builtin_corpus.parent
    kwargs = dict(val_tokens=3000, vocab_size=512, data_dir=data_dir, **SMALL)
    a = prepare_ngram(tmp_path / "a", num_tokens=5000, seed=3, **kwargs)
    b = prepare_ngram(tmp_path / "b", num_tokens=5000, seed=3, **kwargs)
    longer = prepare_ngram(tmp_path / "c", num_tokens=9000, seed=3, **kwargs)
    other = prepare_ngram(tmp_path / "d", num_tokens=5000, seed=4, **kwargs)
    for name in ("train.bin", "val.bin", "meta.json", "gpt2_ids.npy"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    train = (a / "train.bin").read_bytes()
    assert (longer / "train.bin").read_bytes()[: len(train)] == train
    assert (other / "train.bin").read_bytes() != train
    assert (a / "val.bin").read_bytes()[:2000] != train[:2000]  # splits are separate streams
    meta = json.loads((a / "meta.json").read_text())
    tokens = np.fromfile(a / "train.bin", dtype="<u2")
    assert len(tokens) == meta["splits"]["train"]["num_tokens"] == 5000
    assert tokens.max() < meta["vocab_size"] == 512
    rate = meta["generator"]["entropy_rate"]
    assert 0 < rate["se"] < 0.1 * rate["nats"]
    assert rate["nats"] < rate["bigram_conditional_entropy"] < rate["unigram_entropy"]
    assert rate["nats"] < window_floor(meta, 128) < rate["nats"] + 0.1


@pytest.mark.parametrize(
    "repeats",
    [{}, {"repeat_fraction": 0.3, "repeat_window": 16, "chain_tokens": 512}],  # windows fit
    ids=["plain", "repeats"],
)
def test_loader_resumes_over_the_stream(
    builtin_corpus: Path, tmp_path: Path, repeats: dict[str, float]
) -> None:
    out = prepare_ngram(
        tmp_path / "s", num_tokens=20000, val_tokens=1000, vocab_size=512,
        data_dir=builtin_corpus.parent, **{**SMALL, **repeats},
    )  # fmt: skip
    kwargs = dict(block_size=16, micro_batch_size=4, seed=5, vocab_size=512)
    straight = BatchLoader(out / "train.bin", **kwargs)
    expected = [straight.next_step() for _ in range(12)]
    first = BatchLoader(out / "train.bin", **kwargs)
    for _ in range(7):
        first.next_step()
    resumed = BatchLoader(out / "train.bin", **kwargs)
    resumed.load_state_dict(first.state_dict())
    for step in expected[7:]:
        ((x, y),) = resumed.next_step()
        assert np.array_equal(x, step[0][0]) and np.array_equal(y, step[0][1])


def test_command_line(builtin_corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["ngram", "--out", str(tmp_path / "x")]) == 2
    assert "ngram needs --tokens" in capsys.readouterr().err
    assert main(["ngram", "--tokens", "lots", "--out", str(tmp_path / "x")]) == 2
    assert "not a token count: 'lots'" in capsys.readouterr().err
    assert parse_count("100M") == 100_000_000 and parse_count("2.5k") == 2500
    with pytest.raises(DataError, match="lower --vocab"):
        prepare_ngram(tmp_path / "y", num_tokens=10, vocab_size=60000,
                      data_dir=builtin_corpus.parent)  # fmt: skip
    assert not (tmp_path / "y").exists()
