"""--tensor-parallel-size 2 (gloo, one worker per core): every rank takes the one routing
decision, so greedy tokens equal TP 1's and the oracle's for every mode and schedule, a
mixed per-request batch, the parked tier with decode-time re-routing, a kept later turn
and kv_release; metrics count once per engine. Guard: without the reduction across ranks
the same requests give other tokens."""

from __future__ import annotations

from collections import Counter

import pytest

from reference.oracle import oracle_generate_parked
from tests.helpers import (
    CONFIGS,
    MAX_TOKENS,
    NEXT_QUESTION,
    REQUESTS,
    TURNS,
    delta,
    flush,
    generate,
    generate_as_parked_reference,
    hf_inputs,
    hold_request,
    oracle,
    pool_state,
    prom_counter,
    request_inputs,
    reroute_forwards,
    route_counters,
    routed_path,
    routed_path_delta,
    runtime_of,
    two_turns,
)
from vllm_recroute.config import RoutingConfig

pytestmark = pytest.mark.engine

ROUTED = [
    "fastv-reroute",
    "fastv-remove",
    "pdrop-reroute",
    "pdrop-remove",
    "pdrop-reroute-keynorm-block",
    "custom-reroute-question",
]
NO_SWAPS = {"reroute_every": 0}  # the tp2 engine parks; without swaps tokens are the oracle's
PARKING = {k: v for k, v in TURNS.items() if k != "turn_cache_bytes"}


def _tokens(outs) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in outs]


@pytest.mark.parametrize("engine", ["tp2"], indirect=True)
@pytest.mark.parametrize("name", ROUTED)
def test_tp2_equals_tp1_and_the_oracle(engine, routed_llm, hf_eager, tiny_idefics3, name):
    cfg = {**CONFIGS[name], **NO_SWAPS}
    tp2 = _tokens(generate(engine, tiny_idefics3, [cfg] * len(REQUESTS)))
    tp1 = _tokens(generate(routed_llm, tiny_idefics3, [CONFIGS[name]] * len(REQUESTS)))
    assert tp2 == tp1, name
    for spec, tokens in zip(REQUESTS, tp2, strict=True):
        assert tokens == oracle(hf_eager, tiny_idefics3, spec, CONFIGS[name])[1], (name, spec)


@pytest.mark.parametrize("engine", ["tp2"], indirect=True)
def test_tp2_mixed_per_request_batch(engine, hf_eager, tiny_idefics3):
    cfgs = [CONFIGS["pdrop-remove"], CONFIGS["off"], CONFIGS["custom-reroute-question"]]
    outs = generate(engine, tiny_idefics3, [{**c, **NO_SWAPS} for c in cfgs])
    for spec, cfg, tokens in zip(REQUESTS, cfgs, _tokens(outs), strict=True):
        assert tokens == oracle(hf_eager, tiny_idefics3, spec, cfg)[1], (cfg, spec)


@pytest.mark.parametrize("engine", ["tp2"], indirect=True)
def test_tp2_every_rank_moves_rows_once_per_segment(engine, hf_eager, tiny_idefics3):
    """Both ranks run the same routed path: per routed forward, one gather and one
    scatter for each of the two segments that move rows, and one scatter more for the
    scoring layer inside segment [1, 3); the oracle's tokens."""
    cfg = CONFIGS["custom-reroute-wide"]
    before = routed_path(engine)
    outs = generate(engine, tiny_idefics3, [{**cfg, **NO_SWAPS}] * len(REQUESTS))
    for spec, tokens in zip(REQUESTS, _tokens(outs), strict=True):
        assert tokens == oracle(hf_eager, tiny_idefics3, spec, cfg)[1], spec
    rank0, rank1 = routed_path_delta(engine, before)
    assert rank0 == rank1
    forwards = rank0["forwards"]["eager"]
    assert forwards >= 1
    assert rank0["moves"] == Counter(
        gather=2 * forwards, scatter=2 * forwards, materialize=forwards
    )


@pytest.mark.parametrize("engine", ["tp2"], indirect=True)
def test_tp2_parked_tier_reroutes_as_the_reference(engine, hf_model, tiny_idefics3):
    before = prom_counter("recroute:restored_blocks")
    paths = reroute_forwards(engine)
    cfg = {**CONFIGS["pdrop-reroute"], "reroute_every": PARKING["reroute_every"]}
    restored = generate_as_parked_reference(engine, hf_model, tiny_idefics3, cfg, PARKING)
    paths = delta(reroute_forwards(engine), paths)
    flush(engine)
    assert restored > 0
    # the decode re-routes ran in the stage-start attention ops (every rank's, in step:
    # the tier's head mean over ranks is a collective), none eager
    assert paths["installed"] > 0 and paths["hooks"] > 0 and paths["eager"] == 0
    # counted once per engine, not once per rank
    assert prom_counter("recroute:restored_blocks") - before == restored


