"""A routed worker's runtime: the one owner of its routing state, and the connector's API.

One per routed model and worker process, built by the routed decoder (worker/decoder.py,
which only installs routing) and reached through the runner's model
(``vllm_view.runtime_of`` = ``runner.get_model().recroute.runtime``) by patch P1 and the
connector's worker side (connector/worker.py); there are no module-level registries.

    state it owns                       changed by
    RouteStore (per-request state)      requests_gone, begin_step, remember, the turn store
    Ledger (accounting)                 remember, record, the turn store
    ReleasedRows (kv_release)           apply_released; forgotten with the request
    DeferredOutbox (kv_release)         remember; drained by drain_deferred
    page I/O (per layer)                handed to the parked tier and the turn store
    ParkingTier (parked_bytes)          the step router, through its methods
    TurnStore (turn_cache_bytes)        apply_turn_jobs
    Projections (K/V weight rows)       keep_kv_rows, once the weights are loaded
    LayerGroups, TP group, DecisionCheck, LayerCost: bound or fixed at startup

Nothing here caches the model runner: each step's runner comes with the call
(``begin_step``) or from the step P1 publishes (``apply_turn_jobs``), and is passed on.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from vllm_recroute import vllm_view
from vllm_recroute.config import RoutingConfig
from vllm_recroute.kv.table_view import ReleasedRows
from vllm_recroute.metrics.accounting import Ledger, LedgerKey, routed_prompt_delta
from vllm_recroute.requests.options import decode_reroute_every
from vllm_recroute.requests.resolution import RoutingResolver
from vllm_recroute.routing import Stage, spec_stage
from vllm_recroute.routing.reentry import reenters, reentry_flops
from vllm_recroute.vllm_view import StepBatch
from vllm_recroute.worker.compaction import LayerGroups
from vllm_recroute.worker.parking import ParkingTier
from vllm_recroute.worker.projections import Projections
from vllm_recroute.worker.rows import Lookups, StepRows, classify_rows
from vllm_recroute.worker.stage_pages import PageRow, page_io
from vllm_recroute.worker.state import DeferredOutbox, RouteState, RouteStore
from vllm_recroute.worker.tp import DecisionCheck, TPGroup
from vllm_recroute.worker.turns import TurnStore

logger = logging.getLogger("vllm_recroute")

__all__ = ["LayerCost", "WorkerRuntime"]


@dataclass(frozen=True)
class LayerCost:
    """Per token and decoder layer: what a deferred token does not spend (estimates)."""

    flops_per_token_layer: int  # 2 x weights of one decoder layer (matmul FLOPs)
    kv_bytes_per_token_layer: int  # K and V of one token in one layer
    hidden_size: int = 0  # of the residual stream (the re-entry update's FLOPs)

    @classmethod
    def of(cls, layer: Any, vllm_config: Any) -> LayerCost:
        tp = vllm_config.parallel_config.tensor_parallel_size  # weights are sharded by tp
        params = sum(p.numel() for p in layer.parameters()) * tp
        attn = layer.self_attn
        itemsize = torch.empty((), dtype=vllm_config.model_config.dtype).element_size()
        hidden = vllm_config.model_config.get_hidden_size()
        return cls(2 * params, 2 * attn.kv_size * tp * itemsize, hidden)


class WorkerRuntime:
    """The routing state of one routed decoder stack (``layers``, named ``layer_names``
    as vLLM's attention layers) and the operations on it."""

    def __init__(
        self,
        config: RoutingConfig,
        layers: list[Any],
        layer_names: list[str],
        cost: LayerCost,
        image_token_id: int,
        stage_of_layer: dict[str, int] | None = None,
        tp: TPGroup | None = None,
    ) -> None:
        self.config = config
        self.routings = RoutingResolver(config, vllm_view.worker_request_options)
        self.image_token_id = int(image_token_id)
        self.layers = layers
        self.proj = Projections(layers)  # the layers' attention input path (keys, K/V)
        self.num_layers = len(layers)
        self.layer_names = layer_names
        self.cost = cost
        self.kv_release = config.kv_release
        self.tp = TPGroup.current() if tp is None else tp  # scores are averaged over ranks
        self.check = DecisionCheck(self.tp)
        self.ledger = Ledger()
        self.released = ReleasedRows()
        self.outbox = DeferredOutbox()
        keep_turns = config.turn_cache_bytes > 0
        self.store = RouteStore(hold_finished=keep_turns)
        self.store.on_forget(self.released.forget)
        self.store.on_forget(self.outbox.forget)
        self.stage_of_layer = stage_of_layer or {}  # kv_release: layer name -> its stage
        self.groups = LayerGroups(layer_names, self._check_groups)
        parked = config.parked_bytes > 0
        # per-layer page I/O: the parked tier's swaps, the kept turns' saves and loads
        self.io = page_io(layers) if parked or keep_turns else []
        self.tier: ParkingTier | None = None
        if parked:
            self.tier = ParkingTier(config, self.proj, self.io, self.tp.mean)
            self.store.on_forget(self._forget_parked)
        self.turns = TurnStore(self.io, self.store, self.ledger, self.tier) if keep_turns else None

    # -- connector API (connector/worker.py; patch P1 for requests_gone) -------------------

    def requests_gone(self, finished: Iterable[str], preempted: Iterable[str]) -> None:
        """vLLM says these requests finished or were preempted: their state is stale
        (a finished one is held until this step's turn jobs ran)."""
        finished = list(finished)
        self.store.finish(finished)
        self.store.forget(preempted)
        for req_id in finished:
            self.routings.forget(req_id)

    def apply_released(self, events: Iterable[Any]) -> None:
        """kv_release: mirror the scheduler's page releases (kv/manager.ReleasedBlocks)."""
        for event in events:
            if self.store.get(event.request_id) is not None:  # else gone meanwhile
                self.released.apply(event.request_id, event.kv_cache_group_id, event.row_indices)

    def apply_turn_jobs(self, evicted: list[int], saves: list[Any], loads: list[Any]) -> set[str]:
        """Later-turn restore: run this step's jobs (kv/turn_index.py) with this step's
        runner; returns the requests whose held pages may now be freed."""
        if self.turns is None:
            return set()
        step = vllm_view.current_step()
        runner = None if step is None else step.runner
        if runner is not None:
            self.groups.bind(runner)

        def pace(req_id: str) -> int:
            return self.reroute_every_of(runner, req_id)

        self.turns.apply(evicted, saves, loads, self._page, pace)
        return self.turns.take_sent()

    def drain_deferred(self) -> dict[str, dict[int, int]]:
        return self.outbox.drain()

    def drain_stats(self) -> dict[str, Any]:
        return self.ledger.drain()

    # -- a routed forward (worker/step.py) ---------------------------------------------------

    def routes_nothing(self, runner: Any) -> bool:
        """Decode of unrouted requests only: nothing to route or install."""
        return not len(self.store) and not vllm_view.has_prompt_rows(runner)

    def begin_step(self, runner: Any) -> StepRows:
        """The step's rows, and the step-start side effects they imply, in this order:
        requests that start afresh forget their old state (and, through the store's
        hooks, their released rows, outbox report and parked units); prompts split by
        chunked prefill are counted; loaded later turns' one forced re-route is taken."""
        self.groups.bind(runner)
        rows = classify_rows(StepBatch.of(runner), self._lookups(runner))
        self.store.forget(rows.fresh)
        for req_id in rows.split:
            self.ledger.record({LedgerKey.CHUNKED_FALLBACKS: 1})
            logger.warning(
                "vllm-recroute: request %s prompt split by chunked prefill; running it "
                "unrouted (set recroute.chunked_prefill='off' to keep prompts whole)",
                req_id,
            )
        ids = rows.batch.req_ids
        forced = self.store.take_reroutes([ids[row] for row in rows.decodes])
        rows.forced = {row for row in rows.decodes if ids[row] in forced}
        return rows

    def remember(
        self, req_id: str, cfg: RoutingConfig, stages: tuple[Stage, ...], masks: list[Any]
    ) -> None:
        """A routed prompt's decision (``masks``: active visual tokens per stage): its state
        for the steps after, its deferred counts for the scheduler, its accounting."""
        v = int(masks[0].numel())
        deferred = tuple(v - int(m.sum()) for m in masks)
        self.store.put(req_id, RouteState(stages, deferred, decode_reroute_every(cfg)))
        if self.kv_release:
            self.outbox.report(req_id, {spec_stage(k): d for k, d in enumerate(deferred)})
        cost = (self.cost.flops_per_token_layer, self.cost.kv_bytes_per_token_layer)
        layers = [s.end - s.start for s in stages]
        label = f"{cfg.mode}/{cfg.schedule}"
        returned = [int((b & ~a).sum()) for a, b in itertools.pairwise(masks)]
        extra = reentry_flops(v, self.cost.hidden_size, len(stages) - 1) if reenters(cfg) else 0
        self.ledger.record(
            routed_prompt_delta(label, v, self.num_layers, layers, deferred, cost, returned, extra)
        )

    def record(self, *deltas: dict[str, Any]) -> None:
        """Accounting of the parked tier's operations (worker/step.py)."""
        self.ledger.record(*deltas)

    # -- helpers --------------------------------------------------------------------------

    def config_of(self, runner: Any, req_id: str) -> RoutingConfig:
        """A request's effective routing config (server config + its options), resolved
        once per request (``self.routings``; dropped when it finishes)."""
        state = vllm_view.worker_request(runner, req_id)
        return self.config if state is None else self.routings.resolve(state).cfg

    def reroute_every_of(self, runner: Any, req_id: str) -> int:
        return decode_reroute_every(self.config_of(runner, req_id))

    def _lookups(self, runner: Any) -> Lookups:
        def first_image(req_id: str) -> int | None:
            return vllm_view.first_image_offset(vllm_view.worker_request(runner, req_id))

        def config_of(req_id: str) -> RoutingConfig:
            return self.config_of(runner, req_id)

        return Lookups(self.image_token_id, self.num_layers, self.store.get, config_of, first_image)

    def _page(self, layer_idx: int, block_ids: tuple[tuple[int, ...], ...]) -> PageRow:
        group = self.groups.of_layer(layer_idx)
        return PageRow.of_ids(block_ids[group.gid], group.block_size)

    def _check_groups(self, kv_cache_groups: list[Any]) -> None:
        if self.kv_release:
            from vllm_recroute.kv.spec import check_stage_groups

            # A group mixing stages would put compacted and uncompacted KV in one table.
            check_stage_groups(kv_cache_groups, self.stage_of_layer)

    def _forget_parked(self, req_ids: set[str]) -> None:
        assert self.tier is not None
        delta = self.tier.forget(sorted(req_ids))
        if delta:
            self.ledger.record(delta, self.tier.gauges())
