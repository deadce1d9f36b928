"""The n-gram stream with repeats: spans copied from earlier in the same context window.

Why: a 3-gram stream gives attention nothing beyond two tokens to find, so no induction heads
form and no row of attention has near-ties at its max; Qiu & Yao's bf16 mechanism (model/flash.py)
needs both. Here, inside each aligned window of `window` tokens (the model's block_size: the
loader cuts windows at multiples of it), the generator at each position either continues the
n-gram chain or, with probability `start_prob`, starts copying a span of L tokens (uniform in
[span_min, min(span_max, p, window - p)] at window position p) from a source s uniform over the
starts with s + L <= p. A copied token is the n-gram history of the next, so the chain goes on
from it. A window's first span_min positions hold no copy.

The loss floor is exact for order 3: the best predictor knows the generator but not its hidden
choices, so -ln P(x_p | x_<p in the window) is computed with the forward algorithm over the
hidden states (n-gram, or copying from distance d with k tokens to go); see `window_nll`. A
model's target at window position 1 lacks its n-gram's first context token (bigram conditional
entropy, as `data.ngram.window_floor` takes it); the target past the window's end is the next
window's position 0, an n-gram token whose context the window holds.
"""

import math
from dataclasses import asdict, dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from data.ngram import NgramModel

HELDOUT_WINDOWS = 512  # windows of the floor's estimate, each an independent sample of it


@dataclass(frozen=True)
class RepeatSpec:
    """How the stream repeats: copy spans of span_min..span_max tokens inside `window`."""

    fraction: float  # the expected share of copied tokens; `start_prob` is solved from it
    window: int
    span_min: int = 8
    span_max: int = 32

    def __post_init__(self) -> None:
        if not 0 < self.fraction < 1:
            raise ValueError(f"the repeat fraction must be in (0, 1), got {self.fraction}")
        if not 1 <= self.span_min <= self.span_max or 2 * self.span_min > self.window:
            raise ValueError(
                f"spans {self.span_min}..{self.span_max} do not fit windows of {self.window}"
            )
        if self.copied_share(1.0) < self.fraction:  # a copy wherever one can start
            raise ValueError(
                f"spans {self.span_min}..{self.span_max} in windows of {self.window} cannot copy "
                f"{self.fraction:.0%} of the tokens"
            )

    @cached_property
    def start_prob(self) -> float:
        """The per-position probability of starting a copy (from the n-gram state, where a
        span fits) whose expected share of copied tokens is `fraction` (bisection)."""
        low, high = 0.0, 1.0
        for _ in range(50):
            middle = (low + high) / 2
            if self.copied_share(middle) < self.fraction:
                low = middle
            else:
                high = middle
        return (low + high) / 2

    def copied_share(self, start_prob: float) -> float:
        """The expected share of copied tokens in a window at this start probability: a chain
        over the tokens a copy has still to emit (0: the n-gram's state)."""
        left = np.zeros(self.span_max + 1)  # P(a copy has j tokens to emit before position p)
        left[0] = 1.0
        copied = 0.0
        for position in range(self.window):
            longest = self.longest(position)
            if longest >= self.span_min:  # a copy of each fitting length, evenly
                starts = left[0] * start_prob / (longest - self.span_min + 1)
                left[0] -= left[0] * start_prob
                left[self.span_min : longest + 1] += starts
            copied += 1 - left[0]
            ngram = left[0]
            left = np.append(left[1:], 0.0)  # one token emitted: j -> j - 1
            left[0] += ngram
        return copied / self.window

    def longest(self, position: int) -> int:
        """The longest span that can start at window position `position` (< span_min: none)."""
        return min(self.span_max, position, self.window - position)


def sample_with_repeats(
    model: "NgramModel", num_chains: int, length: int, rng: np.random.Generator, spec: RepeatSpec
) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, copied): (num_chains, length) tokens as `NgramModel.sample` draws them, with
    copied spans (module doc), and which of them are copies; `length` a multiple of
    `spec.window`, so every chain starts at a window's start."""
    if length % spec.window:
        raise ValueError(f"chain length {length} is not a multiple of the window {spec.window}")
    history = np.full((num_chains, model.order - 1), model.start_token, dtype=np.int64)
    out = np.empty((num_chains, length), dtype=np.int64)
    copied = np.zeros((num_chains, length), dtype=bool)
    rows = np.arange(num_chains)
    distance = np.zeros(num_chains, dtype=np.int64)  # copying out[t - distance]
    remaining = np.zeros(num_chains, dtype=np.int64)  # copied tokens still to come, this one too
    for t in range(length):
        position = t % spec.window
        token = model.draw(history, rng.random((num_chains, model.order + 1)))
        start_draw, span_draw, source_draw = rng.random((3, num_chains))
        longest = spec.longest(position)
        if longest >= spec.span_min:
            start = (remaining == 0) & (start_draw < spec.start_prob)
            span = spec.span_min + (span_draw * (longest - spec.span_min + 1)).astype(np.int64)
            source = (source_draw * (position - span + 1)).astype(np.int64)
            distance = np.where(start, position - source, distance)
            remaining = np.where(start, span, remaining)
        copied[:, t] = remaining > 0
        out[:, t] = np.where(copied[:, t], out[rows, t - distance * copied[:, t]], token)
        remaining = np.maximum(remaining - 1, 0)
        history = np.concatenate([history[:, 1:], out[:, t, None]], axis=1)
    return out, copied


