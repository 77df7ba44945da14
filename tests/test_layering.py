"""snug's modules import each other in one direction (issues 17 and 34): a test builds the import
graph of snug/ from the source (every import: top-level, inside functions, under TYPE_CHECKING,
and a module imported by its name as a string: importlib.import_module("snug.x"),
__import__("snug.x"), or any call named *import* given a snug module's name) and fails on any
cycle, and on any import that points up the layers (LAYERS), naming the modules."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def import_graph(package: Path) -> dict[str, set[str]]:
    """module -> the modules of the package it imports (a name imported from a module counts
    as that module, or as the submodule of that name when there is one)."""
    mods = {}
    for path in package.rglob("*.py"):
        parts = path.relative_to(package.parent).with_suffix("").parts
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {m: set() for m in mods}
    for mod, path in mods.items():
        pkg = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                names = [
                    f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names
                ]
            elif isinstance(node, ast.Call):
                names = _imported_by_name(node, mods)
            else:
                continue
            for name in names:
                while name and name not in mods:
                    name = name.rpartition(".")[0]
                if name and name != mod:
                    graph[mod].add(name)
    return graph


def _imported_by_name(call: ast.Call, mods: dict) -> list[str]:
    """The snug modules a call imports by their names as strings: importlib.import_module,
    __import__, importlib.util.find_spec and any function whose name says it imports."""
    func = call.func
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
    if "import" not in name.lower() and name != "find_spec":
        return []
    return [
        a.value
        for a in call.args
        if isinstance(a, ast.Constant) and isinstance(a.value, str) and a.value.startswith("snug")
    ]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_graph_sees_a_cycle_through_a_function_level_import(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg.sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from ..a import x\n")
    (pkg / "c.py").write_text("import pkg.a\n")
    assert cycles(import_graph(pkg)) == [["pkg.a", "pkg.sub.b"]]


def test_snug_has_no_import_cycle():
    graph = import_graph(ROOT / "snug")
    assert len(graph) > 50 and "snug.config" in graph["snug.train.training"]
    assert cycles(graph) == [], "import cycles in snug/ (each line one cycle)"


# The layers, bottom first: a module may import its own layer's and those below. The bottom
# (snug.core: the interfaces) imports nothing of snug's but snug.errors; the commands (cli.py
# and each package's command.py) sit on top. Within a layer, packages import each other freely
# only as far as the cycle check allows.
LAYERS = [
    ("snug", "snug.errors"),
    ("snug.core",),
    ("snug.arguments", "snug.runtime"),
    ("snug.config",),
    ("snug.data", "snug.models"),
    ("snug.methods",),
    ("snug.train",),
    ("snug.stages",),
    ("snug.builtin", "snug.plan", "snug.deploy"),
    ("snug.ui",),  # the web page over the commands: plans, runs, chats and merges
    ("snug.cli", "command"),
]


def layer(module: str) -> int:
    """The layer of a module: that of the longest prefix LAYERS names (a package's `command`
    module: the commands' layer)."""
    if module.rpartition(".")[2] == "command":
        return len(LAYERS) - 1
    best, found = -1, None
    for i, names in enumerate(LAYERS):
        for name in names:
            # "snug" (the package's __init__) is itself only; every other name is a prefix too
            prefix = name != "snug" and module.startswith(name + ".")
            if (module == name or prefix) and len(name) > best:
                best, found = len(name), i
    assert found is not None, f"{module}: in no layer of tests/test_layering.py's LAYERS"
    return found


def dynamic_imports(package: Path) -> list[str]:
    """Where a module imports a name it computes (not a string constant): such an import
    escapes the graph, so each one is listed."""
    found = []
    for path in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in ("import_module", "__import__", "find_spec", "exec_module") and not all(
                isinstance(a, ast.Constant) for a in node.args
            ):
                found.append(str(path.relative_to(package.parent)))
    return sorted(set(found))


def test_only_the_door_imports_a_computed_name():
    """The registry's door imports the plug-in modules it is told of (entry points,
    $SNUG_PLUGINS); runtime/progress.py's `importing` imports what its callers name, each a
    string constant the graph counts. Any other import of a computed name would hide an edge
    from the checks here."""
    assert dynamic_imports(ROOT / "snug") == [
        "snug/core/registry.py",
        "snug/runtime/progress.py",
    ]


def test_nothing_imports_snugs_own_plugin_module():
    """snug/builtin.py (every method and stage of snug's) comes in through the entry point
    only: a module importing it would register them by another road (and reach up the
    layers sideways)."""
    graph = import_graph(ROOT / "snug")
    assert [m for m, targets in graph.items() if "snug.builtin" in targets] == []


def upward(graph: dict[str, set[str]]) -> list[str]:
    return sorted(
        f"{a} -> {b}" for a, targets in graph.items() for b in targets if layer(b) > layer(a)
    )


def test_a_module_imported_by_its_name_is_an_import(tmp_path):
    pkg = tmp_path / "snugx"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text(
        "import importlib\ndef f():\n    importlib.import_module('snugx.b')\n"
    )
    (pkg / "b.py").write_text("def g():\n    __import__('snugx.a')\n")
    (pkg / "c.py").write_text("def h(load):\n    load_and_import(1, 'snugx.a')\n")
    graph = import_graph(pkg)
    assert graph["snugx.a"] == {"snugx.b"} and graph["snugx.b"] == {"snugx.a"}
    assert graph["snugx.c"] == {"snugx.a"}
    assert cycles(graph) == [["snugx.a", "snugx.b"]]


def test_no_import_points_up_a_layer():
    """Every import points down or sideways (docs/extending.md: the layers): the planner is
    handed to run_training (auto_fit), a stage's frozen models reach the sharding through a
    hook, and snug's own methods and stages come in through the registry's door, not by name."""
    graph = import_graph(ROOT / "snug")
    assert upward(graph) == [], "imports that point up a layer"
    core = {m for m in graph if m.startswith("snug.core")}
    for module in core:
        assert graph[module] <= core | {"snug.errors"}, (module, graph[module] - core)


def test_the_bottom_layer_imports_no_torch():
    """snug.core and snug.config import no torch, transformers, peft or datasets: the command
    line checks a config (every plug-in's keys included) before those load. So does checking a
    config for every registered stage, the example plug-in stage built on the documented
    helpers (tests/plugins/completion.py) included: a helper's type annotations import them
    only under TYPE_CHECKING."""
    code = (
        "import sys, snug.core.registry, snug.core.stage, snug.core.events, snug.config\n"
        "from snug.config import load_config\n"
        "from snug.core.registry import load_plugins, stages\n"
        "load_plugins()\n"
        "heavy = ('torch', 'transformers', 'peft', 'datasets')\n"
        "for name, stage in sorted(stages().items()):\n"
        "    load_config(None, [f'train.stage={name}', f'train.micro_batch={stage.min_rows}',\n"
        "                      'method.name=dora'])\n"
        "    print(name, sorted(m for m in heavy if m in sys.modules))\n"
    )
    env = {**os.environ, "SNUG_PLUGINS": str(ROOT / "tests" / "plugins" / "completion.py")}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    )
    lines = out.stdout.split("\n")
    assert len([line for line in lines if line]) >= 8 and "completion []" in lines, out.stdout
    assert all(line.endswith(" []") for line in lines if line), out.stdout


