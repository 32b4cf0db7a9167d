"""Schedules: exact stages per depth, budgets, and out-of-range router layers."""

from __future__ import annotations

import pytest

from vllm_recroute.config import RoutingConfig, RoutingConfigError
from vllm_recroute.routing.budget import Stage, average_retention, num_keep, stage_at
from vllm_recroute.routing.schedule import resolve_stages, router_points


def _cfg(**kw) -> RoutingConfig:
    return RoutingConfig.from_dict(kw)


@pytest.mark.parametrize(
    ("layers", "expected"),
    [
        (4, (Stage(1, 4, 0.5),)),  # 2*4/32 rounds to 0 -> clamped to layer 1
        (24, (Stage(2, 24, 0.5),)),  # 1.5 rounds half up
        (30, (Stage(2, 30, 0.5),)),
        (32, (Stage(2, 32, 0.5),)),
    ],
)
def test_fastv_stages(layers: int, expected: tuple[Stage, ...]) -> None:
    assert resolve_stages(_cfg(), layers) == expected


@pytest.mark.parametrize(
    ("layers", "expected"),
    [
        (4, (Stage(1, 2, 0.5), Stage(2, 3, 0.25), Stage(3, 4, 0.125))),
        (24, (Stage(6, 12, 0.5), Stage(12, 18, 0.25), Stage(18, 24, 0.125))),
        # 7.5 and 22.5 round half up (Python's round() would give 8 and 22)
        (30, (Stage(8, 15, 0.5), Stage(15, 23, 0.25), Stage(23, 30, 0.125))),
        (32, (Stage(8, 16, 0.5), Stage(16, 24, 0.25), Stage(24, 32, 0.125))),
    ],
)
def test_pdrop_stages(layers: int, expected: tuple[Stage, ...]) -> None:
    assert resolve_stages(_cfg(schedule="pdrop"), layers) == expected


def test_pdrop_shallow_model_dedups_with_later_keep() -> None:
    # L=3: points 1, 2, 2 -> the stage [2, 2) is empty; layer 2 on runs with λ³
    assert resolve_stages(_cfg(schedule="pdrop"), 3) == (Stage(1, 2, 0.5), Stage(2, 3, 0.125))
    # L=2: points 1, 1, 2 -> only layer 1 routed, with λ² (2 is out of range)
    assert resolve_stages(_cfg(schedule="pdrop"), 2) == (Stage(1, 2, 0.25),)


def test_keep_and_reference_layers_and_router_override() -> None:
    assert resolve_stages(_cfg(keep=0.25), 32) == (Stage(2, 32, 0.25),)
    assert resolve_stages(_cfg(reference_layers=16), 32) == (Stage(4, 32, 0.5),)
    assert resolve_stages(_cfg(router_layers=[5]), 32) == (Stage(5, 32, 0.5),)
    pdrop = _cfg(schedule="pdrop", keep=0.6, router_layers=[2, 6, 12])
    got = resolve_stages(pdrop, 32)
    assert [(s.start, s.end) for s in got] == [(2, 6), (6, 12), (12, 32)]
    assert [s.keep for s in got] == pytest.approx([0.6, 0.36, 0.216])


def test_custom_stages() -> None:
    cfg = _cfg(schedule="custom", custom=[[3, 0.75], [10, 0.2], [20, 0.6]])
    assert resolve_stages(cfg, 24) == (Stage(3, 10, 0.75), Stage(10, 20, 0.2), Stage(20, 24, 0.6))
    assert router_points(cfg, 24) == (3, 10, 20)


@pytest.mark.parametrize(
    ("cfg", "layers", "field"),
    [
        ({"schedule": "custom", "custom": [[3, 0.5], [32, 0.2]]}, 32, "recroute.custom"),
        ({"router_layers": [4]}, 4, "recroute.router_layers"),
        ({"schedule": "pdrop", "router_layers": [2, 3, 9]}, 8, "recroute.router_layers"),
        ({}, 1, "recroute.schedule"),  # fastv's layer 1 is not < 1 layer
        ({"schedule": "pdrop"}, 1, "recroute.schedule"),
    ],
)
def test_router_layer_out_of_range(cfg: dict, layers: int, field: str) -> None:
    with pytest.raises(RoutingConfigError) as info:
        resolve_stages(_cfg(**cfg), layers)
    assert info.value.field == field
    assert str(layers) in str(info.value)


def test_off_has_no_stages() -> None:
    assert resolve_stages(_cfg(mode="off"), 32) == ()
    assert resolve_stages(_cfg(mode="off", avg_visual_tokens=64), 32) == ()
    assert router_points(_cfg(mode="off"), 32) == ()


def test_average_retention() -> None:
    assert average_retention((), 32) == 1.0
    # 2 full layers + 30 layers at 0.5 -> (2 + 15) / 32
    assert average_retention((Stage(2, 32, 0.5),), 32) == pytest.approx(17 / 32)


