"""recroute.parked_bytes: deferred visual K/V parked in a host pool and swapped back by
decode-time re-routing. Same tokens (and the same number of restores) as the reference
where nothing ever leaves memory; parking without re-routing changes nothing; every
pool entry and KV block comes back after finishes and aborts."""

from __future__ import annotations

import pytest

from reference.oracle import oracle_generate_parked
from tests.helpers import (
    CONFIGS,
    MAX_TOKENS,
    PARKING,
    REQUESTS,
    ROUTED_IDEFICS3,
    delta,
    flush,
    generate,
    generate_as_parked_reference,
    hf_inputs,
    hold_request,
    kv_usage,
    make_llm,
    oracle,
    pool_state,
    projection_rows,
    prom_counter,
    request_inputs,
    reroute_forwards,
    shutdown,
    xargs,
)
from vllm_recroute.config import RoutingConfig
from vllm_recroute.tiny import make_test_image

pytestmark = pytest.mark.engine


SWAPPING = {
    "fastv-reroute": CONFIGS["fastv-reroute"],
    "pdrop-reroute": CONFIGS["pdrop-reroute"],
    "custom-reroute-question": CONFIGS["custom-reroute-question"],
}


@pytest.mark.parametrize("name", list(SWAPPING))
@pytest.mark.parametrize("engine", ["parked", "parked-eager-reroute"], indirect=True)
def test_rerouting_matches_the_never_parked_reference(engine, hf_model, tiny_idefics3, name):
    """Both re-routing paths: in the stage-start layers' attention op of the ordinary
    decode step ("parked", the default), or eager through the routed layers (the
    fallback, ``reroute_path: eager``)."""
    cfg = {**SWAPPING[name], "reroute_every": 1}
    before = prom_counter("recroute:restored_blocks")
    dropped = prom_counter("recroute:parked_blocks_dropped")  # (the registry is per process)
    paths = reroute_forwards(engine)
    restored = generate_as_parked_reference(engine, hf_model, tiny_idefics3, cfg)
    paths = delta(reroute_forwards(engine), paths)
    flush(engine)
    assert restored > 0  # the reference swapped units: the test exercises restores
    assert prom_counter("recroute:restored_blocks") - before == restored
    assert prom_counter("recroute:parked_blocks_dropped") == dropped  # reference: no drops
    # every decode step of the batch re-routes; pure-decode ones on the engine's path
    hooked = engine.llm_engine.vllm_config.additional_config["recroute"].get("reroute_path")
    taken, other = ("eager", "installed") if hooked == "eager" else ("installed", "eager")
    assert paths[taken] >= MAX_TOKENS - 1 and paths[other] == 0
    assert (paths["hooks"] > 0) == (taken == "installed")


@pytest.mark.parametrize("engine", ["parked-capped"], indirect=True)
def test_capped_rerouting_matches_the_capped_reference(engine, hf_model, tiny_idefics3):
    """reroute_max_swaps 1: each stage swaps at most its best returner for its weakest
    active unit at a re-route, the reference's swaps under the same cap (its tokens, its
    restores), and fewer than the uncapped reference's on the same requests."""
    cfg = {**CONFIGS["pdrop-reroute"], "reroute_every": 1}
    before = prom_counter("recroute:restored_blocks")
    capped = {**PARKING, "reroute_max_swaps": 1}
    restored = generate_as_parked_reference(engine, hf_model, tiny_idefics3, cfg, capped)
    flush(engine)
    assert restored > 0
    assert prom_counter("recroute:restored_blocks") - before == restored
    uncapped = RoutingConfig.from_dict({**cfg, **PARKING})
    free = 0
    for spec in REQUESTS:
        prompt, images = request_inputs(str(tiny_idefics3), spec)
        inputs = hf_inputs(str(tiny_idefics3), prompt, images)
        free += oracle_generate_parked(hf_model, inputs, uncapped, MAX_TOKENS)[1]
    assert free > restored  # guard: the cap binds on these requests


@pytest.mark.parametrize("engine", ["parked"], indirect=True)
def test_keys_and_values_are_projected_from_kept_weight_rows(engine):
    """Every layer kept its K/V weight rows at load (worker/projections.py), so routing
    projects no queries for keys and restores. The guard: vLLM's CPU dispatch dropped the
    fused weight after packing it, so these rows exist only because they were kept."""
    [(kept, dropped, layers)] = engine.collective_rpc(projection_rows)
    assert layers > 0 and kept == layers and dropped == layers


