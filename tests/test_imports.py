"""No import cycle inside ``medad_fast``, function-level imports included (issue 24).

The graph is read from the source (``ast``), not from a running interpreter, so an import
inside a function counts as much as one at the top of a module: a cycle that only closes
when a function runs is still a cycle. Edges:

* ``import a.b.c`` -> ``a.b.c``;
* ``from M import n`` -> ``M.n`` when that is a module (``from . import submodule``), else ``M``;
  relative imports are resolved against the importing module's package;
* ``importlib.import_module("a.b")`` with a literal name -> ``a.b``.

Importing a submodule also runs its parent packages' ``__init__``; that implicit edge is not
counted (every package's ``__init__`` that imports its own submodules would otherwise close a
cycle with each of them, which Python resolves by running the ``__init__`` first).
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path

import medad_fast

PACKAGE_ROOT = Path(medad_fast.__file__).parent


def module_files(package_root: Path) -> dict[str, Path]:
    """Every module under ``package_root`` by dotted name (a package by its own name): the
    ``.py`` files, and the compiled ones (``_C*.so``: imported by name, importing nothing)."""
    modules = {}
    for path in sorted(package_root.rglob("*")):
        suffix = next((s for s in (".py", *EXTENSION_SUFFIXES) if path.name.endswith(s)), None)
        if suffix is None or not path.is_file():
            continue
        parts = (package_root.name,) + path.relative_to(package_root).parent.parts + (path.name[:-len(suffix)],)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _imported_names(tree: ast.AST, module: str, is_package: bool, modules: dict[str, Path]) -> set[str]:
    """The modules of ``modules`` that ``tree`` (the source of ``module``) imports anywhere."""
    package = module if is_package else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                found.add(submodule if submodule in modules else source)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            found.add(node.args[0].value)
    return {name for name in found if name in modules and name != module}


def import_graph(package_root: Path) -> dict[str, set[str]]:
    """``module -> modules it imports`` for every module of the package at ``package_root``."""
    modules = module_files(package_root)
    return {name: (_imported_names(ast.parse(path.read_text(), str(path)), name, path.name == "__init__.py", modules)
                   if path.suffix == ".py" else set())
            for name, path in modules.items()}


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of ``graph`` with more than one module (Tarjan),
    each sorted; iterative, so a deep package cannot hit the recursion limit."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, successors = work[-1]
            for successor in successors:
                if successor not in index:
                    index[successor] = low[successor] = len(index)
                    stack.append(successor)
                    on_stack.add(successor)
                    work.append((successor, iter(sorted(graph[successor]))))
                    break
                if successor in on_stack:
                    low[node] = min(low[node], index[successor])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        cycles.append(sorted(component))
    return sorted(cycles)


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    """Every module that importing ``start`` can import (its parent packages' ``__init__``
    included, since Python runs them first), ``start`` excluded."""
    parents = [start.rsplit(".", depth)[0] for depth in range(1, start.count(".") + 1)]
    seen: set[str] = set()
    todo = [start, *parents]
    while todo:
        for name in graph[todo.pop()] - seen:
            seen.add(name)
            todo.append(name)
    return (seen | set(parents)) - {start}


def test_medad_fast_has_no_import_cycle() -> None:
    cycles = import_cycles(import_graph(PACKAGE_ROOT))
    assert not cycles, "import cycles in medad_fast (module- and function-level imports):\n" + "\n".join(
        " <-> ".join(cycle) for cycle in cycles)


def test_the_walker_finds_a_function_level_cycle(tmp_path: Path) -> None:
    """The test above can fail: a cycle that only closes inside a function is found;
    ``from . import submodule`` (compiled ones too) counts as the submodule, ``from . import
    NAME`` of a package attribute as the package, and a module outside the cycle stays out."""
    package = tmp_path / "tinypkg"
    package.mkdir()
    (package / "__init__.py").write_text("from . import a\nVERSION = 1\n")
    (package / "a.py").write_text("from . import _C, b\nVALUE = 1\n")
    (package / f"_C{EXTENSION_SUFFIXES[0]}").write_bytes(b"")  # stands for a compiled module
    (package / "b.py").write_text(textwrap.dedent("""\
        def late():
            from .a import VALUE
            return VALUE
        """))
    (package / "c.py").write_text("import tinypkg.b\n")
    graph = import_graph(package)
    assert graph == {"tinypkg": {"tinypkg.a"}, "tinypkg._C": set(), "tinypkg.a": {"tinypkg._C", "tinypkg.b"},
                     "tinypkg.b": {"tinypkg.a"}, "tinypkg.c": {"tinypkg.b"}}
    assert import_cycles(graph) == [["tinypkg.a", "tinypkg.b"]]
    # without the function-level import there is none
    (package / "b.py").write_text("def late():\n    return 1\n")
    assert import_cycles(import_graph(package)) == []
    # a package attribute read inside a function runs the package's __init__, which imports a
    (package / "b.py").write_text("def version():\n    from . import VERSION\n    return VERSION\n")
    assert import_cycles(import_graph(package)) == [["tinypkg", "tinypkg.a", "tinypkg.b"]]


def test_config_does_not_import_methods_and_inference_does_not_import_export() -> None:
    graph = import_graph(PACKAGE_ROOT)
    from_config = reachable(graph, "medad_fast.config")
    assert not {name for name in from_config if name.startswith("medad_fast.methods")}, sorted(from_config)
    assert "medad_fast.export" not in reachable(graph, "medad_fast.inference")


def test_importing_config_leaves_the_methods_unimported() -> None:
    """At run time too: ``import medad_fast.config`` (which runs the package's ``__init__``)
    does not load the method registry, whose import pulls in every method's models."""
    env = {**os.environ, "PYTHONPATH": str(PACKAGE_ROOT.parent)}
    loaded = subprocess.run([sys.executable, "-c", "import sys, medad_fast.config; "
                             "print(sorted(m for m in sys.modules if m.startswith('medad_fast.methods')))"],
                            capture_output=True, text=True, env=env, check=True).stdout.strip()
    assert loaded == "[]"


# ----------------------------------------------------------------------------- a CLI that only parses

#: the command-line package: the only place that parses arguments; no library module imports it
CLI_PACKAGE = "medad_fast.cli"
#: what a verb module offers the dispatcher; anything else in it is private (``_name``)
VERB_API = {"add_arguments", "main"}
#: a verb module is argument parsing, one library call and printing: short
MAX_VERB_LINES = 250


def _in_package(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def argparse_importers(package_root: Path, exempt: str) -> list[str]:
    """The modules of the package at ``package_root`` outside ``exempt`` (a dotted package)
    that import ``argparse`` anywhere (module or function level, or by ``import_module``)."""
    found = []
    for name, path in module_files(package_root).items():
        if path.suffix != ".py" or _in_package(name, exempt):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else
                     [node.args[0].value] if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                                              and node.func.attr == "import_module" and node.args
                                              and isinstance(node.args[0], ast.Constant)) else [])
            if any(str(n).split(".")[0] == "argparse" for n in names):
                found.append(name)
                break
    return found


