"""The import layers of the harness: no cycle, and no module imports a layer above its own.

Every import counts, the ones inside functions too (they once hid a cycle between `train.py`
and the diagnosis). A module's layer is that of the longest prefix named below; the README's
layout section draws the same picture.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Low to high: a module may import its own layer or any below it.
LAYERS: list[list[str]] = [
    ["common", "configs.base"],
    [
        "model.config",
        "data.config",
        "optim.config",
        "monitor.config",
        "checkpoint.config",
    ],
    ["configs"],
    ["model", "data", "study", "launch.distributed", "launch.env"],
    ["optim"],
    ["monitor", "checkpoint"],
    ["trainer"],
    ["postmortem", "bench", "experiments", "launch", "heal"],
    ["train"],
]
PACKAGES = {name.split(".")[0] for layer in LAYERS for name in layer}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def harness_modules() -> dict[str, Path]:
    files = [ROOT / "train.py"]
    for package in sorted(PACKAGES - {"train"}):
        files += sorted((ROOT / package).rglob("*.py"))
    return {module_name(path): path for path in files}


def imports_of(path: Path, modules: dict[str, Path]) -> set[str]:
    """The harness modules `path` imports anywhere in its body (`from P import m` names the
    module P.m when it is one); `if TYPE_CHECKING:` blocks never run, so they do not count."""
    found = set()
    for node in _runtime_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
            names += [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {name for name in names if name in modules}
    return found


def _runtime_nodes(tree: ast.AST):
    """Every node of `tree` but those under `if TYPE_CHECKING:`."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and ast.unparse(node.test).endswith("TYPE_CHECKING"):
            yield from (n for child in node.orelse for n in [child, *_runtime_nodes(child)])
            continue
        yield node
        yield from _runtime_nodes(node)


def layer_of(module: str) -> int:
    best, layer = "", None
    for index, names in enumerate(LAYERS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and len(name) > len(best):
                best, layer = name, index
    assert layer is not None, f"{module} is in no layer: add it to LAYERS"
    return layer


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = harness_modules()
    return {name: imports_of(path, modules) - {name} for name, path in modules.items()}


def test_every_module_has_a_layer(graph) -> None:
    for module in graph:
        layer_of(module)


def test_no_module_imports_a_higher_layer(graph) -> None:
    upward = sorted(
        f"{module} (layer {layer_of(module)}) imports {target} (layer {layer_of(target)})"
        for module, targets in graph.items()
        for target in targets
        if layer_of(target) > layer_of(module)
    )
    assert upward == []


def test_no_import_cycle(graph) -> None:
    state: dict[str, str] = {}
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                cycles.append(" -> ".join([*path[path.index(target) :], target]))
            elif target not in state:
                visit(target, [*path, target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_the_checker_sees_function_local_imports(tmp_path) -> None:
    """The rule the cycle hid behind: an import inside a function is an import."""
    source = tmp_path / "m.py"
    source.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    import model\n"
        "def f():\n    from postmortem import replay\n    import trainer\n"
    )
    modules = {"postmortem.replay": source, "trainer": source, "model": source}
    assert imports_of(source, modules) == {"postmortem.replay", "trainer"}
