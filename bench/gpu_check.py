"""The GPU check: the gpu-marked tests, then one benchmark of every setting, as one JSON.

    python -m bench.gpu_check --out gpu_check.json          # (`make gpu-check`) on a CUDA GPU
    python -m bench.gpu_check --device cpu --model tiny --steps 2 --no-compile --skip-tests \\
        --out /tmp/check.json                               # the same code path, on a CPU

Made for a first session on a GPU machine with no internet: it needs no data set (the batch
is random tokens) and no kernel build (torch's fused Adam). The benchmark is GPT-2 124M
(vocabulary 50,304), batch 16 x 1024, bf16, in one process: plain torch eager and compiled
(`bench.engine.reference_step`), then the harness (`bench.engine.engine_step`) on ZeRO 0, 1
and 2 with compile, without and with the monitor. Each setting is built, warmed up, timed,
then counted: its host reads per step by owner (`bench.syncs`), and on CUDA the synchronising
calls torch's sync debug mode reports. Settings run one after another, each freed before the
next, so each one's peak memory is its own. Without CUDA (and `--device cuda`) it exits 2 after
one line.
"""

import argparse
import gc
import json
import platform
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bench.engine import TINY, engine_step, reference_step
from bench.syncs import by_owner, counted_reads
from configs import load_config
from configs.schema import TrainConfig
from launch.distributed import init_distributed
from model import GPT
from monitor.perf import math_mode, mfu, peak_flops, set_tf32

REPO = Path(__file__).resolve().parents[1]
GPT2 = {
    "model.size": "gpt2",
    "model.n_layer": "null",
    "model.n_head": "null",
    "model.n_embd": "null",
    "model.block_size": 1024,
    "model.vocab_size": 50304,
    "train.micro_batch_size": 16,
}


@dataclass(frozen=True)
class Setting:
    """One measured configuration."""

    name: str
    harness: bool
    compile: bool
    zero_stage: int = 0
    monitor: bool = False


def settings(compile_: bool) -> list[Setting]:
    """Plain torch eager and compiled, then the harness on ZeRO 0/1/2, without and with the
    monitor (compiled unless `compile_` is off)."""
    found = [Setting("torch_eager", False, False), Setting("torch_compiled", False, compile_)]
    for stage in (0, 1, 2):
        for monitor in (False, True):
            name = f"harness_zero{stage}" + "_monitor" * monitor
            found.append(Setting(name, True, compile_, stage, monitor))
    return found


def build_parser() -> argparse.ArgumentParser:
    """The command line of `python -m bench.gpu_check`."""
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__)
    parser.add_argument("--out", required=True, help="the JSON file to write")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--model", choices=("gpt2", "tiny"), default="gpt2")
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--steps", type=_positive, default=30, help="timed steps per setting")
    parser.add_argument("--warmup", type=_positive, default=5, help="untimed steps first")
    parser.add_argument("--no-compile", action="store_true", help="every setting eager")
    parser.add_argument("--skip-tests", action="store_true", help="only the benchmark")
    return parser


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got '{text}'")
    return int(text)


def config(args: argparse.Namespace, setting: Setting) -> TrainConfig:
    """The config of one setting: the model, batch and precision of the check."""
    values: dict[str, Any] = {**(GPT2 if args.model == "gpt2" else TINY)}
    values.update(
        {
            "precision": args.precision,
            "train.compile": setting.compile,
            "zero_stage": setting.zero_stage,
            "run.device": args.device,
            "wandb.mode": "disabled",
        }
    )
    return load_config(None, [f"{k}={v}" for k, v in values.items()])


def run_gpu_tests() -> dict[str, Any]:
    """`pytest -m gpu` in a subprocess: its exit status and its last line."""
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    return {"returncode": proc.returncode, "summary": lines[-1] if lines else proc.stderr[-500:]}


