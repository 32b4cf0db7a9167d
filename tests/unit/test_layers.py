"""The package's rooms import downwards only, and no import forms a cycle.

LAYERS lists every module of ``vllm_recroute`` from the bottom up; a module may import
(at module level or inside a function) only from its own layer or below. Pure rooms
(routing, and kv's pure modules) import nothing from vLLM's worker side nor from the
plugin's worker/ or connector/. Checked twice: statically over every ``import`` statement
(tests/import_graph.py; TYPE_CHECKING blocks count as imports for the type-only, worker
stack and cycle checks), and by importing every module in layer order in a fresh
interpreter, which fails on a module that pulls in a higher layer. No cycle at all, inside
a layer too: function-level and type-only imports are edges of the graph.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.import_graph import (
    ROOT,
    find_cycle,
    import_graph,
    plugin_imports,
    plugin_modules,
)

LAYERS: list[list[str]] = [
    ["errors", "_compat"],
    [
        "routing",
        "routing.decision",
        "routing.reentry",
        "routing.deferral",
        "routing.rerouting",
        "routing.budget",
        "routing.schedule",
        "routing.scorers",
        "routing.settings",
        "routing.stage_numbers",
    ],
    ["config"],
    ["defaults"],
    [
        "messages",
        "requests",
        "requests.options",
        "requests.resolution",
        "metrics",
        "metrics.names",
        "metrics.accounting",
        "sched",
        "sched.chunking",
    ],
    [
        "kv",
        "kv.parked_pool",
        "kv.pages",
        "kv.turn_index",
        "kv.table_view",
        "vllm_view",
        "vllm_view.compat",
        "vllm_view.engine",
        "vllm_view.kv",
        "vllm_view.requests",
        "vllm_view.scheduler",
        "vllm_view.step",
        "tiny",
        "tiny.common",
        "tiny.idefics3",
        "tiny.paligemma",
        "tiny.keye",
        "tiny.phi3v",
        "tiny.minicpmv",
        "tiny.registry",
        "tiny.remote",
        "tiny.remote.keye",
        "tiny.remote.phi3v",
        "tiny.remote.minicpmv",
    ],
    [
        "kv.spec",
        "kv.manager",
        "metrics.stats",
        "metrics.prom",
        "requests.validation",
        "sched.scheduler",
    ],
    ["patches", "platform_patches", "engine_setup"],
    [
        "worker",
        "worker.state",
        "worker.projections",
        "worker.stage_pages",
        "worker.compaction",
        "worker.tp",
        "worker.rows",
        "worker.stage_pages",
        "worker.segments",
        "worker.layer_runs",
        "worker.parking",
        "worker.turns",
        "worker.runtime",
        "worker.step_tier",
        "worker.step",
        "worker.decoder",
    ],
    [
        "connector",
        "connector.worker",
        "connector.scheduler",
        "connector.connector",
    ],
    [
        "models",
        "models.idefics3",
        "models.paligemma",
        "models.keye",
        "models.phi3v",
        "models.minicpmv",
    ],
    [
        "cli",
        "",
        "demo",
        "demo.shapes",
        "demo.model",
        "demo.evaluate",
        "server",
        "server.launcher",
        "server.media",
        "server.endpoints",
    ],
]
# Registered for GPU hosts; importing them needs torchvision (not on this CPU host).
NOT_IMPORTABLE_HERE = ["models.qwen2_5_vl", "models.qwen3_vl", "models.llava"]
ROUTING_LAYER = next(layer for layer in LAYERS if "routing" in layer)
KV_LAYER = next(layer for layer in LAYERS if "kv" in layer)
PURE = [m for m in ROUTING_LAYER + KV_LAYER if m.startswith(("routing", "kv.")) or m == "kv"]

LAYER_OF = {m: i for i, layer in enumerate(LAYERS) for m in layer}
LAYER_OF.update({m: len(LAYERS) - 2 for m in NOT_IMPORTABLE_HERE})


def test_every_module_has_a_layer():
    missing = sorted(set(plugin_modules()) - set(LAYER_OF))
    assert not missing, f"add these modules to LAYERS: {missing}"


@pytest.mark.parametrize("module", sorted(plugin_modules()))
def test_imports_go_downwards(module):
    mine = LAYER_OF[module]
    for target, _ in plugin_imports(plugin_modules()[module]):
        assert LAYER_OF[target] <= mine, f"{module} (layer {mine}) imports {target}"


def test_type_only_imports_go_downwards_too():
    """A type-only import of a higher layer is a cycle in the design even when it is none
    at run time (routing/ names no config class: routing/settings.py)."""
    up = [
        (module, target)
        for module, path in plugin_modules().items()
        for target, _ in plugin_imports(path, type_only=True)
        if LAYER_OF[target] > LAYER_OF[module]
    ]
    assert up == []


@pytest.mark.parametrize("module", PURE)
def test_pure_rooms_do_not_reach_the_worker_or_the_connector(module):
    for target, _ in plugin_imports(plugin_modules()[module]):
        assert not target.startswith(("worker", "connector", "models", "vllm_view")), target


# The worker wing is a straight stack: each module imports only those to its right (and
# the worker's leaves), never one to its left, not even for types (docs/architecture.md).
WORKER_STACK = [
    "worker.decoder",
    "worker.step",
    "worker.step_tier",
    "worker.runtime",
    "worker.turns",
    "worker.parking",
    "worker.stage_pages",
]
WORKER_LAYER = next(layer for layer in LAYERS if "worker" in layer)
WORKER_LEAVES = [m for m in WORKER_LAYER if m.startswith("worker.") and m not in WORKER_STACK]


@pytest.mark.parametrize("module", WORKER_STACK + WORKER_LEAVES)
def test_the_worker_wing_is_a_straight_stack(module):
    allowed = set(WORKER_LEAVES) - {module}
    if module in WORKER_STACK:
        allowed |= set(WORKER_STACK[WORKER_STACK.index(module) + 1 :])
    for target, _ in plugin_imports(plugin_modules()[module], type_only=True):
        if target.startswith("worker.") or target == "worker":
            assert target in allowed, f"{module} imports {target}"


def test_no_import_cycle_even_inside_functions_or_for_types():
    """Any import is an edge: module level, inside a function, for types only; no cycle
    among the package's modules, inside a layer too."""
    cycle = find_cycle(import_graph(plugin_modules(), type_only=True))
    assert cycle is None, "import cycle: " + " -> ".join(cycle or ())


