"""`launch.sizing`: the stream proxies pass the rule, with the numbers their headers state;
the old built-in-corpus proxy fails it."""

from pathlib import Path

import pytest

import launch.sweep as sw
from configs import load_config
from data.ngram import parse_count
from launch.sizing import MIN_TOKENS_PER_PARAM, parameter_counts, sizing

SWEEPS = Path(__file__).resolve().parents[2] / "configs" / "sweeps"
STREAMS = sorted(SWEEPS.glob("stream_*.yaml"))
BUILTIN_COMPACT_TRAIN_TOKENS = 359_769  # docs/data.md (CPython 3.11)


def stream_tokens(dataset: str) -> int:
    """Training tokens of a stream directory named `...-<count>` (`ngram3-v2048-40M`)."""
    return parse_count(dataset.rsplit("-", 1)[1])


def test_parameter_counts_by_hand() -> None:
    cfg = load_config(None, ["model.n_layer=2", "model.n_embd=64", "model.vocab_size=2048"])
    # wte 2048*64 + wpe 128*64 + per block (2 LayerNorms 2*64, qkv 64*192, proj 64*64,
    # MLP 2*64*256) + final LayerNorm 64; no biases
    block = 2 * 64 + 64 * 192 + 64 * 64 + 2 * 64 * 256
    assert parameter_counts(cfg) == (2048 * 64 + 128 * 64 + 2 * block + 64, 2 * block + 64)


@pytest.mark.parametrize("path", STREAMS, ids=lambda p: p.stem)
def test_stream_proxies_pass_the_rule(path: Path) -> None:
    runs = sw.expand(sw.load_sweep(path))
    assert runs
    for run in runs:
        result = sizing(run.config, stream_tokens(run.config.data.dataset))
        assert result.problems == [], (run.name, result.problems)
        print(f"{path.stem}/{run.name}: {result.line()}")  # pytest -s shows both ratios
        assert result.tokens_per_param >= MIN_TOKENS_PER_PARAM
        header = path.read_text() + (SWEEPS / "stream_wd.yaml").read_text()
        assert f"{result.params:,} parameters in all" in header
        assert f"{result.non_embedding_params:,} non-embedding" in header
        assert f"{result.tokens_per_param:.1f} per parameter in all" in header
        assert f"{result.tokens_per_non_embedding_param:.1f} tokens per" in header


def test_the_old_proxy_fails_the_rule() -> None:
    (run, *_) = sw.expand(sw.load_sweep(SWEEPS / "proxy_wd_norm.yaml"))
    problems = sizing(run.config, BUILTIN_COMPACT_TRAIN_TOKENS).problems
    assert problems[0].startswith("0.4 tokens per parameter, below 20")
    assert any("tokens per batch, below 4,096" in p for p in problems)
    assert any("validation tokens, below 262,144" in p for p in problems)


def test_repeating_data_fails() -> None:
    (run, *_) = sw.expand(sw.load_sweep(SWEEPS / "stream_wd.yaml"))
    problems = sizing(run.config, 4_000_000).problems
    assert problems == ["reads 38,400 windows of a split of 31,249: repeats data"]
