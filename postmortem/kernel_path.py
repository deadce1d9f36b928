"""What a CPU kernel path changes: `python -m postmortem.kernel_path [RUN_DIR]`.

The path itself (which ATen, oneDNN and SDPA kernels run, and why it matters) is detected by
`monitor.device_path` and recorded in every run. This tool prints this process's path
(`--lower-paths`: the environments that simulate each lower path this CPU can take, one line
each) and, given a run, how far its bf16 autocast gradient (at the run's last checkpoint, on its
validation data) is from a GPU's (`model/tensor_core.py`'s emulation) and from fp32: run it
under each `ATEN_CPU_CAPABILITY` to see which CPU path computes bf16 most like a GPU.
`--ops FILE` saves the model's ops on fixed inputs as this path computes them, and
`--ops-compare A B` says which op two paths disagree on.
"""

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from monitor.device_path import cpu_flags, kernel_path, lower_paths


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||: how far a result is from a reference, whatever its scale."""
    return float((a - b).norm() / b.norm())


def bf16_distances(model: torch.nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]]):
    """Relative L2 distances between the whole gradients (summed over `batches`) of this
    process's bf16 autocast ("native"), the tensor-core emulation ("emulated") and fp32."""
    from model.tensor_core import TensorCoreBF16

    def gradient(context: Callable[[], Any]) -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        for x, y in batches:
            with context():
                model(x, y).loss.backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    fp32 = gradient(nullcontext)
    native = gradient(lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    emulated = gradient(TensorCoreBF16)
    return {
        "native_vs_emulated": relative_difference(native, emulated),
        "native_vs_fp32": relative_difference(native, fp32),
        "emulated_vs_fp32": relative_difference(emulated, fp32),
    }


def run_distances(run_dir: Path, num_batches: int) -> dict[str, float]:
    """`bf16_distances` at `run_dir`'s latest checkpoint, on the first `num_batches` micro-batches
    of its validation set."""
    from checkpoint.export import consolidated_state_dict, find_checkpoint
    from checkpoint.manager import read_harness
    from configs.schema import TrainConfig
    from data.loader import resolve_dataset, validation_batches
    from model import GPT

    path = find_checkpoint(run_dir)
    cfg = TrainConfig.model_validate(read_harness(path)["config"])  # the run's own config
    model = GPT(cfg.model)
    model.load_state_dict(consolidated_state_dict(path))
    batches = validation_batches(
        resolve_dataset(cfg.data) / "val.bin",
        block_size=cfg.model.block_size,
        micro_batch_size=cfg.train.micro_batch_size,
        num_sequences=num_batches * cfg.train.micro_batch_size,
        vocab_size=cfg.model.vocab_size,
    )
    return bf16_distances(model, [batch for batch, _ in batches])


def op_outputs() -> dict[str, torch.Tensor]:
    """The model's ops in the dtypes bf16 autocast runs them in, on fixed seeded inputs: the
    same numbers on every path but for the path's own kernels (saved per path, then compared)."""
    from torch.nn import functional as F

    gen = torch.Generator().manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).mul(2)

    q, k, v = (randn(8, 2, 128, 32).bfloat16() for _ in range(3))
    x, w = randn(8, 128, 256).bfloat16(), randn(64, 256).bfloat16()
    return {
        "sdpa (bf16)": F.scaled_dot_product_attention(q, k, v, is_causal=True).float(),
        "gelu (bf16)": F.gelu(x, approximate="tanh").float(),
        "linear (bf16)": F.linear(x, w).float(),
        "softmax (bf16)": torch.softmax(x, dim=-1).float(),
        "layer_norm (fp32)": F.layer_norm(x.float(), (256,)),
    }


def compare_ops(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, tuple]:
    """Per op: (relative L2 difference, fraction of outputs that differ) between two paths."""
    return {
        name: (relative_difference(a[name], b[name]), float((a[name] != b[name]).float().mean()))
        for name in a.keys() & b.keys()
    }


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: this process's kernel path, and with RUN_DIR its bf16 distances (module doc)."""
    parser = argparse.ArgumentParser(
        prog="python -m postmortem.kernel_path", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("run_dir", type=Path, nargs="?", help="a run with a checkpoint")
    parser.add_argument("--batches", type=int, default=4, help="validation micro-batches")
    parser.add_argument(
        "--lower-paths",
        action="store_true",
        help="print the environments of the kernel paths below this CPU's, one line each",
    )
    parser.add_argument("--ops", type=Path, help="save this path's op outputs to this file")
    parser.add_argument(
        "--ops-compare", type=Path, nargs=2, metavar=("A", "B"), help="two --ops files"
    )
    args = parser.parse_args(argv)
    if args.ops_compare:
        try:
            a, b = (torch.load(p, weights_only=True) for p in args.ops_compare)
            paths, ops = (a["path"], b["path"]), (a["ops"], b["ops"])
        except Exception as err:  # torch.load's error depends on the bytes it meets
            line = str(err).splitlines()[0] if str(err) else type(err).__name__
            print(
                f"error: {' or '.join(map(str, args.ops_compare))}: not an --ops file ({line})",
                file=sys.stderr,
            )
            return 2
        print(f"{paths[0]} against {paths[1]}:")
        for name, (rel, frac) in sorted(compare_ops(*ops).items(), key=lambda i: -i[1][0]):
            print(f"{name}: relative difference {rel:.2e}, {frac:.2%} of outputs differ")
        return 0
    if args.lower_paths:
        for env in lower_paths(cpu_flags()[1]):
            print(" ".join(f"{name}={value}" for name, value in env.items()))
        return 0
    print(json.dumps(kernel_path(), indent=1))
    if args.ops:
        torch.save({"path": kernel_path()["path"], "ops": op_outputs()}, args.ops)
        print(f"wrote {args.ops}")
    if args.run_dir is None:
        return 0
    from checkpoint.manager import CheckpointError
    from configs import ConfigError
    from data.dataset import DataError

    if args.batches < 1:
        print(f"error: --batches must be >= 1, got {args.batches}", file=sys.stderr)
        return 2
    try:
        distances = run_distances(args.run_dir, args.batches)
    except (CheckpointError, ConfigError, DataError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for name, value in distances.items():
        print(f"{name.replace('_', ' ')}: {value:.5f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
