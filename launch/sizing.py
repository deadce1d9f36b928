"""The sizing rule of the CPU proxy runs, so that they sit in the paper's regime (issue 11).

The paper trains GPT-2 124M on ~200 tokens per parameter in one pass; weight decay acts there
through the optimization dynamics, not as a regularizer. A proxy that sees a few tokens per
parameter, or the same tokens twice, measures something else. The rule, checked for every
shipped stream proxy by tests/launch/test_sizing.py:

- at least MIN_TOKENS_PER_PARAM training tokens per parameter, counting all parameters (the
  tied embedding too), as Chinchilla does; per non-embedding parameter is reported beside it;
- no training window read twice (the run's tokens fit in the stream's training split);
- batches of at least MIN_BATCH_TOKENS tokens, a fixed validation set of MIN_VAL_TOKENS, and
  a cosine schedule down to MIN_LR_RATIO of the peak, as in the paper.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from configs.schema import TrainConfig

MIN_TOKENS_PER_PARAM = 20.0
MIN_BATCH_TOKENS = 4096
MIN_VAL_TOKENS = 256 * 1024
MIN_LR_RATIO = 0.1


@dataclass
class Sizing:
    """One run's size against the rule; `problems` is empty when it passes."""

    params: int  # all parameters, the tied embedding once
    non_embedding_params: int  # without the token and position embeddings (Kaplan et al.)
    train_tokens: int
    batch_tokens: int
    val_tokens: int
    problems: list[str] = field(default_factory=list)

    @property
    def tokens_per_param(self) -> float:
        return self.train_tokens / self.params

    @property
    def tokens_per_non_embedding_param(self) -> float:
        return self.train_tokens / self.non_embedding_params

    def line(self) -> str:
        return (
            f"{self.params:,} parameters ({self.non_embedding_params:,} non-embedding), "
            f"{self.train_tokens:,} tokens: {self.tokens_per_param:.1f} tokens per parameter, "
            f"{self.tokens_per_non_embedding_param:.1f} per non-embedding parameter"
        )


def parameter_counts(cfg: TrainConfig) -> tuple[int, int]:
    """(all parameters, non-embedding parameters) of the run's model, built on no memory."""
    import torch

    from model import GPT

    with torch.device("meta"):
        model = GPT(cfg.model)
    total = model.num_params(non_embedding=False)
    embeddings = model.transformer.wte.weight.numel() + model.transformer.wpe.weight.numel()
    return total, total - embeddings


def sizing(cfg: TrainConfig, stream_tokens: int, world_size: int = 1) -> Sizing:
    """`cfg` against the rule, on a training split of `stream_tokens` tokens."""
    t, block = cfg.train, cfg.model.block_size
    sequences = t.micro_batch_size * t.grad_accum_steps * world_size
    params, non_embedding = parameter_counts(cfg)
    result = Sizing(
        params=params,
        non_embedding_params=non_embedding,
        train_tokens=t.max_steps * sequences * block,
        batch_tokens=sequences * block,
        val_tokens=cfg.data.eval_sequences * block,  # one global set on any world size
    )
    problems = result.problems
    if result.tokens_per_param < MIN_TOKENS_PER_PARAM:
        problems.append(
            f"{result.tokens_per_param:.1f} tokens per parameter, below {MIN_TOKENS_PER_PARAM:g}"
        )
    windows = (stream_tokens - 1) // block
    if t.max_steps * sequences > windows:
        problems.append(
            f"reads {t.max_steps * sequences:,} windows of a split of {windows:,}: repeats data"
        )
    if result.batch_tokens < MIN_BATCH_TOKENS:
        problems.append(f"{result.batch_tokens:,} tokens per batch, below {MIN_BATCH_TOKENS:,}")
    if result.val_tokens < MIN_VAL_TOKENS:
        problems.append(f"{result.val_tokens:,} validation tokens, below {MIN_VAL_TOKENS:,}")
    o = cfg.optim
    if o.schedule != "cosine" or not math.isclose(o.min_lr, MIN_LR_RATIO * o.lr, rel_tol=1e-6):
        problems.append(f"schedule {o.schedule} to {o.min_lr:g}, not cosine to 0.1 x {o.lr:g}")
    return result
