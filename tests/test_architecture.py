"""The layering of docs/ARCHITECTURE.md, checked on the source: one direction of imports.

Every import statement of the package is read (module level and inside functions), so a
cycle hidden in a function-level import fails here as surely as one at the top.
"""
from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
# The installed layout (pyproject package-dir): folder -> package name.
FOLDERS = {"foresight_compile": "foresight_compile", "passes": "foresight_compile.passes",
           "runtime": "foresight_compile.runtime"}
# What runtime/ may import from above it: errors and plain data types only.
RUNTIME_MAY_IMPORT = {"foresight_compile.errors", "foresight_compile.options",
                      "foresight_compile.version"}
MAX_LINES = 420


def _modules() -> dict[str, pathlib.Path]:
    found = {}
    for folder, package in FOLDERS.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


MODULES = _modules()


def _imports(name: str, path: pathlib.Path) -> list[tuple[str, list[str], int]]:
    """(imported module, names taken from it, line) for every import in the file; in a file
    that calls ``importlib.import_module``, every string naming a module of the package
    counts as an import of it (``runtime/__init__.py`` imports its engines by name)."""
    is_package = path.name == "__init__.py"
    tree = ast.parse(path.read_text())
    by_name = any(isinstance(n, ast.Attribute) and n.attr == "import_module"
                  for n in ast.walk(tree))
    out = []
    for node in ast.walk(tree):
        if by_name and isinstance(node, ast.Constant) and node.value in MODULES:
            out.append((node.value, [], node.lineno))
        elif isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".")
                anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
                base = ".".join(anchor + ([base] if base else []))
            names = [a.name for a in node.names]
            # ``from package import module`` imports the module.
            subs = [f"{base}.{n}" for n in names if f"{base}.{n}" in MODULES]
            out += [(m, [], node.lineno) for m in subs]
            rest = [n for n in names if f"{base}.{n}" not in MODULES]
            if rest or not subs:
                out.append((base, rest, node.lineno))
    return [(m, names, line) for m, names, line in out if m.split(".")[0] == "foresight_compile"]


def _resolve(module: str) -> str:
    """The deepest known module of a dotted name (``a.b.Name`` -> ``a.b``)."""
    while module and module not in MODULES:
        module = module.rpartition(".")[0]
    return module


GRAPH = {name: {_resolve(m) for m, _, _ in _imports(name, path)} - {name}
         for name, path in MODULES.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_at_module_level_or_inside_functions():
    # Package faces included: no module imports the package that imports it (the policy
    # registry is a module of its own, not the policies package's ``__init__``).
    assert _cycles(GRAPH) == []


def test_the_cycle_check_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_runtime_imports_nothing_above_it_but_errors_and_plain_data():
    bad = []
    for name, path in MODULES.items():
        if not name.startswith("foresight_compile.runtime"):
            continue
        for module, _, line in _imports(name, path):
            target = _resolve(module)
            if not target.startswith("foresight_compile.runtime") and target not in RUNTIME_MAY_IMPORT:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    assert bad == []


def test_passes_import_only_passes_and_errors():
    bad = [f"{path.relative_to(ROOT)}:{line} imports {module}"
           for name, path in MODULES.items() if name.startswith("foresight_compile.passes")
           for module, _, line in _imports(name, path)
           if not _resolve(module).startswith("foresight_compile.passes")
           and _resolve(module) != "foresight_compile.errors"]
    assert bad == []


def test_no_private_name_is_imported_across_modules():
    bad = [f"{path.relative_to(ROOT)}:{line} imports {n} from {module}"
           for name, path in MODULES.items() for module, names, line in _imports(name, path)
           for n in names if n.startswith("_") and not n.startswith("__")]
    assert bad == []


@pytest.mark.parametrize("name", sorted(MODULES))
def test_modules_stay_small(name):
    lines = len(MODULES[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"{MODULES[name].relative_to(ROOT)} has {lines} lines"


def _map() -> dict[str, str]:
    """docs/ARCHITECTURE.md's map: file -> its "may import" cell."""
    text = (ROOT / "docs/ARCHITECTURE.md").read_text()
    return {line.split("`")[1]: line.rstrip().rstrip("|").rpartition("|")[2].strip()
            for line in text.splitlines() if line.startswith("| `") and line.count("`") >= 2}


def test_architecture_map_lists_every_module_and_nothing_else():
    files = {str(path.relative_to(ROOT)) for path in MODULES.values()}
    assert set(_map()) == files


def _allowed(cell: str) -> list[str]:
    """The modules a "may import" cell names (see docs/ARCHITECTURE.md: dotted, under
    ``foresight_compile.``; "nothing" names none)."""
    if cell == "nothing":
        return []
    items = [i.strip() for i in cell.split(",")]
    return [i if i == "foresight_compile" else f"foresight_compile.{i}" for i in items]


def _covers(item: str, module: str) -> bool:
    """A package's name covers its modules; the root package names its face alone."""
    return module == item or (item != "foresight_compile" and module.startswith(item + "."))


def _may_import_violations(graph: dict[str, set[str]], cells: dict[str, str]) -> list[str]:
    by_file = {str(path.relative_to(ROOT)): name for name, path in MODULES.items()}
    bad = []
    for file, cell in sorted(cells.items()):
        name = by_file[file]
        allowed = _allowed(cell)
        bad += [f"{file}: {item} is not a module or package" for item in allowed
                if item not in MODULES]
        deps = graph[name]
        bad += [f"{file} imports {d}, not on its line ({cell})" for d in sorted(deps)
                if not any(_covers(item, d) for item in allowed)]
        bad += [f"{file}: its line names {item}, which it does not import" for item in allowed
                if not any(_covers(item, d) for d in deps)]
    return bad


def test_every_module_imports_exactly_what_its_may_import_line_says():
    assert _may_import_violations(GRAPH, _map()) == []


def test_the_may_import_check_finds_an_import_off_the_line_and_a_name_not_imported():
    cells = _map()
    graph = {name: set(deps) for name, deps in GRAPH.items()}
    graph["foresight_compile.runtime.policies.basic"].add("foresight_compile.runtime.policies")
    cells["runtime/policies/foresight.py"] += ", errors"
    found = _may_import_violations(graph, cells)
    assert found == [
        "runtime/policies/basic.py imports foresight_compile.runtime.policies, not on its line "
        "(runtime.policies.base)",
        "runtime/policies/foresight.py: its line names foresight_compile.errors, which it "
        "does not import"]


def test_every_document_the_code_cites_is_in_the_repository():
    """``docs/DESIGN.md section 2``, ``docs/ARCHITECTURE.md``: a cited document exists, under
    the repository (never a path outside it)."""
    import re

    cited = re.compile(r"(?<![\w./-])((?:\.\./)*[\w./-]*[A-Z][A-Z_]+\.md)")
    sources = list(MODULES.values()) + sorted((ROOT / "tests").glob("*.py")) \
        + sorted((ROOT / "examples").glob("*.py"))
    bad = []
    for path in sources:
        for name in cited.findall(path.read_text()):
            target = (ROOT / name).resolve()
            if not target.is_file() or ROOT not in target.parents:
                bad.append(f"{path.relative_to(ROOT)} cites {name}")
    assert bad == []
