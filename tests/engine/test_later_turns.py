"""recroute.turn_cache_bytes: a later turn of a conversation loads the earlier turn's stage
KV (pages and parked units) instead of recomputing the image, re-routes it for its own
question, and answers as the reference where nothing ever left memory."""

from __future__ import annotations

import pytest

from reference.oracle import oracle_generate_parked
from tests.helpers import (
    CONFIGS,
    MAX_TOKENS,
    NEXT_QUESTION,
    REQUESTS,
    ROUTED_IDEFICS3,
    TURNS,
    flush,
    hf_inputs,
    kv_usage,
    make_llm,
    pool_state,
    prom_counter,
    request_inputs,
    runtime_of,
    sampling,
    shutdown,
    two_turns,
    xargs,
)
from vllm_recroute.config import RoutingConfig

pytestmark = pytest.mark.engine

# the references' parked tier: the turn engines' (tests/engine/conftest.py), no turn store
PARKING = {k: v for k, v in TURNS.items() if k != "turn_cache_bytes"}


@pytest.mark.parametrize(
    ("engine", "name"),
    [
        ("turns", "pdrop-reroute"),
        ("turns", "custom-reroute-question"),
        # kv_release fixes the router points: the server's schedule only
        ("turns-released", "pdrop-reroute"),
    ],
    indirect=["engine"],
)
def test_later_turn_loads_the_image_and_matches_the_reference(
    engine, hf_model, tiny_idefics3, name
):
    cfg = {**CONFIGS[name], "reroute_every": 2}
    full = RoutingConfig.from_dict({**cfg, **PARKING})
    restored_before = prom_counter("recroute:restored_blocks")
    loads_before = prom_counter("recroute:turn_loads")
    tokens_before = prom_counter("recroute:turn_loaded_tokens")
    restored, loaded_tokens = 0, 0
    for spec in REQUESTS:
        first, second, new_ids = two_turns(engine, tiny_idefics3, spec, cfg)
        prompt, images = request_inputs(str(tiny_idefics3), spec)
        inputs = hf_inputs(str(tiny_idefics3), prompt, images)
        expected_1, _ = oracle_generate_parked(hf_model, inputs, full, MAX_TOKENS)
        expected_2, n = oracle_generate_parked(
            hf_model, inputs, full, MAX_TOKENS, next_turn=(new_ids, MAX_TOKENS, True)
        )
        assert list(first.outputs[0].token_ids) == expected_1, (name, spec)
        assert list(second.outputs[0].token_ids) == expected_2, (name, spec)
        # every token turn 1 computed came back (image included): nothing recomputed
        assert second.num_cached_tokens == len(first.prompt_token_ids) + MAX_TOKENS - 1
        restored += n
        loaded_tokens += second.num_cached_tokens
    flush(engine)
    assert restored > 0  # the reference swapped units in both turns
    assert prom_counter("recroute:restored_blocks") - restored_before == restored
    assert prom_counter("recroute:turn_loads") - loads_before == len(REQUESTS)
    assert prom_counter("recroute:turn_loaded_tokens") - tokens_before == loaded_tokens


@pytest.mark.parametrize("engine", ["turns", "turns-released"], indirect=True)
def test_a_later_turn_that_respells_the_answer_loads_the_prompt(engine, hf_model, tiny_idefics3):
    """A chat template may render the earlier answer differently from the generated
    tokens: the later turn then loads turn 1's prompt rows (image included) with the
    routing state turn 1 ended with, and computes the answer and its question anew."""
    llm = engine
    cfg = {**CONFIGS["pdrop-reroute"], "reroute_every": 2}
    spec = REQUESTS[2]
    prompt, images = request_inputs(str(tiny_idefics3), spec)
    options = xargs(cfg)
    mm = {"image": images}
    [first] = llm.generate(
        [{"prompt": prompt, "multi_modal_data": mm}], sampling(options), use_tqdm=False
    )
    tok = llm.get_tokenizer()
    respelled = [(t + 1) % 500 + 20 for t in first.outputs[0].token_ids]  # not what was generated
    new_ids = respelled + tok.encode(NEXT_QUESTION, add_special_tokens=False)
    [second] = llm.generate(
        [{"prompt_token_ids": tok.encode(prompt) + new_ids, "multi_modal_data": mm}],
        sampling(options),
        use_tqdm=False,
    )
    assert second.num_cached_tokens == len(first.prompt_token_ids)
    full = RoutingConfig.from_dict({**cfg, **PARKING})
    inputs = hf_inputs(str(tiny_idefics3), prompt, images)
    expected, _ = oracle_generate_parked(
        hf_model, inputs, full, MAX_TOKENS, next_turn=(new_ids, MAX_TOKENS, False)
    )
    assert list(second.outputs[0].token_ids) == expected