def test_layer_order_imports_in_a_fresh_interpreter():
    order = [m for layer in LAYERS for m in layer]
    code = f"""
import importlib, json, sys
order = {order!r}
layer = {json.dumps(LAYER_OF)}
bad = []
for name in order:
    importlib.import_module("vllm_recroute" + ("." + name if name else ""))
    loaded = [m.removeprefix("vllm_recroute.") for m in sys.modules
              if m.startswith("vllm_recroute.")]
    up = sorted(m for m in loaded if m in layer and layer[m] > layer[name])
    if up:
        bad.append((name, up))
        break
print(json.dumps(bad))
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_the_static_check_would_catch_an_upward_import(tmp_path):
    """Guard: the checker is not vacuous."""
    bad = tmp_path / "bad.py"
    bad.write_text("from vllm_recroute.worker.decoder import RoutedDecoder\n")
    assert plugin_imports(bad) == [("worker.decoder", True)]
    assert LAYER_OF["worker.decoder"] > LAYER_OF["routing.schedule"]


def test_the_stack_check_sees_type_onlyplugin_imports(tmp_path):
    """Guard: a back reference for types only is an import to the stack check."""
    bad = tmp_path / "bad.py"
    bad.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from vllm_recroute.worker.decoder import RoutedDecoder\n"
    )
    assert plugin_imports(bad) == []
    assert plugin_imports(bad, type_only=True) == [("worker.decoder", False)]


def test_the_cycle_finder_finds_a_planted_cycle():
    """Guard: the cycle check is not vacuous (a tiny fake graph)."""
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"x": {"a"}, "a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]
    assert find_cycle({"a": {"a"}}) == ["a", "a"]


def test_a_function_level_and_a_type_only_import_make_a_cycle(tmp_path):
    """Guard: a lazy import one way and a type-only import back are a cycle to the check."""
    lazy = tmp_path / "lazy.py"
    lazy.write_text("def f():\n    from vllm_recroute.worker.step import StepRouter\n")
    typed = tmp_path / "typed.py"
    typed.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from vllm_recroute.worker.decoder import RoutedDecoder\n"
    )
    modules = {"worker.decoder": lazy, "worker.step": typed}
    assert find_cycle(import_graph(modules, type_only=False)) is None  # run-time edges only
    cycle = find_cycle(import_graph(modules, type_only=True))
    assert cycle == ["worker.decoder", "worker.step", "worker.decoder"]


def test_every_package_is_installed_by_pyproject():
    """A room missing from pyproject's package list works in an editable install and
    breaks a wheel; list every package directory."""
    import tomllib

    pyproject = tomllib.loads((ROOT.parent / "pyproject.toml").read_text())
    listed = set(pyproject["tool"]["setuptools"]["packages"])
    dirs = {
        ".".join(("vllm_recroute", *p.parent.relative_to(ROOT).parts))
        for p in ROOT.rglob("__init__.py")
        if "checkpoint" not in p.parts
    }
    assert dirs - listed == set()


def test_every_entry_point_resolves():
    """pyproject's console script and vLLM plugin entry points name objects that exist (the
    endpoint plugin's `vllm_recroute.server.endpoints` included)."""
    import importlib

    import tomllib

    project = tomllib.loads((ROOT.parent / "pyproject.toml").read_text())["project"]
    groups = {"scripts": project["scripts"], **project["entry-points"]}
    targets = [(g, v) for g, eps in groups.items() for v in eps.values()]
    assert ("vllm.endpoint_plugins", "vllm_recroute.server.endpoints:RecrouteEndpoints") in targets
    for group, value in targets:
        module, _, attr = value.partition(":")
        obj = importlib.import_module(module)
        for name in attr.split("."):
            obj = getattr(obj, name)
        assert callable(obj), (group, value)


def test_register_does_not_load_the_server():
    """vLLM calls register() in every process; the serving surface (launcher, endpoint
    plugin, P8) loads only in `vllm-recroute serve` and through VLLM_PLUGINS. Every other
    module is in a lower layer than server/ (so cannot import it); the package root, in
    server/'s layer, must not either."""
    assert LAYER_OF["server.endpoints"] == LAYER_OF[""] == len(LAYERS) - 1
    assert max(LAYER_OF[m] for m in LAYER_OF if m not in LAYERS[-1]) < LAYER_OF["server"]
    root = [t for t, _ in plugin_imports(ROOT / "__init__.py")]
    assert root and not [t for t in root if t == "server" or t.startswith("server.")], root
