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
import hashlib
import json
import os
import shutil
import sys
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

from data.tokenizer import EOT_TOKEN, VOCAB_SIZE, gpt2_encoding

if TYPE_CHECKING:  # datasets takes about a second to import; only preparation needs it
    from datasets import Dataset

FORMAT_VERSION = 1
META_FILE = "meta.json"
SPLITS = ("train", "val")
TEXT_SUFFIXES = (".txt", ".jsonl", ".parquet")
OPENWEBTEXT = "openwebtext"
NGRAM = "ngram"
OPENWEBTEXT_DOCUMENTS = 8_013_769  # the original release, as the hub's script dataset built it
# The hub's dataset viewer keeps a Parquet conversion of a dataset on this branch; for a script
# dataset (which `datasets` 4 and later refuse to run) it is the one copy the hub itself serves.
PARQUET_REVISION = "refs/convert/parquet"
_MAX_WRITE_SHARDS = 1024  # as nanoGPT: one write holds at most ~1/1024 of a split
_MIN_SHARD_DOCS = 1000  # small splits: fewer shards, as each costs a few milliseconds
_ARROW_BATCH_DOCS = 1000
_TEXT_SCHEMA = pa.schema([("text", pa.string())])


class DataError(ValueError):
    """A problem with the data the user can fix; the message is one line that says how."""


@dataclass(frozen=True)
class HubSource:
    """A dataset loaded by `datasets.load_dataset(name, num_proc=..., **kwargs)`.

    With `parquet_fallback`, a failed load is tried again from the hub's Parquet conversion
    (`revision=PARQUET_REVISION`). With `expected_documents`, loading fewer is warned about: the
    conversion of a large dataset can be partial. `openwebtext` is `openwebtext_source()`; tests
    run the same path offline with `HubSource("json", {"data_files": ..., "cache_dir": ...})`.
    """

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    parquet_fallback: bool = False
    expected_documents: int | None = None


def openwebtext_source(hub_name: str = OPENWEBTEXT) -> HubSource:
    """OpenWebText from the hub (`hub_name`: another copy of it), or its Parquet conversion."""
    return HubSource(hub_name, parquet_fallback=True, expected_documents=OPENWEBTEXT_DOCUMENTS)


@dataclass(frozen=True)
class TextSource:
    """Documents already in memory (the built-in corpus)."""

    description: str
    texts: Sequence[str]


Source = str | Path | Sequence[str | Path] | HubSource | TextSource


def prepare(
    source: Source,
    out_dir: str | Path,
    *,
    val_fraction: float = 0.0005,
    seed: int = 2357,
    force: bool = False,
    num_proc: int = 1,
) -> Path:
    """Tokenize `source` into `out_dir` (train.bin, val.bin, meta.json) and return `out_dir`.

    The defaults are nanoGPT's OpenWebText split. Raises `DataError` for problems the user can
    fix; on any failure nothing is left at `out_dir` and an existing output is untouched.
    """
    out_dir = Path(out_dir)
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if num_proc < 1:
        raise DataError(f"num_proc must be >= 1, got {num_proc}")
    inputs = _local_inputs(source)
    _check_writable(out_dir, force, inputs)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Not mkdtemp: its 0700 mode would stay on the renamed output.
    work_dir = out_dir.with_name(f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}")
    work_dir.mkdir()
    try:
        dataset, description = _load(source, work_dir / "arrow", num_proc)
        splits = _tokenize_and_write(dataset, work_dir, val_fraction, seed, num_proc)
        shutil.rmtree(work_dir / "arrow", ignore_errors=True)
        meta = {
            "format_version": FORMAT_VERSION,
            "tokenizer": "gpt2",
            "vocab_size": VOCAB_SIZE,
            "eot_token": EOT_TOKEN,
            "dtype": "uint16",
            "source": description,
            "split_seed": seed,
            "val_fraction": val_fraction,
            "splits": splits,
        }
        finish(work_dir, out_dir, meta, force, inputs)
    except BaseException:
        shutil.rmtree(work_dir, ignore_errors=True)
        raise
    return out_dir