def package_of(module: str) -> str:
    """snug.train.loss -> snug.train; a top-level module (snug.errors) -> snug."""
    parts = module.split(".")
    if len(parts) > 2 or (ROOT / Path(*parts)).is_dir():
        return ".".join(parts[:2])
    return "snug"


def private_imports(paths: list[Path]) -> list[str]:
    """`from snug.x.y import _name` where the importer lies outside snug.x: a private name
    used across packages (it should be public, or live where it is used)."""
    found = []
    for path in paths:
        parts = path.resolve().relative_to(ROOT).with_suffix("").parts
        home = package_of(".".join(parts)) if parts[0] == "snug" else "outside"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.ImportFrom) or node.level or not node.module:
                continue
            if node.module.split(".")[0] != "snug" or package_of(node.module) == home:
                continue
            found += [
                f"{path.relative_to(ROOT)}:{node.lineno}: {node.module}.{a.name}"
                for a in node.names
                if a.name.startswith("_")
            ]
    return found


def test_no_module_imports_a_private_name_from_another_package():
    """A name with a leading underscore stays in its package: what another package (or a
    plug-in) uses is public, or lives where it is used."""
    paths = sorted((ROOT / "snug").rglob("*.py")) + sorted(
        (ROOT / "tests" / "plugins").glob("*.py")
    )
    assert len(paths) > 50
    assert private_imports(paths) == [], "private names imported across packages"
