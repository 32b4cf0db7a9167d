"""Routing counters as a plain dict (no vLLM import): totals and per-step deltas share it.

Scalars are sums; gauges are levels (latest wins); mappings are sums per label key
(``"mode/schedule"``, stage index as a string). The dict is what travels as
`KVConnectorStats.data` (see stats.py).
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
    "parked_blocks",
    "restored_blocks",
    "parked_blocks_dropped",
    "parked_blocks_freed",
    "turn_saves",
    "turn_loads",
    "turn_loaded_tokens",
)
MAPPINGS = ("routed_requests", "stage_visual_tokens", "stage_active_visual_tokens")
# Levels, not sums: the latest value wins (the parked pool's fill, per worker).
GAUGES = ("parked_pool_blocks", "parked_pool_bytes", "turn_store_entries", "turn_store_bytes")


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
    for k in GAUGES:
        if k in src:
            dst[k] = src[k]
    return dst


def is_empty(data: dict[str, Any]) -> bool:
    return not any(data.get(k) for k in (*SCALARS, *MAPPINGS)) and not any(
        k in data for k in GAUGES
    )
