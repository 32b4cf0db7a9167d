"""A routed engine under vLLM's default compilation takes the oracle's tokens.

vLLM CPU compiles by default (``CompilationMode.DYNAMO_TRACE_ONCE``, inductor): the text
model is traced once, with the layer wrappers traced as plain layers. A step whose routing
moves rows (a routed prefill) bypasses that graph (``skip_compiled``) and runs each
segment's layers as one compiled piece over its active rows (``prefill_path: compiled``;
eager pieces with ``prefill_path: eager``); every other step, the decode steps of routed
requests included, runs the compiled graph with compacted attention installed before it;
a decode step where the parked tier re-routes does its swaps inside the attention op of
each due stage's first layer (worker/decoder.py, "Compilation"), or runs on the routed
path with ``reroute_path: eager``.
"""

from __future__ import annotations

from collections import Counter

import pytest

from tests.helpers import (
    CONFIGS,
    MAX_TOKENS,
    PARKING,
    REQUESTS,
    ROUTED_IDEFICS3,
    delta,
    generate,
    generate_as_parked_reference,
    make_llm,
    oracle,
    reroute_forwards,
    route_counters,
    routed_path,
    routed_path_delta,
    shutdown,
)

pytestmark = pytest.mark.engine


MIXED_STEP_BUDGET = 256


@pytest.fixture(scope="module")
def compiled_llm(tiny_idefics3):
    # reroute_every 0: the parked tier parks, but decode steps never re-route unless a
    # request asks (recroute_reroute_every: its re-routing steps stay compiled, below)
    llm = make_llm(
        tiny_idefics3,
        routed_arch=ROUTED_IDEFICS3,
        recroute={"mode": "reroute", **PARKING, "reroute_every": 0},
        enforce_eager=False,  # vLLM's default compilation
        # REQUESTS' prompts are 107 + 116 + 107 tokens: a batch of all three prefills in
        # two steps, so the second step has a prefill beside decoding requests (in every
        # engine mode: not left to when each request reaches the engine core)
        max_num_batched_tokens=MIXED_STEP_BUDGET,
    )
    yield llm
    shutdown(llm)


def _worker_view(worker):
    from vllm.config import CompilationMode

    runner = worker.model_runner
    model = runner.get_model()
    return {
        "mode": CompilationMode(runner.vllm_config.compilation_config.mode).name,
        "compiled": bool(getattr(model.model.text_model, "compiled", False)),
        "forwards": dict(model.recroute.forwards),
        # (op, native, kernel): under inductor vLLM's norms / activation / rotary run their
        # native forward; the eager routed forward switches to the kernels and back
        "native_ops": len(model.recroute._native_ops),
        "restored": all(op._forward_method == n for op, n, _ in model.recroute._native_ops),
    }


def _view(llm) -> dict:
    [view] = llm.collective_rpc(_worker_view)
    return view


def test_engine_runs_compiled(compiled_llm):
    view = _view(compiled_llm)
    # guard: the engine really compiled its text model (not eager, not skipped)
    assert view["mode"] == "DYNAMO_TRACE_ONCE"
    assert view["compiled"] is True
    assert view["native_ops"] > 0 and view["restored"]


# name -> (segments that move rows, scoring layers inside a segment) on the 4-layer model
SEGMENTS = {
    "fastv-reroute": (1, 0),
    "fastv-remove": (1, 0),
    "pdrop-reroute": (3, 0),
    "pdrop-remove": (3, 0),
    "custom-reroute-wide": (2, 1),
}


def _assert_pieces(d: dict, name: str, kind: str) -> None:
    """Per routed-path forward: one gather and one scatter per segment that moves rows,
    every layer run once in pieces of ``kind`` (stage 0, each segment, one more around
    an inner scoring layer)."""
    moving, inside = SEGMENTS[name]
    forwards = d["forwards"]["eager"]
    assert forwards >= 1  # guard: the routed prefills took the routed path
    want = {"gather": moving, "scatter": moving, "materialize": inside}
    assert d["moves"] == Counter({k: n * forwards for k, n in want.items()})
    assert d["pieces"] == Counter({kind: (1 + moving + inside) * forwards})


@pytest.mark.parametrize("name", sorted(SEGMENTS))
def test_compiled_batch_matches_oracle(compiled_llm, hf_eager, tiny_idefics3, name):
    cfg = CONFIGS[name]
    before = routed_path(compiled_llm)
    outputs = generate(compiled_llm, tiny_idefics3, [cfg] * len(REQUESTS))
    for spec, out in zip(REQUESTS, outputs, strict=True):
        _, expected = oracle(hf_eager, tiny_idefics3, spec, cfg)
        assert list(out.outputs[0].token_ids) == expected, (name, spec)
    [d] = routed_path_delta(compiled_llm, before)
    # the routed prefills ran their segments as compiled pieces; the decode steps of the
    # routed requests (their stages hold fewer tokens) are the compiled forward with
    # compacted attention
    _assert_pieces(d, name, "compiled")
    assert d["forwards"]["installed"] >= MAX_TOKENS - 1


def test_compiled_pieces_take_any_row_count_without_recompiling(compiled_llm, tiny_idefics3):
    """The row dimension of a piece is dynamic: once pdrop's pieces are compiled, other
    keep counts (other active row counts per segment) and another batch mix trace no
    new graph."""
    generate(compiled_llm, tiny_idefics3, [CONFIGS["pdrop-reroute"]] * len(REQUESTS))
    before = routed_path(compiled_llm)
    generate(compiled_llm, tiny_idefics3, [CONFIGS["pdrop-avg-tokens"]] * len(REQUESTS))
    generate(compiled_llm, tiny_idefics3, [CONFIGS["pdrop-reroute"]] * 2 + [CONFIGS["off"]])
    [d] = routed_path_delta(compiled_llm, before)
    assert d["pieces"]["compiled"] >= 8 and d["pieces"]["eager"] == 0  # guard: they ran
    assert d["graphs"]["traced"] == 0


