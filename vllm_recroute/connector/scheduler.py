"""Scheduler side of the connector: page releases and kept turns.

kv_release: the stage groups' `RoutedStageManager`s release pages inside ``schedule()``;
their events ship with the same step's metadata, so the worker learns of a hole before
any block appended after it, and the worker's deferred counts come back as worker
metadata. Later-turn restore (``turn_cache_bytes``): a finished turn's pages are held
(delayed free) until the worker copied them; a later request that starts with the same
tokens, under the same routing context, gets them offered as external, synchronously
loaded KV.
"""

from __future__ import annotations

from typing import Any

from vllm_recroute import vllm_view
from vllm_recroute.config import RoutingConfig
from vllm_recroute.kv.manager import DeferralPlan, RoutedStageManager
from vllm_recroute.kv.turn_index import TurnIndex, TurnRequest
from vllm_recroute.messages import DeferredReport, RecrouteMetadata, TurnLoad, TurnSave
from vllm_recroute.metrics.accounting import add_into, empty_data
from vllm_recroute.metrics.stats import RouteStats
from vllm_recroute.requests.resolution import RequestRouting, RoutingResolver
from vllm_recroute.routing import planned_deferred, spec_stage

__all__ = ["SchedulerSide", "kv_written", "turn_request"]


class SchedulerSide:
    def __init__(self, cfg: RoutingConfig, vllm_config: Any, kv_cache_config: Any) -> None:
        # the engine core's one resolution of each request's routing (shared with
        # RoutedChunkScheduler, sched/scheduler.py), dropped in request_finished
        self.routings = RoutingResolver(cfg, vllm_view.scheduler_request_options)
        self._num_layers = vllm_view.num_decoder_layers(vllm_config)
        self._turns = _turn_index(cfg, vllm_config, kv_cache_config)
        self._kv_cache_manager: Any = None
        self._stage_groups: dict[int, list[RoutedStageManager]] | None = None
        self._released_unreported = 0
        self._released_after_forward = 0
        self._turn_matches: dict[str, tuple[int, int]] = {}  # request -> (turn id, tokens)
        self._turn_deferred: dict[int, dict[int, int]] = {}  # kv_release: turn -> stage -> n
        self._jobs = RecrouteMetadata()

    def bind(self, kv_cache_manager: Any) -> None:
        self._kv_cache_manager = kv_cache_manager
        self._stage_groups = None

    def _stage_managers(self) -> dict[int, list[RoutedStageManager]]:
        """stage -> the RoutedStageManagers of its KV groups (empty without kv_release)."""
        if self._stage_groups is None:
            if self._kv_cache_manager is None:
                return {}
            self._stage_groups = vllm_view.routed_stage_managers(
                self._kv_cache_manager, RoutedStageManager
            )
        return self._stage_groups

    # -- later turns: offer -------------------------------------------------------------

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int):
        """The tokens of a kept turn this request starts with, beyond what vLLM's own
        prefix cache already gave (loaded synchronously). Called for every waiting request
        vLLM considers, before its allocation: kv_release plans its deferred counts here,
        once per call (a request that loads a kept turn arrives routed: it plans nothing,
        each stage group expects the turn's counts instead)."""
        hit = self._turn_hit(request, num_computed_tokens)
        self._plan(request, None if hit is not None else num_computed_tokens)
        if hit is None:
            return 0, False
        self._turn_matches[request.request_id] = hit
        self._expect_deferred(request.request_id, self._turn_deferred.get(hit[0], {}))
        return hit[1] - num_computed_tokens, False

    def _turn_hit(self, request: Any, num_computed_tokens: int) -> tuple[int, int] | None:
        """(turn id, tokens) of the kept turn this request loads, beyond its prefix-cache
        hit; None: none."""
        if self._turns is None or not len(self._turns):
            return None
        turn = turn_request(request, self.routings.resolve(request))
        hit = self._turns.match(turn, request.num_tokens - 1)
        # A new image after the kept turn would have to be routed with the loaded ones.
        if hit is None or any(off + n > hit[1] for off, n, _ in turn.images):
            return None
        return hit if hit[1] > num_computed_tokens else None

    def _plan(self, request: Any, num_computed_tokens: int | None) -> None:
        """kv_release: the request's one deferral plan of this consideration; each stage
        group allocates only the compacted pages of a routed prompt from its first step
        (kv/manager.py, DeferralPlan; None: no plan, an earlier one withdrawn)."""
        managers = self._stage_managers()
        if not managers:
            return
        plans = {} if num_computed_tokens is None else self._plans_of(request, num_computed_tokens)
        for stage, ms in managers.items():
            for manager in ms:
                manager.plan(request.request_id, plans.get(stage))

    def _plans_of(self, request: Any, num_computed: int) -> dict[int, DeferralPlan]:
        """stage -> plan, from what the worker will route: the image tokens of the prompt
        rows from ``num_computed`` on, less the last (sampled) one (worker/step.py)."""
        first = vllm_view.first_image_offset(request)
        prompt_len = request.num_prompt_tokens
        if first is None or first < num_computed or num_computed >= prompt_len:
            return {}
        cfg = self.routings.resolve(request).cfg
        visual = vllm_view.embed_positions_in(request, num_computed, prompt_len - 1)
        counts = planned_deferred(cfg, self._num_layers, visual)
        return {spec_stage(k): DeferralPlan(d, first, prompt_len) for k, d in enumerate(counts)}

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
        self._jobs.turn_loads.append(
            TurnLoad(request.request_id, turn_id, num_tokens - num_external_tokens, num_tokens, ids)
        )

    # -- every step -------------------------------------------------------------------------

    def build_meta(self) -> RecrouteMetadata:
        # Releases happen inside this schedule()'s allocate_slots; ship them with it.
        managers = [m for ms in self._stage_managers().values() for m in ms]
        released = [e for m in managers for e in m.take_released()]
        # Pages of deferred tokens back in the pool: released after a forward, or never
        # taken (a plan's compacted allocation).
        after_forward = sum(len(e.block_ids) for e in released)
        self._released_after_forward += after_forward
        self._released_unreported += after_forward
        self._released_unreported += sum(m.take_never_allocated() for m in managers)
        meta, self._jobs = self._jobs, RecrouteMetadata()
        meta.released = released
        return meta

    def apply_worker_meta(self, report: Any) -> None:
        if not isinstance(report, DeferredReport):
            return
        managers = self._stage_managers()
        for req_id, per_stage in report.deferred.items():
            for stage, n in per_stage.items():
                for manager in managers.get(stage, ()):
                    manager.set_deferred(req_id, n)

    def stats(self) -> RouteStats | None:
        n, self._released_unreported = self._released_unreported, 0
        after, self._released_after_forward = self._released_after_forward, 0
        if not n:
            return None
        delta = {"kv_blocks_released": n, "kv_blocks_released_after_forward": after}
        return RouteStats(data=add_into(empty_data(), delta))

    # -- later turns: keep ------------------------------------------------------------------

    def request_finished(self, request: Any, block_ids: Any) -> bool:
        """Keep a finished turn's KV (its pages are held until the worker copied them).
        Returns whether vLLM must delay freeing the blocks. Every finished request (stopped,
        capped or aborted) passes here: its routing resolution is dropped."""
        delay_free = self._keep_turn(request, block_ids)
        self.routings.forget(request.request_id)
        return delay_free

    def _keep_turn(self, request: Any, block_ids: Any) -> bool:
        if self._turn_matches.pop(request.request_id, None) is not None:
            self._expect_deferred(request.request_id, None)
        if self._turns is None or not vllm_view.is_finished_normally(request):
            return False
        turn, n = turn_request(request, self.routings.resolve(request)), kv_written(request)
        if not self._turns.can_keep(turn, n):
            return False
        turn_id, evicted = self._turns.keep(turn, n, also_at=(request.num_prompt_tokens,))
        self._jobs.turn_evictions.extend(evicted)
        for gone in evicted:
            self._turn_deferred.pop(gone, None)
        self._turn_deferred[turn_id] = {
            stage: ms[0].get_deferred(request.request_id)
            for stage, ms in self._stage_managers().items()
        }
        ids = self._live_block_ids(request.request_id, block_ids)
        self._jobs.turn_saves.append(TurnSave(request.request_id, turn_id, n, ids))
        return True

    def _live_block_ids(self, req_id: str, block_ids: Any) -> tuple[tuple[int, ...], ...]:
        """Per KV group, the blocks that hold the finished request's rows in order.

        vLLM passes the blocks covering ``num_computed_tokens`` counted *uncompacted*
        (`get_block_ids_for_computed_tokens`): in a routed-stage group whose row has
        released (null) entries that cuts off live blocks at the tail. Those groups are
        read from their manager; the others lose only null entries (none without
        kv_release)."""
        null = vllm_view.null_block_id(self._kv_cache_manager)
        stage_groups = {
            m.kv_cache_group_id: m for ms in self._stage_managers().values() for m in ms
        }
        return tuple(
            tuple(stage_groups[gid].live_block_ids(req_id))
            if gid in stage_groups
            else tuple(b for b in blocks if b != null)
            for gid, blocks in enumerate(block_ids)
        )


