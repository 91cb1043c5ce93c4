"""The package's shape: imports flow one way (model → graph → scores → selection → verification →
export → command line), no import circles, and the light entry points import no torch."""

import ast
import subprocess
import sys
from pathlib import Path

import networkx as nx
import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "circuits"

# Lower layers never import higher ones. A module belongs to the first prefix that matches it.
LAYERS = [
    ["circuits.errors", "circuits.files", "circuits.tasks.splits", "circuits.model.adapters",
     "circuits.model.components", "circuits.model.tracr", "circuits.tasks.task",
     "circuits.tasks.builtin", "circuits.methods.registry"],
    ["circuits.graph", "circuits.positions", "circuits.tasks.mib", "circuits.tasks.files",
     "circuits.tasks.generators"],
    ["circuits.patch_sums"],
    ["circuits.patching"],
    ["circuits.model"],                                   # loading wraps, builds the graph, checks by patching
    ["circuits.evaluation", "circuits.circuit"],
    ["circuits.methods", "circuits.select"],
    ["circuits.discover", "circuits.verify"],                # verify.roles: head roles
    ["circuits.io"],
    ["circuits.sweep"],
    ["circuits.cli"],
]


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph(root: Path) -> nx.DiGraph:
    """Module → module edges for every import of the package, also those inside functions."""
    name = root.name
    modules = {module_name(p, root): p for p in root.rglob("*.py")}
    g = nx.DiGraph()
    g.add_nodes_from(modules)
    for mod, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from pkg import sub` depends on the submodule when there is one
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                           for a in node.names]
            for target in targets:
                if target.split(".")[0] == name and target in modules and target != mod:
                    g.add_edge(mod, target)
    return g


def circles(root: Path) -> list[list[str]]:
    return list(nx.simple_cycles(import_graph(root)))


def layer_of(module: str) -> int:
    best = None
    for i, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                if best is None or len(prefix) > best[1]:
                    best = (i, len(prefix))
    if best is None:
        raise AssertionError(f"{module} is in no layer of LAYERS: place it")
    return best[0]


def test_no_import_circles():
    assert circles(PACKAGE) == []


def test_a_deliberate_circle_is_caught(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg.sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from pkg import a\n")     # hidden in a function
    assert circles(pkg) and {"pkg.a", "pkg.sub.b"} == set(circles(pkg)[0])


def test_imports_flow_down_the_layers():
    g = import_graph(PACKAGE)
    upward = [f"{a} → {b}" for a, b in g.edges
              if a != "circuits" and b != "circuits" and layer_of(a) < layer_of(b)
]
    assert upward == []


@pytest.mark.parametrize("module", ["circuits", "circuits.cli.main", "circuits.methods",
                                    "circuits.tasks.builtin", "circuits.sweep.runner"])
def test_light_entry_points_import_no_torch(module):
    code = f"import sys, {module}; print('torch' in sys.modules, 'transformer_lens' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_the_whole_parser_builds_without_torch():
    code = "import sys; from circuits.cli.main import parser; parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
