"""The package's imports go one way (docs/architecture.md): no cycles, no import inside a function
except of an optional extra, no library module importing the CLI, and every module importing only
its own layer or lower ones.

A module may also name another one in a string, ``"bsconv_surgery.surgery"`` or
``"bsconv_surgery.cli.convert:convert"``, to import it when it is first used (the facade's table of
public names, the command table, ``lazy_module``): such a lazy import obeys the same rules, and the
string must name a module that exists.

``python tests/test_architecture.py`` prints the layered import graph and any violation.
"""

from __future__ import annotations

import ast
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Set, Tuple

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "bsconv_surgery"

#: The layers, lowest first: a module may import from its own layer and the ones before it.
#: A name is a top-level module or subpackage; ``__init__`` is the package's public facade.
LAYERS: List[Tuple[str, Tuple[str, ...]]] = [
    ("foundation", ("core",)),
    ("building blocks", ("layers", "models", "data")),
    ("graph", ("fx",)),
    ("maths", ("analysis",)),
    ("passes", ("passes",)),
    ("files", ("io",)),
    ("recovery", ("recovery",)),
    ("surgery", ("conversion", "surgery")),
    ("tools", ("tools", "inference")),
    ("training", ("training",)),
    ("compress", ("compression",)),
    ("facade", ("__init__",)),
    ("cli", ("cli", "__main__")),
]

#: Third-party imports allowed inside functions: optional extras, and modules that are slow to
#: import and needed by one code path only.
LAZY_ALLOWED = {
    "onnx": "slow to import; only ONNX export needs it",
    "onnxruntime": "slow to import; only the ort preparation and backend need it",
    "onnxscript": "only ONNX export needs it",
    "matplotlib": "the 'plot' extra",
    "torch._inductor": "compile-only machinery",
    "sklearn": "about a second to import; only the digits dataset needs it",
}


@dataclass
class Import:
    importer: str
    target: str  # a module of the package, or a third-party module
    line: int
    in_function: bool
    internal: bool
    lazy: bool = False  # named in a string, imported on first use


@dataclass
class ImportGraph:
    root: Path  # the package's folder
    package: str
    modules: Dict[str, Path] = field(default_factory=dict)
    imports: List[Import] = field(default_factory=list)

    def edges(self) -> Dict[str, Set[str]]:
        """Module -> the modules importing it runs: the target, and the ``__init__`` of each
        package around the target that does not also hold the importer."""
        out: Dict[str, Set[str]] = {m: set() for m in self.modules}
        for imp in self.imports:
            if imp.internal:
                out[imp.importer].add(imp.target)
                parts = imp.target.split(".")
                for i in range(2, len(parts)):
                    package = ".".join(parts[:i])
                    if not (imp.importer == package or imp.importer.startswith(package + ".")):
                        out[imp.importer].add(package)
        return out

    def component(self, module: str) -> str:
        """``bsconv_surgery.fx.graph`` -> ``fx``; the package itself -> ``__init__``."""
        parts = module.split(".")
        return parts[1] if len(parts) > 1 else "__init__"