def kv_written(request: Any) -> int:
    """Tokens of ``request`` whose KV a finished step has written.

    Under async scheduling (vLLM's `AsyncScheduler`, on by default on CUDA) the scheduler
    advances ``num_computed_tokens`` when it schedules a step, and counts the step's
    not-yet-sampled tokens in ``num_output_placeholders`` until its output arrives
    (`_update_after_schedule` adds, `_update_request_with_output` subtracts). When a
    request finishes, the next step is already scheduled: ``num_computed_tokens``
    includes its input token, whose KV that in-flight step is still writing. vLLM's own
    frontier of materialized KV is the difference (`Scheduler._handle_stopped_request`:
    ``safe_frontier``; `cache_blocks` in `AsyncScheduler._update_request_with_output`).
    Synchronous scheduling: no placeholders, the same number."""
    return request.num_computed_tokens - request.num_output_placeholders


def _turn_index(cfg: RoutingConfig, vllm_config: Any, kv_cache_config: Any) -> TurnIndex | None:
    """The scheduler's index of kept turns (None: later-turn restore off)."""
    if kv_cache_config is None or cfg.turn_cache_bytes == 0:
        return None
    per_token = sum(
        g.kv_cache_spec.page_size_bytes // g.kv_cache_spec.block_size * len(g.layer_names)
        for g in kv_cache_config.kv_cache_groups
    )
    block = getattr(kv_cache_config, "hash_block_size", None) or vllm_config.cache_config.block_size
    return TurnIndex(cfg.turn_cache_bytes, block, per_token)


def turn_request(request: Any, routing: RequestRouting) -> TurnRequest:
    """What the turn index needs of a scheduler `Request`: tokens, block hashes, image
    spans, its routing context (``routing.key``: options that change the stage layout) and
    its tenant (``cache_salt``: kept turns are isolated like vLLM's prefix cache)."""
    return TurnRequest(
        request.all_token_ids,
        request.block_hashes,
        vllm_view.image_spans(request),
        routing.key,
        vllm_view.cache_salt(request),
    )