def window_nll(
    model: "NgramModel", prefix: np.ndarray, windows: np.ndarray, spec: RepeatSpec
) -> np.ndarray:
    """-ln P(x_p | the window's x_<p) of every token of `windows` (M, W), the n-gram's context
    before position `order - 1` taken from `prefix` (M, order - 1).

    Forward algorithm: before position p the hidden state is the n-gram (weight a_n) or a copy
    from distance d with j tokens left, this one included (a_c[:, d, j]); a copy emits x_{p-d}.
    """
    M, W = windows.shape
    width = model.order - 1
    tokens = np.concatenate([prefix, windows], axis=1)
    contexts = np.stack([tokens[:, i : i + W] for i in range(width)], axis=-1)  # (M, W, width)
    ngram = np.exp(model.log_prob(contexts.reshape(-1, width), windows.reshape(-1)))
    ngram = ngram.reshape(M, W)
    a_n = np.ones(M)
    a_c = np.zeros((M, W + 1, spec.span_max + 1))
    nll = np.empty((M, W))
    for p in range(W):
        match = np.zeros((M, W + 1))  # match[:, d]: x_{p-d} == x_p
        if p:
            match[:, 1 : p + 1] = windows[:, p - 1 :: -1] == windows[:, p, None]
        longest = spec.longest(p)
        start_prob = spec.start_prob if longest >= spec.span_min else 0.0
        copies = a_c * match[:, :, None]
        stay = a_n * (1 - start_prob) * ngram[:, p]  # the n-gram emits and goes on
        total = stay + copies.sum(axis=(1, 2))
        a_c = np.concatenate([copies[:, :, 1:], np.zeros((M, W + 1, 1))], axis=2)
        new_n = stay + a_c[:, :, 0].sum(axis=1)  # the copies whose last token this was
        a_c[:, :, 0] = 0
        lengths = range(spec.span_min, longest + 1)
        for span in lengths:  # a copy of `span` tokens from distance span..p starts here
            weight = start_prob / len(lengths) / (p - span + 1)
            started = (a_n * weight)[:, None] * match[:, span : p + 1]
            total += started.sum(axis=1)
            if span > 1:
                a_c[:, span : p + 1, span - 1] += started
            else:
                new_n += started.sum(axis=1)
        nll[:, p] = -np.log(total)
        a_n = new_n / total
        a_c /= total[:, None, None]
    return nll


def repeat_floor(
    model: "NgramModel",
    spec: RepeatSpec,
    bigram_entropy: float,
    rng: np.random.Generator,
    chain_tokens: int,
) -> dict[str, Any]:
    """The stream's loss floor over the loader's windows, with its standard error, and the
    realised share of copied tokens, from fresh held-out chains of `chain_tokens`: per window,
    target 1 costs `bigram_entropy`, targets 2..W-1 the forward algorithm's -ln P, target W
    (the next window's first token, so the chain's last window has none) its n-gram -ln P.
    `rng` draws the held-out chains (the caller's own stream, apart from train and val)."""
    per_chain = chain_tokens // spec.window
    if per_chain < 2:
        raise ValueError(f"chains of {chain_tokens} tokens hold fewer than 2 windows")
    num_chains = math.ceil(HELDOUT_WINDOWS / (per_chain - 1))
    chains, copied = sample_with_repeats(model, num_chains, chain_tokens, rng, spec)
    width = model.order - 1
    padded = np.concatenate(
        [np.full((num_chains, width), model.start_token, dtype=np.int64), chains], axis=1
    )
    windows = chains.reshape(-1, spec.window)
    chain, start = np.divmod(np.arange(len(windows)) * spec.window, chain_tokens)
    prefix = padded[chain[:, None], start[:, None] + np.arange(width)]  # tokens before each
    nll = window_nll(model, prefix, windows, spec)
    # each window but a chain's last, with the next one's position 0 as its last target
    has_next = np.arange(len(windows)) % per_chain < per_chain - 1
    last = np.append(nll[1:, 0], np.nan)
    per_window = (bigram_entropy + nll[:, 2:].sum(axis=1) + last)[has_next] / spec.window
    return {
        **asdict(spec),
        "start_prob": spec.start_prob,
        "copied_fraction": float(copied.mean()),
        "loss_floor": float(per_window.mean()),
        "loss_floor_se": float(per_window.std(ddof=1) / math.sqrt(len(per_window))),
        "windows": int(len(per_window)),
    }
