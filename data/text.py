"""Tokenize text into a prepared dataset: `prepare(source, out_dir)` (the library of
`python -m data.prepare`, whose module doc describes the sources and the output).

Every source becomes a `datasets` table with a `text` column and then takes the same path: a
seeded split by documents (`train_test_split`), `map` tokenization on `num_proc` processes, each
document followed by EOT, written shard by shard into a hidden sibling directory that is
renamed into place at the end (`data.dataset`). pyarrow and `datasets` are imported here and
only here: training from prepared files needs neither.
"""

import hashlib
import json
import shutil
import sys
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

from data.dataset import (
    FORMAT_VERSION,
    OPENWEBTEXT,
    SPLITS,
    DataError,
    check_writable,
    finish,
    sync,
)
from data.tokenizer import EOT_TOKEN, VOCAB_SIZE, gpt2_encoding

if TYPE_CHECKING:  # datasets takes about a second to import; only preparation needs it
    from datasets import Dataset

TEXT_SUFFIXES = (".txt", ".jsonl", ".parquet")
OPENWEBTEXT_DOCUMENTS = 8_013_769  # the original release, as the hub's script dataset built it
# The hub's dataset viewer keeps a Parquet conversion of a dataset on this branch; for a script
# dataset (which `datasets` 4 and later refuse to run) it is the one copy the hub itself serves.
PARQUET_REVISION = "refs/convert/parquet"
_MAX_WRITE_SHARDS = 1024  # as nanoGPT: one write holds at most ~1/1024 of a split
_MIN_SHARD_DOCS = 1000  # small splits: fewer shards, as each costs a few milliseconds
_ARROW_BATCH_DOCS = 1000
_TEXT_SCHEMA = pa.schema([("text", pa.string())])


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
    check_writable(out_dir, force, inputs)
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


def _local_inputs(source: Source) -> list[Path]:
    """The files and directories a local source reads (none for a hub or in-memory source)."""
    if isinstance(source, HubSource | TextSource) or source == OPENWEBTEXT:
        return []
    return [Path(p) for p in ([source] if isinstance(source, str | Path) else source)]


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
        sync(out)
    return num_tokens, digest.hexdigest()
