"""`data.repeats`: the floor's forward algorithm against the sampler on a small case, the copies,
and the n-gram stream with repeats: determinism, its floor, the loader resuming over it."""

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest

from data.ngram import NgramModel, prepare_ngram, window_floor
from data.prepare import main
from data.repeats import RepeatSpec, sample_with_repeats, window_nll

SMALL = dict(group_chains=8, chain_tokens=512)


def test_the_floor_is_the_samplers_exact_entropy_on_a_small_case() -> None:
    """Binary tokens, windows of 8, spans of 2-3: the forward algorithm's P over all 256 windows
    sums to 1, and 20,000 sampled windows follow it (their mean -ln P is its entropy)."""
    rng = np.random.default_rng(0)
    model = NgramModel(rng.choice(2, 300, p=[0.7, 0.3]), order=2, vocab_size=2, start_token=0)
    spec = RepeatSpec(0.4, window=8, span_min=2, span_max=3)
    windows = np.array(list(itertools.product(range(2), repeat=8)))
    prob = np.exp(-window_nll(model, np.zeros((256, 1), dtype=np.int64), windows, spec).sum(1))
    assert prob.sum() == pytest.approx(1.0, abs=1e-12)
    entropy = -(prob * np.log(prob)).sum()
    n = 20_000
    tokens, copied = sample_with_repeats(model, n, 8, np.random.Generator(np.random.PCG64(1)), spec)
    index = tokens @ (2 ** np.arange(7, -1, -1))
    nll = -np.log(prob[index])
    assert abs(nll.mean() - entropy) < 4 * nll.std() / math.sqrt(n)  # measured 0.8 SE
    frequency = np.bincount(index, minlength=256) / n
    noise = 0.5 * np.sum(np.sqrt(2 * prob * (1 - prob) / (math.pi * n)))  # E|TV| if it fits
    assert 0.5 * np.abs(frequency - prob).sum() < 1.5 * noise
    # the copies: a cheaper window than the n-gram's own
    rare = RepeatSpec(1e-12, window=8, span_min=2, span_max=3)
    ngram = np.exp(-window_nll(model, np.zeros((256, 1), dtype=np.int64), windows, rare).sum(1))
    assert entropy < -(ngram * np.log(ngram)).sum() - 0.1
    assert copied.mean() == pytest.approx(0.4, abs=0.01)  # start_prob is solved for it


def test_copied_spans_come_from_earlier_in_the_same_window() -> None:
    rng = np.random.default_rng(1)
    model = NgramModel(rng.integers(0, 50, 3000), order=3, vocab_size=50, start_token=0)
    spec = RepeatSpec(0.4, window=64)
    tokens, copied = sample_with_repeats(
        model, 16, 256, np.random.Generator(np.random.PCG64(2)), spec
    )
    runs = 0
    for chain, mask in zip(tokens, copied, strict=True):
        for window, marks in zip(chain.reshape(-1, 64), mask.reshape(-1, 64), strict=True):
            assert not marks[: spec.span_min].any()  # no copy starts before span_min
            starts = np.flatnonzero(np.diff(np.concatenate([[0], marks.astype(int)])) == 1)
            for start in starts:
                length = np.argmin(np.append(marks[start:], False))
                assert length >= spec.span_min  # a run: one span or several back to back
                head = window[start : start + spec.span_min]
                earlier = [window[s : s + spec.span_min] for s in range(start - spec.span_min + 1)]
                assert any(np.array_equal(head, e) for e in earlier)
                runs += 1
    assert runs > 50
    assert copied.mean() == pytest.approx(0.4, abs=0.05)


def test_stream_with_repeats_is_deterministic_and_has_its_floor(
    builtin_corpus: Path, tmp_path: Path
) -> None:
    kwargs = dict(val_tokens=3000, vocab_size=512, data_dir=builtin_corpus.parent, **SMALL)
    repeats = dict(repeat_fraction=0.4, repeat_window=64)
    a = prepare_ngram(tmp_path / "a", num_tokens=5000, seed=3, **kwargs, **repeats)
    b = prepare_ngram(tmp_path / "b", num_tokens=5000, seed=3, **kwargs, **repeats)
    plain = prepare_ngram(tmp_path / "p", num_tokens=5000, seed=3, **kwargs)
    for name in ("train.bin", "val.bin", "meta.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    assert (a / "train.bin").read_bytes() != (plain / "train.bin").read_bytes()
    meta = json.loads((a / "meta.json").read_text())
    info = meta["generator"]["repeats"]
    assert info["copied_fraction"] == pytest.approx(0.4, abs=0.03) and info["window"] == 64
    assert "40% of tokens in copied spans" in meta["source"]
    floor = window_floor(meta, 64)
    assert floor == info["loss_floor"] and 0 < info["loss_floor_se"] < 0.02 * floor
    no_repeats = window_floor(json.loads((plain / "meta.json").read_text()), 64)
    # a copied token after a span's first is nearly free: about a third of the tokens
    assert 0.5 * no_repeats < floor < 0.85 * no_repeats
    assert window_floor(meta, 128) is None  # made for windows of 64 only


def test_repeat_arguments_are_one_line_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    args = ["ngram", "--tokens", "1000", "--out", str(tmp_path / "x"), "--repeat-fraction", "0.4"]
    assert main(args) == 2
    assert "needs --repeat-window" in capsys.readouterr().err
    assert main([*args, "--repeat-window", "100"]) == 2
    assert "must divide the chains' 8192 tokens" in capsys.readouterr().err
    assert main([*args, "--repeat-window", "32", "--repeat-span", "20", "40"]) == 2
    assert "do not fit windows of 32" in capsys.readouterr().err
    assert main([*args[:-1], "0.95", "--repeat-window", "64"]) == 2
    assert "cannot copy 95% of the tokens" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
