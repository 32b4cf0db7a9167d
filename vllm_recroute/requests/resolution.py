"""A request's routing, resolved once per process and dropped when the request finishes.

A request's effective routing (the server's config overridden by its options, within the
operator's limits) is resolved in three processes, once in each:

- front end: ``requests/validation.py`` at admission, strict (a bad option is HTTP 400);
- engine core: one `RoutingResolver`, the scheduler-side connector's
  (connector/scheduler.py), shared with ``RoutedChunkScheduler`` (sched/scheduler.py);
- worker: the routed decoder's `RoutingResolver` (worker/decoder.py).

The engine core and the worker never refuse a request: one that reached them unvalidated
(the offline ``LLM`` API) runs with the server's config and a warning naming the option.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from vllm_recroute.config import RoutingConfig
from vllm_recroute.errors import RoutingConfigError
from vllm_recroute.requests.options import (
    config_for_overrides,
    decode_reroute_every,
    overrides_from_extra_args,
)

logger = logging.getLogger("vllm_recroute")

__all__ = ["RequestRouting", "RoutingKey", "RoutingResolver", "resolve_options"]

RoutingKey = tuple[tuple[str, str], ...]
OptionsOf = Callable[[Any], tuple[str, Mapping[str, Any] | None]]


@dataclass(frozen=True)
class RequestRouting:
    """One request's resolved routing."""

    cfg: RoutingConfig  # the server's config with the request's options applied
    # What of its options changes the stage layout: the routing context a kept turn was
    # computed under (``reroute_every`` only paces decode-time swaps). Options no front end
    # validated are keyed by their raw value, so such a request matches only itself.
    key: RoutingKey

    @property
    def reroute_every(self) -> int:
        """Decode steps between re-routings (0: never)."""
        return decode_reroute_every(self.cfg)


def resolve_options(
    base: RoutingConfig, extra_args: Mapping[str, Any] | None, req_id: str
) -> RequestRouting:
    """The routing of one request (``SamplingParams.extra_args``); never raises."""
    try:
        overrides = overrides_from_extra_args(extra_args)
    except RoutingConfigError as err:
        raw = {"raw": repr(sorted((extra_args or {}).items()))}
        return RequestRouting(_server_config(base, err, req_id), _key(raw))
    try:
        cfg = config_for_overrides(base, overrides)
    except RoutingConfigError as err:
        cfg = _server_config(base, err, req_id)
    return RequestRouting(cfg, _key(overrides))


def _server_config(base: RoutingConfig, err: RoutingConfigError, req_id: str) -> RoutingConfig:
    # Reaching here means a caller bypassed front-end validation (offline LLM API);
    # never crash the engine for one request.
    logger.warning("vllm-recroute: request %s: %s; using server routing config", req_id, err)
    return base


def _key(options: Mapping[str, Any]) -> RoutingKey:
    return tuple(sorted((k, repr(v)) for k, v in options.items() if k != "reroute_every"))


class RoutingResolver:
    """One process's resolutions, by request id: each request resolved once, forgotten
    when it finishes (``forget``; a preempted request keeps its options, and so its entry).

    ``options_of(request)`` reads ``(request id, extra_args)`` of the process's request
    type (``vllm_view.scheduler_request_options`` / ``worker_request_options``).
    """

    def __init__(self, base: RoutingConfig, options_of: OptionsOf) -> None:
        self.base = base
        self._options_of = options_of
        self._resolved: dict[str, RequestRouting] = {}

    def resolve(self, request: Any) -> RequestRouting:
        req_id, extra_args = self._options_of(request)
        routing = self._resolved.get(req_id)
        if routing is None:
            routing = self._resolved[req_id] = resolve_options(self.base, extra_args, req_id)
        return routing

    def forget(self, req_id: str) -> None:
        self._resolved.pop(req_id, None)

    def __contains__(self, req_id: object) -> bool:
        return req_id in self._resolved

    def __len__(self) -> int:
        return len(self._resolved)
