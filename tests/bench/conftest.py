"""Fixtures of the benchmark tests: the monitor tests' small-vocabulary corpus and one thread."""

from tests.monitor.conftest import corpus, one_thread

__all__ = ["corpus", "one_thread"]
