"""Fixtures of the monitor tests: a small-vocabulary corpus and one CPU thread."""

from pathlib import Path

import pytest
import torch

from tests.monitor.runs import small_vocab_corpus


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The built-in corpus with its 255 most frequent tokens kept and the rest folded into one."""
    return small_vocab_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread: tiny ops on a shared 2-core machine are fastest (and steadiest)
    that way, and a replay in the same process then reproduces the run bit for bit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
