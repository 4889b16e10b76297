"""The package's layout: the import graph of src/protoken, read from the source with ``ast``, has
no cycle, and its imports go down the layers the README draws.

Every import counts, also those inside functions (imported lazily so that ``protoken convert``
never loads torch): a lazy import still ties the two modules together.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"


def module_names(src: Path, package: str) -> dict[str, Path]:
    """Dotted module name -> file, for every module of ``package`` under ``src``
    (a package is its ``__init__.py``)."""
    out = {}
    for path in sorted((src / package).rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def import_graph(src: Path, package: str) -> dict[str, set[str]]:
    """Module -> the modules of ``package`` it imports (anywhere in its source).

    ``from a.b import c`` is an import of module ``a.b.c`` when that is a module, else of
    ``a.b``; relative imports are resolved against the importing module's package.
    """
    modules = module_names(src, package)
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        here = name if is_package else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = here.split(".")
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
                # a name imported from a module is that module; a submodule is the submodule
                targets = [t for t in targets[:-1] if t in modules] or [base]
            for target in targets:
                while target and target not in modules:  # import a.b.c of a package a.b
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as [m0, m1, ..., m0], or None (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start)
            if found:
                return found
    return None


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph(SRC, "protoken")


def test_the_import_graph_has_no_cycle(graph):
    assert "protoken.geometry" in graph and "protoken.model.hierarchical" in graph
    assert graph["protoken.backbone"] >= {"protoken.geometry"}
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


#: The README's Layout, top row first: a module may import only modules of lower rows. A package
#: name covers its submodules (``model`` is model/hierarchical.py, model/residue.py ...) unless a
#: submodule has a row of its own (``convert.settings``, read by the codec and the shards).
LAYERS = [
    {"__main__"},
    {"cli"},
    {"demo", ""},  # "": the package itself (protoken/__init__.py, whose Tokenizer is lazy)
    {"evaluate"},
    {"report"},
    {"tokenizer", "train"},
    {"pretrained", "token_files"},
    {"checkpoint", "train_config", "plots", "data"},
    {"reconstruct"},
    {"backbone", "metrics"},
    {"model"},
    {"convert"},
    {"archives"},
    {"codec"},
    {"geometry"},
    {"structure"},
    {"shards"},
    {"convert_settings"},
    {"inputs", "fileio", "_version"},
]

#: The rows inside a package, top first (its ``__init__.py`` may import any of them). model/
#: is not listed: inside it only the cycle test applies.
PACKAGE_LAYERS = {
    "convert": [{"run"}, {"file"}, {"pool", "lock"}, {"manifest", "options"}, {"bins"}],
    "data": [{"batches"}, {"index"}],
}  # fmt: skip


def layer_of(module: str) -> int:
    name = module.removeprefix("protoken").removeprefix(".")
    for depth, row in enumerate(LAYERS):
        if name in row or name.split(".")[0] in row - {""}:
            return depth
    raise AssertionError(
        f"{module} has no place in the layout: add it to LAYERS in tests/test_layout.py and to the"
        " README's Layout"
    )


def package_layer_of(module: str) -> tuple[str, int] | None:
    """(package, row) of a module of a package in :data:`PACKAGE_LAYERS`; None for others and
    for a package's ``__init__.py``."""
    parts = module.removeprefix("protoken.").split(".")
    if len(parts) != 2 or parts[0] not in PACKAGE_LAYERS:
        return None
    for depth, row in enumerate(PACKAGE_LAYERS[parts[0]]):
        if parts[1] in row:
            return parts[0], depth
    raise AssertionError(f"{module} has no row in PACKAGE_LAYERS[{parts[0]!r}]")


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """The edges of the graph that go up or sideways in :data:`LAYERS`, or, between two modules
    of one package, in :data:`PACKAGE_LAYERS`."""
    upward = []
    for module, deps in graph.items():
        for dep in deps:
            if dep.startswith(module + "."):  # a package's face importing its own modules
                continue
            inside = module.count(".") > 1 and module.rpartition(".")[0] == dep.rpartition(".")[0]
            if inside:
                a, b = package_layer_of(module), package_layer_of(dep)
                if a is not None and b is not None and b[1] <= a[1]:
                    upward.append(f"{module} -> {dep}")
            elif layer_of(dep) <= layer_of(module):
                upward.append(f"{module} -> {dep}")
    return sorted(upward)


