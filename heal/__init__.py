"""A run as a user starts it, and what it does after a divergence stop: `heal.run(cfg)`.

Under `divergence.policy=heal` the diagnosis acts: diagnose the detection from the checkpoint
kept before it, roll back there, apply the remedy the verdict names (`heal/remedies.py`) and
train on (`heal/loop.py`).
"""

from heal.loop import run

__all__ = ["run"]
