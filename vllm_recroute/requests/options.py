"""Per-request routing options carried in `SamplingParams.extra_args`.

OpenAI clients send them as `extra_body={"vllm_xargs": {"recroute_keep": 0.25}}`; vLLM
copies `vllm_xargs` into `SamplingParams.extra_args`. Keys are flat because vllm_xargs
values must be scalars.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from vllm_recroute.config import RoutingConfig
from vllm_recroute.errors import RoutingConfigError

PREFIX = "recroute_"
REQUEST_FIELDS = (
    "mode",
    "schedule",
    "keep",
    "avg_visual_tokens",
    "scorer",
    "score_query",
    "score_layer",
    "incumbency",
    "max_returners",
    "reentry",
    "granularity",
    "block_reduce",
    "custom",
    "router_layers",
    "reroute_every",
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
    """The request's routing config: the server's, overridden and within its limits
    (RoutingConfigError naming the option otherwise)."""
    return config_for_overrides(base, overrides_from_extra_args(extra_args))


def config_for_overrides(base: RoutingConfig, overrides: Mapping[str, Any]) -> RoutingConfig:
    """``base`` with parsed request ``overrides`` applied, within the operator's limits."""
    if not overrides:
        return base
    check_request_limits(base, overrides)
    return base.with_overrides(overrides)


def _same(requested: Any, current: Any) -> bool:
    as_list = lambda v: [as_list(x) for x in v] if isinstance(v, list | tuple) else v  # noqa: E731
    return as_list(requested) == as_list(current)


def check_request_limits(base: RoutingConfig, overrides: Mapping[str, Any]) -> None:
    """Refuse overrides outside the operator's limits (RoutingConfig.request_*)."""

    def refuse(name: str, message: str) -> None:
        raise RoutingConfigError(f"vllm_xargs.{PREFIX}{name}", message)

    if not base.request_overrides:
        refuse(next(iter(overrides)), "per-request routing options are disabled on this server")
    if base.kv_release:
        for name in ("schedule", "router_layers", "custom"):
            if name in overrides and not _same(overrides[name], getattr(base, name)):
                refuse(
                    name, "fixed on this server: kv_release builds per-stage KV groups at startup"
                )
    mode = overrides.get("mode")
    if base.request_modes is not None and mode is not None and mode not in base.request_modes:
        refuse("mode", f"got {mode!r}; this server allows {', '.join(base.request_modes)}")
    low = base.request_min_keep
    keep = overrides.get("keep")
    if low is not None and isinstance(keep, int | float) and keep < low:
        refuse("keep", f"got {keep!r}; this server's minimum is {low}")
    custom = overrides.get("custom")
    if low is not None and isinstance(custom, list):
        for pair in custom:
            if (
                isinstance(pair, list | tuple)
                and len(pair) == 2
                and isinstance(pair[1], int | float)
                and pair[1] < low
            ):
                refuse("custom", f"keep {pair[1]!r} below this server's minimum {low}")
    low_avg = base.request_min_avg_visual_tokens
    avg = overrides.get("avg_visual_tokens")
    if low_avg is not None and isinstance(avg, int) and avg < low_avg:
        refuse("avg_visual_tokens", f"got {avg!r}; this server's minimum is {low_avg}")


def decode_reroute_every(cfg: RoutingConfig) -> int:
    """Decode steps between re-routings for a request routed with ``cfg`` (0: never;
    remove mode never brings a token back)."""
    return cfg.reroute_every if cfg.mode == "reroute" else 0
