"""The run: `trainer.run(cfg)` trains a config to its end (`trainer/trainer.py`)."""

from trainer.trainer import Trainer, run

__all__ = ["Trainer", "run"]
