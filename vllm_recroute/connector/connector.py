"""`RecrouteConnector`: the thin KV-connector shell of the plugin.

vLLM builds one per role (scheduler, each worker) from ``kv_transfer_config``; the config
hook installs it for routed architectures when no other connector is configured. Every
method delegates to the role object (connector/scheduler.py, connector/worker.py), as
vLLM's OffloadingConnector does. Routing accounting rides on the connector-stats path:

    worker   execute_model -> get_kv_connector_stats()  (drains the decoder's Ledger)
             -> ModelRunnerOutput.kv_connector_output.kv_connector_stats
    engine   Scheduler.update_from_output -> SchedulerStats.kv_connector_stats
    front    PrometheusStatLogger -> build_prom_metrics(...) -> RecroutePromMetrics -> /metrics
"""

from __future__ import annotations

from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorWorkerMetadata,
    SupportsHMA,
)

from vllm_recroute.config import RoutingConfig
from vllm_recroute.connector.scheduler import SchedulerSide
from vllm_recroute.connector.worker import WorkerSide
from vllm_recroute.engine_setup import CONNECTOR_NAME, MODULE_PATH
from vllm_recroute.messages import DeferredReport, RecrouteMetadata
from vllm_recroute.metrics.accounting import add_into, empty_data
from vllm_recroute.metrics.stats import RouteStats

__all__ = ["CONNECTOR_NAME", "MODULE_PATH", "RecrouteConnector"]

# The step messages are pure dataclasses (vllm_recroute/messages.py); to vLLM they are its
# connector metadata types (abstract bases without state: nothing is inherited).
KVConnectorMetadata.register(RecrouteMetadata)
KVConnectorWorkerMetadata.register(DeferredReport)


class RecrouteConnector(KVConnectorBase_V1, SupportsHMA):
    # SupportsHMA: with a connector that lacks it, vLLM turns the hybrid KV-cache manager
    # off for the whole engine (sliding-window models, and per-stage KV groups, need it).

    def __init__(self, vllm_config: Any, role: KVConnectorRole, kv_cache_config: Any = None):
        super().__init__(vllm_config, role, kv_cache_config)
        self.scheduler: SchedulerSide | None = None
        self.worker: WorkerSide | None = None
        if role == KVConnectorRole.SCHEDULER:
            cfg = RoutingConfig.from_additional_config(vllm_config.additional_config)
            self.scheduler = SchedulerSide(cfg, vllm_config, kv_cache_config)
        else:
            self.worker = WorkerSide()

    @property
    def request_routings(self) -> Any | None:
        """Scheduler role: the engine core's resolver of request routings
        (requests/resolution.py), for the scheduler to share; None in a worker."""
        return self.scheduler.routings if self.scheduler is not None else None

    @classmethod
    def supports_sleep_mode(cls, kv_transfer_config: Any) -> bool:
        """vLLM 0.33's hook (a startup error naming this connector when sleep mode is on):
        the routing state this connector carries points into the KV cache that sleep mode
        discards or remaps. The config hook refuses sleep mode first, with the setting's
        name (engine_setup.py); this covers a connector configured by hand."""
        return False

    # -- worker side ----------------------------------------------------------------
    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        assert self.worker is not None
        self.worker.start_load_kv(self._connector_metadata)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, None]:
        assert self.worker is not None
        return self.worker.get_finished(), None

    def wait_for_layer_load(self, layer_name: str) -> None:
        pass

    def save_kv_layer(self, layer_name: str, kv_layer: Any, attn_metadata: Any, **kw) -> None:
        pass

    def wait_for_save(self) -> None:
        pass

    def build_connector_worker_meta(self):
        return self.worker.worker_meta() if self.worker is not None else None

    def get_kv_connector_stats(self) -> RouteStats | None:
        side = self.scheduler or self.worker
        assert side is not None
        return side.stats()

    # -- scheduler side -------------------------------------------------------------
    def bind_kv_cache_manager(self, kv_cache_manager: Any) -> None:
        super().bind_kv_cache_manager(kv_cache_manager)
        assert self.scheduler is not None
        self.scheduler.bind(kv_cache_manager)

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int):
        assert self.scheduler is not None
        return self.scheduler.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int):
        assert self.scheduler is not None
        self.scheduler.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: Any) -> KVConnectorMetadata:
        assert self.scheduler is not None
        return self.scheduler.build_meta()

    def update_connector_output(self, connector_output: Any) -> None:
        assert self.scheduler is not None
        report = getattr(connector_output, "kv_connector_worker_meta", None)
        self.scheduler.apply_worker_meta(report)

    def request_finished_all_groups(self, request: Any, block_ids: Any):
        assert self.scheduler is not None
        return self.scheduler.request_finished(request, block_ids), None

    # -- front end ------------------------------------------------------------------
    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> RouteStats:
        return RouteStats(data=add_into(empty_data(), data or {}))

    @classmethod
    def build_prom_metrics(cls, vllm_config, metric_types, labelnames, per_engine_labelvalues):
        from vllm_recroute.metrics.prom import RecroutePromMetrics

        return RecroutePromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)