@pytest.mark.parametrize("budget", [192, 128, 64])
@pytest.mark.parametrize(
    "cfg",
    [{}, {"schedule": "pdrop", "router_layers": [2, 6, 12]}],
    ids=["fastv", "pdrop-2-6-12"],
)
def test_avg_visual_tokens_hits_target(budget: int, cfg: dict) -> None:
    stages = resolve_stages(_cfg(avg_visual_tokens=budget, **cfg), 32, num_visual=576)
    assert abs(average_retention(stages, 32) - budget / 576) < 1e-3
    assert all(0 < s.keep <= 1 for s in stages)


def test_avg_visual_tokens_pdrop_default_points() -> None:
    stages = resolve_stages(_cfg(schedule="pdrop", avg_visual_tokens=192), 32, num_visual=576)
    assert [(s.start, s.end) for s in stages] == [(8, 16), (16, 24), (24, 32)]
    assert abs(average_retention(stages, 32) - 192 / 576) < 1e-3
    lam = stages[0].keep
    assert [s.keep for s in stages] == pytest.approx([lam, lam**2, lam**3])
    # deterministic: same inputs, same floats
    assert stages == resolve_stages(_cfg(schedule="pdrop", avg_visual_tokens=192), 32, 576)


def test_avg_visual_tokens_unreachable_clamps_to_one_token() -> None:
    # pdrop's first 8 of 32 layers see everything: retention >= 0.25 > 64/576
    stages = resolve_stages(_cfg(schedule="pdrop", avg_visual_tokens=64), 32, num_visual=576)
    assert all(s.keep == pytest.approx(1 / 576) for s in stages)
    assert all(num_keep(s.keep, 576) == 1 for s in stages)
    fastv = resolve_stages(_cfg(avg_visual_tokens=1), 32, num_visual=576)
    assert fastv == (Stage(2, 32, 1 / 576),)


def test_avg_visual_tokens_edge_cases() -> None:
    # budget above the request's visual tokens -> keep everything
    assert resolve_stages(_cfg(avg_visual_tokens=1000), 32, 576) == (Stage(2, 32, 1.0),)
    assert resolve_stages(_cfg(avg_visual_tokens=64), 32, 0) == (Stage(2, 32, 1.0),)
    with pytest.raises(ValueError, match="num_visual"):
        resolve_stages(_cfg(avg_visual_tokens=64), 32)
    # router points never depend on the request
    assert router_points(_cfg(schedule="pdrop", avg_visual_tokens=64), 32) == (8, 16, 24)


@pytest.mark.parametrize(
    ("keep", "num_visual", "expected"),
    [
        (0.5, 576, 288),
        (0.5, 5, 3),  # half rounds up
        (0.5, 7, 4),
        (0.001, 576, 1),  # at least one token
        (1.0, 576, 576),
        (0.3, 0, 0),
        (1.0, 1, 1),
    ],
)
def test_num_keep(keep: float, num_visual: int, expected: int) -> None:
    assert num_keep(keep, num_visual) == expected


def test_stage_at_maps_layers_to_their_stage():
    stages = (Stage(2, 5, 0.5), Stage(5, 8, 0.25))
    assert [stage_at(stages, i) for i in range(9)] == [None, None, 0, 0, 0, 1, 1, 1, None]
    assert stage_at((), 3) is None


@pytest.mark.parametrize(
    ("layers", "expected"),
    [
        # 2/32, 6/32, 15/32 of depth; on shallow models collisions move one layer later
        (3, (Stage(1, 2, 0.5), Stage(2, 3, 0.25))),
        (4, (Stage(1, 2, 0.5), Stage(2, 3, 0.25), Stage(3, 4, 0.125))),
        (16, (Stage(1, 3, 0.5), Stage(3, 8, 0.25), Stage(8, 16, 0.125))),  # 7.5 rounds up
        (32, (Stage(2, 6, 0.5), Stage(6, 15, 0.25), Stage(15, 32, 0.125))),
    ],
)
def test_sparsevlm_stages(layers: int, expected: tuple[Stage, ...]) -> None:
    assert resolve_stages(_cfg(schedule="sparsevlm"), layers) == expected


def test_sparsevlm_reaches_64_of_576_where_pdrop_cannot() -> None:
    for layers in (16, 32):
        sparse = resolve_stages(_cfg(schedule="sparsevlm", avg_visual_tokens=64), layers, 576)
        assert average_retention(sparse, layers) == pytest.approx(64 / 576, abs=1e-6)
        lam = sparse[0].keep
        assert [s.keep for s in sparse] == pytest.approx([lam, lam**2, lam**3])
        pdrop = resolve_stages(_cfg(schedule="pdrop", avg_visual_tokens=64), layers, 576)
        assert average_retention(pdrop, layers) > 0.25  # unreachable: one token per stage


