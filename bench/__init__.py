"""Benchmarks, each printing ratios against a reference measured in the same run:
`python -m bench.engine` (the training step against plain torch), `python -m bench.monitor` (what
the live watch costs per step) and `python -m bench.loader` (data preparation and loading)."""
