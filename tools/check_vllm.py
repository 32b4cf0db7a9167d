"""Check a vLLM release against the patch record without installing or importing it.

    python tools/check_vllm.py 0.33.0        (make check-vllm VERSION=0.33.0)

Downloads that release's wheel without dependencies (cached in .cache/), reads its Python
sources by AST, and resolves every target of ``vllm_recroute.patches.PATCHES``, every
public API of ``PUBLIC_APIS``, every vLLM import of the plugin and every moved symbol of
``vllm_view.compat.MOVED``. Prints what is missing, and every function target whose
arguments differ from the installed vLLM's (wrapped and overridden methods must keep them).
Exit status 1 when anything is missing or changed.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache"


@dataclass(frozen=True)
class Found:
    kind: str  # "module", "class", "def", "attribute"
    signature: str | None = None  # a def's arguments, unparsed


class SourceTree:
    """A package tree read by AST: ``root`` holds ``vllm/`` (or any top package)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._trees: dict[str, ast.Module | None] = {}

    def module(self, name: str) -> ast.Module | None:
        if name not in self._trees:
            base = self.root / name.replace(".", "/")
            path = next(
                (p for p in (base.with_suffix(".py"), base / "__init__.py") if p.is_file()), None
            )
            self._trees[name] = ast.parse(path.read_text()) if path else None
        return self._trees[name]

    def resolve(self, target: str) -> Found | None:
        module, _, attrs = target.partition(":")
        if self.module(module) is None:
            return None
        return self._in_module(module, attrs.split("."), 0) if attrs else Found("module")

    def _in_module(self, module: str, names: list[str], depth: int) -> Found | None:
        tree = self.module(module)
        if tree is None or depth > 8:
            return None
        node = _top_level(tree, names[0])
        if isinstance(node, tuple):  # imported: follow it
            source = self._absolute(module, node)
            return self._in_module(source, [node[1], *names[1:]], depth + 1)
        if node is None:  # from .x import *
            for star in _star_imports(tree):
                found = self._in_module(self._absolute(module, star), names, depth + 1)
                if found is not None:
                    return found
        if node is None and self.module(f"{module}.{names[0]}") is not None:
            sub = f"{module}.{names[0]}"
            return self._in_module(sub, names[1:], depth + 1) if names[1:] else Found("module")
        if node is None:
            return None
        if len(names) == 1:
            return _found(node)
        if isinstance(node, ast.ClassDef):
            return self._in_class(module, node, names[1:], depth)
        return None

    def _absolute(self, module: str, imported: tuple) -> str:
        level, _, source = imported
        if not level:
            return source
        package = (self.root / module.replace(".", "/") / "__init__.py").is_file()
        parts = module.split(".")
        parts = parts[: len(parts) - level + (1 if package else 0)]
        return ".".join([*parts, source] if source else parts)

    def _in_class(
        self, module: str, cls: ast.ClassDef, names: list[str], depth: int
    ) -> Found | None:
        member = _class_member(cls, names[0])
        if member is not None:
            if len(names) == 1:
                return _found(member)
            return (
                self._in_class(module, member, names[1:], depth)
                if isinstance(member, ast.ClassDef)
                else None
            )
        for base in cls.bases:
            base_name = _base_name(base)
            if base_name is None:
                continue
            found = self._in_module(module, [base_name, *names], depth + 1)
            if found is not None:
                return found
        return None


def _top_level(tree: ast.Module, name: str) -> ast.AST | tuple | None:
    found = None
    for node in _top_nodes(tree):
        if (
            (
                isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                and node.name == name
            )
            or (
                isinstance(node, ast.Assign)
                and any(getattr(t, "id", None) == name for t in node.targets)
            )
            or (isinstance(node, ast.AnnAssign) and getattr(node.target, "id", None) == name)
        ):
            found = node
        elif isinstance(node, ast.ImportFrom):
            for a in node.names:
                if (a.asname or a.name) == name:
                    found = (node.level, a.name, node.module)
    return found


def _top_nodes(tree: ast.Module):
    """Module-level statements, those under ``if``/``try`` included (guarded imports)."""
    stack = list(tree.body)
    while stack:
        node = stack.pop(0)
        if isinstance(node, (ast.If, ast.Try)):
            stack[:0] = [*node.body, *getattr(node, "orelse", []), *getattr(node, "finalbody", [])]
            for h in getattr(node, "handlers", []):
                stack[:0] = h.body
            continue
        yield node


def _star_imports(tree: ast.Module) -> list[tuple]:
    return [
        (n.level, "*", n.module)
        for n in _top_nodes(tree)
        if isinstance(n, ast.ImportFrom) and any(a.name == "*" for a in n.names)
    ]


