"""A request as vLLM holds it (scheduler `Request` or worker `CachedRequestState`): its
multimodal spans, per-request options, tenant and status."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch


def _mm_features(request: Any) -> Iterable[Any]:
    # Scheduler `Request` and worker `CachedRequestState` both carry `mm_features`.
    return getattr(request, "mm_features", None) or ()


def first_image_offset(request: Any) -> int | None:
    """Prompt position where the request's first multimodal item starts (None: none)."""
    offsets = [f.mm_position.offset for f in _mm_features(request)]
    return min(offsets) if offsets else None


def routing_free_prefix(request: Any, num_tokens: int) -> int:
    """Scheduler side: tokens of ``request``'s first ``num_tokens`` before its first
    multimodal item (all, for text only): the prefix whose KV is the same under every
    routing decision (what a routed stage may cache)."""
    first = first_image_offset(request)
    return num_tokens if first is None else min(num_tokens, first)


def image_spans(request: Any) -> tuple[tuple[int, int, str], ...]:
    """``(offset, length, identifier)`` of each multimodal item, by offset."""
    return tuple(
        sorted(
            (f.mm_position.offset, f.mm_position.length, f.identifier)
            for f in _mm_features(request)
        )
    )


def embed_positions_in(request: Any, start: int, end: int) -> int:
    """How many prompt positions in ``[start, end)`` take a multimodal embedding (the image
    tokens the worker routes: vLLM marks them with ``PlaceholderRange.is_embed``)."""
    n = 0
    for f in _mm_features(request):
        pos, is_embed = f.mm_position.offset, f.mm_position.is_embed
        length = f.mm_position.length
        idx = torch.arange(pos, pos + length)
        if is_embed is not None:
            idx = idx[is_embed.bool().cpu()]
        n += int(((idx >= start) & (idx < end)).sum())
    return n


def image_embeds_from(request: Any, start: int) -> int:
    """Scheduler side: encoder embeddings of the request's multimodal items starting at or
    after ``start``; a repeated item once (vLLM encodes it once per step)."""
    seen: dict[str, int] = {}
    for f in _mm_features(request):
        if f.mm_position.offset >= start:
            seen[f.identifier] = f.mm_position.get_num_embeds()
    return sum(seen.values())


def prompt_length(request: Any) -> int:
    """Scheduler side: the request's number of prompt tokens."""
    return int(request.num_prompt_tokens)


def worker_request(runner: Any, req_id: str) -> Any | None:
    """Worker side: vLLM's cached state of a request (``CachedRequestState``)."""
    return runner.requests.get(req_id)


def worker_request_options(state: Any) -> tuple[str, Mapping[str, Any] | None]:
    """Worker side: ``(request id, SamplingParams.extra_args)`` of a request's cached state
    (what `requests.resolution.RoutingResolver` reads)."""
    params = getattr(state, "sampling_params", None)
    return state.req_id, getattr(params, "extra_args", None)


def scheduler_extra_args(request: Any) -> Mapping[str, Any] | None:
    """Scheduler side: a `vllm.v1.request.Request`'s per-request options."""
    params = request.sampling_params
    return params.extra_args if params else None


def scheduler_request_options(request: Any) -> tuple[str, Mapping[str, Any] | None]:
    """Scheduler side: ``(request id, extra_args)`` of a `vllm.v1.request.Request`."""
    return request.request_id, scheduler_extra_args(request)


def cache_salt(request: Any) -> str | None:
    """Scheduler side: the request's ``cache_salt`` (its tenant for prefix caching), or
    None. vLLM rejects an empty salt at the API; an empty one offline means none too."""
    return getattr(request, "cache_salt", None) or None


def is_waiting(request: Any) -> bool:
    """Scheduler side: a request not admitted yet (new, or preempted and waiting again)."""
    from vllm.v1.request import RequestStatus

    return request.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED)


def is_finished_normally(request: Any) -> bool:
    """A request that stopped or hit its length (not aborted): its KV is complete."""
    from vllm.v1.request import RequestStatus

    done = (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH_CAPPED)
    return request.status in done
