"""The plugin's import graph, read statically from the source (no module is imported).

One home for what tests/unit/test_layers.py (layers, the worker stack, no cycle) and
tests/unit/test_tiny_registry.py (tiny/ has no cycle) read: the modules of
``vllm_recroute``, the plugin imports of each file (module level, inside functions, and
with ``type_only`` those of ``if TYPE_CHECKING:`` blocks), the graph they form and the
first cycle in a graph.
"""

from __future__ import annotations

import ast
import functools
from collections.abc import Collection, Mapping
from pathlib import Path

import vllm_recroute

ROOT = Path(vllm_recroute.__file__).parent


def module_name(path: Path) -> str:
    """``vllm_recroute/kv/spec.py`` -> ``kv.spec``; the package root is ``""``."""
    rel = path.relative_to(ROOT).with_suffix("")
    return ".".join(p for p in rel.parts if p != "__init__")


@functools.cache
def plugin_modules() -> dict[str, Path]:
    """Every module of the package (the shipped checkpoint's files are data, not modules)."""
    return {module_name(p): p for p in ROOT.rglob("*.py") if "checkpoint" not in p.parts}


def plugin_imports(
    path: Path, type_only: bool = False, known: Collection[str] | None = None
) -> list[tuple[str, bool]]:
    """(imported plugin module, at module level) for every import in ``path``, those
    inside functions included; with ``type_only``, the imports of ``if TYPE_CHECKING:``
    blocks too. ``known``: the module names that count (default: the package's)."""
    known = plugin_modules() if known is None else known
    tree = ast.parse(path.read_text())
    skip: set[int] = set()
    for node in ast.walk(tree):  # `if TYPE_CHECKING:` blocks are not imports at run time
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= set() if type_only else {id(n) for n in ast.walk(node)}
    top = {id(n) for n in tree.body}
    out = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        names: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            if name == "vllm_recroute" or name.startswith("vllm_recroute."):
                mod = name.removeprefix("vllm_recroute").removeprefix(".")
                # the package root (register()) imports nothing at module level, so
                # `from vllm_recroute import vllm_view` imports vllm_view only
                if mod and mod in known:
                    out.append((mod, id(node) in top))
    return out


def import_graph(modules: Mapping[str, Path], type_only: bool = True) -> dict[str, set[str]]:
    """module -> the modules of ``modules`` it imports anywhere in its file (inside
    functions too; with ``type_only``, for types only too); self-imports left out."""
    return {
        m: {t for t, _ in plugin_imports(p, type_only, known=modules) if t != m}
        for m, p in modules.items()
    }


def find_cycle(graph: Mapping[str, Collection[str]]) -> list[str] | None:
    """The first cycle of ``graph`` (in sorted order) as a path ``[a, b, ..., a]``; None
    when there is none."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(path: list[str]) -> list[str] | None:
        m = path[-1]
        state[m] = 1
        for t in sorted(graph.get(m, ())):
            if state.get(t) == 1:
                return [*path[path.index(t) :], t]
            if t not in state and (found := visit([*path, t])):
                return found
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit([m])):
            return found
    return None
