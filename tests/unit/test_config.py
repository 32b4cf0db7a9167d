"""RoutingConfig validation: every bad value names its field and what is allowed."""

from __future__ import annotations

import json

import pydantic
import pytest

from vllm_recroute.config import RoutingConfig, RoutingConfigError
from vllm_recroute.defaults import parse_routing_arg


@pytest.mark.parametrize(
    ("data", "field", "expected"),
    [
        ({"mode": "foo"}, "mode", "allowed values: off, reroute, remove"),
        ({"parked_bytes": -1}, "parked_bytes", ">= 0"),
        ({"parked_bytes": "1G"}, "parked_bytes", ">= 0"),
        ({"park_block_tokens": 0}, "park_block_tokens", "> 0"),
        ({"park_format": "fp4"}, "park_format", "allowed values: none, int8"),
        ({"reroute_every": -2}, "reroute_every", ">= 0"),
        ({"reroute_every": 4}, "reroute_every", "set parked_bytes > 0"),
        ({"turn_cache_bytes": -1}, "turn_cache_bytes", ">= 0"),
        ({"turn_cache_bytes": 1 << 20}, "turn_cache_bytes", "set parked_bytes > 0"),
        ({"schedule": "linear"}, "schedule", "allowed values: fastv, pdrop, custom"),
        ({"scorer": "magic"}, "scorer", "allowed values: attention, key_norm"),
        ({"score_query": "first"}, "score_query", "allowed values: last, question"),
        ({"score_layer": "after"}, "score_layer", "allowed values: before, at"),
        ({"incumbency": -0.5}, "incumbency", ">= 0"),
        ({"incumbency": float("nan")}, "incumbency", ">= 0"),
        ({"max_returners": -1}, "max_returners", ">= 0"),
        ({"max_returners": 1.5}, "max_returners", ">= 0"),
        ({"reroute_max_swaps": -1}, "reroute_max_swaps", ">= 0"),
        ({"reroute_max_swaps": "2"}, "reroute_max_swaps", ">= 0"),
        ({"incumbency": 0.5, "granularity": "block"}, "incumbency", "granularity 'block'"),
        ({"granularity": "page"}, "granularity", "allowed values: token, block"),
        ({"block_reduce": "sum"}, "block_reduce", "allowed values: max, mean"),
        ({"keep": 0}, "keep", "(0, 1]"),
        ({"keep": 1.5}, "keep", "(0, 1]"),
        ({"keep": -1}, "keep", "(0, 1]"),
        ({"keep": "0.5"}, "keep", "(0, 1]"),
        ({"keep": True}, "keep", "(0, 1]"),
        ({"avg_visual_tokens": 0}, "avg_visual_tokens", "> 0"),
        ({"avg_visual_tokens": -5}, "avg_visual_tokens", "> 0"),
        ({"avg_visual_tokens": 19.5}, "avg_visual_tokens", "> 0"),
        ({"block_size": 0}, "block_size", "> 0"),
        ({"reference_layers": 0}, "reference_layers", "> 0"),
        ({"keep": 0.5, "avg_visual_tokens": 64}, "keep", "avg_visual_tokens"),
        ({"schedule": "custom"}, "custom", "required"),
        ({"schedule": "custom", "custom": []}, "custom", "strictly increasing"),
        ({"schedule": "custom", "custom": [[4, 0.5], [4, 0.2]]}, "custom", "strictly increasing"),
        ({"schedule": "custom", "custom": [[4, 0.5], [2, 0.2]]}, "custom", "strictly increasing"),
        ({"schedule": "custom", "custom": [[0, 0.5]]}, "custom", ">= 1"),
        ({"schedule": "custom", "custom": [[2, 0.0]]}, "custom", "(0, 1]"),
        ({"schedule": "custom", "custom": [[2, 1.5]]}, "custom", "(0, 1]"),
        ({"schedule": "custom", "custom": [[2, 0.5, 1]]}, "custom", "[layer, keep] pairs"),
        ({"schedule": "custom", "custom": [[2, 0.5]], "keep": 0.5}, "keep", "custom"),
        ({"custom": [[2, 0.5]]}, "custom", "only allowed with schedule 'custom'"),
        ({"router_layers": [2, 4]}, "router_layers", "exactly 1"),
        ({"schedule": "pdrop", "router_layers": [2, 4]}, "router_layers", "exactly 3"),
        ({"schedule": "pdrop", "router_layers": [4, 4, 8]}, "router_layers", "increasing"),
        ({"router_layers": [0]}, "router_layers", ">= 1"),
    ],
)
def test_invalid_value_names_field_and_allowed(data: dict, field: str, expected: str) -> None:
    with pytest.raises(RoutingConfigError) as info:
        RoutingConfig.from_dict(data)
    assert info.value.field == f"recroute.{field}"
    assert str(info.value).startswith(f"recroute.{field}: ")
    assert expected in str(info.value)


def test_unknown_key_names_key_and_lists_allowed_keys() -> None:
    with pytest.raises(RoutingConfigError) as info:
        RoutingConfig.from_dict({"kep": 0.5})
    msg = str(info.value)
    assert "recroute.kep" in msg
    for key in RoutingConfig.model_fields:
        assert key in msg


