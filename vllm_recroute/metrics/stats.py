"""Routing accounting that travels worker -> scheduler -> front end.

vLLM carries a KV connector's `KVConnectorStats.data` (a plain dict) from each worker's
`ModelRunnerOutput` through `SchedulerStats.kv_connector_stats` to the front end's stat
loggers, where `build_kv_connector_stats` rebuilds it. `RouteStats` is that dict of
counter *deltas* for one step; `aggregate` sums, so any interval sums correctly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats

from vllm_recroute.metrics.accounting import SCALARS, add_into, empty_data, is_empty


@dataclass
class RouteStats(KVConnectorStats):
    data: dict[str, Any] = field(default_factory=empty_data)

    def reset(self) -> None:
        self.data = empty_data()

    def aggregate(self, other: KVConnectorStats) -> RouteStats:
        add_into(self.data, other.data)
        return self

    def reduce(self) -> dict[str, int | float]:
        out: dict[str, int | float] = {k: self.data.get(k, 0) for k in SCALARS}
        out["routed_requests"] = sum((self.data.get("routed_requests") or {}).values())
        return out

    def is_empty(self) -> bool:
        return is_empty(self.data)