@pytest.mark.parametrize("engine", ["turns"], indirect=True)
def test_other_routing_options_recompute_and_differ(engine, tiny_idefics3):
    """A kept turn serves only requests with the same routing options (its stage layout
    depends on them). Guard for the reference test: the loaded turn (re-routed units of
    turn 1) answers differently from a from-scratch routed prefill of the same prompt."""
    cfg = {**CONFIGS["pdrop-reroute"], "reroute_every": 2}
    first, loaded, new_ids = two_turns(engine, tiny_idefics3, REQUESTS[1], cfg)
    assert loaded.num_cached_tokens > 0
    prompt, images = request_inputs(str(tiny_idefics3), REQUESTS[1])
    tok = engine.get_tokenizer()
    ids = tok.encode(prompt) + list(first.outputs[0].token_ids) + new_ids
    # the server's default scorer, spelled out: same routing, another options fingerprint
    other = xargs({**cfg, "scorer": "attention"})
    params = sampling(other)
    params.logprobs = 1
    [fresh] = engine.generate(
        [{"prompt_token_ids": ids, "multi_modal_data": {"image": images}}], params, use_tqdm=False
    )
    assert fresh.num_cached_tokens == 0
    params = sampling(xargs(cfg))
    params.logprobs = 1
    [again] = engine.generate(
        [{"prompt_token_ids": ids, "multi_modal_data": {"image": images}}], params, use_tqdm=False
    )
    assert again.num_cached_tokens == loaded.num_cached_tokens  # kept turns are read-only
    assert list(again.outputs[0].token_ids) == list(loaded.outputs[0].token_ids)
    lp = [next(iter(step.values())).logprob for step in again.outputs[0].logprobs]
    lp_fresh = [next(iter(step.values())).logprob for step in fresh.outputs[0].logprobs]
    assert lp != pytest.approx(lp_fresh, abs=1e-4)


@pytest.mark.parametrize("engine", ["turns", "turns-released"], indirect=True)
def test_kept_turns_hold_no_pages_and_stay_within_the_store(engine, tiny_idefics3):
    """After finishes and aborts, kept turns own host bytes only: the pool and every KV
    block are back, and the store stays within recroute.turn_cache_bytes."""
    from vllm import SamplingParams

    core = engine.llm_engine
    cfg = xargs({**CONFIGS["pdrop-reroute"], "reroute_every": 1})
    two_turns(engine, tiny_idefics3, REQUESTS[2], {**CONFIGS["pdrop-reroute"]})
    prompt, images = request_inputs(str(tiny_idefics3), REQUESTS[0])
    params = SamplingParams(max_tokens=50, ignore_eos=True, extra_args=cfg)
    for name in ("t-abort", "t-keep"):
        core.add_request(name, {"prompt": prompt, "multi_modal_data": {"image": images}}, params)
    for _ in range(3):
        core.step()
    core.abort_request(["t-abort"])
    while core.has_unfinished_requests():
        core.step()
    flush(engine)
    assert engine.collective_rpc(pool_state) == [(0, 0, 0)]
    assert kv_usage(engine) == 0.0
    [(entries, nbytes)] = engine.collective_rpc(_turn_store)
    assert entries > 0 and 0 < nbytes <= TURNS["turn_cache_bytes"]
    assert prom_counter("recroute:turn_store_entries") == entries
    assert prom_counter("recroute:turn_store_bytes") == nbytes


def _turn_store(worker):
    g = runtime_of(worker).turns.gauges()
    return g["turn_store_entries"], g["turn_store_bytes"]


def _salted(prompt: dict, salt: str | None) -> dict:
    return prompt if salt is None else {**prompt, "cache_salt": salt}


def _turn_2_cached_tokens_by_salt(llm, model_dir) -> tuple[int, dict]:
    """Turn 1 kept under salt "tenant-a"; its turn 2 (same tokens and image) sent under
    another salt, none, then its own. Returns turn 1's computed tokens and, per salt of
    turn 2, its num_cached_tokens (0: nothing came from the turn store or vLLM's cache)."""
    cfg = {**CONFIGS["pdrop-reroute"], "reroute_every": 2}
    # a conversation no other test of the module sends (the engine is shared: an unsalted
    # turn kept by another test would rightly serve the unsalted request)
    prompt, images = request_inputs(str(model_dir), ((11,), 128, "which tenant drew this?"))
    mm = {"image": images}
    params = sampling(xargs(cfg))
    first_prompt = _salted({"prompt": prompt, "multi_modal_data": mm}, "tenant-a")
    [first] = llm.generate([first_prompt], params, use_tqdm=False)
    tok = llm.get_tokenizer()
    ids = tok.encode(prompt) + list(first.outputs[0].token_ids)
    ids += tok.encode(NEXT_QUESTION, add_special_tokens=False)
    cached = {}
    for salt in ("tenant-b", None, "tenant-a"):  # the owner last: its load changes nothing
        turn_2 = _salted({"prompt_token_ids": ids, "multi_modal_data": mm}, salt)
        [second] = llm.generate([turn_2], params, use_tqdm=False)
        cached[salt] = second.num_cached_tokens
    return len(first.prompt_token_ids) + MAX_TOKENS - 1, cached


@pytest.mark.parametrize("engine", ["turns-released"], indirect=True)
def test_a_kept_turn_is_loaded_only_under_its_cache_salt(engine, tiny_idefics3):
    """Tenant isolation: cache_salt keeps a kept turn (and vLLM's prefix cache, on with
    kv_release) from serving any request but its own tenant's."""
    computed, cached = _turn_2_cached_tokens_by_salt(engine, tiny_idefics3)
    assert cached == {"tenant-b": 0, None: 0, "tenant-a": computed}


@pytest.fixture(scope="module")
def long_block_engine(tiny_idefics3):
    """The turn engine with 128-token blocks: a whole chat turn (80 visual tokens, the
    question, the answer) is shorter than one block, so its key holds no block hash."""
    llm = make_llm(
        tiny_idefics3,
        routed_arch=ROUTED_IDEFICS3,
        recroute={"mode": "reroute", "schedule": "pdrop", **TURNS},
        block_size=128,
    )
    yield llm
    shutdown(llm)


def test_a_turn_shorter_than_a_block_is_loaded_only_under_its_cache_salt(
    long_block_engine, tiny_idefics3
):
    computed, cached = _turn_2_cached_tokens_by_salt(long_block_engine, tiny_idefics3)
    assert computed < 128  # the whole kept turn lies inside the first block
    assert cached == {"tenant-b": 0, None: 0, "tenant-a": computed}
