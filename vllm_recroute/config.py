"""Routing configuration: one validated, frozen object shared by every process.

The config reaches the engine through ``--additional-config '{"recroute": {...}}'``
(``vllm_config.additional_config``) and can be overridden per request (``vllm_xargs``).
Every validation failure raises :class:`RoutingConfigError` whose message names the field
(``recroute.<field>``) and states the allowed values or range, so a user can fix a typo
without reading the source. See ``docs/configuration.md`` for every field.

This module must not import vllm: it is used by the CLI, the server and the tests too.
"""

from __future__ import annotations

import itertools
import json
import typing
from collections.abc import Mapping
from typing import Annotated, Any, Literal

import pydantic
from pydantic import ConfigDict, Strict, StrictInt, field_validator, model_validator

from vllm_recroute.errors import RoutingConfigError
from vllm_recroute.routing.schedule import SCHEDULES
from vllm_recroute.routing.scorers import SCORERS

__all__ = [
    "CONFIG_KEY",
    "RoutingConfig",
    "RoutingConfigError",
]

# Key of the plugin's section inside vLLM's ``additional_config``.
CONFIG_KEY = "recroute"

# Strict scalars: without them pydantic would silently accept ``True`` as 1 or "0.5" as 0.5,
# which hides mistakes in hand-written JSON. Ints are still accepted where a float is expected.
_Float = Annotated[float, Strict()]


def _field(name: str) -> str:
    return f"{CONFIG_KEY}.{name}" if name else CONFIG_KEY