def finish(
    work_dir: Path,
    out_dir: Path,
    meta: dict[str, Any],
    force: bool,
    inputs: Sequence[Path] = (),
) -> None:
    """Write `meta.json` into `work_dir` and rename it to `out_dir`.

    meta.json is written last: its presence is what marks a directory as finished.
    """
    with (work_dir / META_FILE).open("w") as out:
        out.write(json.dumps(meta, indent=2) + "\n")
        _sync(out)
    _install(work_dir, out_dir, force, inputs)


def _check_writable(out_dir: Path, force: bool, inputs: Sequence[Path] = ()) -> None:
    """Refuse an output that would destroy something other than an earlier prepared dataset.

    `--force` replaces a prepared dataset (a directory with its meta.json) and nothing else:
    never an arbitrary directory or file, and never one that holds an input.
    """
    for path in inputs:
        if out_dir.resolve() in (path.resolve(), *path.resolve().parents):
            raise DataError(
                f"--out {out_dir} holds the input {path}: write the dataset to another directory"
            )
    if not out_dir.exists():
        return
    if (out_dir / META_FILE).is_file():
        if not force:
            raise DataError(
                f"{out_dir} already holds a prepared dataset; pass --force to replace it"
            )
        return
    if not out_dir.is_dir() or any(out_dir.iterdir()):
        raise DataError(
            f"{out_dir} exists and is not a prepared dataset (no {META_FILE}); --force replaces "
            "only a prepared dataset: choose a new or empty --out"
        )


def _local_inputs(source: Source) -> list[Path]:
    """The files and directories a local source reads (none for a hub or in-memory source)."""
    if isinstance(source, HubSource | TextSource) or source == OPENWEBTEXT:
        return []
    return [Path(p) for p in ([source] if isinstance(source, str | Path) else source)]


def _install(work_dir: Path, out_dir: Path, force: bool, inputs: Sequence[Path]) -> None:
    """Rename the finished `work_dir` to `out_dir`; an old output is removed only afterwards."""
    _check_writable(out_dir, force, inputs)  # again: another process may have finished meanwhile
    if not out_dir.exists():
        work_dir.rename(out_dir)
        return
    old_dir = out_dir.with_name(f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}")
    out_dir.rename(old_dir)
    work_dir.rename(out_dir)
    if old_dir.is_dir():
        shutil.rmtree(old_dir)
    else:
        old_dir.unlink()


# ----------------------------------------------------------------------------- loading


def _load(source: Source, arrow_dir: Path, num_proc: int) -> tuple["Dataset", str]:
    """Any source as a `datasets.Dataset` with a `text` column, plus a one-line description."""
    if source == OPENWEBTEXT:  # the string only: Path("openwebtext") is a local directory
        source = openwebtext_source()
    if isinstance(source, HubSource):
        return _load_hub(source, num_proc)
    if isinstance(source, TextSource):
        return _texts_to_dataset(source.texts, arrow_dir, source.description), source.description
    paths = [source] if isinstance(source, str | Path) else list(source)
    files = _find_files(paths)
    description = "local files: " + ", ".join(str(p) for p in paths)
    return _texts_to_dataset(_read_all(files), arrow_dir, description), description


def _read_all(files: list[Path]) -> Iterator[str]:
    """The documents of every file, with a progress bar ended (its line too) on any error."""
    with tqdm(files, desc="reading", unit="file") as bar:
        for file in bar:
            yield from _read(file)


