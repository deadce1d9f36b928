"""Adam at the edge of stability, on the CPU: `python -m experiments.aeos --out docs/aeos`.

The external check of `monitor.sharpness` (Cohen et al. 2022, figure 1's claim): full-batch Adam
on a fixed training set drives the preconditioned sharpness S = lambda_max(P^-1 H) up to the
stability threshold 38 / lr (beta1 = 0.9) and then keeps it hovering there, at every learning rate.

A small GPT trains with plain torch Adam (no DeepSpeed: one process, full batch, so nothing else
varies), no weight decay, no clipping, constant lr, on the first `--sequences` windows of the
built-in compact corpus with their ids renumbered densely (a few hundred distinct tokens, so the
output layer stays small). Every `--every` steps S and lambda_max(H) are measured with the same
functions the harness records (`monitor.sharpness.top_eigenvalues`, `preconditioner`).
Writes `aeos.json` (every measurement), `aeos.png` and a printed table.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data.builtin import prepare_builtin_compact
from model import GPT
from model.config import ModelConfig
from monitor.sharpness import preconditioner, stability_threshold, top_eigenvalues

REPO = Path(__file__).resolve().parents[1]
BETAS = (0.9, 0.999)
EPS = 1e-8


def training_set(sequences: int, block_size: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(x, y, vocab) of the first `sequences` windows, ids renumbered to 0..distinct-1."""
    tokens = np.fromfile(prepare_builtin_compact(REPO / "data" / "cache") / "train.bin", "<u2")
    tokens = tokens[: sequences * block_size + 1].astype(np.int64)
    ids, dense = np.unique(tokens, return_inverse=True)
    data = torch.from_numpy(dense)
    x = data[:-1].view(sequences, block_size)
    y = data[1:].view(sequences, block_size)
    return x, y, len(ids)


def train(lr: float, args: argparse.Namespace) -> dict[str, Any]:
    """One full-batch Adam run; its losses and sharpness measurements."""
    x, y, vocab = training_set(args.sequences, args.block_size)
    torch.manual_seed(args.seed)
    cfg = ModelConfig(
        n_layer=args.n_layer,
        n_head=args.n_head,
        n_embd=args.n_embd,
        block_size=args.block_size,
        vocab_size=-(-vocab // 64) * 64,
    )
    model = GPT(cfg).eval()  # no dropout: one fixed function
    params = list(model.parameters())
    optimizer = torch.optim.Adam(params, lr=lr, betas=BETAS, eps=EPS)
    batches = [(x, y)]
    losses, measurements = [], []
    for step in range(args.steps + 1):
        if step % args.every == 0 and step > 0:
            v = torch.cat([optimizer.state[p]["exp_avg_sq"].reshape(-1) for p in params])
            inv_sqrt_p = preconditioner(v, step, BETAS, EPS).rsqrt()
            s, h, _ = top_eigenvalues(model, params, batches, inv_sqrt_p, args.iters, step)
            measurements.append({"step": step, "sharpness": s, "hessian_max_eig": h})
            print(
                f"lr {lr:g} step {step}: loss {losses[-1]:.4f} S {s:.5g} "
                f"(38/lr {stability_threshold(BETAS[0], lr):.5g}) lambda_max(H) {h:.4g}",
                flush=True,
            )
        if step == args.steps:
            break
        optimizer.zero_grad(set_to_none=True)
        loss = model(x, y).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return {
        "lr": lr,
        "threshold": stability_threshold(BETAS[0], lr),
        "losses": losses,
        "measurements": measurements,
        "num_params": sum(p.numel() for p in params),
        "vocab": vocab,
    }


def summarize(run: dict[str, Any], tail: float) -> dict[str, float]:
    """S / threshold over the last `tail` fraction of the measurements: median, min, max; and
    the first step at which S reached 90% of the threshold."""
    ratios = np.array([m["sharpness"] for m in run["measurements"]]) / run["threshold"]
    late = ratios[int(len(ratios) * (1 - tail)) :]
    reached = [m["step"] for m, r in zip(run["measurements"], ratios, strict=True) if r >= 0.9]
    return {
        "median_ratio": float(np.median(late)),
        "min_ratio": float(late.min()),
        "max_ratio": float(late.max()),
        "first_step_at_0.9": reached[0] if reached else None,
    }


def plot(runs: Sequence[dict[str, Any]], path: Path) -> None:
    from study.plots import new_figure, palette, save_figure

    fig, (ax_s, ax_loss) = new_figure(2)
    handles, texts = [], []
    for run, color in zip(runs, palette(len(runs)), strict=True):
        steps = [m["step"] for m in run["measurements"]]
        (line,) = ax_s.plot(steps, [m["sharpness"] for m in run["measurements"]], color=color)
        ax_s.axhline(run["threshold"], color=color, ls="--", lw=1)
        ax_loss.plot(np.arange(1, len(run["losses"]) + 1), run["losses"], color=color, lw=1)
        handles.append(line)
        texts.append(f"lr {run['lr']:g} (dashed: 38/lr = {run['threshold']:.3g})")
    ax_s.set_yscale("log")
    ax_s.set_title("preconditioned sharpness S = lambda_max(P^-1 H)")
    ax_loss.set_yscale("log")
    ax_loss.set_title("full-batch training loss")
    save_figure(fig, path, handles, texts, "Adam at the edge of stability (full batch, CPU)")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.aeos", description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("docs/aeos"))
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-4, 3e-4, 1e-3])
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--every", type=int, default=20, help="steps between measurements")
    parser.add_argument("--iters", type=int, default=20, help="most Lanczos iterations")
    parser.add_argument("--sequences", type=int, default=64)
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--n-layer", type=int, default=2)
    parser.add_argument("--n-head", type=int, default=2)
    parser.add_argument("--n-embd", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tail", type=float, default=0.5, help="fraction summarised")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    runs = [train(lr, args) for lr in args.lrs]
    for run in runs:
        run["summary"] = summarize(run, args.tail)
        print(f"lr {run['lr']:g}: 38/lr {run['threshold']:.4g}, {run['summary']}")
    result = {"args": {k: str(v) for k, v in vars(args).items()}, "runs": runs}
    result["seconds"] = time.perf_counter() - start
    (args.out / "aeos.json").write_text(json.dumps(result, indent=1))
    plot(runs, args.out / "aeos.png")
    print(f"{result['seconds']:.0f} s; wrote {args.out / 'aeos.json'} and aeos.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
