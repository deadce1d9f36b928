"""Fixtures of the heal tests: the monitor tests' small-vocabulary corpus and one thread (the
diagnosis a heal runs replays the run in this process, bit for bit on the same thread count)."""

from tests.monitor.conftest import corpus, one_thread

__all__ = ["corpus", "one_thread"]
