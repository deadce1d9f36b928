"""Data throughput on this machine: `python -m bench.loader [--repeat N] [--steps N]`.

Preparation is measured on one process (so the figure is per core) over the built-in corpus
text repeated `--repeat` times; the loader over the prepared built-in train split.
"""

import argparse
import os
import platform
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from data.builtin import builtin_documents
from data.loader import BatchLoader
from data.text import TextSource, prepare
from data.tokenizer import gpt2_encoding

# (block_size, micro_batch_size, grad_accum_steps, world_size): a GPT-2 step and a CPU-sized one.
_LOADER_LAYOUTS = [(1024, 8, 1, 1), (1024, 16, 4, 8), (256, 32, 1, 1)]


def main(argv: Sequence[str] | None = None) -> None:
    """Print preparation (MB/s per core) and loader (tokens/s) throughput."""
    parser = argparse.ArgumentParser(prog="python -m bench.loader", description=__doc__)
    parser.add_argument("--repeat", type=int, default=4, help="copies of the built-in text")
    parser.add_argument("--steps", type=int, default=200, help="loader steps per layout")
    args = parser.parse_args(argv)

    documents = builtin_documents() * args.repeat
    megabytes = sum(len(document.encode()) for document in documents) / 1e6
    print(
        f"bench.loader: Python {platform.python_version()}, {platform.machine()}, "
        f"{os.cpu_count()} CPUs visible"
    )
    print(f"text: built-in corpus x{args.repeat} = {megabytes:.2f} MB, {len(documents):,} docs")

    encoding = gpt2_encoding()
    start = time.perf_counter()
    num_tokens = sum(len(encoding.encode_ordinary(document)) for document in documents)
    seconds = time.perf_counter() - start
    print(
        f"  tokenize (encode_ordinary, 1 process)   {megabytes / seconds:8.2f} MB/s per core"
        f"   {num_tokens / seconds / 1e6:6.2f} M tokens/s   ({num_tokens:,} tokens)"
    )

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        out_dir = prepare(TextSource("bench", documents), Path(tmp) / "bench", val_fraction=0.01)
        seconds = time.perf_counter() - start
        print(
            f"  prepare() end to end (num_proc=1)       {megabytes / seconds:8.2f} MB/s per core"
            f"   (split, tokenize, write, sha256: {seconds:.2f} s)",
            flush=True,
        )
        for block_size, micro, accum, world in _LOADER_LAYOUTS:
            loader = BatchLoader(
                out_dir / "train.bin",
                block_size=block_size,
                micro_batch_size=micro,
                grad_accum_steps=accum,
                rank=world - 1,
                world_size=world,
            )
            loader.next_step()  # first touch of the pages
            start = time.perf_counter()
            for _ in range(args.steps):
                loader.next_step()
            seconds = time.perf_counter() - start
            tokens_per_s = args.steps * micro * accum * block_size / seconds
            print(
                f"  loader next_step: block {block_size:4d}, micro {micro:2d} x accum {accum} "
                f"(1 rank of {world})  {tokens_per_s / 1e6:8.2f} M tokens/s per rank"
                f"   {seconds / args.steps * 1e3:.3f} ms/step"
            )


if __name__ == "__main__":
    main()
