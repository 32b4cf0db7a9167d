"""Per-request routing options carried in `SamplingParams.extra_args`.

OpenAI clients send them as `extra_body={"vllm_xargs": {"recroute_keep": 0.25}}`; vLLM
copies `vllm_xargs` into `SamplingParams.extra_args`. Keys are flat because vllm_xargs
values must be scalars.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

from vllm_recroute.config import RoutingConfig, RoutingConfigError

logger = logging.getLogger("vllm_recroute")

PREFIX = "recroute_"
REQUEST_FIELDS = (
    "mode",
    "schedule",
    "keep",
    "avg_visual_tokens",
    "scorer",
    "score_query",
    "granularity",
    "block_reduce",
    "custom",
    "router_layers",
)
# Non-scalar fields travel as JSON strings through vllm_xargs.
_JSON_FIELDS = ("custom", "router_layers")


def overrides_from_extra_args(extra_args: Mapping[str, Any] | None) -> dict[str, Any]:
    """The routing fields a request overrides; unknown recroute_* keys are an error."""
    out: dict[str, Any] = {}
    for key, value in (extra_args or {}).items():
        if not key.startswith(PREFIX):
            continue
        name = key.removeprefix(PREFIX)
        if name not in REQUEST_FIELDS:
            allowed = ", ".join(PREFIX + f for f in REQUEST_FIELDS)
            raise RoutingConfigError(f"vllm_xargs.{key}", f"unknown option; allowed: {allowed}")
        if name in _JSON_FIELDS and isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as err:
                raise RoutingConfigError(f"vllm_xargs.{key}", f"not valid JSON: {err}") from None
        out[name] = value
    return out


def config_for_extra_args(
    base: RoutingConfig, extra_args: Mapping[str, Any] | None
) -> RoutingConfig:
    overrides = overrides_from_extra_args(extra_args)
    return base.with_overrides(overrides) if overrides else base


def routing_for_request(base: RoutingConfig, runner: Any, req_id: str) -> RoutingConfig:
    """Effective config of one request, worker side (the front end already validated it)."""
    state = runner.requests.get(req_id)
    params = getattr(state, "sampling_params", None)
    extra = getattr(params, "extra_args", None)
    if not extra:
        return base
    try:
        return config_for_extra_args(base, extra)
    except RoutingConfigError as err:
        # Reaching here means a caller bypassed front-end validation (offline LLM API);
        # never crash the engine for one request.
        logger.warning("vllm-recroute: request %s: %s; using server routing config", req_id, err)
        return base
