"""`RecrouteStatsConnector`: carries routing accounting from workers to `/metrics`.

vLLM routes a KV connector's stats worker -> scheduler -> front end on every step (the
path its own connectors use for transfer metrics):

    worker   execute_model -> connector.get_kv_connector_stats()  (drains RouteStore deltas)
             -> ModelRunnerOutput.kv_connector_output.kv_connector_stats
    engine   Scheduler.update_from_output -> SchedulerStats.kv_connector_stats (dict)
    front    PrometheusStatLogger -> RecrouteStatsConnector.build_prom_metrics(...)
             -> RecroutePromMetrics.observe(data, engine_idx)     -> /metrics

It is also the scheduler <-> worker channel of the KV tiers: page releases of kv_release
(kv/manager.py) and, with ``turn_cache_bytes``, later-turn restore (kv/turn_index.py on
the scheduler side, models/turns.py on the worker side): a finished turn's pages are held
(delayed free) until the worker copied them, and a later turn that starts with the same
tokens gets them offered as external, synchronously loaded KV. The config hook installs
the connector for routed architectures when no other KV connector is configured.
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

from vllm_recroute.kv.turn_index import TurnIndex, TurnLoad, TurnRequest, TurnSave
from vllm_recroute.metrics.accounting import add_into, empty_data, is_empty
from vllm_recroute.metrics.stats import RouteStats

CONNECTOR_NAME = "RecrouteStatsConnector"
MODULE_PATH = "vllm_recroute.metrics.connector"


@dataclass
class RecrouteMetadata(KVConnectorMetadata):
    """Scheduler -> worker, per step: pages released by routed-stage groups (kv_release)
    and later-turn jobs, run by the worker in the order evictions, saves, loads."""

    released: list[Any] = field(default_factory=list)  # kv/manager.ReleasedBlocks
    turn_evictions: list[int] = field(default_factory=list)  # kv/turn_index turn ids
    turn_saves: list[Any] = field(default_factory=list)  # kv/turn_index.TurnSave
    turn_loads: list[Any] = field(default_factory=list)  # kv/turn_index.TurnLoad


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
        self._turns = _turn_index(vllm_config, kv_cache_config, role)
        self._turn_matches: dict[str, tuple[int, int]] = {}  # request -> (turn id, tokens)
        self._turn_deferred: dict[int, dict[int, int]] = {}  # kv_release: turn -> stage -> n
        self._turn_jobs = RecrouteMetadata()
        self._turns_sent: set[str] = set()  # worker: saved since the last get_finished

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
        # (After the forward when the step has no synchronous load: releases and saves
        # only concern pages the forward does not use.)
        meta = self._connector_metadata
        if not isinstance(meta, RecrouteMetadata):
            return
        from vllm_recroute.models.routed import apply_released_blocks, apply_turn_jobs

        if meta.released:
            apply_released_blocks(meta.released)
        self._turns_sent |= apply_turn_jobs(meta.turn_evictions, meta.turn_saves, meta.turn_loads)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, None]:
        sent, self._turns_sent = self._turns_sent, set()
        return (sent or None), None

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
        """Later-turn restore: the tokens of a kept turn this request starts with, beyond
        what vLLM's own prefix cache already gave (loaded synchronously)."""
        if self._turns is None or not len(self._turns):
            return 0, False
        turn = _turn_request(request)
        hit = self._turns.match(turn, request.num_tokens - 1)
        # A new image after the kept turn would have to be routed with the loaded ones.
        if hit is None or any(off + n > hit[1] for off, n, _ in turn.images):
            return 0, False
        if hit[1] <= num_computed_tokens:
            return 0, False
        self._turn_matches[request.request_id] = hit
        self._expect_deferred(request.request_id, self._turn_deferred.get(hit[0], {}))
        return hit[1] - num_computed_tokens, False

    def _expect_deferred(self, req_id: str, per_stage: dict[int, int] | None) -> None:
        """kv_release: tell each stage group how many of the offered tokens are deferred
        (it allocates compacted blocks for them; None withdraws the offer)."""
        for stage, managers in self._stage_managers().items():
            for manager in managers:
                n = None if per_stage is None else per_stage.get(stage, 0)
                manager.expect_deferred(req_id, n)

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int):
        hit = self._turn_matches.pop(request.request_id, None)
        if hit is None or num_external_tokens == 0:
            return
        turn_id, num_tokens = hit
        ids = tuple(tuple(g) for g in blocks.get_block_ids())
        self._turn_jobs.turn_loads.append(
            TurnLoad(request.request_id, turn_id, num_tokens - num_external_tokens, num_tokens, ids)
        )

    def build_connector_meta(self, scheduler_output: Any) -> KVConnectorMetadata:
        # Releases happen inside this schedule()'s allocate_slots; ship them with it, so
        # the worker learns of a hole before any block appended after it.
        released = [
            e for ms in self._stage_managers().values() for m in ms for e in m.take_released()
        ]
        self._released_unreported += sum(len(e.block_ids) for e in released)
        meta, self._turn_jobs = self._turn_jobs, RecrouteMetadata()
        meta.released = released
        return meta

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
        """Later-turn restore: keep a finished turn's KV (its pages are held until the
        worker copied them). Otherwise nothing is held and vLLM frees the blocks now."""
        from vllm.v1.request import RequestStatus

        if self._turn_matches.pop(request.request_id, None) is not None:
            self._expect_deferred(request.request_id, None)
        done = (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH_CAPPED)
        if self._turns is None or request.status not in done:
            return False, None
        turn, n = _turn_request(request), request.num_computed_tokens
        if not self._turns.can_keep(turn, n):
            return False, None
        turn_id, evicted = self._turns.keep(turn, n, also_at=(request.num_prompt_tokens,))
        self._turn_jobs.turn_evictions.extend(evicted)
        for gone in evicted:
            self._turn_deferred.pop(gone, None)
        self._turn_deferred[turn_id] = {
            stage: ms[0].get_deferred(request.request_id)
            for stage, ms in self._stage_managers().items()
        }
        # the live rows only: pages released by kv_release are null blocks (id 0)
        ids = tuple(tuple(b for b in g if b != 0) for g in block_ids)
        self._turn_jobs.turn_saves.append(TurnSave(request.request_id, turn_id, n, ids))
        return True, None

    # -- front end ------------------------------------------------------------------
    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> RouteStats:
        return RouteStats(data=add_into(empty_data(), data or {}))

    @classmethod
    def build_prom_metrics(cls, vllm_config, metric_types, labelnames, per_engine_labelvalues):
        from vllm_recroute.metrics.prom import RecroutePromMetrics

        return RecroutePromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)


