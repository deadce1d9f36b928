"""`data.prepare`: counts, checksums and split against a direct tokenization; atomicity."""

import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import data.text as prep
from data.dataset import DataError
from data.prepare import main
from data.text import HubSource, prepare
from data.tokenizer import EOT_TOKEN, gpt2_encoding

DOCS = [
    f"Document {i}: {'naïve café 👋 ' * (i % 5)}the number {i * 7919} is odd." for i in range(40)
]


def _ids(text: str) -> list[int]:
    return gpt2_encoding().encode_ordinary(text) + [EOT_TOKEN]


def _documents(path: Path) -> list[tuple[int, ...]]:
    """A token file cut after every EOT: the tokenized documents in file order."""
    ids = np.fromfile(path, dtype="<u2").tolist()
    ends = [i + 1 for i, token in enumerate(ids) if token == EOT_TOKEN]
    return [tuple(ids[start:end]) for start, end in zip([0, *ends[:-1]], ends, strict=True)]


def _meta(out: Path) -> dict:
    return json.loads((out / "meta.json").read_text())


def _write_mixed_dir(root: Path) -> Path:
    """DOCS spread over .txt (one document each), .jsonl and .parquet files, plus noise."""
    root.mkdir()
    for i, doc in enumerate(DOCS[:10]):
        (root / f"doc{i:02d}.txt").write_text(doc, encoding="utf-8")
    (root / "empty.txt").write_text("")  # dropped: not a document
    (root / "notes.md").write_text("ignored: not a supported suffix")
    sub = root / "sub"
    sub.mkdir()
    lines = [json.dumps({"text": doc}) for doc in DOCS[10:25]]
    (sub / "part.jsonl").write_text("\n".join(lines[:7]) + "\n\n" + "\n".join(lines[7:]) + "\n")
    pq.write_table(pa.table({"text": DOCS[25:], "id": list(range(25, 40))}), sub / "part.parquet")
    return root


def _assert_matches_direct_tokenization(out: Path, docs: list[str], val_fraction: float) -> None:
    meta = _meta(out)
    expected = sorted(tuple(_ids(doc)) for doc in docs)
    written = {name: _documents(out / f"{name}.bin") for name in ("train", "val")}
    assert sorted(written["train"] + written["val"]) == expected
    assert meta["splits"]["val"]["num_documents"] == math.ceil(val_fraction * len(docs))
    for name, split in meta["splits"].items():
        assert split["num_documents"] == len(written[name])
        assert split["num_tokens"] == sum(map(len, written[name]))
        assert split["sha256"] == hashlib.sha256((out / split["file"]).read_bytes()).hexdigest()
    assert (meta["tokenizer"], meta["vocab_size"], meta["eot_token"]) == ("gpt2", 50257, 50256)
    assert (meta["format_version"], meta["val_fraction"]) == (1, val_fraction)


def test_mixed_directory_matches_direct_tokenization(tmp_path: Path) -> None:
    out = prepare(_write_mixed_dir(tmp_path / "in"), tmp_path / "out", val_fraction=0.2, seed=7)
    _assert_matches_direct_tokenization(out, DOCS, 0.2)
    assert _meta(out)["split_seed"] == 7
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out"]  # no work dir left


def test_split_is_seeded(tmp_path: Path) -> None:
    src = _write_mixed_dir(tmp_path / "in")
    a = prepare(src, tmp_path / "a", val_fraction=0.2, seed=1)
    b = prepare([src], tmp_path / "b", val_fraction=0.2, seed=1)
    c = prepare(src, tmp_path / "c", val_fraction=0.2, seed=2)
    assert (a / "val.bin").read_bytes() == (b / "val.bin").read_bytes()
    assert (a / "val.bin").read_bytes() != (c / "val.bin").read_bytes()


