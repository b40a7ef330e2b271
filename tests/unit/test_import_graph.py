"""The package's import graph: no cycle, and no import that points up a layer.

Cycles count module-level imports, type-only ones (`if TYPE_CHECKING:`) included, since
they too say which layer leans on which. Layers count every import, also the ones made
inside a function to load something late: a late import is still a dependency.
ARCHITECTURE.md draws the layers.
"""

from __future__ import annotations

import ast
from pathlib import Path

import kvmnetd

ROOT = Path(kvmnetd.__file__).parent


def module_name(path: Path) -> str:
    parts = ["kvmnetd", *path.relative_to(ROOT).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, name: str, late: bool = False) -> set[str]:
    """What `name` imports at module level; with `late`, also inside functions."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    nodes: list[ast.AST] = []
    for node in tree.body:  # module level, and the type-only block
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            nodes += node.body
        else:
            nodes.append(node)
    if late:
        nodes = list(ast.walk(tree))
    for node in nodes:
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("kvmnetd")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            if not base.startswith("kvmnetd"):
                continue
            out.add(base)
            out |= {f"{base}.{a.name}" for a in node.names}
    return out


def graph(late: bool = False) -> dict[str, set[str]]:
    mods = {module_name(p): p for p in ROOT.rglob("*.py")}
    return {n: {d for d in imports(p, n, late) if d in mods and d != n}
            for n, p in mods.items()}


# Bottom to top. A module imports its own layer and the ones below, never one above.
LAYERS = ("model", "config plan", "adapters", "engine", "app", "control",
          "service", "daemon cli cli_libvirt __main__")
RANK = {part: i for i, names in enumerate(LAYERS) for part in names.split()}
RANK["logsetup"] = 0  # a leaf: structlog set-up, imported from everywhere
RANK["kvmnetd"] = 0  # the package itself: __version__


def layer(module: str) -> str:
    return module.split(".")[1] if "." in module else module


def test_every_module_is_in_a_layer() -> None:
    assert {layer(n) for n in graph()} <= set(RANK)


def test_no_import_points_up_a_layer() -> None:
    upward = sorted(f"{n} imports {d}" for n, deps in graph(late=True).items()
                    for d in deps if RANK[layer(d)] > RANK[layer(n)])
    assert not upward, "\n".join(upward)


def test_no_import_cycle() -> None:
    g = graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for d in sorted(g[n]):
            if state.get(d) == 1:
                cycle = [*stack[stack.index(d):], d]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if d not in state:
                visit(d)
        stack.pop()
        state[n] = 2

    for n in sorted(g):
        if n not in state:
            visit(n)
