"""The vLLM routed path takes the oracle's tokens, for every mode and schedule, batched."""

from __future__ import annotations

from collections import Counter

import pytest

from tests.helpers import (
    CONFIGS,
    REQUESTS,
    generate,
    oracle,
    request_inputs,
    route_counters,
    routed_path,
    routed_path_delta,
    runtime_of,
    xargs,
)

pytestmark = pytest.mark.engine


@pytest.mark.parametrize("name", list(CONFIGS))
def test_batch_matches_oracle(routed_llm, hf_eager, tiny_idefics3, name):
    cfg = CONFIGS[name]
    outputs = generate(routed_llm, tiny_idefics3, [cfg] * len(REQUESTS))
    for spec, out in zip(REQUESTS, outputs, strict=True):
        prompt_ids, expected = oracle(hf_eager, tiny_idefics3, spec, cfg)
        assert out.prompt_token_ids == prompt_ids
        assert list(out.outputs[0].token_ids) == expected, (name, spec)


# name -> (segments that move rows, scoring layers inside a segment) on the 4-layer model
SEGMENTS = {"fastv-reroute": (1, 0), "pdrop-reroute": (3, 0), "custom-reroute-wide": (2, 1)}


@pytest.mark.parametrize("name", sorted(SEGMENTS))
def test_a_routed_prefill_moves_rows_once_per_segment(routed_llm, tiny_idefics3, name):
    """The routed path (enforce_eager: eager pieces) gathers a segment's active rows once
    and scatters them once, not at every layer; a scoring layer inside a segment sees
    the full stream through one more scatter. Every layer runs once, in pieces."""
    moving, inside = SEGMENTS[name]
    before = routed_path(routed_llm)
    generate(routed_llm, tiny_idefics3, [CONFIGS[name]] * len(REQUESTS))
    [d] = routed_path_delta(routed_llm, before)
    forwards = d["forwards"]["eager"]
    assert forwards >= 1  # guard: routed prefills took the routed path
    want = {"gather": moving, "scatter": moving, "materialize": inside}
    assert d["moves"] == Counter({k: n * forwards for k, n in want.items()})
    # stage 0 and each segment, one piece more around each inner scoring layer
    assert d["pieces"] == Counter(eager=(1 + moving + inside) * forwards)


def test_mixed_batch_matches_oracle(routed_llm, hf_eager, tiny_idefics3):
    cfgs = [CONFIGS["pdrop-remove"], CONFIGS["off"], CONFIGS["custom-reroute-question"]]
    outputs = generate(routed_llm, tiny_idefics3, cfgs)
    for spec, cfg, out in zip(REQUESTS, cfgs, outputs, strict=True):
        _, expected = oracle(hf_eager, tiny_idefics3, spec, cfg)
        assert list(out.outputs[0].token_ids) == expected, (cfg, spec)


def test_a_batch_scored_before_and_at_the_router_layer_matches_oracle(
    routed_llm, hf_eager, tiny_idefics3
):
    # one forward scores request 0 before layer 1 and requests 1, 2 at it (score_layer)
    cfgs = [CONFIGS["custom-reroute-question"], CONFIGS["custom-reroute-question-at"],
            CONFIGS["fastv-matched-reroute-at"]]  # fmt: skip
    outputs = generate(routed_llm, tiny_idefics3, cfgs)
    for spec, cfg, out in zip(REQUESTS, cfgs, outputs, strict=True):
        _, expected = oracle(hf_eager, tiny_idefics3, spec, cfg)
        assert list(out.outputs[0].token_ids) == expected, (cfg, spec)


def test_scoring_at_the_router_layer_changes_the_decision(routed_llm, tiny_idefics3):
    # the guard of the two tests above: score_layer is not ignored
    _assert_every_answer_differs(routed_llm, tiny_idefics3, "custom-reroute-question",
                                 "custom-reroute-question-at")  # fmt: skip


def test_brakes_on_returning_tokens_change_the_decision(routed_llm, tiny_idefics3):
    # the guard of the braked config's oracle equality (test_batch_matches_oracle)
    _assert_every_answer_differs(routed_llm, tiny_idefics3, "custom-reroute-braked",
                                 "custom-reroute-unbraked")  # fmt: skip


def test_the_reentry_update_changes_the_answer_and_is_counted(routed_llm, tiny_idefics3):
    # the guard of custom-reroute-reentry's oracle equality (test_batch_matches_oracle),
    # and the ledger's returners: stage 2 keeps 3 times stage 1, so tokens come back
    before = route_counters(routed_llm)
    _assert_every_answer_differs(routed_llm, tiny_idefics3, "custom-reroute-question",
                                 "custom-reroute-reentry")  # fmt: skip
    after = route_counters(routed_llm)
    returned = after["stage_returned_visual_tokens"].get("2", 0)
    assert returned - before["stage_returned_visual_tokens"].get("2", 0) > 0
    assert after["routing_extra_flops"] > before["routing_extra_flops"]


def _logprobs(out) -> list[float]:
    return [next(iter(lp.values())).logprob for lp in out.outputs[0].logprobs]


def _assert_every_answer_differs(llm, model, name_a: str, name_b: str) -> None:
    """REQUESTS under the two configs give different log-probabilities, request by request."""
    a_outs = generate(llm, model, [CONFIGS[name_a]] * len(REQUESTS))
    b_outs = generate(llm, model, [CONFIGS[name_b]] * len(REQUESTS))
    for a, b in zip(a_outs, b_outs, strict=True):
        assert _logprobs(a) != pytest.approx(_logprobs(b), abs=1e-4), (name_a, name_b)


def test_remove_differs_from_reroute_when_tokens_come_back(routed_llm, tiny_idefics3):
    # Stage 2 keeps more than stage 1: reroute brings deferred tokens back, remove cannot.
    _assert_every_answer_differs(routed_llm, tiny_idefics3, "custom-reroute-question",
                                 "custom-remove-question")  # fmt: skip


def test_finished_requests_leave_no_routing_state(routed_llm, tiny_idefics3):
    before = route_counters(routed_llm)["routed_requests"]
    generate(routed_llm, tiny_idefics3, [CONFIGS["pdrop-reroute"]] * 3)
    assert route_counters(routed_llm)["routed_requests"] == before + 3

    def stored(worker):
        return len(runtime_of(worker).store)

    # vLLM reports finished ids with the next step; run one more (text-only) request.
    from vllm import SamplingParams

    routed_llm.generate(["hello"], SamplingParams(max_tokens=2), use_tqdm=False)
    assert routed_llm.collective_rpc(stored) == [0]


def test_aborted_requests_leave_no_routing_state(routed_llm, tiny_idefics3):
    from vllm import SamplingParams

    engine = routed_llm.llm_engine
    prompt, images = request_inputs(str(tiny_idefics3), REQUESTS[0])
    params = SamplingParams(
        max_tokens=200, ignore_eos=True, extra_args=xargs(CONFIGS["pdrop-reroute"])
    )
    engine.add_request(
        "abort-me", {"prompt": prompt, "multi_modal_data": {"image": images}}, params
    )
    for _ in range(4):  # prefill (routed) and a few decode steps
        engine.step()

    def stored(worker):
        return runtime_of(worker).store.request_ids()

    # state exists mid-request (vLLM suffixes the external id internally)
    [[held]] = routed_llm.collective_rpc(stored)
    assert held.startswith("abort-me")
    engine.abort_request(["abort-me"])
    routed_llm.generate(["hello"], SamplingParams(max_tokens=2), use_tqdm=False)
    assert routed_llm.collective_rpc(stored) == [[]]
