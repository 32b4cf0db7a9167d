"""Plugin registration, the version gate, and the routed classes that cannot be imported
on this CPU host (Qwen2.5-VL, LLaVA need torchvision): checked by source inspection."""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
from pathlib import Path

import pytest

from vllm_recroute.models import ROUTED_ARCHITECTURES, ROUTED_FOR_HF_ARCH


def test_entry_point_is_declared():
    eps = importlib.metadata.entry_points(group="vllm.general_plugins")
    assert {ep.name: ep.value for ep in eps}["recroute"] == "vllm_recroute:register"


def test_register_is_idempotent_and_registers_every_arch():
    from vllm import ModelRegistry
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    import vllm_recroute

    vllm_recroute.register()
    vllm_recroute.register()
    supported = set(ModelRegistry.get_supported_archs())
    assert set(ROUTED_ARCHITECTURES) <= supported
    assert set(ROUTED_ARCHITECTURES) <= set(MODELS_CONFIG_MAP)


@pytest.mark.parametrize("arch", sorted(ROUTED_ARCHITECTURES))
def test_routed_class_source(arch):
    """Every routed class subclasses the vLLM class it is named after and installs the
    routed decoder on a text model: verified without importing (torchvision-free host)."""
    module, cls_name = ROUTED_ARCHITECTURES[arch].split(":")
    assert cls_name == arch
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin
    tree = ast.parse(Path(spec.origin).read_text())
    classes = {n.name: n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)}
    node = classes[arch]
    base = arch.removeprefix("Recroute")
    assert [b.id for b in node.bases if isinstance(b, ast.Name)] == [base]
    imports = {
        alias.name: n.module
        for n in ast.walk(tree)
        if isinstance(n, ast.ImportFrom)
        for alias in n.names
    }
    assert imports[base].startswith("vllm.model_executor.models.")
    calls = [n for n in ast.walk(node) if isinstance(n, ast.Call)]
    assert any(getattr(c.func, "id", None) == "RoutedDecoder" for c in calls)
    assert ROUTED_FOR_HF_ARCH[base] == arch
    # the vLLM base class exists in the installed vLLM's source (without importing it)
    vllm_spec = importlib.util.find_spec(imports[base])
    assert f"class {base}(" in Path(vllm_spec.origin).read_text()