@pytest.mark.parametrize("name", ["pdrop-reroute", "fastv-reroute", "pdrop-remove"])
@pytest.mark.parametrize("engine", ["parked"], indirect=True)
def test_parking_without_rerouting_changes_nothing(engine, hf_model, tiny_idefics3, name):
    """Parked but never restored: the tokens of the routing oracle (parking off)."""
    cfg = {**CONFIGS[name], "reroute_every": 0}
    parked_before = prom_counter("recroute:parked_blocks")
    outs = generate(engine, tiny_idefics3, [cfg] * len(REQUESTS))
    for spec, out in zip(REQUESTS, outs, strict=True):
        _, expected = oracle(hf_model, tiny_idefics3, spec, CONFIGS[name])
        assert list(out.outputs[0].token_ids) == expected, (name, spec)
    flush(engine)
    parked = prom_counter("recroute:parked_blocks") - parked_before
    if name.endswith("remove"):
        assert parked == 0  # removed tokens are gone for good: nothing to park
    else:
        assert parked > 0


@pytest.mark.parametrize("engine", ["parked"], indirect=True)
def test_finish_and_abort_return_every_pool_entry_and_block(engine, tiny_idefics3):
    from vllm import SamplingParams

    core = engine.llm_engine
    flush(engine)
    assert engine.collective_rpc(pool_state) == [(0, 0, 0)]
    prompt, images = request_inputs(str(tiny_idefics3), REQUESTS[0])
    params = SamplingParams(
        max_tokens=200, ignore_eos=True, extra_args={"recroute_reroute_every": 1}
    )
    for name in ("abort-a", "keep-b", "abort-c"):
        core.add_request(name, {"prompt": prompt, "multi_modal_data": {"image": images}}, params)
    for _ in range(4):  # routed prefill, parking, a few swapping decode steps
        core.step()
    [(blocks, used, units)] = engine.collective_rpc(pool_state)
    assert blocks > 0 and used > 0 and units > 0
    core.abort_request(["abort-a", "abort-c"])
    while core.has_unfinished_requests():
        core.step()
    flush(engine)
    assert engine.collective_rpc(pool_state) == [(0, 0, 0)]
    assert kv_usage(engine) == 0.0  # every KV block back in vLLM's pool
    assert prom_counter("recroute:parked_pool_blocks") == 0
    assert prom_counter("recroute:parked_pool_bytes") == 0


@pytest.mark.parametrize("engine", ["parked"], indirect=True)
def test_rerouting_changes_what_decode_attends_to(engine, tiny_idefics3):
    """Guard for the reference test: swaps really change the model's output."""

    def logprobs(cfg):
        out = generate(engine, tiny_idefics3, [cfg] * len(REQUESTS))
        return [lp for o in out for step in o.outputs[0].logprobs for lp in step.values()]

    swapping = logprobs({**CONFIGS["pdrop-reroute"], "reroute_every": 1})
    fixed = logprobs({**CONFIGS["pdrop-reroute"], "reroute_every": 0})
    assert [x.logprob for x in swapping] != pytest.approx([x.logprob for x in fixed], abs=1e-4)


@pytest.mark.parametrize("engine", ["parked-released"], indirect=True)
def test_parking_with_released_pages(engine, hf_model, tiny_idefics3):
    """kv_release + parked tier: deferred pages go back to vLLM's pool, their K/V lives in
    the host pool, swaps happen inside the compacted rows; same tokens and restores as the
    reference, and every page and pool entry back at the end."""
    llm = engine
    cfg = {**CONFIGS["pdrop-reroute"], "reroute_every": 1}
    released0 = prom_counter("recroute:kv_blocks_released")
    restored0 = prom_counter("recroute:restored_blocks")
    restored = generate_as_parked_reference(llm, hf_model, tiny_idefics3, cfg)
    flush(llm)
    assert restored > 0
    assert prom_counter("recroute:restored_blocks") - restored0 == restored
    assert prom_counter("recroute:kv_blocks_released") > released0
    assert llm.collective_rpc(pool_state) == [(0, 0, 0)]
    assert kv_usage(llm) == 0.0


SYSTEM = (
    "you are a careful assistant that looks at pictures of shapes and colors and answers "
    "short questions about them with one word, the shapes are circles squares triangles "
    "and stars in red green blue yellow purple and orange on a light background"
)


