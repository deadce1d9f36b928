"""Tokenize a dataset into GPT-2 token files: `python -m data.prepare SOURCE... --out DIR`.

SOURCE is `openwebtext` (through Hugging Face `datasets`, as nanoGPT does), `ngram` (an
unlimited sampled stream with a known loss floor, `--tokens N`: see `data.ngram`) or local `.txt`,
`.jsonl` (a `text` field per line) and `.parquet` (a `text` column) files or directories of them.
A `.txt` file is one document; empty documents are dropped. Every source becomes a `datasets`
table with a `text` column and then takes the same path: a seeded split by documents
(`train_test_split`), `map` tokenization on `num_proc` processes, each document followed by EOT,
written shard by shard.

The output directory holds `train.bin` and `val.bin` (little-endian uint16 token ids) and
`meta.json` (tokenizer, counts, split, sha256 of each file). Everything is written into a hidden
sibling directory that is renamed into place at the end, so `meta.json` present means finished;
a run killed hard leaves only a `.<name>.tmp-*` sibling, safe to delete.
"""

import argparse
import json
import os
import signal
import sys
import traceback
from collections.abc import Sequence
from typing import Any

from data.dataset import META_FILE, OPENWEBTEXT, DataError
from data.text import openwebtext_source, prepare

NGRAM = "ngram"


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m data.prepare`; returns the exit status (2 for a data error, 130 for Ctrl-C).

    Ctrl-C is one line and exit 130, whatever the tokenizer's worker pool was doing: the pool's
    workers (forked, so they share this handler) ignore it and the main process stops, which
    removes the unfinished output (`data.dataset` writes it in a hidden sibling).
    """
    main_pid, interrupted = os.getpid(), []

    def on_interrupt(signum: int, frame: Any) -> None:
        if os.getpid() == main_pid:  # a forked worker leaves the stopping to its parent
            interrupted.append(signum)
            raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, on_interrupt)
    try:
        return _main(argv)
    except BaseException as error:
        if not interrupted:
            raise
        _close_quietly(error)
        print(
            "error: interrupted; nothing was written: run the same command again", file=sys.stderr
        )
        return 130
    finally:
        signal.signal(signal.SIGINT, previous)


def _close_quietly(error: BaseException) -> None:
    """Free the interrupted frames' locals now, with unraisable exceptions silenced.

    The tokenizer pool's result generator (`datasets`' `iflatmap_unordered`), left suspended
    where Ctrl-C struck outside it, waits on its stopped workers when it is closed and times out:
    an "Exception ignored in" traceback after the one line, whenever the frames holding it die.
    Clearing them here closes it here.
    """
    hook, sys.unraisablehook = sys.unraisablehook, lambda unraisable: None
    try:
        traceback.clear_frames(error.__traceback__)
    finally:
        sys.unraisablehook = hook


def _main(argv: Sequence[str] | None) -> int:
    """`main` itself."""
    parser = argparse.ArgumentParser(
        prog="python -m data.prepare", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "sources", nargs="+", help=f"'{OPENWEBTEXT}', or .txt/.jsonl/.parquet files or directories"
    )
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--val-fraction", type=float, default=0.0005, help="documents held out")
    parser.add_argument("--seed", type=int, default=2357, help="split seed (ngram: sampler seed)")
    parser.add_argument("--force", action="store_true", help="replace an existing output")
    parser.add_argument(
        "--num-proc", type=int, default=min(8, os.cpu_count() or 1), help="tokenizer processes"
    )
    parser.add_argument(
        "--hub-name",
        default=OPENWEBTEXT,
        help="the datasets.load_dataset name for 'openwebtext' (a mirror, if the default fails)",
    )
    parser.add_argument("--tokens", help="ngram: training tokens to sample, e.g. 100M")
    parser.add_argument("--val-tokens", default="1048576", help="ngram: validation tokens")
    parser.add_argument("--order", type=int, default=3, help="ngram: order of the model")
    parser.add_argument("--vocab", type=int, default=2048, help="ngram: ids kept, incl. 'other'")
    parser.add_argument(
        "--repeat-fraction", type=float, default=0.0, help="ngram: share of copied tokens"
    )
    parser.add_argument("--repeat-window", type=int, help="ngram repeats: the models' block_size")
    parser.add_argument(
        "--repeat-span", type=int, nargs=2, default=(8, 32), help="ngram repeats: span min max"
    )
    args = parser.parse_args(argv)
    if args.sources == [NGRAM]:
        return _main_ngram(args)
    sources = openwebtext_source(args.hub_name) if args.sources == [OPENWEBTEXT] else args.sources
    try:
        out_dir = prepare(
            sources,
            args.out,
            val_fraction=args.val_fraction,
            seed=args.seed,
            force=args.force,
            num_proc=args.num_proc,
        )
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    splits = json.loads((out_dir / META_FILE).read_text())["splits"]
    for name, split in splits.items():
        print(f"{name}: {split['num_tokens']:,} tokens, {split['num_documents']:,} documents")
    print(f"wrote {out_dir}")
    return 0


def _main_ngram(args: argparse.Namespace) -> int:
    from data.ngram import parse_count, prepare_ngram

    try:
        if args.tokens is None:
            raise DataError("ngram needs --tokens N (training tokens, e.g. 100M)")
        out_dir = prepare_ngram(
            args.out,
            num_tokens=parse_count(args.tokens),
            val_tokens=parse_count(args.val_tokens),
            order=args.order,
            vocab_size=args.vocab,
            seed=args.seed,
            force=args.force,
            repeat_fraction=args.repeat_fraction,
            repeat_window=args.repeat_window,
            repeat_span=tuple(args.repeat_span),
        )
    except (DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    generator = json.loads((out_dir / META_FILE).read_text())["generator"]
    rate = generator["entropy_rate"]
    floor = "" if "repeats" in generator else " (loss floor)"  # repeats lower the floor
    print(f"entropy rate{floor} {rate['nats']:.4f} +- {rate['se']:.4f} nats/token")
    if "repeats" in generator:
        floor, se, window = (
            generator["repeats"][k] for k in ("loss_floor", "loss_floor_se", "window")
        )
        print(f"loss floor with repeats {floor:.4f} +- {se:.4f} nats/token, {window}-token windows")
    print(f"wrote {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
