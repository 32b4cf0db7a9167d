"""vLLM's scheduler with routed prompts' chunks aligned to their first image.

Installed by the config hook as ``SchedulerConfig.scheduler_cls`` (engine_setup.py)
with chunked prefill kept on. Two overrides of vLLM's v1 ``Scheduler`` (0.32 and 0.33;
patch record P11), nothing else changes:

- ``_try_schedule_encoder_inputs``: vLLM calls it for every request with multimodal
  inputs, on both the running and the waiting path, after the token budget,
  ``long_prefill_token_threshold`` and a prefix-cache hit have set the chunk, and it may
  already shorten a chunk to end before an image (encoder budget). A routed request's
  chunk is cut here by ``sched.chunking.aligned_chunk``: before its first image it chunks
  freely; from the first image on, the whole rest in one step or nothing this step. A
  waiting request whose remaining prompt fits one step is admitted whole or not this step
  (never with only the text before its image: see the rule's ``admit_whole``).
- ``schedule``: a request cut that way needs the whole span at its next step; it is moved
  to the front of ``running``, so that step's token budget serves it before the decodes
  and chunks of older requests (otherwise those could hold it back step after step).
- Head of line: a waiting routed request cut to 0 tokens closes admission for the rest of
  the step (``_hold_the_line``), so the requests queued behind it wait as it does. vLLM
  0.32 does that itself; 0.33 skips such a request and admits those behind it, under
  which a routed prompt admitted whole could wait behind a stream of small requests
  indefinitely. The rule is the plugin's, so it holds on either version.

Text-only requests, requests with routing off and prompts whose span is larger than any
step are scheduled exactly as vLLM does (the last run unrouted, counted by the worker).
Async scheduling needs nothing more: the scheduler advances ``num_computed_tokens`` when it
schedules, so the next step's chunk starts at the first image either way.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.scheduler import Scheduler

from vllm_recroute import vllm_view
from vllm_recroute.config import RoutingConfig
from vllm_recroute.requests.resolution import RoutingResolver
from vllm_recroute.sched import SCHEDULER_PATH
from vllm_recroute.sched.chunking import aligned_chunk, span_fits

__all__ = ["SCHEDULER_PATH", "AsyncRoutedChunkScheduler", "RoutedChunkScheduler"]

_EncoderPlan = tuple[list[int], int, int, list[int], list[int]]


class RoutedChunkScheduler(Scheduler):
    """vLLM's scheduler; routed prompts take their span from the first image in one step."""

    def __new__(cls, *args: Any, **kwargs: Any) -> RoutedChunkScheduler:
        # The config hook runs before vLLM decides on async scheduling, so it cannot pick
        # the base class; the engine core builds the scheduler once that is settled (as
        # vLLM's DiffusionScheduler / DiffusionAsyncScheduler pair, chosen here instead).
        config = kwargs.get("vllm_config", args[0] if args else None)
        if cls is RoutedChunkScheduler and config.scheduler_config.async_scheduling:
            cls = AsyncRoutedChunkScheduler
        return super().__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._routings = self._resolver()
        self._step_tokens = vllm_view.step_token_limit(self)
        self._step_embeds = vllm_view.step_embed_limit(self)
        self._wants_span: set[str] = set()  # cut before the first image at the last step

    def _resolver(self) -> RoutingResolver:
        """The engine core's one resolution of each request's routing: the plugin's
        connector's when it is installed (connector/scheduler.py), else our own."""
        shared = getattr(vllm_view.kv_connector(self), "request_routings", None)
        if isinstance(shared, RoutingResolver):
            return shared
        cfg = RoutingConfig.from_additional_config(self.vllm_config.additional_config)
        return RoutingResolver(cfg, vllm_view.scheduler_request_options)

    def schedule(self, *args: Any, **kwargs: Any) -> Any:
        self._serve_first(self._wants_span)
        self._wants_span = set()
        active_limit = self.max_num_active_reqs
        try:
            output = super().schedule(*args, **kwargs)
        finally:
            self.max_num_active_reqs = active_limit  # reopens admission (_hold_the_line)
        # Requests finished since the last step: their routing is not needed again (the
        # connector drops it too, in request_finished, when the resolver is shared).
        for req_id in vllm_view.gone_request_ids(output)[0]:
            self._routings.forget(req_id)
        return output

    def _hold_the_line(self) -> None:
        """No waiting request is admitted for the rest of this step: the head-of-line wait
        of a routed prompt held back for a step with its whole span.

        vLLM 0.32 stops admitting when a waiting request's chunk is cut to 0 tokens; 0.33
        skips it and admits the requests behind it, so a stream of small requests could
        take every step's budget before a prompt that must be admitted whole. Both
        versions' admission loops stop once ``len(running) >= max_num_active_reqs``,
        read before each waiting request: 0 until ``schedule`` returns keeps 0.32's
        semantics on either version (redundant on 0.32)."""
        self.max_num_active_reqs = 0

    def _serve_first(self, req_ids: set[str]) -> None:
        # Stable: among themselves, and for everyone else, vLLM's order is kept.
        if not req_ids:
            return
        first = [r for r in self.running if r.request_id in req_ids]
        if first:
            rest = [r for r in self.running if r.request_id not in req_ids]
            self.running[:] = first + rest

    def _try_schedule_encoder_inputs(
        self,
        request: Any,
        num_computed_tokens: int,
        num_new_tokens: int,
        encoder_compute_budget: int,
        shift_computed_tokens: int = 0,
    ) -> _EncoderPlan:
        align = self._alignment(request, num_computed_tokens)
        wanted = num_new_tokens if align is None else align(num_new_tokens)
        plan = super()._try_schedule_encoder_inputs(
            request, num_computed_tokens, wanted, encoder_compute_budget, shift_computed_tokens
        )
        if align is None:
            return plan
        got = plan[1]
        if align(got) != got:
            # This step's encoder budget or cache (shared with the step's other requests)
            # cut inside the span: schedule none of its images now, take it all next step.
            plan = ([], align(got), encoder_compute_budget, [], [])
        if plan[1] < num_new_tokens:
            self._wants_span.add(request.request_id)
        if plan[1] == 0 and vllm_view.is_waiting(request):
            self._hold_the_line()
        return plan

    def _alignment(self, request: Any, computed: int) -> Callable[[int], int] | None:
        """The chunk rule of a routed request whose first image is not computed yet and
        whose span fits one step; None: schedule it as vLLM does."""
        first = vllm_view.first_image_offset(request)
        if first is None or computed > first or not self._routed(request):
            return None
        end = vllm_view.prompt_length(request)
        embeds = vllm_view.image_embeds_from(request, first)
        if not span_fits(end, first, self._step_tokens, embeds, self._step_embeds):
            return None
        whole = vllm_view.is_waiting(request) and end - computed <= self._step_tokens
        return lambda n: aligned_chunk(computed, n, end, first, fits=True, admit_whole=whole)

    def _routed(self, request: Any) -> bool:
        return self._routings.resolve(request).cfg.enabled


class AsyncRoutedChunkScheduler(RoutedChunkScheduler, AsyncScheduler):
    """The same on vLLM's async scheduler (``--async-scheduling``, on by default)."""