def _load_hub(source: HubSource, num_proc: int) -> tuple["Dataset", str]:
    """The `train` split's `text` column, and the call that loaded it."""
    import datasets

    attempts = [source.kwargs]
    if source.parquet_fallback:
        attempts.append({**source.kwargs, "revision": PARQUET_REVISION})
    # offline, a renamed repo, a script dataset (refused since datasets 4), no conversion
    expected_errors = (ConnectionError, FileNotFoundError, RuntimeError)
    expected_errors += (datasets.exceptions.DatasetsError,)
    failures = []
    for kwargs in attempts:
        revision = f", revision={kwargs['revision']!r}" if "revision" in kwargs else ""
        call = f"datasets.load_dataset({source.name!r}{revision})"
        try:
            loaded = datasets.load_dataset(source.name, num_proc=num_proc, **kwargs)
            break
        except expected_errors as e:
            lines = str(e).strip().splitlines()
            failures.append(f"{call} failed: {lines[0] if lines else type(e).__name__}")
    else:
        raise DataError(
            "; ".join(failures) + "; check the network, name another copy with --hub-name, or "
            "prepare from local files: python -m data.prepare FILES_OR_DIRS --out DIR "
            "(.parquet with a 'text' column, .jsonl with a 'text' field, or .txt)"
        )
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise DataError(f"dataset {source.name!r} has no 'train' split: {list(loaded)}")
        loaded = loaded["train"]
    if "text" not in loaded.column_names:
        raise DataError(f"dataset {source.name!r} has no 'text' column: {loaded.column_names}")
    if len(loaded) == 0:
        raise DataError(f"empty input: dataset {source.name!r} has no documents")
    expected = source.expected_documents
    if expected is not None and len(loaded) < expected:
        call += f" ({len(loaded):,} of {expected:,} documents)"
        print(
            f"warning: {call}: {len(loaded) / expected:.1%} of the corpus (the hub's Parquet "
            "conversion of a large dataset can be partial); for all of it, prepare from a full "
            "copy (--hub-name, or local .parquet/.jsonl files)",
            file=sys.stderr,
        )
    return loaded.select_columns(["text"]), call


def _find_files(paths: Sequence[str | Path]) -> list[Path]:
    if not paths:
        raise DataError("no input files given")
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES and p.is_file())
            if not found:
                raise DataError(f"no input files: no .txt, .jsonl or .parquet files under {path}")
            files.extend(found)
        elif path.is_file():
            if path.suffix not in TEXT_SUFFIXES:
                raise DataError(f"unsupported file {path}: expected .txt, .jsonl or .parquet")
            files.append(path)
        else:
            raise DataError(
                f"unknown source {str(path)!r}: expected '{OPENWEBTEXT}' or existing "
                ".txt/.jsonl/.parquet files or directories"
            )
    return files


def _read(path: Path) -> Iterator[str]:
    """The documents of one file (empty ones are dropped later)."""
    if path.suffix == ".txt":
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
        yield text
    elif path.suffix == ".jsonl":
        with path.open("rb") as lines:  # bytes: a bad line is reported with its number
            for line_number, raw in enumerate(lines, 1):
                where = f"{path}:{line_number}"
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(f"{where}: not UTF-8 ({e.reason} at byte {e.start})") from None
                if line.strip():
                    yield _jsonl_text(line, where)
    else:
        try:
            parquet = pq.ParquetFile(path)
        except pa.ArrowException as e:
            raise DataError(f"{path} is not a readable parquet file: {e}") from None
        if "text" not in parquet.schema_arrow.names:
            raise DataError(f"{path} has no 'text' column: {parquet.schema_arrow.names}")
        for batch in parquet.iter_batches(columns=["text"]):
            yield from (text for text in batch.column(0).to_pylist() if text is not None)


