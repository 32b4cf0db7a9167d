"""Per-request routing options (vllm_xargs): parsing, validation, operator limits."""

from __future__ import annotations

import pytest

from vllm_recroute.config import RoutingConfig, RoutingConfigError
from vllm_recroute.requests.options import config_for_extra_args, overrides_from_extra_args


def test_flat_keys_and_json_fields():
    ov = overrides_from_extra_args(
        {"recroute_keep": 0.3, "recroute_custom": "[[1, 0.5]]", "other_plugin_key": 1}
    )
    assert ov == {"keep": 0.3, "custom": [[1, 0.5]]}


def test_score_layer_is_a_per_request_option():
    cfg = config_for_extra_args(RoutingConfig(), {"recroute_score_layer": "at"})
    assert (RoutingConfig().score_layer, cfg.score_layer) == ("before", "at")
    with pytest.raises(RoutingConfigError, match="allowed values: before, at") as info:
        config_for_extra_args(RoutingConfig(), {"recroute_score_layer": "after"})
    assert info.value.field == "recroute.score_layer"


def test_no_options_returns_server_config_itself():
    base = RoutingConfig(schedule="pdrop")
    assert config_for_extra_args(base, None) is base
    assert config_for_extra_args(base, {"unrelated": 1}) is base


def test_override_applies_and_is_validated():
    base = RoutingConfig(schedule="pdrop", keep=0.5)
    cfg = config_for_extra_args(base, {"recroute_schedule": "fastv", "recroute_keep": 0.25})
    assert (cfg.schedule, cfg.keep) == ("fastv", 0.25)
    with pytest.raises(RoutingConfigError) as info:
        config_for_extra_args(base, {"recroute_keep": 0})
    assert info.value.field == "recroute.keep"


@pytest.mark.parametrize(
    ("xargs", "field"),
    [
        ({"recroute_kep": 0.5}, "vllm_xargs.recroute_kep"),
        ({"recroute_chunked_prefill": "fallback"}, "vllm_xargs.recroute_chunked_prefill"),
        ({"recroute_request_min_keep": 0.01}, "vllm_xargs.recroute_request_min_keep"),
        ({"recroute_router_layers": "[1,"}, "vllm_xargs.recroute_router_layers"),
        ({"recroute_parked_bytes": 1 << 30}, "vllm_xargs.recroute_parked_bytes"),
        ({"recroute_park_format": "int8"}, "vllm_xargs.recroute_park_format"),
    ],
)
def test_unknown_server_only_or_malformed_options_name_the_key(xargs, field):
    with pytest.raises(RoutingConfigError) as info:
        config_for_extra_args(RoutingConfig(), xargs)
    assert info.value.field == field


def test_operator_limits():
    base = RoutingConfig(
        request_min_keep=0.2, request_min_avg_visual_tokens=64, request_modes=("reroute", "off")
    )
    assert config_for_extra_args(base, {"recroute_keep": 0.2}).keep == 0.2
    with pytest.raises(RoutingConfigError, match=r"minimum is 0\.2") as info:
        config_for_extra_args(base, {"recroute_keep": 0.1})
    assert info.value.field == "vllm_xargs.recroute_keep"
    with pytest.raises(RoutingConfigError, match="allows reroute, off"):
        config_for_extra_args(base, {"recroute_mode": "remove"})
    with pytest.raises(RoutingConfigError, match="minimum is 64"):
        config_for_extra_args(base, {"recroute_avg_visual_tokens": 32})
    with pytest.raises(RoutingConfigError, match=r"keep 0\.1 below"):
        config_for_extra_args(
            base, {"recroute_schedule": "custom", "recroute_custom": "[[1, 0.1]]"}
        )


def test_operator_can_disable_overrides():
    base = RoutingConfig(request_overrides=False)
    with pytest.raises(RoutingConfigError, match="disabled on this server"):
        config_for_extra_args(base, {"recroute_keep": 0.5})


def test_limit_fields_validated_at_startup():
    with pytest.raises(RoutingConfigError) as info:
        RoutingConfig(request_min_keep=1.5)
    assert info.value.field == "recroute.request_min_keep"
    with pytest.raises(RoutingConfigError) as info:
        RoutingConfig.from_dict({"request_modes": ["sometimes"]})
    assert info.value.field == "recroute.request_modes"


def test_kv_release_fixes_router_points_per_request():
    base = RoutingConfig(schedule="pdrop", kv_release=True)
    # same schedule, other budget or mode: fine (router points do not move)
    cfg = config_for_extra_args(
        base, {"recroute_schedule": "pdrop", "recroute_keep": 0.3, "recroute_mode": "remove"}
    )
    assert (cfg.keep, cfg.mode) == (0.3, "remove")
    for xargs in (
        {"recroute_schedule": "fastv"},
        {"recroute_router_layers": "[1, 2, 3]"},
        {"recroute_schedule": "custom", "recroute_custom": "[[1, 0.5]]"},
    ):
        with pytest.raises(RoutingConfigError, match="fixed on this server"):
            config_for_extra_args(base, xargs)


def test_reroute_every_per_request_needs_the_servers_parked_tier():
    parked = RoutingConfig(parked_bytes=1 << 20, reroute_every=4)
    assert config_for_extra_args(parked, {"recroute_reroute_every": 0}).reroute_every == 0
    assert config_for_extra_args(parked, {"recroute_reroute_every": 1}).reroute_every == 1
    with pytest.raises(RoutingConfigError) as info:
        config_for_extra_args(RoutingConfig(), {"recroute_reroute_every": 2})
    assert info.value.field == "recroute.reroute_every"
    assert "parked_bytes" in str(info.value)
