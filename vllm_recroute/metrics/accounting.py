"""Routing counters as a plain dict (no vLLM import): totals and per-step deltas share it.

Scalars are sums; gauges are levels (latest wins); mappings are sums per label key
(``"mode/schedule"``, stage index as a string). The dict is what travels as
`KVConnectorStats.data` (see stats.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from vllm_recroute.metrics.names import METRICS, PREFIX
from vllm_recroute.routing.stage_numbers import spec_stage

# Kinds come from the one list of metrics (names.py): a counter without labels is a scalar
# sum, a labelled counter a mapping of sums, a gauge a level.
_KEYS = [(m.name.removeprefix(PREFIX), m) for m in METRICS]
SCALARS = tuple(k for k, m in _KEYS if m.kind == "counter" and not m.labels)
MAPPINGS = tuple(k for k, m in _KEYS if m.kind == "counter" and m.labels)
GAUGES = tuple(k for k, m in _KEYS if m.kind == "gauge")
# Every name a delta may carry: the metrics of names.py without their prefix.
KEYS: tuple[str, ...] = (*SCALARS, *MAPPINGS, *GAUGES)
_KNOWN = frozenset(KEYS)


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
            dst[k] = _merge_gauge(dst.get(k), src[k])
    return dst


def _merge_gauge(old: Any, new: Any) -> Any:
    """Latest wins, per rank when levels are per rank (``{rank: level}``, see
    ``per_rank``): tensor-parallel ranks each report their own pool in the same step."""
    if isinstance(new, dict):
        return {**(old if isinstance(old, dict) else {}), **new}
    return new


def per_rank(data: dict[str, Any], rank: int, counters: bool) -> dict[str, Any]:
    """A worker's drained delta as it travels: gauges keyed by its rank; counters only
    from the rank that reports them (all ranks take the same decisions: no doubles)."""
    out = dict(data) if counters else {k: data[k] for k in GAUGES if k in data}
    for k in GAUGES:
        if k in out:
            out[k] = {str(rank): out[k]}
    return out


def gauge_total(level: Any) -> int:
    """The engine's level of a gauge: the sum over its ranks' latest levels."""
    return sum(level.values()) if isinstance(level, dict) else int(level or 0)


def is_empty(data: dict[str, Any]) -> bool:
    return not any(data.get(k) for k in (*SCALARS, *MAPPINGS)) and not any(
        k in data for k in GAUGES
    )


class LedgerKey:
    """Named handles of the keys in ``KEYS`` (for recording sites;
    tests/unit/test_ledger.py checks they are the same set)."""

    CHUNKED_FALLBACKS = "chunked_fallbacks"
    DECODER_FLOPS_SAVED = "decoder_flops_saved"
    DEFERRED_VISUAL_TOKEN_LAYERS = "deferred_visual_token_layers"
    KV_BLOCKS_RELEASED = "kv_blocks_released"
    KV_BLOCKS_RELEASED_AFTER_FORWARD = "kv_blocks_released_after_forward"
    KV_BYTES_SAVED = "kv_bytes_saved"
    PARKED_BLOCKS = "parked_blocks"
    PARKED_BLOCKS_DROPPED = "parked_blocks_dropped"
    PARKED_BLOCKS_FREED = "parked_blocks_freed"
    PARKED_POOL_BLOCKS = "parked_pool_blocks"
    PARKED_POOL_BYTES = "parked_pool_bytes"
    RESTORED_BLOCKS = "restored_blocks"
    ROUTED_REQUESTS = "routed_requests"
    ROUTING_EXTRA_FLOPS = "routing_extra_flops"
    STAGE_ACTIVE_VISUAL_TOKENS = "stage_active_visual_tokens"
    STAGE_RETURNED_VISUAL_TOKENS = "stage_returned_visual_tokens"
    STAGE_VISUAL_TOKENS = "stage_visual_tokens"
    TURN_LOADED_TOKENS = "turn_loaded_tokens"
    TURN_LOADS = "turn_loads"
    TURN_SAVES = "turn_saves"
    TURN_STORE_BYTES = "turn_store_bytes"
    TURN_STORE_ENTRIES = "turn_store_entries"
    VISUAL_TOKEN_LAYERS = "visual_token_layers"
    VISUAL_TOKENS = "visual_tokens"


class Ledger:
    """A worker's routing accounting: ``totals`` since start (tests, /stats) and the delta
    not yet reported to the front end (drained by the connector each step)."""

    def __init__(self) -> None:
        self.totals = empty_data()
        self._pending = empty_data()

    def record(self, *deltas: dict[str, Any]) -> None:
        """Add counter deltas and set gauges (later arguments win for a gauge). A key not
        in ``KEYS`` is a ``ValueError`` naming it (it would otherwise be dropped silently)."""
        for delta in deltas:
            if not delta:
                continue
            unknown = sorted(set(delta) - _KNOWN)
            if unknown:
                raise ValueError(
                    f"vllm-recroute: Ledger.record: unknown key(s) {unknown}; a key is a "
                    f"metric of metrics/names.py without its prefix: {', '.join(KEYS)}"
                )
            add_into(self.totals, delta)
            add_into(self._pending, delta)

    def drain(self) -> dict[str, Any]:
        out, self._pending = self._pending, empty_data()
        return out


# -- what one routed prompt adds (worker/runtime.py) ---------------------------------------
# The ledger keys the routing decision writes (handles of ``LedgerKey`` above; each in
# SCALARS or MAPPINGS, checked by tests/unit/test_prompt_delta.py).
ROUTED_PROMPT_KEYS = (
    LedgerKey.ROUTED_REQUESTS,  # {"mode/schedule": requests}
    LedgerKey.VISUAL_TOKENS,
    LedgerKey.VISUAL_TOKEN_LAYERS,
    LedgerKey.DEFERRED_VISUAL_TOKEN_LAYERS,
    LedgerKey.DECODER_FLOPS_SAVED,
    LedgerKey.KV_BYTES_SAVED,
    LedgerKey.STAGE_VISUAL_TOKENS,  # {"stage": tokens}
    LedgerKey.STAGE_ACTIVE_VISUAL_TOKENS,  # {"stage": tokens}
    LedgerKey.STAGE_RETURNED_VISUAL_TOKENS,  # {"stage": tokens}, stages after the first
    LedgerKey.ROUTING_EXTRA_FLOPS,
    LedgerKey.CHUNKED_FALLBACKS,  # prompts split by chunked prefill: unrouted
)


def routed_prompt_delta(
    label: str,
    visual: int,
    num_layers: int,
    stage_layers: Sequence[int],
    deferred: Sequence[int],
    cost: tuple[int, int],
    returned: Sequence[int] = (),
    extra_flops: int = 0,
) -> dict[str, Any]:
    """One routed prompt's delta: ``label`` "mode/schedule"; ``visual`` its visual tokens;
    per routed stage its layer count and deferred tokens; ``cost``: FLOPs and K/V bytes
    one token spends in one decoder layer (estimates); ``returned``: per stage after the
    first, its active tokens the stage before deferred; ``extra_flops``: what the routing
    options added (re-entry updates)."""
    deferred_layers = sum(d * n for n, d in zip(stage_layers, deferred, strict=True))
    flops, kv_bytes = cost
    return {
        LedgerKey.ROUTED_REQUESTS: {label: 1},
        LedgerKey.VISUAL_TOKENS: visual,
        LedgerKey.VISUAL_TOKEN_LAYERS: visual * num_layers,
        LedgerKey.DEFERRED_VISUAL_TOKEN_LAYERS: deferred_layers,
        LedgerKey.DECODER_FLOPS_SAVED: flops * deferred_layers,
        LedgerKey.KV_BYTES_SAVED: kv_bytes * deferred_layers,
        LedgerKey.STAGE_VISUAL_TOKENS: {str(spec_stage(k)): visual for k in range(len(deferred))},
        LedgerKey.STAGE_ACTIVE_VISUAL_TOKENS: {
            str(spec_stage(k)): visual - d for k, d in enumerate(deferred)
        },
        LedgerKey.STAGE_RETURNED_VISUAL_TOKENS: {
            str(spec_stage(k + 1)): r for k, r in enumerate(returned)
        },
        LedgerKey.ROUTING_EXTRA_FLOPS: extra_flops,
    }
