"""`RecrouteStatsConnector`: carries routing accounting from workers to `/metrics`.

vLLM routes a KV connector's stats worker -> scheduler -> front end on every step (the
path its own connectors use for transfer metrics):

    worker   execute_model -> connector.get_kv_connector_stats()  (drains RouteStore deltas)
             -> ModelRunnerOutput.kv_connector_output.kv_connector_stats
    engine   Scheduler.update_from_output -> SchedulerStats.kv_connector_stats (dict)
    front    PrometheusStatLogger -> RecrouteStatsConnector.build_prom_metrics(...)
             -> RecroutePromMetrics.observe(data, engine_idx)     -> /metrics

This connector moves no KV: every load/save hook is a no-op and it reports no external
cache hits. The config hook installs it for routed architectures when no other KV
connector is configured. The parked-block tier will live here too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorWorkerMetadata,
    SupportsHMA,
)

from vllm_recroute.metrics.accounting import add_into, empty_data, is_empty
from vllm_recroute.metrics.stats import RouteStats

CONNECTOR_NAME = "RecrouteStatsConnector"
MODULE_PATH = "vllm_recroute.metrics.connector"


@dataclass
class RecrouteMetadata(KVConnectorMetadata):
    """Scheduler -> worker, per step: pages released by routed-stage groups (kv_release)."""

    released: list[Any] = field(default_factory=list)  # kv/manager.ReleasedBlocks


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


class RecrouteStatsConnector(KVConnectorBase_V1, SupportsHMA):
    # SupportsHMA: with a connector that lacks it, vLLM turns the hybrid KV-cache manager
    # off for the whole engine (sliding-window models, and per-stage KV groups, need it).

    def __init__(self, vllm_config: Any, role: KVConnectorRole, kv_cache_config: Any = None):
        super().__init__(vllm_config, role, kv_cache_config)
        self._reports = self._reporting_rank()
        self._stage_groups: dict[int, list[Any]] | None = None  # scheduler: stage -> managers
        self._released_unreported = 0

    @staticmethod
    def _reporting_rank() -> bool:
        # Tensor-parallel ranks route identically; only rank 0 reports, so nothing doubles.
        try:
            from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

            return get_tensor_model_parallel_rank() == 0
        except (AssertionError, RuntimeError):
            return True

    # -- worker side ----------------------------------------------------------------
    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        # Runs every step before the forward pass, with this step's metadata bound.
        meta = self._connector_metadata
        if isinstance(meta, RecrouteMetadata) and meta.released:
            from vllm_recroute.models.routed import apply_released_blocks

            apply_released_blocks(meta.released)

    def wait_for_layer_load(self, layer_name: str) -> None:
        pass

    def save_kv_layer(self, layer_name: str, kv_layer: Any, attn_metadata: Any, **kw) -> None:
        pass

    def wait_for_save(self) -> None:
        pass

    def get_kv_connector_stats(self) -> RouteStats | None:
        if self._role == KVConnectorRole.SCHEDULER:
            n, self._released_unreported = self._released_unreported, 0
            return RouteStats(data=add_into(empty_data(), {"kv_blocks_released": n})) if n else None
        if not self._reports:
            return None
        from vllm_recroute.models.routed import drain_route_stats

        data = drain_route_stats()
        return None if is_empty(data) else RouteStats(data=data)

    def build_connector_worker_meta(self) -> DeferredReport | None:
        from vllm_recroute.models.routed import drain_deferred_reports

        deferred = drain_deferred_reports()
        return DeferredReport(deferred) if deferred else None

    # -- scheduler side -------------------------------------------------------------
    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int):
        return 0, False

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int):
        pass

    def build_connector_meta(self, scheduler_output: Any) -> KVConnectorMetadata:
        # Releases happen inside this schedule()'s allocate_slots; ship them with it, so
        # the worker learns of a hole before any block appended after it.
        released = [
            e for ms in self._stage_managers().values() for m in ms for e in m.take_released()
        ]
        self._released_unreported += sum(len(e.block_ids) for e in released)
        return RecrouteMetadata(released)

    def update_connector_output(self, connector_output: Any) -> None:
        report = getattr(connector_output, "kv_connector_worker_meta", None)
        if not isinstance(report, DeferredReport):
            return
        managers = self._stage_managers()
        for req_id, per_stage in report.deferred.items():
            for stage, n in per_stage.items():
                for manager in managers.get(stage, ()):
                    manager.set_deferred(req_id, n)

    def _stage_managers(self) -> dict[int, list[Any]]:
        """stage -> the RoutedStageManagers of its KV groups (empty without kv_release)."""
        if self._stage_groups is None:
            from vllm_recroute.kv.manager import RoutedStageManager

            kvm = getattr(self, "_kv_cache_manager", None)
            if kvm is None:
                return {}
            self._stage_groups = {}
            for m in kvm.coordinator.single_type_managers:
                if isinstance(m, RoutedStageManager):
                    self._stage_groups.setdefault(m.stage, []).append(m)
        return self._stage_groups

    def request_finished_all_groups(self, request: Any, block_ids: Any):
        return False, None  # nothing held: vLLM frees the blocks now

    # -- front end ------------------------------------------------------------------
    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> RouteStats:
        return RouteStats(data=add_into(empty_data(), data or {}))

    @classmethod
    def build_prom_metrics(cls, vllm_config, metric_types, labelnames, per_engine_labelvalues):
        from vllm_recroute.metrics.prom import RecroutePromMetrics

        return RecroutePromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)
