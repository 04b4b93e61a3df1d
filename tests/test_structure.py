"""The import layering the CLI relies on: nothing imports the ``vhist`` command module
(it sits on top of the commands it calls), and no module pair imports each other."""
import ast
from pathlib import Path

import vhist

ROOT = Path(vhist.__file__).parent


def _imports(path: Path) -> set[str]:
    """Every ``vhist...`` module ``path`` imports, at the top or inside a function."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("vhist"):
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names if a.name.startswith("vhist"))
    return names


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_no_module_imports_the_cli_and_no_two_modules_import_each_other():
    graph = {_module(p): _imports(p) for p in ROOT.rglob("*.py") if "kernels" not in p.parts}
    assert not [m for m, deps in graph.items() if "vhist.__main__" in deps and m != "vhist.__main__"]
    pairs = sorted({tuple(sorted((a, b))) for a, deps in graph.items() for b in deps
                    if b in graph and a != b and a in graph[b]
                    # a package and its own modules (the package re-exports them)
                    and not b.startswith(a + ".") and not a.startswith(b + ".")})
    assert pairs == []


def test_convert_is_a_room_of_its_own():
    """vhist.convert reads models and writes ops: nothing below it (ops, nn, models,
    reference, kernels) imports it; only the package root, the CLI and training do."""
    graph = {_module(p): _imports(p) for p in ROOT.rglob("*.py")}
    importers = sorted(m for m, deps in graph.items()
                       if not m.startswith("vhist.convert") and any(d.startswith("vhist.convert") for d in deps))
    assert importers == ["vhist", "vhist.__main__", "vhist.train.checkpoint", "vhist.train.setup"]
