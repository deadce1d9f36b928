"""The built-in corpus: English text every CPython install carries, so no run needs a download.

It is Python's own documentation topics (`pydoc_data.topics`, the text behind `help("if")`)
plus the docstrings of a fixed list of standard-library modules, about 0.4M GPT-2 tokens.
The modules are pure Python or always-built C modules whose public names do not depend on the
platform or on optional libraries (no os, ssl, sqlite3, lzma, ...), and everything is sorted,
so the bytes depend only on the Python version, which names the cache directory.
"""

import fcntl
import importlib
import inspect
import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from pydoc_data.topics import topics
from types import ModuleType

# Sorted; each imports without side effects on CPython 3.11+.
MODULES = (
    "abc", "argparse", "array", "ast", "asyncio.base_events", "asyncio.events", "asyncio.locks",
    "asyncio.protocols", "asyncio.queues", "asyncio.runners", "asyncio.taskgroups", "asyncio.tasks",
    "asyncio.timeouts", "asyncio.transports", "base64", "bdb", "binascii", "bisect", "builtins",
    "cProfile", "calendar", "cmath", "cmd", "code", "codecs", "codeop", "collections",
    "collections.abc", "colorsys", "compileall", "concurrent.futures.thread", "configparser",
    "contextlib", "copy", "copyreg", "csv", "dataclasses", "datetime", "difflib", "dis", "doctest",
    "email.charset", "email.feedparser", "email.generator", "email.header", "email.headerregistry",
    "email.message", "email.parser", "email.policy", "email.utils", "enum", "filecmp", "fileinput",
    "fnmatch", "fractions", "functools", "getopt", "gettext", "glob", "graphlib", "heapq", "hmac",
    "html", "html.parser", "http.cookiejar", "http.cookies", "http.server", "importlib.abc",
    "importlib.metadata", "importlib.resources.abc", "importlib.util", "inspect", "io", "ipaddress",
    "itertools", "json", "json.decoder", "json.encoder", "keyword", "linecache", "logging",
    "logging.config", "logging.handlers", "mailbox", "math", "mimetypes", "modulefinder", "numbers",
    "operator", "optparse", "pathlib", "pdb", "pickle", "pickletools", "pkgutil", "plistlib",
    "pprint", "profile", "pstats", "py_compile", "pyclbr", "pydoc", "queue", "quopri", "random",
    "re", "reprlib", "runpy", "sched", "secrets", "shelve", "shlex", "statistics", "string",
    "struct", "symtable", "tabnanny", "tarfile", "textwrap", "threading", "timeit", "tokenize",
    "tomllib", "trace", "traceback", "types", "typing", "unicodedata", "unittest.case",
    "unittest.loader", "unittest.mock", "unittest.result", "unittest.suite", "urllib.error",
    "urllib.parse", "urllib.robotparser", "warnings", "wave", "weakref", "wsgiref.handlers",
    "xml.dom.expatbuilder", "xml.dom.minidom", "xml.etree.ElementTree", "xml.sax.handler",
    "xml.sax.saxutils", "xml.sax.xmlreader", "xmlrpc.client", "xmlrpc.server", "zipapp", "zipfile",
    "zipimport",
)  # fmt: skip
VAL_FRACTION = 0.1  # 5% would leave too few validation windows for a few evaluation batches
SPLIT_SEED = 2357


def builtin_dir(data_dir: str | Path) -> Path:
    """Where the corpus of this Python version is (or will be) prepared."""
    return Path(data_dir) / f"builtin-py{sys.version_info.major}{sys.version_info.minor}"


def builtin_documents() -> list[str]:
    """The corpus as documents: one per pydoc topic, module, and public class or function.

    They are collected by running this file in a bare interpreter (`-I -S`: the standard
    library only), because libraries imported here can patch the standard library (torch
    replaces `inspect.getfile`), which would change the text.
    """
    collect = [sys.executable, "-I", "-S", __file__]
    result = subprocess.run(collect, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        last_line = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"collecting the built-in corpus failed: {last_line}")
    return json.loads(result.stdout)


def _collect_documents() -> list[str]:
    documents = [f"{name}\n\n{text.strip()}" for name, text in sorted(topics.items())]
    with warnings.catch_warnings():  # e.g. typing.io's deprecation when its members are listed
        warnings.simplefilter("ignore")
        for module_name in MODULES:
            documents.extend(_module_documents(importlib.import_module(module_name)))
    return documents


