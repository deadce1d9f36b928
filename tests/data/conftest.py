"""Shared fixtures: the built-in corpus, prepared once per test session."""

from pathlib import Path

import pytest

from data.builtin import prepare_builtin


@pytest.fixture(scope="session")
def builtin_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return prepare_builtin(tmp_path_factory.mktemp("data_cache"))