def measure(
    step: Callable[[], Any], steps: int, warmup: int, device: torch.device, log_interval: int
) -> dict[str, Any]:
    """Warm up, time `steps` steps, then count one log interval's host reads and syncs."""
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(warmup):
        step()
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    sync()
    seconds = (time.perf_counter() - start) / steps
    peak_mb = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None
    with warnings.catch_warnings(record=True) as caught, counted_reads() as reads:
        warnings.simplefilter("always")
        if cuda:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(log_interval):
                step()
            sync()
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode("default")
    syncs = sum("synchronizing" in str(w.message) for w in caught) if cuda else None
    return {
        "step_s": seconds,
        "peak_mem_mb": peak_mb,
        "host_reads_per_step": {k: v / log_interval for k, v in by_owner(reads).items()},
        "cuda_syncs_per_step": None if syncs is None else syncs / log_interval,
        "final_loss": float(loss),  # host sync, after timing
    }


def report(
    meta: dict[str, Any],
    tests: dict[str, Any] | None,
    figures: dict[str, dict[str, Any]],
    tokens_per_step: int,
    flops_per_token: float,
    peak: float | None,
) -> dict[str, Any]:
    """The JSON: the machine, the tests, each setting's figures, and the harness against plain
    compiled torch (tokens/s ratios; the goal is >= 1.0)."""
    settings_out = {}
    for name, f in figures.items():
        tok_per_s = tokens_per_step / f["step_s"]
        settings_out[name] = {
            "tok_per_s": tok_per_s,
            "step_ms": 1000 * f["step_s"],
            "mfu": mfu(flops_per_token, tok_per_s, peak),
            **{k: v for k, v in f.items() if k != "step_s"},
        }
    base = settings_out.get("torch_compiled", {}).get("tok_per_s")
    ratios = {
        f"{name}_vs_torch_compiled": s["tok_per_s"] / base
        for name, s in settings_out.items()
        if name.startswith("harness") and base
    }
    return {**meta, "tests": tests, "settings": settings_out, "ratios": ratios}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the check; 0 when the tests (if run) passed, 1 when they failed, 2 without CUDA."""
    args = build_parser().parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print(
            f"bench.gpu_check: no CUDA device (torch {torch.__version__}); run it on a machine "
            "with a GPU, or pass --device cpu to try it here",
            file=sys.stderr,
        )
        return 2
    tests = None if args.skip_tests else run_gpu_tests()
    env = init_distributed(args.device)
    device = env.device
    all_settings = settings(not args.no_compile)
    first = config(args, all_settings[0])
    if device.type == "cuda" and first.precision == "fp32":
        set_tf32(first.tf32)
    shape = (first.train.micro_batch_size, first.model.block_size)
    gen = torch.Generator().manual_seed(0)
    batch = tuple(
        torch.randint(0, first.model.vocab_size, shape, generator=gen).to(device) for _ in "xy"
    )
    figures = {}
    for setting in all_settings:
        cfg = config(args, setting)
        # what earlier settings left allocated (0 when each was freed): inside its peak
        before_mb = torch.cuda.memory_allocated(device) / 2**20 if device.type == "cuda" else None
        if setting.harness:
            step = engine_step(cfg, device, batch, monitor=setting.monitor)
        else:
            step = reference_step(cfg, device, batch)
        interval = cfg.train.log_interval
        figures[setting.name] = measure(step, args.steps, args.warmup, device, interval)
        figures[setting.name].update(compile=setting.compile, allocated_before_mb=before_mb)
        print(f"  {setting.name:<24} {1000 * figures[setting.name]['step_s']:9.1f} ms/step")
        del step
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    with torch.device("meta"):
        flops_per_token = GPT(first.model).flops_per_token()
    import deepspeed

    meta = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "deepspeed": deepspeed.__version__,
        "machine": platform.machine(),
        "model": first.model.model_dump(mode="json"),
        "batch": list(shape),
        "precision": first.precision,
        "steps": args.steps,
        "warmup": args.warmup,
    }
    peak = peak_flops(device, math_mode(first))
    result = report(meta, tests, figures, shape[0] * shape[1], flops_per_token, peak)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"bench.gpu_check: wrote {args.out}")
    return 1 if tests is not None and tests["returncode"] != 0 else 0


if __name__ == "__main__":
    sys.exit(main())
