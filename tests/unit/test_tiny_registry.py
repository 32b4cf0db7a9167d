"""The tiny checkpoints' registry: one entry per routed architecture this host runs, each
checkpoint naming its routed class and its remote code; cache keys (and so the cache
directories of earlier builds) stable; the package's modules free of import cycles and
of private names imported across."""

from __future__ import annotations

import ast
import hashlib
import json
import re

import pytest

from tests.import_graph import find_cycle, import_graph, plugin_modules
from tests.unit.test_layers import NOT_IMPORTABLE_HERE
from vllm_recroute.cli import remote_code_files
from vllm_recroute.models import ROUTED_ARCHITECTURES
from vllm_recroute.tiny import ARCHS, PRESETS, TINY_ARCHS, cached_tiny_model, get_arch
from vllm_recroute.tiny.common import FORMAT_VERSION, remote_source


def test_registry_is_the_routed_architectures_this_host_runs():
    gpu_only = {
        name
        for name, target in ROUTED_ARCHITECTURES.items()
        if target.split(":")[0].removeprefix("vllm_recroute.") in NOT_IMPORTABLE_HERE
    }
    routed = {"Recroute" + e.hf_architecture for e in TINY_ARCHS.values()}
    assert routed == set(ROUTED_ARCHITECTURES) - gpu_only
    assert tuple(TINY_ARCHS) == ARCHS and all(n == e.name for n, e in TINY_ARCHS.items())


@pytest.mark.parametrize("arch", ARCHS)
def test_checkpoint_names_its_architecture_and_its_remote_code(arch):
    entry = TINY_ARCHS[arch]
    model = cached_tiny_model(arch)
    config = json.loads((model / "config.json").read_text())
    assert config["architectures"] == [entry.hf_architecture]
    assert bool(remote_code_files(model)) == (entry.remote is not None)
    if entry.remote is not None:  # the copy is the source the cache key digests
        copied = model / f"recroute_{entry.remote}.py"
        assert copied.read_bytes() == remote_source(entry.remote).read_bytes()


@pytest.mark.parametrize(
    ("arch", "seed", "preset", "key"),
    [
        ("idefics3", 0, "tiny", "a002d32eb4"),
        ("idefics3", 1, "tiny", "04357194db"),
        ("idefics3", 0, "smolvlm-256m", "b98424f7ed"),
        ("paligemma", 0, "tiny", "1446027dae"),
    ],
)
def test_cache_key_of_native_checkpoints_is_stable(arch, seed, preset, key):
    assert TINY_ARCHS[arch].cache_key(seed, preset) == key


@pytest.mark.parametrize("arch", [a for a in ARCHS if TINY_ARCHS[a].remote])
def test_cache_key_of_remote_checkpoints_is_the_digest_of_the_source_bytes(arch):
    """Not of where the module lives: moving `remote/` keeps the cached directories."""
    digest = hashlib.sha1(remote_source(arch).read_bytes()).hexdigest()
    text = f"{arch}-0-tiny-{FORMAT_VERSION}-{digest}"
    assert TINY_ARCHS[arch].cache_key(0, "tiny") == hashlib.sha1(text.encode()).hexdigest()[:10]
    assert FORMAT_VERSION == 4  # bumping it rebuilds every cached checkpoint


def test_presets_and_their_errors():
    assert set(TINY_ARCHS["idefics3"].presets) == set(PRESETS)
    for entry in TINY_ARCHS.values():
        assert "tiny" in entry.presets and set(entry.presets) <= set(PRESETS)
    with pytest.raises(ValueError, match=r"arch: got 'nope'; allowed: idefics3, paligemma"):
        get_arch("nope")
    with pytest.raises(ValueError, match=r"preset: got 'big'; allowed: tiny, smolvlm-256m"):
        get_arch("idefics3", "big")
    with pytest.raises(ValueError, match=r"keye: only the 'tiny' preset is provided"):
        get_arch("keye", "smolvlm-256m")


TINY = sorted(m for m in plugin_modules() if m == "tiny" or m.startswith("tiny."))


def test_no_import_cycle_in_the_package_even_inside_functions():
    modules = plugin_modules()
    cycle = find_cycle(import_graph({m: modules[m] for m in TINY}))
    assert cycle is None, "import cycle: " + " -> ".join(cycle or ())


@pytest.mark.parametrize("module", TINY)
def test_no_private_name_is_imported_across_modules(module):
    tree = ast.parse(plugin_modules()[module].read_text())
    private = [
        f"{node.module}.{a.name}"
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("vllm_recroute")
        for a in node.names
        if re.match(r"_[^_]", a.name)
    ]
    assert not private, private