def test_imports_go_down_the_layers(graph):
    upward = upward_imports(graph)
    assert not upward, "imports that go up or sideways in the layout: " + ", ".join(upward)


def test_nothing_below_the_command_line_imports_it(graph):
    users = {name for name, deps in graph.items() if "protoken.cli" in deps}
    assert users <= {"protoken.__main__"}


def test_the_checks_find_what_they_look_for(tmp_path):
    """The graph builder and the cycle finder on a small package with a cycle through a
    function-level relative import, so the tests above can fail."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("import os\nfrom pkg.sub import b\n")
    (pkg / "sub" / "__init__.py").write_text("from pkg.sub.b import thing\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from .. import c\n\nthing = 1\n")
    (pkg / "c.py").write_text("import pkg.a as a\n")
    graph = import_graph(tmp_path, "pkg")
    assert graph["pkg.a"] == {"pkg.sub.b"} and graph["pkg.sub"] == {"pkg.sub.b"}
    assert graph["pkg.sub.b"] == {"pkg.c"} and graph["pkg.c"] == {"pkg.a"}
    assert find_cycle(graph) == ["pkg.a", "pkg.sub.b", "pkg.c", "pkg.a"]
    (pkg / "c.py").write_text("X = 1\n")
    assert find_cycle(import_graph(tmp_path, "pkg")) is None
    assert reachable(import_graph(tmp_path, "pkg"), "pkg.a") == {"pkg.sub.b", "pkg.c"}
    # the layer check: up and sideways are reported, down and inside model/ are not
    fake = {
        "protoken.geometry": {"protoken.codec"},
        "protoken.backbone": {"protoken.metrics", "protoken.geometry"},
        "protoken.model.hierarchical": {"protoken.model.losses"},
        "protoken.convert.bins": {"protoken.convert.manifest"},
        "protoken.convert.run": {"protoken.convert.file"},
        "protoken.codec": {"protoken.convert_settings"},
        "protoken.shards": {"protoken.convert.manifest"},
    }
    assert upward_imports(fake) == ["protoken.backbone -> protoken.metrics",
                                    "protoken.convert.bins -> protoken.convert.manifest",
                                    "protoken.geometry -> protoken.codec",
                                    "protoken.shards -> protoken.convert.manifest"]  # fmt: skip
    with pytest.raises(AssertionError, match="no place in the layout"):
        layer_of("protoken.newthing")


#: Above this many lines a module says in its docstring why it is one module.
LONG_MODULE = 600


def _stated_length(path: Path) -> int | None:
    """The ``~N lines`` (or ``about N lines``) a module's docstring states, None if none."""
    import re

    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    m = re.search(r"(?:~|about )(\d+) lines", " ".join(doc.split()))
    return int(m.group(1)) if m else None


def test_a_long_module_says_why_and_how_long_it_is():
    """Issue 23: no module over ~600 lines without a reason stated in its docstring; the stated
    length is kept within 15% of the real one, so the reason is revisited as the module grows."""
    long = {}
    for path in sorted((SRC / "protoken").rglob("*.py")):
        n = len(path.read_text().splitlines())
        if n > LONG_MODULE:
            long[path.relative_to(SRC).as_posix()] = (n, _stated_length(path))
    assert long, "no module over the limit: the check would not see one"
    bad = {k: v for k, v in long.items() if v[1] is None or abs(v[1] - v[0]) > 0.15 * v[0]}
    assert not bad, f"(lines, stated) of long modules without a true stated length: {bad}"


def test_the_stated_length_is_read_from_the_docstring(tmp_path):
    module = tmp_path / "m.py"
    module.write_text('"""Things.\n\nOne module of ~900\nlines on purpose."""\n')
    assert _stated_length(module) == 900
    module.write_text('"""Things."""\n# ~900 lines\n')
    assert _stated_length(module) is None