def module_name(package_dir: Path, path: Path) -> str:
    parts = [package_dir.name, *path.relative_to(package_dir).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports_of(tree: ast.AST) -> List[Tuple[ast.AST, bool]]:
    """Every import node with whether it sits inside a function (class bodies count as module level)."""
    found: List[Tuple[ast.AST, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found.append((child, in_function))
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(tree, False)
    return found


def build_graph(package_dir: Path = PACKAGE_DIR) -> ImportGraph:
    graph = ImportGraph(package_dir, package_dir.name)
    for path in sorted(package_dir.rglob("*.py")):
        graph.modules[module_name(package_dir, path)] = path
    for importer, path in graph.modules.items():
        is_package = path.name == "__init__.py"
        tree = ast.parse(path.read_text(), str(path))
        for node, in_function in _imports_of(tree):
            for target in _targets(graph, importer, is_package, node):
                internal = target == graph.package or target.startswith(graph.package + ".")
                graph.imports.append(Import(importer, target, node.lineno, in_function, internal))
        for line, target in _lazy_references(graph, tree):
            graph.imports.append(Import(importer, target, line, False, True, lazy=True))
    return graph


def _lazy_references(graph: ImportGraph, tree: ast.AST) -> List[Tuple[int, str]]:
    """Every string that is a module path of the package, ``pkg.mod`` or ``pkg.mod:attr``, with
    its line (the module part, as written: ``violations`` checks that it exists)."""
    pattern = re.compile(rf"{re.escape(graph.package)}(\.[A-Za-z_]\w*)*(:[A-Za-z_]\w*)?")
    return [(node.lineno, node.value.partition(":")[0]) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and pattern.fullmatch(node.value)]


def _resolve(graph: ImportGraph, base: str) -> str:
    """The module ``base`` names, or the nearest enclosing module of the package (for ``a.b.Name``)."""
    while base not in graph.modules and "." in base:
        base = base.rsplit(".", 1)[0]
    return base


def _targets(graph: ImportGraph, importer: str, is_package: bool, node: ast.AST) -> List[str]:
    if isinstance(node, ast.Import):
        return [_resolve(graph, a.name) if a.name.startswith(graph.package) else a.name for a in node.names]
    if node.module == "__future__":
        return []
    if node.level:
        base = importer if is_package else importer.rsplit(".", 1)[0]
        for _ in range(node.level - 1):
            base = base.rsplit(".", 1)[0]
        base = f"{base}.{node.module}" if node.module else base
    else:
        base = node.module
        if not base.startswith(graph.package):
            return [base]
    # ``from . import x`` / ``from .pkg import mod`` import modules; ``from .mod import Name`` a module's name
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in graph.modules else _resolve(graph, base) for a in node.names]


def find_cycle(edges: Dict[str, Set[str]]) -> Optional[List[str]]:
    """A cycle of the directed graph as ``[a, b, ..., a]``, or ``None``."""
    state: Dict[str, int] = {}  # 1: on the current path, 2: done
    path: List[str] = []

    def visit(node: str) -> Optional[List[str]]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def rank_of(component: str) -> int:
    for rank, (_, names) in enumerate(LAYERS):
        if component in names:
            return rank
    raise AssertionError(f"'{component}' is in no layer of LAYERS: add it where it belongs")


def violations(graph: ImportGraph) -> List[str]:
    """Every broken rule, one line each (empty when the package is in order)."""
    out: List[str] = []
    cycle = find_cycle(graph.edges())
    if cycle:
        out.append("import cycle: " + " -> ".join(cycle))
    for imp in graph.imports:
        where = f"{graph.modules[imp.importer].relative_to(graph.root.parent)}:{imp.line}"
        if imp.lazy and imp.target not in graph.modules:
            out.append(f"{where}: names {imp.target}, which is no module of the package")
        elif imp.internal:
            if imp.in_function:
                out.append(f"{where}: imports {imp.target} inside a function")
            src, dst = graph.component(imp.importer), graph.component(imp.target)
            if dst in ("cli", "__main__") and src not in ("cli", "__main__"):
                out.append(f"{where}: library module {imp.importer} imports the CLI ({imp.target})")
            elif rank_of(dst) > rank_of(src):
                out.append(f"{where}: {imp.importer} ({LAYERS[rank_of(src)][0]}) imports {imp.target} "
                           f"from a higher layer ({LAYERS[rank_of(dst)][0]})")
        elif imp.in_function and not any(imp.target == m or imp.target.startswith(m + ".") for m in LAZY_ALLOWED):
            out.append(f"{where}: imports {imp.target} inside a function (only optional extras may wait: "
                       f"{', '.join(sorted(LAZY_ALLOWED))})")
    return out


# ------------------------------------------------------------------------------------------ tests


def test_the_package_imports_go_one_way():
    graph = build_graph()
    assert len(graph.modules) > 40  # the whole package was read
    problems = violations(graph)
    assert problems == [], "\n".join(problems)


def test_every_module_has_a_layer():
    graph = build_graph()
    for module in graph.modules:
        rank_of(graph.component(module))


#: What the package root may define: the entry points (the rest lives in the folders).
ROOT_ENTRY_POINTS = {"surgery.py": {"convert", "load_converted"}, "__init__.py": {"__getattr__", "__dir__"},
                     "__main__.py": set()}


def test_the_root_holds_only_the_entry_points():
    for path in sorted(PACKAGE_DIR.glob("*.py")):
        assert path.name in ROOT_ENTRY_POINTS, f"{path.name} belongs in a folder (see docs/architecture.md)"
        tree = ast.parse(path.read_text())
        defined = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
        assert defined == ROOT_ENTRY_POINTS[path.name], path.name


def test_no_function_takes_both_an_input_size_and_a_family():
    """How a model is fed is one ``ExampleInputs``, made once at the edge (issue 21); its own
    constructor ``ExampleInputs.of(family, size)`` is the one place the two meet."""
    both = []
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                names = {a.arg for a in node.args.args + node.args.kwonlyargs}
                if "family" in names and names & {"input_size", "size"} and not (path.name == "inputs.py" and node.name == "of"):
                    both.append(f"{path.relative_to(PACKAGE_DIR)}:{node.lineno} {node.name}")
    assert both == []


def test_the_checks_catch_cycles_function_imports_cli_imports_and_upward_imports(tmp_path):
    """The rules have teeth: a small package that breaks each one is caught."""
    pkg = tmp_path / "bsconv_surgery"
    (pkg / "cli").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "core").mkdir()
    (pkg / "cli" / "__init__.py").write_text("")
    (pkg / "core" / "__init__.py").write_text("")
    (pkg / "core" / "errors.py").write_text("from .options import X\n")  # foundation <-> foundation: a cycle
    (pkg / "core" / "options.py").write_text("from .errors import Y\n")
    (pkg / "surgery.py").write_text("from . import cli\n\ndef f():\n    from .core.errors import Y\n    import yaml\n")
    (pkg / "layers.py").write_text("from .surgery import convert\n")
    (pkg / "core" / "registry.py").write_text("LATER = {'x': 'bsconv_surgery.layers:BSConvU', 'y': 'bsconv_surgery.gone'}\n")
    problems = "\n".join(violations(build_graph(pkg)))
    assert "import cycle: bsconv_surgery.core.errors -> bsconv_surgery.core.options -> bsconv_surgery.core.errors" in problems
    assert "imports bsconv_surgery.core.errors inside a function" in problems
    assert "imports yaml inside a function" in problems
    assert "library module bsconv_surgery.surgery imports the CLI" in problems
    assert "bsconv_surgery.layers (building blocks) imports bsconv_surgery.surgery from a higher layer (surgery)" in problems
    assert "bsconv_surgery.core.registry (foundation) imports bsconv_surgery.layers from a higher layer" in problems
    assert "names bsconv_surgery.gone, which is no module of the package" in problems


def test_lazy_imports_are_in_the_graph():
    """The command table and ``lazy_module`` strings are edges: a command depends on the library."""
    graph = build_graph()
    lazy = {(i.importer, i.target) for i in graph.imports if i.lazy}
    assert ("bsconv_surgery.cli", "bsconv_surgery.cli.convert") in lazy
    assert ("bsconv_surgery.cli.convert", "bsconv_surgery.surgery") in lazy
    assert ("bsconv_surgery", "bsconv_surgery.surgery") in lazy


def main() -> int:
    graph = build_graph()
    for rank, (layer, names) in enumerate(LAYERS):
        print(f"{rank} {layer}")
        for module in sorted(m for m in graph.modules if graph.component(m) in names):
            deps = sorted({i.target.removeprefix(graph.package + ".") for i in graph.imports if i.importer == module and i.internal})
            print(f"    {module.removeprefix(graph.package + '.') or '__init__'} -> {', '.join(deps) or '-'}")
    problems = violations(graph)
    print("\n".join(problems) if problems else f"OK: {len(graph.modules)} modules, no cycle, imports go one way, "
          f"no import inside a function but of {', '.join(sorted(LAZY_ALLOWED))}.")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
