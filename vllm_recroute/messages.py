"""What crosses between the scheduler and the workers each step: one pure module.

No vLLM, no torch: the scheduler side (connector/scheduler.py, kv/manager.py,
kv/turn_index.py) builds these, the worker side (connector/worker.py, worker/) reads them,
and tests build them by hand.

    scheduler -> worker   RecrouteMetadata (vLLM's connector metadata, in SchedulerOutput):
                          ReleasedBlocks events (kv_release), turn evictions, TurnSave,
                          TurnLoad (later turns), run in that order
    worker -> scheduler   DeferredReport (vLLM's connector worker metadata, in
                          ModelRunnerOutput): request -> {stage: deferred tokens}

vLLM's base classes (``KVConnectorMetadata``, ``KVConnectorWorkerMetadata``: abstract, no
state) are attached in connector/connector.py (``ABC.register``), which imports vLLM.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["DeferredReport", "RecrouteMetadata", "ReleasedBlocks", "TurnLoad", "TurnSave"]


@dataclass(frozen=True)
class ReleasedBlocks:
    """Blocks of one request returned to the pool by one stage group (scheduler -> worker).

    ``row_indices[i]`` is the index in the worker's block-table row that held
    ``block_ids[i]``; the worker must not read or write those entries again.
    """

    request_id: str
    kv_cache_group_id: int
    stage: int
    row_indices: tuple[int, ...]
    block_ids: tuple[int, ...]


@dataclass(frozen=True)
class TurnSave:
    """Scheduler -> worker: copy a finished request's stage KV into the turn store.

    The request's pages are held (vLLM's delayed free) until the worker reports it in
    ``finished_sending``.
    """

    request_id: str
    turn_id: int
    num_tokens: int  # tokens [0, num_tokens) have KV
    block_ids: tuple[tuple[int, ...], ...]  # per KV-cache group, the request's row


@dataclass(frozen=True)
class TurnLoad:
    """Scheduler -> worker: before this step's forward, write a kept turn's stage KV for
    tokens [start, num_tokens) into a new request's pages and give it the turn's routing
    state (to be re-routed for its own question)."""

    request_id: str
    turn_id: int
    start: int  # tokens before it came from vLLM's own prefix cache
    num_tokens: int
    block_ids: tuple[tuple[int, ...], ...]


@dataclass
class RecrouteMetadata:
    """Scheduler -> worker, per step: pages released by routed-stage groups (kv_release)
    and later-turn jobs, run by the worker in the order evictions, saves, loads."""

    released: list[ReleasedBlocks] = field(default_factory=list)
    turn_evictions: list[int] = field(default_factory=list)  # kv/turn_index turn ids
    turn_saves: list[TurnSave] = field(default_factory=list)
    turn_loads: list[TurnLoad] = field(default_factory=list)


@dataclass
class DeferredReport:
    """Worker -> scheduler, per step: request -> {stage: deferred tokens} (kv_release)."""

    deferred: dict[str, dict[int, int]] = field(default_factory=dict)

    def aggregate(self, other: Any) -> DeferredReport:
        # Tensor-parallel ranks take identical decisions: the union is any one of them.
        if isinstance(other, DeferredReport):
            for req, per_stage in other.deferred.items():
                self.deferred.setdefault(req, per_stage)
        return self
