"""tools/check_vllm.py's AST resolver on a tiny synthetic package (no download, no import):
inherited members, instance attributes, re-exports, star imports, signature changes."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))

import check_vllm


def _tree(root: Path, files: dict[str, str]) -> check_vllm.SourceTree:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return check_vllm.SourceTree(root)


BASE = {
    "pkg/__init__.py": "from .core import Base\nfrom .stars import *\n",
    "pkg/core.py": (
        "class Base:\n"
        "    limit = 3\n"
        "    def __init__(self):\n"
        "        self.blocks = {}\n"
        "    def step(self, request, n, shift=0):\n"
        "        return n\n"
    ),
    "pkg/child.py": (
        "from pkg.core import Base\n\nclass Child(Base):\n    def extra(self):\n        pass\n"
    ),
    "pkg/stars.py": "def helper(x):\n    return x\n",
}


def test_resolves_members_bases_instance_attributes_and_reexports(tmp_path):
    tree = _tree(tmp_path, BASE)
    assert tree.resolve("pkg.child:Child.step").signature == "self, request, n, shift=0"
    assert tree.resolve("pkg.child:Child.blocks").kind == "attribute"  # self.blocks, in Base
    assert tree.resolve("pkg.core:Base.limit").kind == "attribute"
    assert tree.resolve("pkg:Base").kind == "class"  # re-exported
    assert tree.resolve("pkg:helper").kind == "def"  # star import
    assert tree.resolve("pkg.core").kind == "module"
    for missing in ("pkg.child:Child.gone", "pkg.core:Nothing", "pkg.absent:X", "pkg:nope"):
        assert tree.resolve(missing) is None, missing


def test_reports_missing_names_and_changed_signatures(tmp_path, monkeypatch):
    old = _tree(tmp_path / "old", BASE)
    changed = dict(BASE)
    changed["pkg/core.py"] = BASE["pkg/core.py"].replace("n, shift=0", "n, budget, shift=0")
    changed["pkg/child.py"] = "from pkg.core import Base\n\nclass Renamed(Base):\n    pass\n"
    new = _tree(tmp_path / "new", changed)
    names = {"pkg.core:Base.step": "P1", "pkg.child:Child": "P2", "pkg:helper": "public"}
    monkeypatch.setattr(check_vllm, "names_to_check", lambda: names)
    monkeypatch.setattr(check_vllm, "_moved", lambda: ())
    problems = check_vllm.check(new, old)
    assert problems == [
        "missing  pkg.child:Child  (P2)",
        "changed  pkg.core:Base.step  (P1)\n"
        "    was (self, request, n, shift=0)\n"
        "    now (self, request, n, budget, shift=0)",
    ]
    assert check_vllm.check(old, old) == []


def test_a_dataclass_has_its_generated_fields(tmp_path):
    """``__dataclass_fields__`` (read to copy vLLM's AttentionGroup) exists on a
    @dataclass class although no source line writes it; not on a plain class."""
    from tools.check_vllm import SourceTree

    pkg = tmp_path / "vllm"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "m.py").write_text(
        "from dataclasses import dataclass\n\n@dataclass(eq=False)\nclass A:\n    x: int = 0\n\n"
        "class B:\n    pass\n"
    )
    tree = SourceTree(tmp_path)
    assert tree.resolve("vllm.m:A.__dataclass_fields__") is not None
    assert tree.resolve("vllm.m:B.__dataclass_fields__") is None