class RoutingConfig(pydantic.BaseModel):
    """What to route, where, and how to score. Immutable; build with :meth:`from_dict`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    mode: Literal["off", "reroute", "remove"] = "reroute"
    schedule: str = "fastv"  # a name in routing/schedule.py:SCHEDULES
    keep: _Float | None = None
    avg_visual_tokens: StrictInt | None = None
    router_layers: tuple[StrictInt, ...] | None = None
    custom: tuple[tuple[StrictInt, _Float], ...] | None = None
    scorer: str = "attention"  # a name in routing/scorers.py:SCORERS
    score_query: Literal["last", "question"] = "last"
    # Which layer's attention scores a router point: "before" = the layer before it, on that
    # layer's input (FastV's and PyramidDrop's convention), "at" = the router layer itself,
    # on its own input (its input norm, q/k projections, RoPE), as "Reroute, Don't Remove"'s
    # released code does; "at" sees one more layer of every token's state.
    score_layer: Literal["before", "at"] = "before"
    # Brakes on tokens returning at a router point (reroute, token granularity; the policy in
    # routing/decision.py:stay_or_return): a deferred token displaces an active one only if
    # its score is more than 1 + incumbency times the active one's (0 = plain reroute, inf =
    # active tokens first), and at most max_returners active tokens are displaced (None =
    # no cap). Decisions only: no extra FLOPs, the row's budget is unchanged.
    incumbency: _Float = 0.0
    max_returners: StrictInt | None = None
    # Re-entry of a returning token (reroute, prefill; routing/reentry.py): "none" keeps its
    # stage-entry state, "mean_update" adds the mean residual update the request's active
    # visual tokens got over the stages it skipped (its FLOPs are counted in the ledger).
    reentry: Literal["none", "mean_update"] = "none"
    granularity: Literal["token", "block"] = "token"
    block_size: StrictInt = 16
    block_reduce: Literal["max", "mean"] = "max"
    reference_layers: StrictInt = 32
    # Engine-wide, not per request: "routed" keeps vLLM's chunked prefill; a routed prompt
    # chunks freely before its first image and takes the rest in one step (sched/), unless
    # that span alone exceeds a step (then it runs unrouted, counted). "off" disables
    # chunked prefill: every prompt in one step.
    chunked_prefill: Literal["routed", "off"] = "routed"
    # Engine-wide: give each routing stage its own KV-cache group(s) and return the pages of
    # deferred tokens to vLLM's block pool (the scheduler sees the savings). Router points
    # are then fixed at startup: per-request schedule/router_layers/custom are refused.
    kv_release: bool = False
    # Engine-wide parked tier (docs/architecture.md, "Parked tier"): deferred visual tokens
    # (reroute mode) are kept, as their stage-entry hidden state, in a bounded host pool of
    # this many bytes (0 = off) in units of ``park_block_tokens`` tokens, as ``park_format``
    # ("none" = bit-exact copy, "int8" = per-channel int8). Every ``reroute_every`` decode
    # steps (0 = never) each stage re-scores its parked and active units against the current
    # query and swaps them, keeping the stage's active budget (and so its pages) constant.
    parked_bytes: StrictInt = 0
    park_format: Literal["none", "int8"] = "none"
    park_block_tokens: StrictInt = 16
    reroute_every: StrictInt = 0
    # Engine-wide: at most this many units a stage swaps at one re-route (None: every unit
    # that outranks an active one). The best-ranked returners take the worst-ranked active
    # units' slots first, so a cap keeps the swaps that gain most; the rest compete again at
    # the next re-route. Each swap's K/V are projected and written at the re-route step:
    # the cap bounds that step's extra time.
    reroute_max_swaps: StrictInt | None = None
    # Engine-wide: how a pure-decode step that re-routes runs. "compiled": the ordinary
    # (compiled) decode step; each due stage's swaps happen inside vLLM's attention op of the
    # stage's first layer, from the query it receives (worker/decoder.py, "Compilation").
    # "eager": the whole text model runs eager through the routed layers (the fallback, also
    # taken when the attention op cannot be hooked). Same decisions and tokens either way.
    reroute_path: Literal["compiled", "eager"] = "compiled"
    # Engine-wide: how a step whose routing moves rows (a routed prefill) runs each segment's
    # layers over its active rows (gathered once, scattered back once per segment).
    # "compiled": one torch.compile'd piece per segment (row count dynamic), where vLLM
    # compiles the text model (not under enforce_eager); "eager": the layers' own forwards,
    # vLLM's eager kernels (the fallback). Same decisions; tokens within float tolerance.
    prefill_path: Literal["compiled", "eager"] = "compiled"
    # Engine-wide later-turn restore (docs/architecture.md, "Later turns"): when a request with
    # images finishes, its stage KV (pages and parked units) is kept in a host store of this
    # many bytes (0 = off, LRU). A later request whose prompt starts with that request's
    # tokens (the next turn of the conversation) loads it instead of recomputing the image,
    # then re-routes the loaded units for its new question before its first forward.
    turn_cache_bytes: StrictInt = 0
    # Operator limits on per-request options (vllm_xargs); server-side only, not overridable.
    request_overrides: bool = True  # False: requests may not change routing at all
    request_min_keep: _Float | None = None  # lowest keep (or custom keep) a request may ask
    request_min_avg_visual_tokens: StrictInt | None = None  # lowest avg_visual_tokens
    request_modes: tuple[Literal["off", "reroute", "remove"], ...] | None = None  # None: all

    # Constructing directly (``RoutingConfig(mode="x")``) raises RoutingConfigError as well, so
    # callers never have to handle pydantic's ValidationError.
    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except pydantic.ValidationError as exc:
            raise _translate(exc, data) from None

    # ------------------------------------------------------------------ per-field checks
    @field_validator("schedule", "scorer", mode="before")
    @classmethod
    def _check_registered(cls, v: Any, info: pydantic.ValidationInfo) -> Any:
        name = info.field_name or ""
        if not isinstance(v, str) or v not in _REGISTRIES[name]:
            raise RoutingConfigError(_field(name), f"got {_plain(v)!r}; {_allowed(name)}")
        return v

    @field_validator("keep")
    @classmethod
    def _check_keep(cls, v: float | None) -> float | None:
        if v is not None and not 0.0 < v <= 1.0:
            raise RoutingConfigError(_field("keep"), f"got {v!r}; {_HELP['keep']}")
        return v

    @field_validator("request_min_keep")
    @classmethod
    def _check_min_keep(cls, v: float | None) -> float | None:
        if v is not None and not 0.0 < v <= 1.0:
            raise RoutingConfigError(
                _field("request_min_keep"), f"got {v!r}; {_HELP['request_min_keep']}"
            )
        return v

    @field_validator(
        "avg_visual_tokens",
        "block_size",
        "reference_layers",
        "request_min_avg_visual_tokens",
        "park_block_tokens",
    )
    @classmethod
    def _check_positive(cls, v: int | None, info: pydantic.ValidationInfo) -> int | None:
        if v is not None and v <= 0:
            name = info.field_name or ""
            raise RoutingConfigError(_field(name), f"got {v!r}; {_HELP[name]}")
        return v

    @field_validator("router_layers")
    @classmethod
    def _check_router_layers(cls, v: tuple[int, ...] | None) -> tuple[int, ...] | None:
        if v is not None:
            _check_layers("router_layers", list(v), v)
        return v

    @field_validator("custom")
    @classmethod
    def _check_custom(
        cls, v: tuple[tuple[int, float], ...] | None
    ) -> tuple[tuple[int, float], ...] | None:
        if v is None:
            return v
        _check_layers("custom", [layer for layer, _ in v], v)
        for _, keep in v:
            if not 0.0 < keep <= 1.0:
                raise RoutingConfigError(
                    _field("custom"),
                    f"got {_plain(v)}; keep {keep!r} out of range; " + _HELP["custom"],
                )
        return v

    @field_validator("parked_bytes", "reroute_every", "turn_cache_bytes", "incumbency",
                     "max_returners", "reroute_max_swaps")  # fmt: skip
    @classmethod
    def _check_non_negative(cls, v: float | None, info: pydantic.ValidationInfo) -> float | None:
        if v is not None and not v >= 0:  # NaN too
            name = info.field_name or ""
            raise RoutingConfigError(_field(name), f"got {v!r}; {_HELP[name]}")
        return v

    # ------------------------------------------------------------------ cross-field checks
    @model_validator(mode="after")
    def _check_combination(self) -> RoutingConfig:
        if self.reroute_every > 0 and self.parked_bytes == 0:
            raise RoutingConfigError(
                _field("reroute_every"),
                "decode-time re-routing restores parked blocks; set parked_bytes > 0 as well",
            )
        if self.turn_cache_bytes > 0 and self.parked_bytes == 0:
            raise RoutingConfigError(
                _field("turn_cache_bytes"),
                "a later turn restores the parked blocks of the earlier one; set parked_bytes "
                "> 0 as well",
            )
        if self.keep is not None and self.avg_visual_tokens is not None:
            raise RoutingConfigError(
                _field("keep"),
                "keep and avg_visual_tokens are mutually exclusive (both express the budget); "
                "set only one",
            )
        braked = self.incumbency > 0 or self.max_returners is not None
        if braked and self.granularity == "block":
            raise RoutingConfigError(
                _field("incumbency" if self.incumbency > 0 else "max_returners"),
                "brakes on returning tokens route tokens; not allowed with granularity 'block'",
            )
        SCHEDULES[self.schedule].validate(self)
        return self

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | str | None) -> RoutingConfig:
        """Validate a mapping (or a JSON object string); ``None`` gives the defaults."""
        data = _as_mapping(d, CONFIG_KEY)
        return cls(**data)

    @classmethod
    def from_additional_config(
        cls, additional_config: Mapping[str, Any] | str | None
    ) -> RoutingConfig:
        """Read ``additional_config["recroute"]``; a missing section means routing is off.

        Off by default because installing the plugin must not change plain vLLM's behaviour
        for users who did not ask for routing.
        """
        outer = _as_mapping(additional_config, "additional_config")
        if CONFIG_KEY not in outer or outer[CONFIG_KEY] is None:
            return cls(mode="off")
        return cls.from_dict(outer[CONFIG_KEY])

    def with_overrides(self, overrides: Mapping[str, Any] | str | None) -> RoutingConfig:
        """Per-request override, validated like the base config.

        Setting ``keep`` clears ``avg_visual_tokens`` and vice versa (they are two spellings of
        one budget), and changing ``schedule`` resets the schedule-specific fields that the
        override does not give (a fastv keep is not a pdrop ratio).
        """
        upd = _as_mapping(overrides, CONFIG_KEY)
        if not upd:
            return self
        data = self.model_dump()
        if "schedule" in upd and upd["schedule"] != self.schedule:
            for name in _SCHEDULE_FIELDS:
                data[name] = None
        for name, other in (("keep", "avg_visual_tokens"), ("avg_visual_tokens", "keep")):
            if upd.get(name) is not None and other not in upd:
                data[other] = None
        data.update(upd)
        return type(self)(**data)

    @property
    def enabled(self) -> bool:
        return self.mode != "off"


# ---------------------------------------------------------------------- helpers

# Fields whose values are the names of a registry (one entry per strategy).
_REGISTRIES: dict[str, Mapping[str, Any]] = {"schedule": SCHEDULES, "scorer": SCORERS}
_SCHEDULE_FIELDS = ("keep", "avg_visual_tokens", "router_layers", "custom")


def _allowed(name: str) -> str:
    if name in _REGISTRIES:
        return "allowed values: " + ", ".join(_REGISTRIES[name])
    values = typing.get_args(RoutingConfig.model_fields[name].annotation)
    return "allowed values: " + ", ".join(str(v) for v in values)


_HELP: dict[str, str] = {
    "keep": "must be a number in (0, 1]",
    "avg_visual_tokens": "must be an integer > 0",
    "router_layers": "must be a strictly increasing list of integer layers >= 1 "
    "(fastv: 1 layer, pdrop: 3 layers)",
    "custom": "must be a non-empty list of [layer, keep] pairs with strictly increasing "
    "integer layers >= 1 and keep in (0, 1]",
    "block_size": "must be an integer > 0",
    "request_min_keep": "must be a number in (0, 1]",
    "request_min_avg_visual_tokens": "must be an integer > 0",
    "request_modes": "must be a list of modes among off, reroute, remove",
    "request_overrides": "must be true or false",
    "kv_release": "must be true or false",
    "reference_layers": "must be an integer > 0",
    "parked_bytes": "must be an integer >= 0 (bytes of host memory for parked K/V; 0 = off)",
    "park_block_tokens": "must be an integer > 0",
    "reroute_every": "must be an integer >= 0 (decode steps between re-routings; 0 = off)",
    "reroute_max_swaps": "must be an integer >= 0 or null (units a stage swaps at one "
    "re-route; null = no cap)",
    "turn_cache_bytes": "must be an integer >= 0 (bytes of host memory for finished turns' "
    "stage KV; 0 = off)",
    "incumbency": "must be a number >= 0 (a deferred token must beat an active one by the "
    "factor 1 + incumbency; 0 = plain reroute)",
    "max_returners": "must be an integer >= 0 or null (active tokens a router point may displace)",
    "chunked_prefill": "allowed values: routed, off (the former 'fallback' is 'routed': "
    "chunked prefill stays on, and a prompt too long to route in one step still runs "
    "unrouted, counted)",
}


def _help(name: str) -> str:
    if name in _HELP:
        return _HELP[name]
    return _allowed(name)  # the Literal fields: list their values from the annotation


def _check_layers(name: str, layers: list[int], raw: Any) -> None:
    ok = bool(layers) and layers[0] >= 1 and all(a < b for a, b in itertools.pairwise(layers))
    if not ok:
        raise RoutingConfigError(_field(name), f"got {_plain(raw)}; {_HELP[name]}")


def _plain(v: Any) -> Any:
    """Tuples back to lists so messages look like the JSON the user wrote."""
    if isinstance(v, tuple | list):
        return [_plain(x) for x in v]
    return v


def _as_mapping(d: Mapping[str, Any] | str | None, where: str) -> Mapping[str, Any]:
    if d is None:
        return {}
    if isinstance(d, str):
        try:
            d = json.loads(d) if d.strip() else {}
        except json.JSONDecodeError as exc:
            raise RoutingConfigError(where, f"invalid JSON ({exc.msg} at {exc.pos})") from None
    if not isinstance(d, Mapping):
        raise RoutingConfigError(where, f"got {d!r}; expected a JSON object")
    bad = [k for k in d if not isinstance(k, str)]
    if bad:
        raise RoutingConfigError(where, f"keys must be strings, got {bad[0]!r}")
    return d


def _translate(exc: pydantic.ValidationError, data: Mapping[str, Any]) -> RoutingConfigError:
    """Turn pydantic's error list into one RoutingConfigError naming the first bad field."""
    problems: list[tuple[str, str]] = []
    for err in exc.errors(include_url=False):
        own = (err.get("ctx") or {}).get("error")
        if isinstance(own, RoutingConfigError):  # raised by our validators: already worded
            problems.append((own.field, own.detail))
            continue
        name = str(err["loc"][0]) if err["loc"] else ""
        if err["type"] == "extra_forbidden":
            allowed = ", ".join(RoutingConfig.model_fields)
            problems.append((_field(name), f"unknown key; allowed keys: {allowed}"))
        else:
            problems.append((_field(name), f"got {_plain(data.get(name))!r}; {_help(name)}"))
    # The first problem gives ``field``; the others stay in the message so one run shows all.
    (field, detail), rest = problems[0], problems[1:]
    return RoutingConfigError(field, "".join([detail, *(f"\n{f}: {d}" for f, d in rest)]))