def _jsonl_text(line: str, where: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: not valid JSON ({e.msg})") from None
    text = record.get("text") if isinstance(record, dict) else None
    if not isinstance(text, str):
        raise DataError(f"{where}: no string 'text' field")
    return text


def _texts_to_dataset(texts: Iterable[str], arrow_dir: Path, description: str) -> "Dataset":
    """Stream documents into an Arrow file that `datasets` memory-maps (bounded memory)."""
    from datasets import Dataset

    arrow_dir.mkdir(parents=True, exist_ok=True)
    arrow_file = arrow_dir / "documents.arrow"
    num_docs = 0
    with pa.OSFile(str(arrow_file), "wb") as sink, pa.ipc.new_stream(sink, _TEXT_SCHEMA) as out:
        batch: list[str] = []
        for text in texts:
            if text:
                batch.append(text)
            if len(batch) == _ARROW_BATCH_DOCS:
                out.write_batch(pa.record_batch([pa.array(batch, pa.string())], _TEXT_SCHEMA))
                num_docs += len(batch)
                batch = []
        if batch:
            out.write_batch(pa.record_batch([pa.array(batch, pa.string())], _TEXT_SCHEMA))
            num_docs += len(batch)
    if num_docs == 0:
        raise DataError(f"empty input: no text in {description}")
    return Dataset.from_file(str(arrow_file))


# ----------------------------------------------------------------------------- tokenizing


def _tokenize(batch: dict[str, list[str]]) -> dict[str, list[Any]]:
    # encode_ordinary: a literal "<|endoftext|>" inside a document is plain text (as nanoGPT).
    encoding = gpt2_encoding()
    ids = [encoding.encode_ordinary(text) + [EOT_TOKEN] for text in batch["text"]]
    return {"ids": ids, "len": [len(doc) for doc in ids]}


def _tokenize_and_write(
    dataset: "Dataset", out_dir: Path, val_fraction: float, seed: int, num_proc: int
) -> dict[str, dict[str, Any]]:
    """Split by documents, tokenize, write `<split>.bin`; returns meta.json's `splits`."""
    from datasets import Features, Sequence, Value

    if len(dataset) < 2:
        raise DataError(f"{len(dataset)} document cannot be split into train and val; need 2+")
    try:
        split = dataset.train_test_split(test_size=val_fraction, seed=seed, shuffle=True)
    except ValueError as e:
        raise DataError(f"cannot split {len(dataset)} documents: {e}") from None
    split["val"] = split.pop("test")
    gpt2_encoding()  # build it once here; forked map workers inherit it
    features = Features({"ids": Sequence(Value("uint16")), "len": Value("int64")})
    tokenized = split.map(
        _tokenize,
        batched=True,
        remove_columns=["text"],
        features=features,
        num_proc=num_proc if num_proc > 1 else None,
        desc="tokenizing",
    )
    splits = {}
    for name in SPLITS:
        num_tokens, sha256 = _write_split(tokenized[name], out_dir / f"{name}.bin", name)
        splits[name] = {
            "file": f"{name}.bin",
            "num_tokens": num_tokens,
            "num_documents": len(tokenized[name]),
            "sha256": sha256,
        }
    return splits


def _write_split(tokenized: "Dataset", path: Path, name: str) -> tuple[int, str]:
    """Append the documents' ids shard by shard, hashing as we go (no second read)."""
    digest = hashlib.sha256()
    num_tokens = 0
    num_shards = max(1, min(_MAX_WRITE_SHARDS, len(tokenized) // _MIN_SHARD_DOCS))
    with path.open("wb") as out:
        for index in tqdm(range(num_shards), desc=f"writing {name}.bin", unit="shard"):
            shard = tokenized.shard(num_shards=num_shards, index=index, contiguous=True)
            ids = pc.list_flatten(shard.with_format("arrow")[:].column("ids")).to_numpy()
            data = ids.astype("<u2", copy=False).tobytes()
            out.write(data)
            digest.update(data)
            num_tokens += len(ids)
        _sync(out)
    return num_tokens, digest.hexdigest()


def _sync(file: IO[Any]) -> None:
    """On disk before the rename, so a crash cannot leave a finished-looking directory."""
    file.flush()
    os.fsync(file.fileno())


def file_sha256(path: Path) -> str:
    """The sha256 of a file, read in 16 MiB pieces."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while piece := f.read(1 << 24):
            digest.update(piece)
    return digest.hexdigest()


# ----------------------------------------------------------------------------- command line


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m data.prepare`; returns the exit status (2 for a data error)."""
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
    rate = json.loads((out_dir / META_FILE).read_text())["generator"]["entropy_rate"]
    print(f"entropy rate (loss floor) {rate['nats']:.4f} +- {rate['se']:.4f} nats/token")
    print(f"wrote {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