def _turn_index(vllm_config: Any, kv_cache_config: Any, role: Any) -> TurnIndex | None:
    """The scheduler's index of kept turns (None: later-turn restore off, or a worker)."""
    from vllm_recroute.config import RoutingConfig

    if role != KVConnectorRole.SCHEDULER or kv_cache_config is None:
        return None
    cfg = RoutingConfig.from_additional_config(vllm_config.additional_config)
    if cfg.turn_cache_bytes == 0:
        return None
    per_token = sum(
        g.kv_cache_spec.page_size_bytes // g.kv_cache_spec.block_size * len(g.layer_names)
        for g in kv_cache_config.kv_cache_groups
    )
    block = getattr(kv_cache_config, "hash_block_size", None) or vllm_config.cache_config.block_size
    return TurnIndex(cfg.turn_cache_bytes, block, per_token)


def _turn_request(request: Any) -> TurnRequest:
    from vllm_recroute.config import RoutingConfigError
    from vllm_recroute.request_options import overrides_from_extra_args

    images = sorted(
        (f.mm_position.offset, f.mm_position.length, f.identifier)
        for f in getattr(request, "mm_features", None) or ()
    )
    params = request.sampling_params
    extra = params.extra_args if params else None
    try:
        options = overrides_from_extra_args(extra)
    except RoutingConfigError:
        # Not validated by a front end (offline API); the worker falls back to the
        # server's config for it. Key it by its raw options: it matches only itself.
        options = {"raw": repr(sorted((extra or {}).items()))}
    # reroute_every only paces decode-time swaps; it does not change the stage layout
    routing = tuple(sorted((k, repr(v)) for k, v in options.items() if k != "reroute_every"))
    return TurnRequest(request.all_token_ids, request.block_hashes, tuple(images), routing)
