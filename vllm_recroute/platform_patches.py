"""Patches of vLLM's CPU platform behaviour (records P10 and P12 in patches.py).

Kept apart from patches.py, which holds the record and the runner patches: these two
only concern how vLLM sets up a CPU host (thread binding, a CUDA-only call).
"""

from __future__ import annotations

import functools
from typing import Any

__all__ = ["apply_cpu_torch_shims", "apply_thread_policy"]


def apply_cpu_torch_shims() -> None:
    """P12 (idempotent; CPU-only torch builds only): ``torch.cuda.is_current_stream_capturing``
    answers False instead of raising. vLLM's MiniCPM-V resampler (``Resampler2_5.forward``)
    asks it unguarded, so on a torch built without CUDA the model cannot run at all, plain
    or routed; a stream that does not exist is not capturing."""
    import torch

    if torch.version.cuda is not None or getattr(torch.version, "hip", None) is not None:
        return
    if getattr(torch.cuda.is_current_stream_capturing, "__recroute_patched__", False):
        return

    def is_current_stream_capturing() -> bool:
        return False

    is_current_stream_capturing.__recroute_patched__ = True  # type: ignore[attr-defined]
    torch.cuda.is_current_stream_capturing = is_current_stream_capturing
    torch.cuda.graphs.is_current_stream_capturing = is_current_stream_capturing


def apply_thread_policy(connector_name: str) -> None:
    """Apply P10 (idempotent): the plugin's own connector reserves no CPU for itself."""
    try:
        from vllm.utils.ompmultiprocessing import OMPProcessManager
    except ImportError:  # no CPU thread binding in this vLLM build
        return
    original = OMPProcessManager.__init__
    if getattr(original, "__recroute_patched__", False):
        return

    @functools.wraps(original)
    def __init__(self, config: Any) -> None:
        kv = config.kv_transfer_config
        if kv is None or kv.kv_connector != connector_name:
            original(self, config)
            return
        # vLLM reads only `kv_transfer_config is not None` here; hiding it for the call
        # gives the binding plain vLLM would choose. The config is restored at once.
        config.kv_transfer_config = None
        try:
            original(self, config)
        finally:
            config.kv_transfer_config = kv

    __init__.__recroute_patched__ = True  # type: ignore[attr-defined]
    OMPProcessManager.__init__ = __init__