def test_error_is_not_pydantic_validation_error() -> None:
    with pytest.raises(RoutingConfigError) as info:
        RoutingConfig(mode="foo")  # direct construction too
    assert not isinstance(info.value, pydantic.ValidationError)
    assert isinstance(info.value, ValueError)


def test_every_problem_is_reported() -> None:
    with pytest.raises(RoutingConfigError) as info:
        RoutingConfig.from_dict({"mode": "x", "scorer": "y"})
    assert "recroute.mode" in str(info.value) and "recroute.scorer" in str(info.value)


def test_defaults_and_valid_values() -> None:
    cfg = RoutingConfig.from_dict(None)
    assert cfg.mode == "reroute" and cfg.schedule == "fastv" and cfg.enabled
    assert cfg.keep is None and cfg.block_size == 16 and cfg.reference_layers == 32
    custom = RoutingConfig.from_dict({"schedule": "custom", "custom": [[2, 1], [8, 0.25]]})
    assert custom.custom == ((2, 1.0), (8, 0.25))
    pdrop = RoutingConfig.from_dict({"schedule": "pdrop", "router_layers": [2, 6, 12]})
    assert pdrop.router_layers == (2, 6, 12)
    assert RoutingConfig.from_dict({"keep": 1}).keep == 1.0


def test_frozen_and_hashable() -> None:
    cfg = RoutingConfig()
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        cfg.keep = 0.3  # type: ignore[misc]
    assert hash(cfg) == hash(RoutingConfig())


def test_json_string_accepted() -> None:
    cfg = RoutingConfig.from_dict('{"schedule": "pdrop", "keep": 0.4}')
    assert (cfg.schedule, cfg.keep) == ("pdrop", 0.4)
    with pytest.raises(RoutingConfigError, match=r"recroute: invalid JSON"):
        RoutingConfig.from_dict("{not json")
    with pytest.raises(RoutingConfigError, match=r"expected a JSON object"):
        RoutingConfig.from_dict("[1, 2]")
    with pytest.raises(RoutingConfigError, match="keys must be strings"):
        RoutingConfig.from_dict({1: "x"})


def test_from_additional_config() -> None:
    assert RoutingConfig.from_additional_config(None).mode == "off"
    assert RoutingConfig.from_additional_config({}).mode == "off"
    assert not RoutingConfig.from_additional_config({"other_plugin": {}}).enabled
    cfg = RoutingConfig.from_additional_config({"recroute": {"mode": "remove"}})
    assert cfg.mode == "remove"
    nested_json = RoutingConfig.from_additional_config({"recroute": '{"scorer": "key_norm"}'})
    assert nested_json.scorer == "key_norm" and nested_json.mode == "reroute"
    whole_json = json.dumps({"recroute": {"granularity": "block"}})
    assert RoutingConfig.from_additional_config(whole_json).granularity == "block"
    with pytest.raises(RoutingConfigError, match=r"recroute\.mode"):
        RoutingConfig.from_additional_config({"recroute": {"mode": "on"}})


def test_with_overrides_validates_and_replaces() -> None:
    base = RoutingConfig.from_dict({"keep": 0.3, "scorer": "key_norm"})
    assert base.with_overrides({}) is base
    assert base.with_overrides({"keep": 0.6}).keep == 0.6
    assert base.with_overrides({"mode": "remove"}).scorer == "key_norm"
    # keep and avg_visual_tokens are one budget: overriding one clears the other
    avg = base.with_overrides({"avg_visual_tokens": 64})
    assert (avg.keep, avg.avg_visual_tokens) == (None, 64)
    assert avg.with_overrides({"keep": 0.2}).avg_visual_tokens is None
    # switching schedule drops the old schedule's keep
    custom = base.with_overrides({"schedule": "custom", "custom": [[3, 0.2]]})
    assert custom.keep is None and custom.custom == ((3, 0.2),)
    with pytest.raises(RoutingConfigError, match=r"recroute\.keep"):
        base.with_overrides({"keep": 2})
    with pytest.raises(RoutingConfigError, match=r"recroute\.bogus"):
        base.with_overrides({"bogus": 1})
    with pytest.raises(RoutingConfigError, match=r"recroute\.keep"):
        base.with_overrides({"keep": 0.5, "avg_visual_tokens": 64})


def test_parse_routing_arg() -> None:
    assert parse_routing_arg("off", None).mode == "off"
    fastv = parse_routing_arg("fastv", 0.25)
    assert (fastv.mode, fastv.schedule, fastv.keep) == ("reroute", "fastv", 0.25)
    assert parse_routing_arg("pdrop", None).schedule == "pdrop"
    js = parse_routing_arg('{"mode": "remove", "avg_visual_tokens": 128}', 0.5)
    assert (js.mode, js.keep, js.avg_visual_tokens) == ("remove", 0.5, None)
    with pytest.raises(RoutingConfigError, match=r"--routing.*off, fastv, pdrop"):
        parse_routing_arg("fastvv", None)
    with pytest.raises(RoutingConfigError, match=r"recroute\.keep"):
        parse_routing_arg("fastv", 1.5)