def _class_member(cls: ast.ClassDef, name: str) -> ast.AST | None:
    if name == "__dataclass_fields__" and any(_is_dataclass(d) for d in cls.decorator_list):
        return cls  # made by @dataclass, not written in the source
    for node in cls.body:
        if (
            isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
            and node.name == name
        ):
            return node
        if isinstance(node, ast.Assign) and any(
            getattr(t, "id", None) == name for t in node.targets
        ):
            return node
        if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", None) == name:
            return node
    for node in ast.walk(cls):  # instance attributes: self.name = ... in any method
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        for t in targets:
            if (
                isinstance(t, ast.Attribute)
                and t.attr == name
                and getattr(t.value, "id", None) == "self"
            ):
                return node
    return None


def _is_dataclass(decorator: ast.expr) -> bool:
    func = decorator.func if isinstance(decorator, ast.Call) else decorator
    return getattr(func, "id", getattr(func, "attr", None)) == "dataclass"


def _base_name(base: ast.expr) -> str | None:
    if isinstance(base, ast.Subscript):  # Generic[T], AttentionImplBase[T]
        base = base.value
    return base.id if isinstance(base, ast.Name) else None


def _found(node: ast.AST) -> Found:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        return Found("def", ast.unparse(node.args))
    return Found("class" if isinstance(node, ast.ClassDef) else "attribute")


# ------------------------------------------------------------------ what to check


def names_to_check() -> dict[str, str]:
    """Every vLLM name the plugin depends on -> where it comes from."""
    sys.path.insert(0, str(ROOT))
    from vllm_recroute.patches import PATCHES, PUBLIC_APIS

    out: dict[str, str] = {}
    for p in PATCHES:
        for t in p.targets:
            if t.split(":")[0].split(".")[0] == "vllm":
                out.setdefault(t, p.id)
    for t in PUBLIC_APIS:
        out.setdefault(t, "public")
    for name in plugin_imports():
        out.setdefault(name, "import")
    return out


def plugin_imports() -> set[str]:
    found: set[str] = set()
    for path in (ROOT / "vllm_recroute").rglob("*.py"):  # its server/ included
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and _vllm(node.module):
                found |= {f"{node.module}:{a.name}" for a in node.names}
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names if _vllm(a.name)}
    return found


def _vllm(module: str | None) -> bool:
    return module is not None and (module == "vllm" or module.startswith("vllm."))


def check(candidate: SourceTree, installed: SourceTree) -> list[str]:
    """Problems of ``candidate`` against the record (and ``installed``, for signatures)."""
    problems = []
    for name, source in sorted(names_to_check().items()):
        got = candidate.resolve(name)
        if got is None:
            problems.append(f"missing  {name}  ({source})")
            continue
        before = installed.resolve(name)
        was = before.signature if before else None
        if got.signature and was and was != got.signature:
            problems.append(
                f"changed  {name}  ({source})\n    was ({was})\n    now ({got.signature})"
            )
    for moved in _moved():
        if not any(candidate.resolve(f"{m}:{moved.name}") for m in moved.modules):
            problems.append(f"missing  {moved.name} in any of {moved.modules}  (vllm_view.compat)")
    return problems


def _moved() -> tuple:
    sys.path.insert(0, str(ROOT))
    from vllm_recroute.vllm_view.compat import MOVED

    return MOVED


# ------------------------------------------------------------------ the wheel


def wheel_sources(version: str) -> Path:
    """The release's Python sources, from its wheel (downloaded once into .cache/)."""
    src = CACHE / f"vllm-{version}-src"
    if (src / "vllm" / "__init__.py").is_file():
        return src
    wheels = CACHE / "wheels"
    wheel = next(iter(wheels.glob(f"vllm-{version}-*.whl")), None)
    if wheel is None:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                f"vllm=={version}",
                "-d",
                str(wheels),
            ],
            check=True,
        )
        wheel = next(wheels.glob(f"vllm-{version}-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        z.extractall(src, [n for n in z.namelist() if n.startswith("vllm/") and n.endswith(".py")])
    return src


def installed_sources() -> Path:
    import importlib.util

    return Path(importlib.util.find_spec("vllm").origin).parents[1]


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__)
        return 2
    version = argv[0]
    candidate, installed = SourceTree(wheel_sources(version)), SourceTree(installed_sources())
    n = len(names_to_check())
    problems = check(candidate, installed)
    print(f"vLLM {version}: {n} names (record targets, public APIs, plugin imports) checked by AST")
    for p in problems:
        print("  " + p)
    print(
        "nothing missing, no signature changed" if not problems else f"{len(problems)} problem(s)"
    )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
