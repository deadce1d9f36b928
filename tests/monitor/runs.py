"""Real tiny training runs for the monitor tests, in this process, and readers of their files.

The model is a 2-layer GPT, 32 wide, on the built-in corpus cut down to a 256-token vocabulary
(the 255 most frequent GPT-2 tokens plus one for the rest), so that a step takes milliseconds
while the loss curve, its noise and the grad norms are those of real text.
"""

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data.builtin import prepare_builtin

REPO = Path(__file__).resolve().parents[2]
VOCAB = 256


def small_vocab_corpus(out_dir: Path, vocab_size: int = VOCAB) -> Path:
    """A prepared dataset directory (train.bin, val.bin, meta.json) with `vocab_size` ids."""
    source = prepare_builtin(REPO / "data" / "cache")
    train = np.fromfile(source / "train.bin", dtype="<u2")
    ids, counts = np.unique(train, return_counts=True)
    kept = ids[np.argsort(-counts, kind="stable")][: vocab_size - 1]
    table = np.full(2**16, vocab_size - 1, dtype="<u2")
    table[kept] = np.arange(vocab_size - 1)
    splits = {}
    for split in ("train", "val"):
        tokens = table[np.fromfile(source / f"{split}.bin", dtype="<u2")]
        tokens.tofile(out_dir / f"{split}.bin")
        splits[split] = {"file": f"{split}.bin", "num_tokens": len(tokens)}
    meta = {"tokenizer": f"gpt2, top {vocab_size - 1} tokens", "vocab_size": vocab_size}
    (out_dir / "meta.json").write_text(json.dumps({**meta, "splits": splits}))
    return out_dir


# A learning rate far too high, at once: the run blows up within a few steps.
LR_BLOW_UP: dict[str, object] = {
    "optim.lr": 3,
    "optim.warmup_steps": 0,
    "optim.schedule": "constant",
    "optim.grad_clip": 0,
}


# bf16 at lr 0.1 without weight decay: the attention logits cross the detector's 1,000 within
# 150 steps (which layer, and when, depends on the CPU's bf16 kernels).
ATTENTION_GROWTH: dict[str, object] = {
    "precision": "bf16",
    "optim.lr": 0.1,
    "optim.weight_decay": 0.0,
    "optim.schedule": "constant",
    "checkpoint.interval": 10,
    "train.max_steps": 150,
}

N_LAYER = 2


def overrides(run_dir: Path, corpus: Path, **extra: object) -> list[str]:
    """The dotted overrides of a test run; detector thresholds stay at their defaults."""
    values: dict[str, object] = {
        "model.n_layer": N_LAYER,
        "model.n_head": 2,
        "model.n_embd": 32,
        "model.block_size": 32,
        "model.vocab_size": VOCAB,
        "train.micro_batch_size": 8,
        "train.log_interval": 1,
        "train.eval_interval": 0,
        "data.dataset": corpus,
        "data.eval_sequences": 16,
        "run.device": "cpu",
        "run.out_dir": run_dir.parent,
        "run.name": run_dir.name,
        "wandb.mode": "disabled",
    }
    values.update(extra)
    return [f"{key}={value}" for key, value in values.items()]


def run(run_dir: Path, corpus: Path, stop_step: int | None = None, **extra: object) -> dict:
    """Train in this process as `python train.py` does (the caller holds the `dist_env`
    group): the run, then its diagnosis if it stopped and asks for one; returns the summary."""
    import trainer
    from configs import load_config
    from postmortem.diagnose import diagnose_stop

    cfg = load_config(None, overrides(run_dir, corpus, **extra))
    summary = trainer.run(cfg, stop_step)
    diagnose_stop(cfg, summary)
    return summary


def blow_up_overrides(checkpoint_interval: int) -> dict[str, object]:
    """The overrides that resume a healthy run at `LR_BLOW_UP` under the `stop` policy."""
    return {
        **LR_BLOW_UP,
        "checkpoint.force_resume": True,
        "checkpoint.interval": checkpoint_interval,
        "divergence.policy": "stop",
    }


def blow_up(run_dir: Path, corpus: Path, checkpoint_interval: int) -> dict:
    """20 healthy steps, then the run resumed at `LR_BLOW_UP` under the `stop` policy."""
    run(run_dir, corpus, 20, **{"checkpoint.interval": 10})
    return run(run_dir, corpus, **blow_up_overrides(checkpoint_interval))


@contextmanager
def nan_in_the_next_gradient() -> Iterator[None]:
    """A NaN in one entry of the logits' gradient of the next training forward, that one only
    (a torch forward hook on the model, removed at its first use)."""
    from model import GPT

    def nan_into_one_gradient_entry(module, args, output):
        if isinstance(module, GPT) and module.training:
            handle.remove()

            def poison(grad: torch.Tensor) -> torch.Tensor:
                grad = grad.clone()
                grad[0, 0, 0] = math.nan
                return grad

            output.logits.register_hook(poison)

    handle = torch.nn.modules.module.register_module_forward_hook(nan_into_one_gradient_entry)
    try:
        yield
    finally:
        handle.remove()


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def events(run_dir: Path, kind: str | None = None) -> list[dict[str, Any]]:
    found = read_jsonl(run_dir / "events.jsonl")
    return [e for e in found if kind is None or e["kind"] == kind]


def detections(run_dir: Path) -> list[dict[str, Any]]:
    return [e for e in events(run_dir) if "metric" in e]


def metrics(run_dir: Path) -> dict[int, dict[str, Any]]:
    """The last training line of each step (after a rollback a step appears again)."""
    lines = read_jsonl(run_dir / "metrics.jsonl")
    return {line["step"]: line for line in lines if "loss" in line}


def summary(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "summary.json").read_text())
