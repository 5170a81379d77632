"""The package's shape: no import cycles, no import up the layers, no oversized modules, README's layout section matches the tree."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "platform" / "loraops"
README = PACKAGE.parents[1] / "README.md"
#: Modules that are data tables rather than code.
DATA_TABLES = {"loraops.training.builtin_data"}
MAX_LINES = 450
MAX_FUNCTION_LINES = 80
#: Modules at the package root: only what every layer shares; each stage has its own folder.
MAX_ROOT_MODULES = 12


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imported_modules(path: Path, name: str, known: set[str]) -> set[str]:
    """Package modules that ``name`` imports, at the top or deferred inside a function: a cycle
    hidden in a function still sends a reader in a circle. ``from a import b`` counts ``a.b``
    when that is a module; importing ``a.b.c`` imports ``a`` and ``a.b`` too."""
    found: set[str] = set()
    anchor = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                base = ".".join([*anchor[: len(anchor) - node.level + 1], *([base] if base else [])])
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    closure = {".".join(dep.split(".")[:i]) for dep in found for i in range(1, dep.count(".") + 2)}
    # A module's own parent packages are imported before it by Python itself: not an edge a reader follows.
    return {dep for dep in closure if dep in known and dep != name and not name.startswith(dep + ".")}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as a list of modules, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def walk(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            if dep not in state and (cycle := walk(dep)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := walk(node)):
            return cycle
    return None


def test_cycle_finder_finds_a_cycle_and_accepts_a_tree():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_package_has_no_import_cycle():
    modules = package_modules()
    graph = {name: imported_modules(path, name, set(modules)) for name, path in modules.items()}
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


#: The layers, lowest first: a module imports only modules of its own layer or of lower ones. Each
#: entry is a module or a package (its submodules too); a module's layer is its longest matching entry.
LAYERS: list[tuple[str, ...]] = [
    # The shared root modules; generate.py is plain batched generation (the serving model is serve's).
    ("loraops", "loraops.errors", "loraops.layout", "loraops.config", "loraops.storage", "loraops.metrics", "loraops.console", "loraops.cluster",
     "loraops.generate"),  # fmt: skip
    ("loraops.training",),
    ("loraops.registry", "loraops.tune"),
    ("loraops.serve",),
    ("loraops.bench",),
    ("loraops.commands", "loraops.demo"),
    ("loraops.cli", "loraops.__main__"),
]


def layer_of(name: str) -> int | None:
    """The index in :data:`LAYERS` of module ``name``, or None when no entry names it or a package above it."""
    matches = [(len(entry), index) for index, entries in enumerate(LAYERS) for entry in entries if name == entry or name.startswith(entry + ".")]
    return max(matches)[1] if matches else None


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Every import of ``graph`` that runs from a module to one of a higher layer, as ``a -> b``."""
    return sorted(f"{name} -> {dep}" for name, deps in graph.items() for dep in deps if layer_of(dep) > layer_of(name))


def test_layer_check_finds_an_upward_import():
    assert upward_imports({"loraops.training.model": {"loraops.serve.model"}, "loraops.serve.model": {"loraops.training.model"}}) == [
        "loraops.training.model -> loraops.serve.model"
    ]
    assert layer_of("loraops.serve.engine.core") == layer_of("loraops.serve") > layer_of("loraops.generate")


def test_no_module_imports_one_of_a_higher_layer():
    modules = package_modules()
    unplaced = sorted(name for name in modules if layer_of(name) is None)
    assert unplaced == [], f"modules in no layer of LAYERS (add them): {', '.join(unplaced)}"
    graph = {name: imported_modules(path, name, set(modules)) for name, path in modules.items()}
    assert upward_imports(graph) == [], "imports that run up the layers"


@pytest.mark.parametrize("name", sorted(set(package_modules()) - DATA_TABLES))
def test_no_module_is_over_the_size_limit(name):
    lines = len(package_modules()[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"{name} has {lines} lines (limit {MAX_LINES}): split it by concern"


def long_functions(path: Path) -> list[str]:
    """Functions and methods of ``path`` over the limit, as ``name (lines)``: decorators and docstring included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            lines = node.end_lineno - first + 1
            if lines > MAX_FUNCTION_LINES:
                found.append(f"{node.name} ({lines} lines)")
    return found


def test_long_function_finder_counts_a_long_function(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    (tmp_path / "m.py").write_text(f"def short():\n    pass\n\n\ndef long():\n{body}\n")
    assert long_functions(tmp_path / "m.py") == [f"long ({MAX_FUNCTION_LINES + 1} lines)"]


@pytest.mark.parametrize("name", sorted(set(package_modules()) - DATA_TABLES))
def test_no_function_is_over_the_size_limit(name):
    offenders = long_functions(package_modules()[name])
    assert offenders == [], f"{name}: {', '.join(offenders)} over {MAX_FUNCTION_LINES} lines: split by step"


def test_the_package_root_holds_only_the_shared_modules():
    root = sorted(path.name for path in PACKAGE.glob("*.py"))
    assert len(root) <= MAX_ROOT_MODULES, f"{len(root)} modules at the package root (limit {MAX_ROOT_MODULES}): {', '.join(root)}; give a stage its folder"


def readme_layout_paths() -> set[str]:
    """Package files named in README's "Repository layout" section (``platform/loraops/...py``)."""
    text = README.read_text()
    match = re.search(r"^## Repository layout\n(.*?)(?=^## )", text, re.S | re.M)
    assert match, "README.md has no '## Repository layout' section"
    section = match.group(1)
    listed: set[str] = set()
    folder: list[str] = []
    for line in section.splitlines():
        entry = re.match(r"^(\s*)([\w./-]+?)(/?)(?=\s|$)", line)
        if not entry or not entry.group(2) or line.lstrip().startswith(("#", "`", "|")):
            continue
        depth = len(entry.group(1)) // 2
        folder = folder[:depth]
        if entry.group(3):
            folder.append(entry.group(2))
        elif entry.group(2).endswith(".py"):
            listed.add("/".join([*folder, entry.group(2)]))
    return {path for path in listed if path.startswith("platform/loraops/")}


def test_readme_layout_lists_every_package_module_and_nothing_else():
    actual = {path.relative_to(PACKAGE.parents[1]).as_posix() for path in PACKAGE.rglob("*.py")}
    listed = readme_layout_paths()
    assert sorted(actual - listed) == [], "modules missing from README's Repository layout"
    assert sorted(listed - actual) == [], "README's Repository layout lists modules that do not exist"


def test_no_test_imports_conftest():
    """Shared helpers are fixtures: importing conftest as a module depends on pytest's import mode."""
    tests = Path(__file__).resolve().parent
    offenders = []
    for path in sorted(tests.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module] if isinstance(node, ast.ImportFrom) else [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
            if "conftest" in names:
                offenders.append(f"{path.name}:{node.lineno}")
    assert offenders == []
