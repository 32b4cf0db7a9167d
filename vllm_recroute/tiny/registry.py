"""The tiny architectures: one entry each, and the two entry points that build them.

Adding an architecture is one builder module (``build(out, preset)``) and one entry in
``TINY_ARCHS``; `tests/unit/test_tiny_registry.py` checks every entry against the routed
classes of `vllm_recroute/models/`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vllm_recroute.tiny.common import PRESETS, build_cached, cache_dir, cache_key, write_marker
from vllm_recroute.tiny.idefics3 import build as build_idefics3
from vllm_recroute.tiny.keye import build as build_keye
from vllm_recroute.tiny.minicpmv import build as build_minicpmv
from vllm_recroute.tiny.paligemma import build as build_paligemma
from vllm_recroute.tiny.phi3v import build as build_phi3v


@dataclass(frozen=True)
class TinyArch:
    """How one architecture's tiny checkpoint is built.

    ``hf_architecture`` is what the checkpoint's ``config.json`` names (the routed class
    ``Recroute<hf_architecture>`` wraps it); ``remote`` is the module of ``remote/``
    whose source the checkpoint carries (its config names it in ``auto_map``, so it is
    served with ``--trust-remote-code``), None for classes transformers ships.
    """

    name: str
    build: Callable[[Path, str], None]
    hf_architecture: str
    presets: tuple[str, ...] = ("tiny",)
    remote: str | None = None

    def cache_key(self, seed: int = 0, preset: str = "tiny") -> str:
        return cache_key(self.name, seed, preset, self.remote)


TINY_ARCHS: dict[str, TinyArch] = {
    a.name: a
    for a in (
        TinyArch("idefics3", build_idefics3, "Idefics3ForConditionalGeneration", PRESETS),
        TinyArch("paligemma", build_paligemma, "PaliGemmaForConditionalGeneration"),
        TinyArch("keye", build_keye, "KeyeForConditionalGeneration", remote="keye"),
        TinyArch("phi3v", build_phi3v, "Phi3VForCausalLM", remote="phi3v"),
        TinyArch("minicpmv", build_minicpmv, "MiniCPMV", remote="minicpmv"),
    )
}
ARCHS: tuple[str, ...] = tuple(TINY_ARCHS)


def get_arch(arch: str, preset: str = "tiny") -> TinyArch:
    """The entry of ``arch``; ValueError naming the allowed values if there is none, or if
    it has no ``preset``."""
    if arch not in TINY_ARCHS:
        raise ValueError(f"arch: got {arch!r}; allowed: {', '.join(ARCHS)}")
    if preset not in PRESETS:
        raise ValueError(f"preset: got {preset!r}; allowed: {', '.join(PRESETS)}")
    entry = TINY_ARCHS[arch]
    if preset not in entry.presets:
        allowed = ", ".join(repr(p) for p in entry.presets)
        raise ValueError(f"{arch}: only the {allowed} preset is provided")
    return entry


def build_tiny_model(
    out_dir: str | os.PathLike, arch: str = "idefics3", seed: int = 0, preset: str = "tiny"
) -> Path:
    """Write a random-weight checkpoint of `arch` to `out_dir`; same arguments, same bytes."""
    import torch

    entry = get_arch(arch, preset)
    out = Path(out_dir)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        entry.build(out, preset)
    write_marker(out, arch, seed, preset)
    return out


def cached_tiny_model(
    arch: str = "idefics3", seed: int = 0, preset: str = "tiny", root: str | None = None
) -> Path:
    """Build once into the cache (``$RECROUTE_CACHE_DIR``) and return the directory."""
    key = get_arch(arch, preset).cache_key(seed, preset)
    out = (Path(root) if root else cache_dir()) / f"{arch}-{preset}-s{seed}-{key}"
    return build_cached(out, lambda tmp: build_tiny_model(tmp, arch, seed, preset))