@pytest.mark.parametrize("engine", ["tp2"], indirect=True)
def test_tp2_kept_later_turn_matches_the_reference(engine, hf_model, tiny_idefics3):
    cfg = {**CONFIGS["pdrop-reroute"], "reroute_every": 2}
    full = RoutingConfig.from_dict({**cfg, **PARKING})
    for spec in REQUESTS:
        first, second, new_ids = two_turns(engine, tiny_idefics3, spec, cfg, NEXT_QUESTION)
        prompt, images = request_inputs(str(tiny_idefics3), spec)
        inputs = hf_inputs(str(tiny_idefics3), prompt, images)
        expected_2, _ = oracle_generate_parked(
            hf_model, inputs, full, MAX_TOKENS, next_turn=(new_ids, MAX_TOKENS, True)
        )
        assert list(second.outputs[0].token_ids) == expected_2, spec
        assert second.num_cached_tokens == len(first.prompt_token_ids) + MAX_TOKENS - 1


@pytest.mark.parametrize("engine", ["tp2"], indirect=True)
def test_tp2_metrics_count_once_and_pool_gauges_add_up(engine, tiny_idefics3):
    before = route_counters(engine)["routed_requests"]
    generate(engine, tiny_idefics3, [{**CONFIGS["pdrop-reroute"], **NO_SWAPS}] * len(REQUESTS))
    assert route_counters(engine)["routed_requests"] == before + len(REQUESTS)
    # mid-request, each rank holds its own shard of the parked units; /metrics says the sum
    core = engine.llm_engine
    # without swaps: a swap that parks an evicted unit's K/V (a different size from the
    # state it restores) changes the bytes at every step, and /metrics is a step behind
    hold_request(engine, tiny_idefics3, max_tokens=50, cfg={**CONFIGS["pdrop-reroute"], **NO_SWAPS})
    per_rank = engine.collective_rpc(pool_state)
    assert len(per_rank) == 2 and all(blocks > 0 for blocks, _, _ in per_rank)
    assert per_rank[0] == per_rank[1]  # same decisions, same shard sizes
    assert prom_counter("recroute:parked_pool_bytes") == sum(b for _, b, _ in per_rank)
    assert prom_counter("recroute:parked_pool_blocks") == sum(n for n, _, _ in per_rank)
    core.abort_request(["held"])
    while core.has_unfinished_requests():
        core.step()
    flush(engine)
    assert engine.collective_rpc(pool_state) == [(0, 0, 0), (0, 0, 0)]


def _skip_reduction(worker, skip: bool):
    from vllm_recroute.worker.tp import DecisionCheck, TPGroup

    rt = runtime_of(worker)
    if skip:
        rt._real_tp = rt.tp
        rt.tp = TPGroup(1)  # each rank routes on its own head shard (the old bug)
        rt.check = DecisionCheck(TPGroup(1))
    else:
        rt.tp = rt._real_tp
        rt.check = DecisionCheck(rt.tp)
    return True


@pytest.mark.parametrize("engine", ["tp2"], indirect=True)
def test_guard_without_the_reduction_tokens_are_wrong(engine, hf_eager, tiny_idefics3):
    cfg = {**CONFIGS["pdrop-reroute"], **NO_SWAPS}
    engine.collective_rpc(_skip_reduction, args=(True,))
    try:
        wrong = _tokens(generate(engine, tiny_idefics3, [cfg] * len(REQUESTS)))
    finally:
        engine.collective_rpc(_skip_reduction, args=(False,))
    expected = [oracle(hf_eager, tiny_idefics3, s, CONFIGS["pdrop-reroute"])[1] for s in REQUESTS]
    assert wrong != expected
    # and with the reduction back, the same engine is right again
    assert _tokens(generate(engine, tiny_idefics3, [cfg] * len(REQUESTS))) == expected


@pytest.mark.parametrize("engine", ["tp2-release"], indirect=True)
def test_tp2_kv_release_matches_the_oracle_and_releases(engine, hf_eager, tiny_idefics3):
    before = prom_counter("recroute:kv_blocks_released")
    cfg = {**CONFIGS["pdrop-reroute"], "reroute_every": 0}
    outs = generate(engine, tiny_idefics3, [cfg] * len(REQUESTS))
    for spec, tokens in zip(REQUESTS, _tokens(outs), strict=True):
        assert tokens == oracle(hf_eager, tiny_idefics3, spec, CONFIGS["pdrop-reroute"])[1]
    flush(engine)
    assert prom_counter("recroute:kv_blocks_released") > before
    usage = {m.name: m for m in engine.get_metrics()}["vllm:kv_cache_usage_perc"].value
    assert usage == 0.0