def verb_module_problems(path: Path) -> list[str]:
    """What makes ``path`` more than a verb module: too long, or a public top-level name
    other than ``add_arguments`` / ``main``."""
    source = path.read_text()
    problems = [f"{len(source.splitlines())} lines (at most {MAX_VERB_LINES})"] \
        if len(source.splitlines()) > MAX_VERB_LINES else []
    defined = set()
    for node in ast.parse(source, str(path)).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defined.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            defined.update(t.id for t in targets if isinstance(t, ast.Name))
    problems += [f"public name {name}" for name in sorted(defined - VERB_API) if not name.startswith("_")]
    problems += [f"no {name}" for name in sorted(VERB_API - defined)]
    return problems


def test_only_the_cli_package_parses_arguments_and_no_library_module_imports_it() -> None:
    assert argparse_importers(PACKAGE_ROOT, CLI_PACKAGE) == []
    graph = import_graph(PACKAGE_ROOT)
    assert CLI_PACKAGE in graph  # the package is there (the checks below would pass vacuously)
    into_cli = {name: sorted(i for i in imports if _in_package(i, CLI_PACKAGE))
                for name, imports in graph.items() if not _in_package(name, CLI_PACKAGE)}
    assert {name: found for name, found in into_cli.items() if found} == {}


def test_each_verb_is_a_short_module_of_add_arguments_and_main() -> None:
    from medad_fast.cli import COMMANDS

    problems = {verb: verb_module_problems(PACKAGE_ROOT / "cli" / f"{verb}.py") for verb in COMMANDS}
    assert {verb: found for verb, found in problems.items() if found} == {}


def test_the_cli_checks_find_a_parser_in_a_library_module(tmp_path: Path) -> None:
    """The two tests above can fail: a function-level ``import argparse`` outside the CLI
    package is found (inside it is not), and so are a long verb module and a public helper."""
    package = tmp_path / "tinypkg"
    (package / "cli").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "cli" / "__init__.py").write_text("import argparse\n")
    (package / "engine.py").write_text("def run():\n    from argparse import ArgumentParser\n    return ArgumentParser\n")
    (package / "report.py").write_text("import json\n")
    assert argparse_importers(package, "tinypkg.cli") == ["tinypkg.engine"]
    verb = package / "cli" / "go.py"
    verb.write_text("def add_arguments(parser):\n    pass\n\n\ndef main(args):\n    return 0\n\n\n_NOTE = 1\n")
    assert verb_module_problems(verb) == []
    verb.write_text(verb.read_text() + "LIMIT = 3\n\n\ndef train(config):\n    return config\n"
                    + "\n" * MAX_VERB_LINES)
    assert verb_module_problems(verb) == [f"{MAX_VERB_LINES + 14} lines (at most {MAX_VERB_LINES})",
                                          "public name LIMIT", "public name train"]
