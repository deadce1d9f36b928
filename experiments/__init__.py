"""Experiments beyond a training run: `python -m experiments.aeos` (Adam's edge of stability)."""
