"""Prometheus export of routing accounting (front-end process), names from names.py."""

from __future__ import annotations

import threading
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorPromMetrics
from vllm.v1.metrics.utils import create_metric_per_engine

from vllm_recroute.metrics.accounting import (
    GAUGES,
    MAPPINGS,
    SCALARS,
    add_into,
    empty_data,
    gauge_total,
)
from vllm_recroute.metrics.names import BY_NAME, PREFIX

# Totals observed by this front end, per engine index (GET /v1/recroute/stats).
_totals: dict[int, dict[str, Any]] = {}
_lock = threading.Lock()


def observed_totals() -> dict[int, dict[str, Any]]:
    with _lock:
        return {idx: add_into(empty_data(), data) for idx, data in _totals.items()}


class RecroutePromMetrics(KVConnectorPromMetrics):
    def __init__(self, vllm_config, metric_types, labelnames, per_engine_labelvalues):
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self._scalars = {
            key: create_metric_per_engine(self._make(key, labelnames), per_engine_labelvalues)
            for key in SCALARS
        }
        self._mapped = {key: self._make(key, labelnames) for key in MAPPINGS}
        self._gauges = {
            key: create_metric_per_engine(self._make(key, labelnames), per_engine_labelvalues)
            for key in GAUGES
        }

    def _make(self, key: str, labelnames: list[str]) -> Any:
        spec = BY_NAME[PREFIX + key]
        # A process that builds a second engine (tests, LLM re-creation) reuses the
        # registered counter: counters are per process, as Prometheus expects.
        from prometheus_client import REGISTRY

        existing = REGISTRY._names_to_collectors.get(spec.name)  # patch record P7
        if existing is not None:
            return existing
        cls = self._gauge_cls if spec.kind == "gauge" else self._counter_cls
        extra = {"multiprocess_mode": "mostrecent"} if spec.kind == "gauge" else {}
        return cls(
            **extra,
            name=spec.name,
            documentation=spec.help,
            labelnames=[*labelnames, *spec.labels],
        )

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        data = transfer_stats_data or {}
        base = self.per_engine_labelvalues[engine_idx]
        for key, children in self._scalars.items():
            if data.get(key):
                children[engine_idx].inc(data[key])
        for key, children in self._gauges.items():
            if key in data:
                children[engine_idx].set(gauge_total(data[key]))
        for key, counter in self._mapped.items():
            for label, value in (data.get(key) or {}).items():
                counter.labels(*base, *str(label).split("/")).inc(value)
        totals = {**data, **{k: gauge_total(data[k]) for k in GAUGES if k in data}}
        with _lock:
            add_into(_totals.setdefault(engine_idx, empty_data()), totals)


__all__ = ["RecroutePromMetrics", "observed_totals"]