def _module_documents(module: ModuleType) -> list[str]:
    documents = [_section(f"module {module.__name__}", module.__doc__)]
    for name, member in sorted(vars(module).items()):
        # Only names defined here: re-exports would repeat another module's text.
        if name.startswith("_") or getattr(member, "__module__", None) != module.__name__:
            continue
        qualname = f"{module.__name__}.{name}"
        if inspect.isclass(member):
            sections = [_section(f"class {qualname}", member.__doc__)]
            for attr_name, attr in sorted(vars(member).items()):
                if not attr_name.startswith("_") and _is_method(attr):
                    sections.append(_section(f"{qualname}.{attr_name}", attr.__doc__))
            documents.append("\n\n".join(section for section in sections if section))
        elif inspect.isroutine(member):
            documents.append(_section(qualname, member.__doc__))
    return [document for document in documents if document]


def _is_method(attr: object) -> bool:
    return inspect.isroutine(attr) or isinstance(attr, property | classmethod | staticmethod)


def _section(title: str, doc: str | None) -> str:
    """`title`, a blank line and the dedented docstring; empty when there is no docstring."""
    body = inspect.cleandoc(doc or "")
    return f"{title}\n\n{body}" if body else ""


def prepare_builtin(data_dir: str | Path) -> Path:
    """Prepare the corpus on first use and return its directory; later calls return at once."""

    def build(out_dir: Path) -> None:
        # Imported here, not at the top: this file must also run with the standard library
        # alone (see above), and training on an already prepared corpus must not import
        # data.text's pyarrow and datasets.
        from data.text import TextSource, prepare

        version = sys.version.split()[0]
        description = (
            f"builtin: Python {version} pydoc topics and docstrings of "
            f"{len(MODULES)} standard-library modules"
        )
        prepare(
            TextSource(description, builtin_documents()),
            out_dir,
            val_fraction=VAL_FRACTION,
            seed=SPLIT_SEED,
        )

    return _prepare_once(builtin_dir(data_dir), build)


def prepare_builtin_compact(data_dir: str | Path) -> Path:
    """The built-in corpus with its GPT-2 ids renumbered densely, in id order.

    About 10k distinct ids occur (9,885 on CPython 3.11.7), so a model needs a 10,240-row
    embedding instead of 50,304: at width 128 the output layer stops being ~90% of the FLOPs,
    and CPU runs are about 3x faster. `gpt2_ids.npy` maps a compact id back to GPT-2's.
    """
    import numpy as np

    from data.dataset import META_FILE, file_sha256

    full = prepare_builtin(data_dir)

    def build(out_dir: Path) -> None:
        meta = json.loads((full / META_FILE).read_text())
        splits = {
            name: np.fromfile(full / e["file"], dtype="<u2") for name, e in meta["splits"].items()
        }
        ids = np.unique(np.concatenate(list(splits.values())))
        table = np.zeros(2**16, dtype="<u2")
        table[ids] = np.arange(len(ids), dtype="<u2")
        work = out_dir.with_name(f".{out_dir.name}.tmp")
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        np.save(work / "gpt2_ids.npy", ids.astype("<u2"))
        for name, entry in meta["splits"].items():
            table[splits[name]].tofile(work / entry["file"])
            entry["sha256"] = file_sha256(work / entry["file"])
        meta.update(
            tokenizer="gpt2-compact",
            vocab_size=int(len(ids)),
            eot_token=int(table[meta["eot_token"]]),
            source=meta["source"] + "; ids renumbered densely (gpt2_ids.npy maps them back)",
        )
        (work / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        work.rename(out_dir)

    return _prepare_once(full.with_name(full.name.replace("builtin", "builtin-compact")), build)


def _prepare_once(out_dir: Path, build) -> Path:
    """Run `build(out_dir)` once per machine; safe when several ranks call it together.

    The first caller takes an exclusive lock and builds, the others wait on the lock and then
    find the finished directory (a `meta.json` in it means finished).
    """
    from data.dataset import META_FILE

    if (out_dir / META_FILE).exists():
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(out_dir.with_name(out_dir.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not (out_dir / META_FILE).exists():
            build(out_dir)
    return out_dir


if __name__ == "__main__":  # how builtin_documents runs this file; ASCII JSON on stdout
    json.dump(_collect_documents(), sys.stdout)
