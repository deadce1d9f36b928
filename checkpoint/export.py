"""Export a checkpoint's weights as one fp32 state dict or a Hugging Face GPT-2 directory.

    python -m checkpoint.export RUN_DIR [--step N] --to torch|hf [--out DIR]

Any ZeRO stage and world size: ZeRO 1-3 checkpoints are consolidated from their fp32 optimizer
partitions (DeepSpeed's `zero_to_fp32`), ZeRO 0 ones hold the whole module already. The default
output is `RUN_DIR/export/step_N-<to>/`. `--to torch` writes `model.pt` (the state dict, our
parameter names) and `config.json` (the model config and where it came from); `--to hf` writes
what `GPT2LMHeadModel.from_pretrained` loads.
"""

import argparse
import json
import pickle
import sys
from pathlib import Path

import torch

from checkpoint.config import CheckpointConfig
from checkpoint.manager import Checkpointer, CheckpointError, read_harness, step_of, tag_for
from model.config import ModelConfig

# ZeRO 0 keeps the whole module (and the optimizer) in DeepSpeed's model-states file
_MODULE_FILE = "mp_rank_00_model_states.pt"


def find_checkpoint(run_dir: Path, step: int | None = None) -> Path:
    """The checkpoint of `run_dir` at `step` (default: the latest); a one-line error if none."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"run directory {run_dir} does not exist")
    ckpt = Checkpointer(run_dir, CheckpointConfig(), rank=0, world_size=1)
    complete = ckpt.complete()
    if not complete:
        raise CheckpointError(f"{run_dir} has no complete checkpoint in {ckpt.dir}")
    if step is None:
        latest = next((p for p in ckpt.candidates() if p in complete), None)
        return latest if latest is not None else complete[-1]
    path = ckpt.dir / tag_for(step)
    if path not in complete:
        have = ", ".join(str(step_of(p)) for p in complete)
        raise CheckpointError(f"{run_dir} has no checkpoint at step {step} (steps: {have})")
    return path


def consolidated_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The fp32 weights of checkpoint `path`, whole, by parameter name (tied ones included)."""
    harness = read_harness(path)
    try:
        if harness["zero_stage"] == 0:
            # weights-only: a checkpoint from elsewhere cannot run code (DeepSpeed's file holds
            # only tensors and plain values)
            module = torch.load(path / _MODULE_FILE, map_location="cpu", weights_only=True)
            return {k: v.float() for k, v in module["module"].items()}
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name)
    except (OSError, RuntimeError, KeyError, ValueError, pickle.UnpicklingError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(f"cannot consolidate checkpoint {path}: {first}") from None
    return {k: v.float() for k, v in state.items()}


def model_config(path: Path) -> ModelConfig:
    """The model config the checkpoint was trained with."""
    return ModelConfig(**read_harness(path)["config"]["model"])


# what each export writes; an --out holding anything else is not overwritten
_EXPORT_FILES = {"torch": {"model.pt", "config.json"}, "hf": {"model.safetensors", "config.json"}}


def check_out(out: Path, to: str) -> None:
    """Refuse an --out that is a file, or a directory holding more than an earlier export."""
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"--out {out} is an existing file: name a new or empty directory")
    if out.is_dir():
        others = sorted(p.name for p in out.iterdir() if p.name not in _EXPORT_FILES[to])
        if others:
            raise CheckpointError(
                f"--out {out} holds other files ({', '.join(others[:3])}): name a new or empty "
                "directory"
            )


def export(path: Path, to: str, out: Path) -> Path:
    """Write checkpoint `path` to `out` as `to` ('torch' or 'hf'); returns `out`."""
    check_out(out, to)
    state = consolidated_state_dict(path)
    config = model_config(path)
    if to == "hf":
        from model.hf import export_hf_state_dict

        try:
            export_hf_state_dict(state, config, out)
        except ValueError as err:
            raise CheckpointError(f"cannot export {path} to Hugging Face: {err}") from None
        return out
    out.mkdir(parents=True, exist_ok=True)
    torch.save(state, out / "model.pt")
    meta = {"model": config.model_dump(mode="json"), "step": step_of(path), "source": str(path)}
    (out / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    """CLI; a bad run directory or step is a one-line `error:` and exit status 2."""
    parser = argparse.ArgumentParser(prog="python -m checkpoint.export", description=__doc__)
    parser.add_argument("run_dir", type=Path, help="the run directory (holds checkpoints/)")
    parser.add_argument("--step", type=int, default=None, help="default: the latest checkpoint")
    parser.add_argument("--to", choices=("torch", "hf"), required=True)
    parser.add_argument("--out", type=Path, default=None, help="default: RUN_DIR/export/...")
    args = parser.parse_args(argv)
    try:
        path = find_checkpoint(args.run_dir, args.step)
        out = args.out or args.run_dir / "export" / f"{path.name}-{args.to}"
        export(path, args.to, out)
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"exported step {step_of(path)} ({path}) to {out} ({args.to})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
