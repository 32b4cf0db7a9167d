"""Routing counters as a plain dict (no vLLM import): totals and per-step deltas share it.

Scalars are sums; gauges are levels (latest wins); mappings are sums per label key
(``"mode/schedule"``, stage index as a string). The dict is what travels as
`KVConnectorStats.data` (see stats.py).
"""

from __future__ import annotations

from typing import Any

from vllm_recroute.metrics.names import METRICS, PREFIX

# Kinds come from the one list of metrics (names.py): a counter without labels is a scalar
# sum, a labelled counter a mapping of sums, a gauge a level.
_KEYS = [(m.name.removeprefix(PREFIX), m) for m in METRICS]
SCALARS = tuple(k for k, m in _KEYS if m.kind == "counter" and not m.labels)
MAPPINGS = tuple(k for k, m in _KEYS if m.kind == "counter" and m.labels)
GAUGES = tuple(k for k, m in _KEYS if m.kind == "gauge")


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


class Ledger:
    """A worker's routing accounting: ``totals`` since start (tests, /stats) and the delta
    not yet reported to the front end (drained by the connector each step)."""

    def __init__(self) -> None:
        self.totals = empty_data()
        self._pending = empty_data()

    def record(self, *deltas: dict[str, Any]) -> None:
        """Add counter deltas and set gauges (later arguments win for a gauge)."""
        for delta in deltas:
            if delta:
                add_into(self.totals, delta)
                add_into(self._pending, delta)

    def drain(self) -> dict[str, Any]:
        out, self._pending = self._pending, empty_data()
        return out
