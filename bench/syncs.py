"""Count a step's host syncs: every read of a tensor's value into Python, by who made it.

On a GPU each such read waits for the device to finish its queued work, so a training step
should make as few as it can (docs/engine.md says how many each stage makes). `counted_reads`
wraps torch.Tensor's reading methods while a block runs and files each read under its owner:
the innermost frame of the stack in DeepSpeed, in torch (its optimizers, say) or in this
repository (the model's forward, called through torch's Module, is the repository's).
`tests/trainer/test_step.py` asserts the count; `bench.gpu_check` reports it.
"""

import collections
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import deepspeed
import torch

# What reads a tensor's value into Python (a `.cpu()` of a CUDA tensor copies and waits).
READS = ("item", "tolist", "__float__", "__bool__", "__int__", "__index__", "cpu", "numpy")
OWNERS = (
    ("deepspeed", Path(deepspeed.__file__).parent),
    ("torch", Path(torch.__file__).parent),
    ("harness", Path(__file__).resolve().parents[1]),
)

Reads = collections.Counter  # (owner, method, "file:line function") -> count


def _owner(stack: traceback.StackSummary) -> tuple[str, str] | None:
    """Who made a read: the innermost frame in DeepSpeed, torch or the harness."""
    for frame in reversed(stack[:-1]):  # the last frame is the counting shim itself
        path = Path(frame.filename)
        for owner, root in OWNERS:
            if path.is_relative_to(root):
                return owner, f"{path.relative_to(root)}:{frame.lineno} {frame.name}"
    return None


@contextmanager
def counted_reads() -> Iterator[Reads]:
    """Count every host read of a tensor by (owner, method, where) while the block runs."""
    counts: Reads = collections.Counter()
    originals = {name: getattr(torch.Tensor, name) for name in READS}

    def shim(name: str):
        def read(self, *args, **kwargs):
            owner = _owner(traceback.extract_stack())
            if owner is not None:
                counts[owner[0], name, owner[1]] += 1
            return originals[name](self, *args, **kwargs)

        return read

    for name in READS:
        setattr(torch.Tensor, name, shim(name))
    try:
        yield counts
    finally:
        for name, method in originals.items():
            setattr(torch.Tensor, name, method)


def by_owner(counts: Reads) -> dict[str, int]:
    """The reads of each owner (every owner present, 0 if it made none)."""
    totals = dict.fromkeys((owner for owner, _ in OWNERS), 0)
    for (owner, _, _), n in counts.items():
        totals[owner] += n
    return totals


def table(counts: Reads) -> str:
    """One line per (owner, method, where), owners grouped."""
    rows = sorted(counts.items())
    return "\n".join(f"  {owner:<9} {n:>3}  {name:<9} {where}" for (owner, name, where), n in rows)