def test_sparsevlm_router_override_and_errors() -> None:
    stages = resolve_stages(_cfg(schedule="sparsevlm", keep=0.4, router_layers=[1, 2, 4]), 8)
    assert [(s.start, s.end) for s in stages] == [(1, 2), (2, 4), (4, 8)]
    assert [s.keep for s in stages] == pytest.approx([0.4, 0.16, 0.064])
    assert resolve_stages(_cfg(schedule="sparsevlm"), 2) == (Stage(1, 2, 0.5),)
    with pytest.raises(RoutingConfigError, match=r"recroute\.router_layers"):
        _cfg(schedule="sparsevlm", router_layers=[1, 2])
    with pytest.raises(RoutingConfigError, match=r"recroute\.router_layers"):
        resolve_stages(_cfg(schedule="sparsevlm", router_layers=[1, 2, 8]), 8)
    with pytest.raises(RoutingConfigError, match=r"recroute\.schedule"):
        resolve_stages(_cfg(schedule="sparsevlm"), 1)


def test_stage_numbers_are_the_kv_spec_stages_of_the_layers():
    """spec_stage(k) is the stage every layer of the request's k-th routed stage reports in
    its KV spec (worker/decoder.py: the router points at or before the layer), and 0 is
    never a routed stage."""
    from vllm_recroute.routing import router_points, spec_stage

    cfg = RoutingConfig(schedule="pdrop")
    points = router_points(cfg, 32)
    for k, stage in enumerate(resolve_stages(cfg, 32)):
        for layer in range(stage.start, stage.end):
            assert sum(1 for p in points if p <= layer) == spec_stage(k) >= 1
    with pytest.raises(ValueError):
        spec_stage(-1)


# ------------------------------------------------- the paper's layouts (issue 25)

# The keep ratios of "Reroute, Don't Remove"'s released configs for 32-layer LLaVA-1.5
# (elmma/mllm-reroute, configs/experiment/llava15/avg{192,128,64}/*.yaml), per schedule and
# average budget of 576 visual tokens
PAPER_KEEPS = {
    ("fastv-matched", 192): (0.2644,) * 4,  # = fastv_K3's keep_ratio
    ("fastv-matched", 128): (0.1418,) * 4,
    ("fastv-matched", 64): (0.01916,) * 4,
    ("pdrop-matched", 192): (0.4502, 0.4502, 0.2251, 0.1126),
    ("pdrop-matched", 128): (0.2655, 0.2655, 0.1328, 0.0664),
    ("pdrop-early", 192): (0.5965, 0.3558, 0.2123, 0.1266),
    ("pdrop-early", 128): (0.4570, 0.2088, 0.0954, 0.0436),
}


@pytest.mark.parametrize(("name", "avg"), list(PAPER_KEEPS))
def test_paper_layouts_reproduce_the_released_configs(name: str, avg: int) -> None:
    stages = resolve_stages(_cfg(schedule=name, avg_visual_tokens=avg), 32, 576)
    expected_points = (3, 7, 15, 23) if name == "fastv-matched" else (2, 7, 15, 23)
    assert tuple(s.start for s in stages) == expected_points
    assert [s.keep for s in stages] == pytest.approx(PAPER_KEEPS[name, avg], abs=1e-4)
    assert average_retention(stages, 32) == pytest.approx(avg / 576, abs=1e-9)


@pytest.mark.parametrize("name", ["fastv-matched", "pdrop-matched", "pdrop-early"])
def test_paper_layouts_scale_down_without_raising_the_floor(name: str) -> None:
    # floor, not rounding: on 16 layers the first point stays at 1 (1.5 would round to 2,
    # and 2 full layers of 16 put the paper's 11% out of reach)
    assert router_points(_cfg(schedule=name), 16) == (1, 3, 7, 11)
    assert router_points(_cfg(schedule=name), 4) == (1, 2, 3)  # collisions move later
    stages = resolve_stages(_cfg(schedule=name, avg_visual_tokens=7), 16, 64)
    assert average_retention(stages, 16) == pytest.approx(7 / 64, abs=1e-9)


def test_paper_layout_keeps() -> None:
    assert [s.keep for s in resolve_stages(_cfg(schedule="fastv-matched", keep=0.3), 32)] == [
        0.3
    ] * 4
    assert [s.keep for s in resolve_stages(_cfg(schedule="pdrop-matched", keep=0.4), 32)] == [
        0.4, 0.4, 0.2, 0.1
    ]  # fmt: skip
    early = [s.keep for s in resolve_stages(_cfg(schedule="pdrop-early", keep=0.5), 32)]
    assert early == [0.5, 0.25, 0.125, 0.0625]
    with pytest.raises(RoutingConfigError, match="needs exactly 4 router layer"):
        _cfg(schedule="pdrop-matched", router_layers=[1, 2, 3])
