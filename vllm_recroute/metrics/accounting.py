"""Routing counters as a plain dict (no vLLM import): totals and per-step deltas share it.

Scalars are sums; mappings are sums per label key (``"mode/schedule"``, stage index as a
string). The dict is what travels as `KVConnectorStats.data` (see stats.py).
"""

from __future__ import annotations

from typing import Any

SCALARS = (
    "chunked_fallbacks",
    "visual_tokens",
    "visual_token_layers",
    "deferred_visual_token_layers",
    "decoder_flops_saved",
    "kv_bytes_saved",
    "kv_blocks_released",
)
MAPPINGS = ("routed_requests", "stage_visual_tokens", "stage_active_visual_tokens")


def empty_data() -> dict[str, Any]:
    return {**{k: 0 for k in SCALARS}, **{k: {} for k in MAPPINGS}}


def add_into(dst: dict[str, Any], src: dict[str, Any]) -> dict[str, Any]:
    """dst += src, key by key; returns dst."""
    for k in SCALARS:
        dst[k] = dst.get(k, 0) + src.get(k, 0)
    for k in MAPPINGS:
        out = dst.setdefault(k, {})
        for key, v in (src.get(k) or {}).items():
            out[str(key)] = out.get(str(key), 0) + v
    return dst


def is_empty(data: dict[str, Any]) -> bool:
    return not any(data.get(k) for k in (*SCALARS, *MAPPINGS))
