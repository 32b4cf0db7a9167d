"""One contract over every registered schedule and scorer (kvpress-style): a new entry in
`SCHEDULES` or `SCORERS` is tested here without writing a test of its own."""

from __future__ import annotations

import itertools

import pytest
import torch

from vllm_recroute.config import RoutingConfig, RoutingConfigError
from vllm_recroute.routing import SCORERS, ScoreInputs, average_retention, resolve_stages
from vllm_recroute.routing.schedule import SCHEDULES, get_schedule
from vllm_recroute.routing.scorers import query_indices

DEPTHS = (4, 16, 30, 32)


def _cfg(name: str, **kw) -> RoutingConfig:
    return RoutingConfig.from_dict({"schedule": name, **SCHEDULES[name].example, **kw})


def test_registries_are_what_the_config_accepts():
    for name in SCHEDULES:
        assert _cfg(name).schedule == name
    for name in SCORERS:
        assert RoutingConfig(scorer=name).scorer == name
    with pytest.raises(RoutingConfigError, match="allowed values: fastv, pdrop, custom"):
        RoutingConfig(schedule="nope")
    with pytest.raises(RoutingConfigError, match=r"recroute\.scorer"):
        RoutingConfig(scorer="nope")
    with pytest.raises(RoutingConfigError, match=r"recroute\.schedule"):
        get_schedule("nope")


@pytest.mark.parametrize("name", list(SCHEDULES))
@pytest.mark.parametrize("depth", DEPTHS)
def test_schedule_tiles_the_routed_layers(name, depth):
    stages = resolve_stages(_cfg(name), depth)
    assert stages, "a routing schedule routes something"
    assert stages[0].start >= 1
    assert stages[-1].end == depth
    for a, b in itertools.pairwise(stages):
        assert a.end == b.start and a.start < a.end
    assert all(0.0 < s.keep <= 1.0 for s in stages)
    assert resolve_stages(_cfg(name), depth) == stages  # deterministic


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_schedule_scales_with_depth_or_says_it_does_not(name):
    shallow, deep = resolve_stages(_cfg(name), 16), resolve_stages(_cfg(name), 32)
    starts_16 = [s.start for s in shallow]
    starts_32 = [s.start for s in deep]
    if SCHEDULES[name].scales_with_depth:
        assert [s.keep for s in shallow] == [s.keep for s in deep]
        assert all(abs(2 * a - b) <= 1 for a, b in zip(starts_16, starts_32, strict=True))
    else:
        assert starts_16 == starts_32


@pytest.mark.parametrize("name", [n for n in SCHEDULES if n != "custom"])
@pytest.mark.parametrize("avg", [64, 128, 192, 400])
def test_average_budget_is_met_where_reachable(name, avg):
    depth, num_visual = 32, 576
    stages = resolve_stages(_cfg(name, avg_visual_tokens=avg), depth, num_visual)
    got = average_retention(stages, depth)
    floor = average_retention(resolve_stages(_cfg(name, avg_visual_tokens=1), depth, 576), depth)
    target = avg / num_visual
    if target >= floor:
        assert got == pytest.approx(target, abs=1e-6)
    else:  # unreachable: the cheapest valid schedule, one token per stage
        assert got == pytest.approx(floor)


def test_custom_schedule_refuses_a_second_budget():
    with pytest.raises(RoutingConfigError, match=r"recroute\.avg_visual_tokens"):
        _cfg("custom", avg_visual_tokens=64)


def _inputs(seed: int, t: int = 12, heads: int = 4, kv_heads: int = 2, d: int = 8):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(t, heads, d, generator=g)
    k = torch.randn(t, kv_heads, d, generator=g)
    vis = torch.arange(2, 8)
    return ScoreInputs(q, k, vis, query_indices(t, vis, "question"), d**-0.5)


@pytest.mark.parametrize("name", list(SCORERS))
def test_scorer_contract(name):
    scorer = SCORERS[name]()
    x = _inputs(0)
    s = scorer.score(x)
    assert s.shape == (6,) and s.dtype == torch.float32 and bool(torch.isfinite(s).all())
    assert torch.equal(scorer.score(_inputs(0)), s)  # deterministic
    empty = ScoreInputs(x.q, x.k, torch.zeros(0, dtype=torch.long), x.query_idx, x.scale)
    assert scorer.score(empty).shape == (0,)


@pytest.mark.parametrize("name", list(SCORERS))
def test_a_scorer_that_says_it_is_causal_ignores_later_tokens(name):
    scorer = SCORERS[name]()
    x, y = _inputs(0), _inputs(0)
    y.q[8:] += 5.0  # change only tokens after the last visual token
    y.k[8:] -= 3.0
    same = torch.allclose(scorer.score(x), scorer.score(y))
    if scorer.causal:
        assert same
    else:  # guard: the perturbation is visible to a scorer that reads later tokens
        assert not same


@pytest.mark.parametrize("name", list(SCHEDULES))
@pytest.mark.parametrize("mode", ["reroute", "remove"])
@pytest.mark.parametrize("granularity", ["token", "block"])
@pytest.mark.parametrize("num_visual", [1, 7, 64, 130])
def test_planned_deferred_counts_match_the_decision(name, mode, granularity, num_visual):
    """The scheduler's plan (kv/manager.py allocates compacted pages from it) equals the
    deferred counts every decision takes, whatever the scores: exactly for token
    granularity, as a floor for block granularity."""
    from vllm_recroute.routing import num_keep, planned_deferred, resolve_stages, route_request

    cfg = _cfg(name, mode=mode, granularity=granularity, block_size=8)
    plan = planned_deferred(cfg, 16, num_visual)
    stages = resolve_stages(cfg, 16, num_visual)
    assert len(plan) == len(stages) > 0  # guard: something is routed
    block_ids = torch.arange(3, 3 + num_visual) // 8 if granularity == "block" else None
    for seed in range(5):
        gen = torch.Generator().manual_seed(seed)
        prev = None
        for k, stage in enumerate(stages):
            scores = torch.rand(num_visual, generator=gen)
            keep = num_keep(stage.keep, num_visual)
            prev = route_request(scores, keep, mode, prev, block_ids=block_ids)
            deferred = num_visual - int(prev.sum())
            if granularity == "token":
                assert deferred == plan[k], (seed, k)
            else:
                assert deferred >= plan[k], (seed, k)