def test_datasets_path_offline_equals_local_path(tmp_path: Path) -> None:
    """The openwebtext code path (load_dataset, num_proc map) on a local json dataset."""
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"text": doc}) + "\n" for doc in DOCS))
    hub = HubSource("json", {"data_files": str(jsonl), "cache_dir": str(tmp_path / "hf")})
    out = prepare(hub, tmp_path / "hub", val_fraction=0.1, seed=2357, num_proc=2)
    _assert_matches_direct_tokenization(out, DOCS, 0.1)
    assert _meta(out)["source"] == "datasets.load_dataset('json')"
    # Same rows, same seed: the local-file path writes the very same bytes.
    local = prepare(jsonl, tmp_path / "local", val_fraction=0.1, seed=2357)
    for name in ("train.bin", "val.bin"):
        assert (out / name).read_bytes() == (local / name).read_bytes()


def test_refuses_to_overwrite_without_force(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = _write_mixed_dir(tmp_path / "in")
    out = prepare(src, tmp_path / "out", val_fraction=0.2)
    with pytest.raises(DataError, match="--force"):
        prepare(src, out, val_fraction=0.2)
    capsys.readouterr()  # drop the progress bars of the first run
    assert main([str(src), "--out", str(out), "--val-fraction", "0.2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--force" in err and err.count("\n") == 1
    assert main([str(src), "--out", str(out), "--val-fraction", "0.3", "--force"]) == 0
    assert _meta(out)["val_fraction"] == 0.3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out"]


def test_refuses_a_non_empty_directory_that_is_not_a_dataset(tmp_path: Path) -> None:
    """--force replaces a prepared dataset only: never another directory, or a file."""
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "precious.txt").write_text("keep me")
    (tmp_path / "file").write_text("keep me too")
    src = _write_mixed_dir(tmp_path / "in")
    for force in (False, True):
        with pytest.raises(DataError, match="not a prepared dataset .no meta.json.; --force"):
            prepare(src, tmp_path / "out", force=force)
        with pytest.raises(DataError, match="not a prepared dataset"):
            prepare(src, tmp_path / "file", force=force)
    assert (tmp_path / "out" / "precious.txt").read_text() == "keep me"
    assert (tmp_path / "file").read_text() == "keep me too"


def test_force_never_deletes_an_input(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """`prepare d --out d --force` (or --out a parent of an input) refuses and keeps the input,
    even where the directory also holds an earlier prepared dataset."""
    src = _write_mixed_dir(tmp_path / "d")
    before = {p: p.read_bytes() for p in src.rglob("*") if p.is_file()}
    for out, sources in ((src, [src]), (tmp_path, [src / "doc00.txt"]), (src, [src / "sub"])):
        assert main([*map(str, sources), "--out", str(out), "--force"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: --out {out} holds the input ") and err.count("\n") == 1
    (src / "meta.json").write_text("{}")  # looks prepared: still an input directory
    assert main([str(src / "doc00.txt"), "--out", str(src), "--force"]) == 2
    (src / "meta.json").unlink()
    assert {p: p.read_bytes() for p in src.rglob("*") if p.is_file()} == before


def test_bad_file_midway_leaves_nothing_finished(tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    (src / "a.txt").write_text(DOCS[0])
    (src / "b.jsonl").write_text(json.dumps({"text": DOCS[1]}) + "\n{not json\n")
    (src / "c.txt").write_text(DOCS[2])
    with pytest.raises(DataError, match=r"b\.jsonl:2: not valid JSON"):
        prepare(src, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


@pytest.mark.parametrize("interruption", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_interrupted_write_keeps_the_old_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, interruption: BaseException
) -> None:
    src = _write_mixed_dir(tmp_path / "in")
    out = prepare(src, tmp_path / "out", val_fraction=0.2, seed=1)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    write_split = prep._write_split

    def fail_on_val(tokenized, path: Path, name: str) -> tuple[int, str]:
        if name == "val":  # train.bin is already written by now
            raise interruption
        return write_split(tokenized, path, name)

    monkeypatch.setattr(prep, "_write_split", fail_on_val)
    with pytest.raises(type(interruption)):
        prepare(src, out, val_fraction=0.2, seed=2, force=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out"]
    with pytest.raises(type(interruption)):
        prepare(src, tmp_path / "new", val_fraction=0.2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out"]


def test_one_line_errors(tmp_path: Path) -> None:
    (tmp_path / "nothing").mkdir()
    with pytest.raises(DataError, match="no input files: no .txt, .jsonl or .parquet files"):
        prepare(tmp_path / "nothing", tmp_path / "out")
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "a.txt").write_text("")
    (tmp_path / "blank" / "b.jsonl").write_text('{"text": ""}\n')
    with pytest.raises(DataError, match="empty input"):
        prepare(tmp_path / "blank", tmp_path / "out")
    with pytest.raises(DataError, match="unknown source 'wikipedia'"):
        prepare("wikipedia", tmp_path / "out")
    (tmp_path / "x.csv").write_text("text\nhello\n")
    with pytest.raises(DataError, match="unsupported file"):
        prepare(tmp_path / "x.csv", tmp_path / "out")
    (tmp_path / "one.txt").write_text("a single document")
    with pytest.raises(DataError, match="need 2"):
        prepare(tmp_path / "one.txt", tmp_path / "out")
    (tmp_path / "notext.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(DataError, match=r"notext\.jsonl:1: no string 'text' field"):
        prepare(tmp_path / "notext.jsonl", tmp_path / "out")
    missing_file, cache_dir = str(tmp_path / "missing.jsonl"), str(tmp_path / "hf")
    missing = HubSource("json", {"data_files": missing_file, "cache_dir": cache_dir})
    with pytest.raises(DataError, match=r"load_dataset\('json'\) failed: .*--hub-name"):
        prepare(missing, tmp_path / "out")
    with pytest.raises(DataError, match="val_fraction"):
        prepare(tmp_path / "one.txt", tmp_path / "out", val_fraction=1.5)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "blank", "notext.jsonl", "nothing", "one.txt", "x.csv"
    ]  # fmt: skip


def test_command_line_error_exits_2(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "data.prepare", "no-such-source", "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr == (
        "error: unknown source 'no-such-source': expected 'openwebtext' or existing "
        ".txt/.jsonl/.parquet files or directories\n"
    )


class StandInHub:
    """`datasets.load_dataset` for the hub's `openwebtext`, offline: each call takes the next
    outcome, an exception of the type real `datasets` raises or the dataset to return."""

    def __init__(self, *outcomes: object) -> None:
        self.outcomes = list(outcomes)
        self.calls: list[tuple[str, dict]] = []

    def __call__(self, name: str, num_proc: int = 1, **kwargs: object):
        self.calls.append((name, kwargs))
        outcome = self.outcomes.pop(0)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome


SCRIPT_REFUSED = RuntimeError("Dataset scripts are no longer supported, but found openwebtext.py")


def test_openwebtext_falls_back_to_the_parquet_conversion_and_warns_when_short(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    import datasets

    converted = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": DOCS})})
    hub = StandInHub(SCRIPT_REFUSED, converted)
    monkeypatch.setattr(datasets, "load_dataset", hub)
    assert main(["openwebtext", "--out", str(tmp_path / "owt"), "--num-proc", "1"]) == 0
    assert hub.calls == [("openwebtext", {}), ("openwebtext", {"revision": "refs/convert/parquet"})]
    call = "datasets.load_dataset('openwebtext', revision='refs/convert/parquet')"
    assert _meta(tmp_path / "owt")["source"] == f"{call} (40 of 8,013,769 documents)"
    warning = capsys.readouterr().err.splitlines()
    assert [line for line in warning if line.startswith("warning: ")] == [
        f"warning: {call} (40 of 8,013,769 documents): 0.0% of the corpus (the hub's Parquet "
        "conversion of a large dataset can be partial); for all of it, prepare from a full copy "
        "(--hub-name, or local .parquet/.jsonl files)"
    ]
    _assert_matches_direct_tokenization(tmp_path / "owt", DOCS, 0.0005)


def test_openwebtext_without_hub_or_conversion_is_one_line_naming_the_ways_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    import datasets
    from datasets.exceptions import DatasetNotFoundError
    from huggingface_hub.errors import OfflineModeIsEnabled

    no_revision = DatasetNotFoundError(
        "Revision 'refs/convert/parquet' doesn't exist for dataset 'my/owt' on the Hub."
    )
    for outcomes, name in [
        ((SCRIPT_REFUSED, no_revision), "openwebtext"),
        ((OfflineModeIsEnabled("Cannot reach the Hub: offline mode is enabled."),) * 2, "my/owt"),
    ]:
        hub = StandInHub(*outcomes)
        monkeypatch.setattr(datasets, "load_dataset", hub)
        argv = ["openwebtext", "--out", str(tmp_path / "owt"), "--hub-name", name]
        assert main(argv) == 2
        assert [kwargs for _, kwargs in hub.calls] == [{}, {"revision": "refs/convert/parquet"}]
        assert {called for called, _ in hub.calls} == {name}
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(
            f"error: datasets.load_dataset({name!r}) failed: {outcomes[0]}; "
            f"datasets.load_dataset({name!r}, revision='refs/convert/parquet') failed: "
            f"{outcomes[1]}; check the network, name another copy with --hub-name, or prepare "
            "from local files: python -m data.prepare FILES_OR_DIRS --out DIR"
        )
    assert not (tmp_path / "owt").exists()


def test_a_full_hub_dataset_is_not_warned_about(tmp_path: Path, capsys) -> None:
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"text": doc}) + "\n" for doc in DOCS))
    kwargs = {"data_files": str(jsonl), "cache_dir": str(tmp_path / "hf")}
    prepare(HubSource("json", kwargs, expected_documents=40), tmp_path / "full", val_fraction=0.1)
    assert "warning" not in capsys.readouterr().err
    assert _meta(tmp_path / "full")["source"] == "datasets.load_dataset('json')"
    prepare(HubSource("json", kwargs, expected_documents=41), tmp_path / "short", val_fraction=0.1)
    assert "warning: datasets.load_dataset('json') (40 of 41 documents)" in capsys.readouterr().err


def test_a_non_utf8_jsonl_line_is_a_one_line_error(tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    (src / "a.jsonl").write_bytes(json.dumps({"text": DOCS[0]}).encode() + b'\n{"text": "\xff"}\n')
    with pytest.raises(DataError, match=r"a\.jsonl:2: not UTF-8 \(invalid start byte at byte 10\)"):
        prepare(src, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


def test_ctrl_c_outside_the_pool_leaves_no_exception_ignored_traceback(monkeypatch, capsys):
    """The race behind test_ctrl_c_during_tokenizing's rare traceback, made certain: Ctrl-C
    strikes while the pool's result generator is suspended, and closing it later times out."""
    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)

    def interrupted_outside_the_pool(argv):
        def results():  # as datasets' iflatmap_unordered: its cleanup waits on the workers
            try:
                yield 1
                yield 2
            finally:
                raise TimeoutError

        pending = results()
        next(pending)
        os.kill(os.getpid(), signal.SIGINT)  # the handler raises KeyboardInterrupt here
        return next(pending)

    monkeypatch.setattr("data.prepare._main", interrupted_outside_the_pool)
    assert main([]) == 130
    assert unraisable == [] and sys.unraisablehook == unraisable.append
    assert capsys.readouterr().err == (
        "error: interrupted; nothing was written: run the same command again\n"
    )


@pytest.mark.slow
def test_ctrl_c_during_tokenizing_is_one_line_and_exit_130(tmp_path: Path) -> None:
    """issue 22: Ctrl-C with two tokenizer processes used to end in ~50 lines ending in the pool's
    TimeoutError and exit 1. The terminal's SIGINT reaches the whole process group, workers too;
    now one line, exit 130, and no output or temporary directory left."""
    rng = np.random.default_rng(0)
    words = np.array(["".join(rng.choice(list("abcdefghij"), 6)) for _ in range(2000)])
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(200):
        (docs / f"d{i:03d}.txt").write_text(" ".join(rng.choice(words, 6000)))
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "data.prepare", str(docs), "--out", str(out), "--num-proc", "2"],
        cwd=Path(__file__).resolve().parents[2],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a terminal's foreground job
    )
    deadline = time.time() + 120
    while not list(tmp_path.glob(".out.tmp-*/arrow/*_of_00002*")) and proc.poll() is None:
        assert time.time() < deadline, "data.prepare's two tokenizers never started"
        time.sleep(0.05)  # the two workers' shards appear once tokenizing has begun
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        "error: interrupted; nothing was written: run the same command again"
    )
    assert not out.exists() and not list(tmp_path.glob(".out.*"))