@pytest.mark.parametrize("engine", ["parked-released"], indirect=True)
def test_prefix_cache_serves_text_never_routed_image_blocks(engine, hf_model, tiny_idefics3):
    """Same text prefix and image, two questions: the second request hits the cached text
    blocks in every group, recomputes the image under its own routing, and equals the
    reference; a request identical to the first gets no more than the text either."""
    from vllm import SamplingParams

    from tests.helpers import chat_prompt, processor_for, route_counters

    llm = engine
    cfg = {**CONFIGS["pdrop-reroute"], "reroute_every": 1}
    images = [make_test_image(5, size=128)]
    routed0 = route_counters(llm)["routed_requests"]
    outs = []
    for question in (
        "what is in the picture?",
        "where is the red square?",
        "what is in the picture?",
    ):
        prompt = chat_prompt(str(tiny_idefics3), question, before=SYSTEM)
        params = SamplingParams(
            temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, extra_args=xargs(cfg)
        )
        [out] = llm.generate(
            [{"prompt": prompt, "multi_modal_data": {"image": images}}], params, use_tqdm=False
        )
        inputs = hf_inputs(str(tiny_idefics3), prompt, images)
        expected, _ = oracle_generate_parked(
            hf_model, inputs, RoutingConfig.from_dict({**cfg, **PARKING}), MAX_TOKENS
        )
        assert list(out.outputs[0].token_ids) == expected, question
        outs.append((out, inputs))
    ids = outs[0][1]["input_ids"][0].tolist()
    image_token = processor_for(str(tiny_idefics3)).tokenizer.convert_tokens_to_ids("<image>")
    first_image = ids.index(image_token)
    text_blocks = (first_image // 32) * 32
    assert text_blocks >= 32, "test prompt must have at least one whole text block"
    assert outs[0][0].num_cached_tokens == 0
    # a hit, but never past the text before the image (its image tokens are recomputed)
    assert 0 < outs[1][0].num_cached_tokens <= first_image
    assert 0 < outs[2][0].num_cached_tokens <= first_image
    assert route_counters(llm)["routed_requests"] == routed0 + 3  # hits were routed too


@pytest.mark.parametrize("engine", ["parked"], indirect=True)
def test_a_stage_with_nothing_deferred_parks_nothing(engine, hf_model, tiny_idefics3):
    """keep = 1.0 (every visual token active): nothing to park or swap, the oracle's tokens
    (regression: an empty deferred set once crashed the engine)."""
    cfg = {"mode": "reroute", "schedule": "fastv", "keep": 1.0}
    parked0 = prom_counter("recroute:parked_blocks")
    outs = generate(engine, tiny_idefics3, [{**cfg, "reroute_every": 1}] * len(REQUESTS))
    for spec, out in zip(REQUESTS, outs, strict=True):
        _, expected = oracle(hf_model, tiny_idefics3, spec, cfg)
        assert list(out.outputs[0].token_ids) == expected, spec
    flush(engine)
    assert prom_counter("recroute:parked_blocks") == parked0


@pytest.fixture(scope="module")
def int8_parked_llm(tiny_idefics3):
    llm = make_llm(
        tiny_idefics3,
        routed_arch=ROUTED_IDEFICS3,
        recroute={"mode": "reroute", "schedule": "pdrop", **PARKING, "park_format": "int8"},
        block_size=32,
        disable_log_stats=False,
    )
    yield llm
    shutdown(llm)


@pytest.mark.parametrize("engine", ["parked"], indirect=True)
def test_int8_parking_holds_fewer_bytes_and_restores(
    int8_parked_llm, engine, hf_model, tiny_idefics3
):
    """park_format int8 reaches the pool: the same units (stage-entry states) in fewer
    bytes than this fp32 model's (payload a quarter, plus one scale a hidden channel,
    positions and digests, which this tiny model's hidden size makes 0.6 of the total);
    without re-routing the tokens are the oracle's, with it units come back."""
    cfg = {**CONFIGS["pdrop-reroute"], "reroute_every": 0}
    for name, llm in (("none", engine), ("int8", int8_parked_llm)):
        outs = generate(llm, tiny_idefics3, [cfg] * len(REQUESTS))
        for spec, out in zip(REQUESTS, outs, strict=True):
            _, expected = oracle(hf_model, tiny_idefics3, spec, CONFIGS["pdrop-reroute"])
            assert list(out.outputs[0].token_ids) == expected, (name, spec)
    held = {name: _held_mid_request(llm, tiny_idefics3) for name, llm in
            (("none", engine), ("int8", int8_parked_llm))}  # fmt: skip
    assert held["int8"][0] == held["none"][0] > 0  # the same units parked
    assert held["int8"][1] < 0.65 * held["none"][1]
    restored0 = prom_counter("recroute:restored_blocks")
    generate(int8_parked_llm, tiny_idefics3, [{**cfg, "reroute_every": 1}] * len(REQUESTS))
    flush(int8_parked_llm)
    assert prom_counter("recroute:restored_blocks") > restored0
    assert int8_parked_llm.collective_rpc(pool_state) == [(0, 0, 0)]


def _held_mid_request(llm, model_dir) -> tuple[int, int, int]:
    """Pool (units, bytes, stages) while one routed request is decoding; then abort it."""
    hold_request(llm, model_dir)
    [held] = llm.collective_rpc(pool_state)
    llm.llm_engine.abort_request(["held"])
    flush(llm)
    return held
