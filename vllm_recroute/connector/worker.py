"""Worker side of the connector: the scheduler's jobs applied to the routed worker runtime.

The runtime (worker/runtime.py) is the runner's model's (``vllm_view.runtime_of``); every
connector call below runs inside ``execute_model``, where patch P1 publishes the runner, so
no registry is needed. A process whose model is not routed has no runtime: every call is a
no-op.
"""

from __future__ import annotations

from typing import Any

from vllm_recroute import vllm_view
from vllm_recroute.messages import DeferredReport, RecrouteMetadata
from vllm_recroute.metrics.accounting import is_empty, per_rank
from vllm_recroute.metrics.stats import RouteStats

__all__ = ["WorkerSide"]


class WorkerSide:
    def __init__(self) -> None:
        # Tensor-parallel ranks route identically: counters come from rank 0 only, so
        # nothing doubles; every rank reports its own pool levels (summed per engine).
        self._rank = vllm_view.tensor_parallel_rank()
        self._sent: set[str] = set()  # kept turns saved since the last get_finished

    @staticmethod
    def _runtime() -> Any | None:
        step = vllm_view.current_step()
        return None if step is None else vllm_view.runtime_of(step.runner)

    def start_load_kv(self, meta: Any) -> None:
        """Runs every step, with this step's metadata: releases, then turn jobs (before the
        forward when the step loads a turn; releases and saves only concern pages the
        forward does not use)."""
        runtime = self._runtime()
        if not isinstance(meta, RecrouteMetadata) or runtime is None:
            return
        if meta.released:
            runtime.apply_released(meta.released)
        self._sent |= runtime.apply_turn_jobs(meta.turn_evictions, meta.turn_saves, meta.turn_loads)

    def get_finished(self) -> set[str] | None:
        sent, self._sent = self._sent, set()
        return sent or None

    def stats(self) -> RouteStats | None:
        runtime = self._runtime()
        if runtime is None:
            return None
        data = per_rank(runtime.drain_stats(), self._rank, counters=self._rank == 0)
        return None if is_empty(data) else RouteStats(data=data)

    def worker_meta(self) -> DeferredReport | None:
        runtime = self._runtime()
        deferred = runtime.drain_deferred() if runtime is not None else {}
        return DeferredReport(deferred) if deferred else None
