"""The built-in corpus: same bytes every time, the expected size, prepared once under a lock."""

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import data.text
from data.builtin import MODULES, builtin_dir, builtin_documents, prepare_builtin


def _files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def test_fixed_sorted_module_list() -> None:
    assert list(MODULES) == sorted(set(MODULES))
    documents = builtin_documents()
    assert documents == builtin_documents()
    assert len(documents) > 1500 and all(documents)


def test_size_and_checksums(builtin_corpus: Path) -> None:
    meta = json.loads((builtin_corpus / "meta.json").read_text())
    splits = meta["splits"]
    total = splits["train"]["num_tokens"] + splits["val"]["num_tokens"]
    assert 350_000 < total < 500_000
    assert 0.07 < splits["val"]["num_tokens"] / total < 0.13  # val_fraction 0.1 of documents
    for split in splits.values():
        data = (builtin_corpus / split["file"]).read_bytes()
        assert len(data) == 2 * split["num_tokens"]
        assert hashlib.sha256(data).hexdigest() == split["sha256"]
    assert meta["source"].startswith("builtin: Python 3.")


def test_second_call_is_instant(builtin_corpus: Path) -> None:
    before = {p.name: p.stat().st_mtime_ns for p in builtin_corpus.iterdir()}
    start = time.perf_counter()
    assert prepare_builtin(builtin_corpus.parent) == builtin_corpus
    assert time.perf_counter() - start < 0.1
    assert {p.name: p.stat().st_mtime_ns for p in builtin_corpus.iterdir()} == before


def test_concurrent_callers_prepare_once_and_bytes_are_reproducible(
    builtin_corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    real_prepare = data.text.prepare

    def counting_prepare(*args, **kwargs) -> Path:
        calls.append(args[1])
        time.sleep(0.2)  # widen the window in which the other caller could race
        return real_prepare(*args, **kwargs)

    monkeypatch.setattr(data.text, "prepare", counting_prepare)
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(prepare_builtin(tmp_path))) for _ in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [builtin_dir(tmp_path)] * 3
    assert calls == [builtin_dir(tmp_path)]
    # A second, independent preparation gives byte-identical files (meta.json included).
    assert _files(builtin_dir(tmp_path)) == _files(builtin_corpus)


def test_same_text_after_torch_patched_the_standard_library() -> None:
    script = (
        "import hashlib, inspect, torch; from data.builtin import builtin_documents; "
        "assert inspect.getfile.__module__ != 'inspect'; "
        "print(hashlib.sha256('\\0'.join(builtin_documents()).encode()).hexdigest())"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, env=env
    )
    expected = hashlib.sha256("\0".join(builtin_documents()).encode()).hexdigest()
    assert result.stdout.strip() == expected
