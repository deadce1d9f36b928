"""Fixtures of the post-mortem tests: the monitor tests' small-vocabulary corpus and one thread
(a replay in the same process reproduces a run bit for bit only on the thread count it ran on)."""

from tests.monitor.conftest import corpus, one_thread

__all__ = ["corpus", "one_thread"]
