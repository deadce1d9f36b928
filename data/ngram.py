"""An unlimited token stream with real-text statistics and a known loss floor.

The CPU proxy of the study needs what the paper has (one pass over far more tokens than
parameters) on a corpus of 0.4M tokens. So instead of repeating the built-in corpus, a smoothed
n-gram model is fitted on it and sampled: interpolated Kneser-Ney (Chen & Goodman's form, one
discount per order from the count-of-counts) over a reduced vocabulary, the most frequent
`vocab_size - 1` GPT-2 ids of the corpus plus one "other" id, so that the embedding does not
dwarf a small model. Because the generator is known, so is the best loss any model can reach on
its tokens: the generator's own entropy rate, estimated as its mean -log p on held-out samples.

Sampling is vectorized across chains: every chain starts from a document start (a context of
EOT), and at each position all chains draw their next token at once, choosing at each order
between the discounted counts of their context and the back-off to the next lower order, as
the interpolated model's mixture weights say. Chains come in groups of `GROUP_CHAINS` with their
own seeds, so a longer stream with the same seed begins with the shorter one's bytes.

With `repeat_fraction` (`--repeat-fraction`), a share of the tokens are spans copied from
earlier in the same context window, so that induction heads and near-tied attention rows can
form; its floor is computed exactly (data/repeats.py).
"""

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from tqdm import tqdm

from data.dataset import (
    META_FILE,
    DataError,
    check_writable,
    file_sha256,
    finish,
    read_meta,
    sync,
)
from data.repeats import RepeatSpec, repeat_floor, sample_with_repeats
from data.tokenizer import EOT_TOKEN

GROUP_CHAINS = 1024  # chains sampled side by side (one numpy call covers all of them)
CHAIN_TOKENS = 8192  # tokens per chain: a chain's start (an artificial context) is rare
HELDOUT_CHAINS = 256  # independent chains of the entropy-rate estimate, so its SE is plain
SPLIT_STREAMS = {"train": 0, "val": 1, "heldout": 2}  # each split is its own seeded stream


@dataclass(frozen=True)
class _Level:
    """One order of the model: entries (context, token) with their (continuation) counts.

    `keys` are `context * V + token`, sorted, so each context's entries are contiguous from
    `ctx_start[i]`; `cum` is the running sum of the discounted counts over all entries.
    """

    keys: np.ndarray
    counts: np.ndarray
    discount: float
    ctx_keys: np.ndarray
    ctx_start: np.ndarray
    ctx_total: np.ndarray
    ctx_types: np.ndarray
    cum: np.ndarray


