"""vLLM symbols that moved between the supported releases, looked up in one place.

Each entry of :data:`MOVED` lists a symbol's modules newest release first; the lookup takes
the first that has it. ``tests/unit/test_patches.py`` and ``tools/check_vllm.py`` check that
every entry resolves in one of its modules, on the installed vLLM and on a candidate wheel.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from functools import cache
from typing import Any

__all__ = ["MOVED", "Moved", "get_kv_cache_groups", "moved_symbol"]


@dataclass(frozen=True)
class Moved:
    name: str
    modules: tuple[str, ...]  # newest release first


MOVED: tuple[Moved, ...] = (
    # 0.33 split KV-cache planning out of kv_cache_utils.
    Moved(
        "get_kv_cache_groups",
        ("vllm.v1.core.kv_cache_planning", "vllm.v1.core.kv_cache_utils"),
    ),
)


@cache
def moved_symbol(name: str) -> Any:
    """The symbol ``name`` of :data:`MOVED` from the first of its modules that has it."""
    entry = next(m for m in MOVED if m.name == name)
    for module in entry.modules:
        try:
            found = getattr(importlib.import_module(module), name, None)
        except ModuleNotFoundError:
            continue
        if found is not None:
            return found
    raise ImportError(f"vLLM has no {name} in any of {', '.join(entry.modules)}")


def get_kv_cache_groups(vllm_config: Any, kv_cache_spec: dict[str, Any]) -> list[Any]:
    """vLLM's layer grouping (0.33: ``kv_cache_planning``, 0.32: ``kv_cache_utils``)."""
    return moved_symbol("get_kv_cache_groups")(vllm_config, kv_cache_spec)