def test_compiled_mixed_batch_matches_oracle(compiled_llm, hf_eager, tiny_idefics3):
    cfgs = [CONFIGS["pdrop-remove"], CONFIGS["off"], CONFIGS["custom-reroute-question"]]
    outputs = generate(compiled_llm, tiny_idefics3, cfgs)
    for spec, cfg, out in zip(REQUESTS, cfgs, outputs, strict=True):
        _, expected = oracle(hf_eager, tiny_idefics3, spec, cfg)
        assert list(out.outputs[0].token_ids) == expected, (cfg, spec)


def test_compiled_decode_rerouting_matches_the_parked_reference(
    compiled_llm, hf_model, tiny_idefics3
):
    """Re-routing decode steps (parked tier, per-request reroute_every 1: every decode step
    of the batch's three requests re-routes) stay compiled: the swaps run inside the
    attention op of each stage's first layer; the tokens are the parked reference's."""
    before, ops_before = _view(compiled_llm)["forwards"], reroute_forwards(compiled_llm)
    restored_before = route_counters(compiled_llm)["restored_blocks"]
    cfg = {**CONFIGS["pdrop-reroute"], "reroute_every": 1}
    restored = generate_as_parked_reference(compiled_llm, hf_model, tiny_idefics3, cfg)
    assert restored > 0  # guard: the reference's units really came back at decode
    # guard: the engine restored as many (the swaps happened, in the hooks)
    assert route_counters(compiled_llm)["restored_blocks"] - restored_before == restored
    forwards = delta(_view(compiled_llm)["forwards"], before)
    rerouting = delta(reroute_forwards(compiled_llm), ops_before)
    # every pure-decode step re-routes, on the compiled path; only the prefill steps are
    # eager (a later prefill beside decoding requests re-routes them there: eager anyway)
    assert rerouting["installed"] >= MAX_TOKENS - 1 and rerouting["eager"] == 0
    assert forwards["eager"] == 1 + rerouting["with_prefill"]
    # guard: the token budget splits the batch's prefills, so one re-routes the requests
    # already decoding in its step (the eager tier path of a mixed step)
    assert rerouting["with_prefill"] >= 1
    assert forwards["installed"] == rerouting["installed"]
    # pdrop: 3 stages, so 3 stage-start layers hooked (and fired) per re-routing step
    assert rerouting["hooks"] == 3 * rerouting["installed"]


@pytest.fixture(scope="module")
def eager_rerouting_llm(tiny_idefics3):
    """The same compiled engine with the fallbacks: re-routing decode steps run eager,
    and the routed path runs its segments' layers eager (vLLM's eager kernels)."""
    fallbacks = {"reroute_path": "eager", "prefill_path": "eager"}
    llm = make_llm(
        tiny_idefics3,
        routed_arch=ROUTED_IDEFICS3,
        recroute={"mode": "reroute", **PARKING, "reroute_every": 0, **fallbacks},
        enforce_eager=False,
    )
    yield llm
    shutdown(llm)


@pytest.mark.parametrize("name", ["pdrop-reroute", "custom-reroute-wide"])
def test_eager_prefill_fallback_matches_oracle(eager_rerouting_llm, hf_eager, tiny_idefics3, name):
    """prefill_path 'eager' on a compiled engine: the same segments, gathered and
    scattered once each, their layers run eager on vLLM's kernels (switched for the
    forward and back), the oracle's tokens."""
    llm, cfg = eager_rerouting_llm, CONFIGS[name]
    before = routed_path(llm)
    outputs = generate(llm, tiny_idefics3, [cfg] * len(REQUESTS))
    for spec, out in zip(REQUESTS, outputs, strict=True):
        _, expected = oracle(hf_eager, tiny_idefics3, spec, cfg)
        assert list(out.outputs[0].token_ids) == expected, (name, spec)
    [d] = routed_path_delta(llm, before)
    _assert_pieces(d, name, "eager")
    view = _view(llm)
    assert view["mode"] == "DYNAMO_TRACE_ONCE" and view["compiled"] is True
    assert view["native_ops"] > 0 and view["restored"]


def test_eager_rerouting_fallback_matches_the_parked_reference(
    eager_rerouting_llm, hf_model, tiny_idefics3
):
    """reroute_path 'eager': every re-routing step goes eager (the layer wrappers' tier
    path), no attention op is hooked; the same tokens and restores. (Its segments run
    eager too here; with prefill_path 'compiled' they run compiled, as in a prefill.)"""
    llm = eager_rerouting_llm
    before, ops_before = _view(llm)["forwards"], reroute_forwards(llm)
    restored_before = route_counters(llm)["restored_blocks"]
    cfg = {**CONFIGS["pdrop-reroute"], "reroute_every": 1}
    restored = generate_as_parked_reference(llm, hf_model, tiny_idefics3, cfg)
    assert restored > 0
    assert route_counters(llm)["restored_blocks"] - restored_before == restored
    forwards = delta(_view(llm)["forwards"], before)
    rerouting = delta(reroute_forwards(llm), ops_before)
    assert rerouting["eager"] >= MAX_TOKENS - 1
    assert rerouting["installed"] == 0 and rerouting["hooks"] == 0
    assert forwards["eager"] == 1 + rerouting["with_prefill"] + rerouting["eager"]
    assert forwards["installed"] == 0  # every decode step of the batch re-routes