class NgramModel:
    """Interpolated Kneser-Ney over ids 0..vocab_size-1, fitted on a token sequence.

    P_k(w | c) = max(n(c, w) - D_k, 0) / n(c) + D_k * types(c) / n(c) * P_{k-1}(w | c'),
    where c' drops c's oldest token, n are raw counts at the highest order and continuation
    counts (distinct left neighbours) below it, and P_0 is uniform. An unseen context backs off
    entirely.
    """

    def __init__(self, tokens: np.ndarray, *, order: int, vocab_size: int, start_token: int):
        if not 2 <= order <= 5:  # a 5-gram key is 5 * 11 bits for a 2k vocabulary: fits int64
            raise ValueError(f"order must be in [2, 5], got {order}")
        if vocab_size**order >= 2**63:
            raise ValueError(f"vocab_size**order must fit in int64, got {vocab_size}**{order}")
        tokens = np.asarray(tokens, dtype=np.int64)
        if len(tokens) <= order or tokens.min() < 0 or tokens.max() >= vocab_size:
            raise ValueError(f"need more than {order} tokens with ids in [0, {vocab_size})")
        self.order = order
        self.vocab_size = vocab_size
        self.start_token = start_token
        keys = sum(tokens[i : len(tokens) - order + 1 + i] * vocab_size ** (order - 1 - i)
                   for i in range(order))  # fmt: skip
        unique, counts = np.unique(keys, return_counts=True)
        levels = [self._level(unique, counts.astype(np.float64))]
        for k in range(order - 1, 0, -1):  # continuation counts: distinct left neighbours
            unique, counts = np.unique(unique % vocab_size**k, return_counts=True)
            levels.append(self._level(unique, counts.astype(np.float64)))
        self.levels = levels[::-1]  # levels[c]: context of c tokens

    def _level(self, keys: np.ndarray, counts: np.ndarray) -> _Level:
        n1, n2 = np.sum(counts == 1), np.sum(counts == 2)
        discount = float(n1 / (n1 + 2 * n2)) if n1 else 0.5  # Ney's estimate
        ctx = keys // self.vocab_size
        ctx_keys, ctx_start, ctx_types = np.unique(ctx, return_index=True, return_counts=True)
        return _Level(
            keys=keys,
            counts=counts,
            discount=discount,
            ctx_keys=ctx_keys,
            ctx_start=ctx_start,
            ctx_total=np.add.reduceat(counts, ctx_start),
            ctx_types=ctx_types.astype(np.float64),
            cum=np.cumsum(counts - discount),
        )

    @property
    def discounts(self) -> list[float]:
        """D_1..D_order (by context length + 1)."""
        return [level.discount for level in self.levels]

    def _context_keys(self, history: np.ndarray, length: int) -> np.ndarray:
        """The keys of the last `length` tokens of each row of `history` (N, order - 1)."""
        key = np.zeros(len(history), dtype=np.int64)
        for column in range(history.shape[1] - length, history.shape[1]):
            key = key * self.vocab_size + history[:, column]
        return key

    def _find(self, level: _Level, ctx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(found mask, context index) of each context key at this level."""
        index = np.searchsorted(level.ctx_keys, ctx)
        index = np.minimum(index, len(level.ctx_keys) - 1)
        return level.ctx_keys[index] == ctx, index

    def log_prob(self, history: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        """ln P(token | history) for rows of `history` (N, order - 1) and `tokens` (N,)."""
        history = np.asarray(history, dtype=np.int64)
        tokens = np.asarray(tokens, dtype=np.int64)
        prob = np.full(len(tokens), 1.0 / self.vocab_size)
        for length, level in enumerate(self.levels):
            ctx = self._context_keys(history, length)
            found, index = self._find(level, ctx)
            entry_keys = ctx * self.vocab_size + tokens
            entry = np.minimum(np.searchsorted(level.keys, entry_keys), len(level.keys) - 1)
            count = np.where(level.keys[entry] == entry_keys, level.counts[entry], 0.0)
            total = level.ctx_total[index]
            own = np.maximum(count - level.discount, 0.0) / total
            backoff = level.discount * level.ctx_types[index] / total
            prob = np.where(found, own + backoff * prob, prob)
        return np.log(prob)

    def draw(self, history: np.ndarray, draws: np.ndarray) -> np.ndarray:
        """One next token per row of `history` (N, order - 1), from uniform `draws` (N, order + 1):
        at each order, highest first, the discounted counts of the context or the back-off to
        the next lower order, as the interpolated model's mixture weights say."""
        width = self.order - 1
        token = np.full(len(history), -1, dtype=np.int64)
        pending = np.arange(len(history))
        for context_length in range(width, -1, -1):  # highest order first
            level = self.levels[context_length]
            ctx = self._context_keys(history[pending], context_length)
            found, index = self._find(level, ctx)
            total = level.ctx_total[index]
            own_mass = total - level.discount * level.ctx_types[index]
            r = draws[pending, context_length] * total
            take = found & (r < own_mass)
            start = level.ctx_start[index[take]]
            before = np.where(start > 0, level.cum[np.maximum(start - 1, 0)], 0.0)
            entry = np.searchsorted(level.cum, before + r[take], side="right")
            end = start + level.ctx_types[index[take]].astype(np.int64) - 1
            token[pending[take]] = level.keys[np.minimum(entry, end)] % self.vocab_size
            pending = pending[~take]
        token[pending] = (draws[pending, -1] * self.vocab_size).astype(np.int64)
        return token

    def sample(self, num_chains: int, length: int, rng: np.random.Generator) -> np.ndarray:
        """(num_chains, length) tokens, each chain from a document start (EOT context)."""
        history = np.full((num_chains, self.order - 1), self.start_token, dtype=np.int64)
        out = np.empty((num_chains, length), dtype=np.int64)
        for t in range(length):
            out[:, t] = self.draw(history, rng.random((num_chains, self.order + 1)))
            history = np.concatenate([history[:, 1:], out[:, t, None]], axis=1)
        return out

    def chain_log_probs(self, chains: np.ndarray) -> np.ndarray:
        """ln P of every token of `chains` (M, L) given the history the sampler had."""
        width = self.order - 1
        padded = np.concatenate(
            [np.full((len(chains), width), self.start_token, dtype=np.int64), chains], axis=1
        )
        history = np.stack([padded[:, i : i + chains.shape[1]] for i in range(width)], axis=-1)
        flat_history = history.reshape(-1, width)
        return self.log_prob(flat_history, chains.reshape(-1)).reshape(chains.shape)


def reduce_vocabulary(corpus: np.ndarray, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(reduced corpus, gpt2_ids): the `vocab_size - 1` most frequent ids, then "other".

    Reduced id i < vocab_size - 1 is GPT-2 id `gpt2_ids[i]` (by falling frequency, ties by id);
    every other id becomes `vocab_size - 1`.
    """
    ids, counts = np.unique(corpus, return_counts=True)
    if len(ids) < vocab_size - 1:
        raise ValueError(f"the corpus has {len(ids)} distinct ids, fewer than {vocab_size - 1}")
    kept = ids[np.lexsort((ids, -counts))[: vocab_size - 1]]
    table = np.full(int(corpus.max()) + 1, vocab_size - 1, dtype=np.int64)
    table[kept] = np.arange(vocab_size - 1)
    return table[corpus], kept


def sample_stream(
    model: NgramModel,
    num_tokens: int,
    seed: int,
    split: str,
    out: BinaryIO,
    *,
    group_chains: int = GROUP_CHAINS,
    chain_tokens: int = CHAIN_TOKENS,
    repeats: RepeatSpec | None = None,
) -> None:
    """Write `num_tokens` of the split's stream to `out` as uint16 bytes.

    The stream is groups of `group_chains` chains of `chain_tokens`, group g seeded by
    (seed, split, g), each chain written whole: the last group is sampled in full and cut.
    With `repeats`, chains hold copied spans (data/repeats.py).
    """
    group_tokens = group_chains * chain_tokens
    num_groups = math.ceil(num_tokens / group_tokens)
    for group in tqdm(range(num_groups), desc=f"sampling {split}", unit="group", disable=None):
        rng = np.random.Generator(np.random.PCG64([seed, SPLIT_STREAMS[split], group]))
        if repeats is None:
            chains = model.sample(group_chains, chain_tokens, rng)
        else:
            chains, _ = sample_with_repeats(model, group_chains, chain_tokens, rng, repeats)
        chains = chains.astype("<u2").reshape(-1)
        out.write(chains[: num_tokens - group * group_tokens].tobytes())


def entropy_rate(model: NgramModel, seed: int, chain_tokens: int = CHAIN_TOKENS) -> dict[str, Any]:
    """The generator's mean -ln p per token on fresh held-out chains, with its standard error.

    Chains are independent, so the SE is the spread of per-chain means over sqrt(chains). Also
    the plug-in entropies of a token and of a token given one predecessor: what a model can do
    at best at the first two positions of a window, where it lacks the generator's context.
    """
    rng = np.random.Generator(np.random.PCG64([seed, SPLIT_STREAMS["heldout"], 0]))
    chains = model.sample(HELDOUT_CHAINS, chain_tokens, rng)
    nll = -model.chain_log_probs(chains)
    per_chain = nll.mean(axis=1)
    flat = chains.reshape(-1)
    unigram = np.bincount(flat, minlength=model.vocab_size) / len(flat)
    pairs = chains[:, :-1].astype(np.int64) * model.vocab_size + chains[:, 1:]
    _, pair_counts = np.unique(pairs, return_counts=True)
    pair_p = pair_counts / pair_counts.sum()
    h0 = _entropy(unigram)
    return {
        "nats": float(nll.mean()),
        "se": float(per_chain.std(ddof=1) / math.sqrt(len(per_chain))),
        "tokens": int(nll.size),
        "chains": len(per_chain),
        "unigram_entropy": h0,
        "bigram_conditional_entropy": _entropy(pair_p) - h0,
    }


def _entropy(p: np.ndarray) -> float:
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def window_floor(meta: dict[str, Any], block_size: int) -> float | None:
    """The best mean loss over windows of `block_size` tokens, from a stream's meta.json.

    Position 0 of a window has no context (unigram entropy), position 1 one token (bigram
    conditional entropy), later ones the generator's (its entropy rate; exact for order 3, a
    slight underestimate above). A stream with repeats has its own floor, for windows of the
    size it was made for (data/repeats.py). None when the dataset has no known floor.
    """
    generator = meta.get("generator") or {}
    if "repeats" in generator:
        repeats = generator["repeats"]
        return repeats["loss_floor"] if block_size == repeats["window"] else None
    rate = generator.get("entropy_rate")
    if not rate or block_size < 2:
        return None
    head = rate["unigram_entropy"] + rate["bigram_conditional_entropy"]
    return (head + (block_size - 2) * rate["nats"]) / block_size


def loss_floor(data_dir: Path, block_size: int) -> dict[str, Any]:
    """What a run records about its data: the source and, for a stream, its loss floor."""
    meta = read_meta(data_dir) or {}
    rate = (meta.get("generator") or {}).get("entropy_rate") or {}
    return {
        "source": meta.get("source"),
        "entropy_rate": rate.get("nats"),
        "entropy_rate_se": rate.get("se"),
        "loss_floor": window_floor(meta, block_size),
    }


def prepare_ngram(
    out_dir: str | Path,
    *,
    num_tokens: int,
    val_tokens: int = 1 << 20,
    order: int = 3,
    vocab_size: int = 2048,
    seed: int = 0,
    data_dir: str | Path = "data/cache",
    force: bool = False,
    group_chains: int = GROUP_CHAINS,
    chain_tokens: int = CHAIN_TOKENS,
    repeat_fraction: float = 0.0,
    repeat_window: int | None = None,
    repeat_span: tuple[int, int] = (8, 32),
) -> Path:
    """Fit the generator on the built-in corpus and write `num_tokens` of train, `val_tokens`
    of val and a meta.json with the generator and its entropy rate into `out_dir`.

    `group_chains` and `chain_tokens` set the stream's layout (see `sample_stream`); tests
    make them small. `repeat_fraction` > 0 copies spans of `repeat_span` tokens inside windows
    of `repeat_window` tokens, the block_size of the models that read it (data/repeats.py).
    Raises `DataError` for bad arguments; an existing output is untouched.
    """
    from data.builtin import prepare_builtin

    if num_tokens < 1 or val_tokens < 1:
        raise DataError(f"--tokens and --val-tokens must be >= 1, got {num_tokens}, {val_tokens}")
    if not 2 <= vocab_size <= 2**16:
        raise DataError(f"--vocab must be in [2, 65536], got {vocab_size}")
    repeats = _repeat_spec(repeat_fraction, repeat_window, repeat_span, chain_tokens)
    out_dir = Path(out_dir)
    check_writable(out_dir, force)
    corpus_dir = prepare_builtin(data_dir)
    corpus_meta = json.loads((corpus_dir / META_FILE).read_text())
    corpus = np.concatenate(
        [np.fromfile(corpus_dir / e["file"], dtype="<u2") for e in corpus_meta["splits"].values()]
    )
    try:
        reduced, gpt2_ids = reduce_vocabulary(corpus, vocab_size)
        eot = int(np.flatnonzero(gpt2_ids == EOT_TOKEN)[0])
        model = NgramModel(reduced, order=order, vocab_size=vocab_size, start_token=eot)
    except (ValueError, IndexError) as e:
        raise DataError(f"cannot fit the n-gram model: {e}; lower --vocab or --order") from None
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work_dir = out_dir.with_name(f".{out_dir.name}.tmp-{seed}")
    work_dir.mkdir(exist_ok=True)
    try:
        np.save(work_dir / "gpt2_ids.npy", gpt2_ids.astype("<u2"))
        splits = {}
        for name, count in (("train", num_tokens), ("val", val_tokens)):
            path = work_dir / f"{name}.bin"
            with path.open("wb") as out:
                sample_stream(
                    model, count, seed, name, out,
                    group_chains=group_chains, chain_tokens=chain_tokens, repeats=repeats,
                )  # fmt: skip
                sync(out)
            splits[name] = {"file": path.name, "num_tokens": count, "sha256": file_sha256(path)}
        rate = entropy_rate(model, seed, chain_tokens)
        source = f"{order}-gram Kneser-Ney stream fitted on {corpus_meta['source']}"
        if repeats is not None:
            source += f", {repeat_fraction:.0%} of tokens in copied spans"
        meta = {
            "format_version": 1,
            "tokenizer": f"gpt2-top{vocab_size - 1}+other",
            "vocab_size": vocab_size,
            "eot_token": eot,
            "dtype": "uint16",
            "source": source,
            "generator": {
                "kind": "interpolated Kneser-Ney n-gram",
                "order": order,
                "seed": seed,
                "discounts": model.discounts,
                "fitted_on": corpus_meta["source"],
                "fitted_tokens": int(len(corpus)),
                "other_fraction": float(np.mean(reduced == vocab_size - 1)),
                "group_chains": group_chains,
                "chain_tokens": chain_tokens,
                "entropy_rate": rate,
            },
            "splits": splits,
        }
        if repeats is not None:
            bigram = rate["bigram_conditional_entropy"]
            heldout = np.random.Generator(np.random.PCG64([seed, SPLIT_STREAMS["heldout"], 1]))
            meta["generator"]["repeats"] = repeat_floor(
                model, repeats, bigram, heldout, chain_tokens
            )
        finish(work_dir, out_dir, meta, force)
    except BaseException:
        shutil.rmtree(work_dir, ignore_errors=True)
        raise
    return out_dir


def _repeat_spec(
    fraction: float, window: int | None, span: tuple[int, int], chain_tokens: int
) -> RepeatSpec | None:
    """The repeats of `prepare_ngram`'s arguments (None for none), or a one-line DataError."""
    if fraction == 0:
        return None
    if window is None:
        raise DataError("--repeat-fraction needs --repeat-window (the models' block_size)")
    if chain_tokens % window:
        raise DataError(f"--repeat-window {window} must divide the chains' {chain_tokens} tokens")
    try:
        return RepeatSpec(fraction, window, *span)
    except ValueError as e:
        raise DataError(f"{e} (--repeat-fraction, --repeat-window, --repeat-span)") from None


def parse_count(text: str) -> int:
    """'100M' -> 100_000_000 (suffixes k, M, G), for the command line."""
    scale = {"k": 10**3, "K": 10**3, "M": 10**6, "G": 10**9}.get(text[-1:], 1)
    number = text[:-1] if scale > 1 else text
    try:
        return int(float(number) * scale)
    except ValueError:
        raise ValueError(f"not a token count: {text!r} (e.g. 100M)") from None
