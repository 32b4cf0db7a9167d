"""What the connector carries between scheduler and workers each step."""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorMetadata,
    KVConnectorWorkerMetadata,
)

from vllm_recroute.kv.manager import ReleasedBlocks
from vllm_recroute.kv.turn_index import TurnLoad, TurnSave

__all__ = ["DeferredReport", "RecrouteMetadata"]


@dataclass
class RecrouteMetadata(KVConnectorMetadata):
    """Scheduler -> worker, per step: pages released by routed-stage groups (kv_release)
    and later-turn jobs, run by the worker in the order evictions, saves, loads."""

    released: list[ReleasedBlocks] = field(default_factory=list)
    turn_evictions: list[int] = field(default_factory=list)  # kv/turn_index turn ids
    turn_saves: list[TurnSave] = field(default_factory=list)
    turn_loads: list[TurnLoad] = field(default_factory=list)


@dataclass
class DeferredReport(KVConnectorWorkerMetadata):
    """Worker -> scheduler, per step: request -> {stage: deferred tokens} (kv_release)."""

    deferred: dict[str, dict[int, int]] = field(default_factory=dict)

    def aggregate(self, other: KVConnectorWorkerMetadata) -> DeferredReport:
        # Tensor-parallel ranks take identical decisions: the union is any one of them.
        if isinstance(other, DeferredReport):
            for req, per_stage in other.deferred.items():
                self.deferred.setdefault(req, per_stage)
        return self
