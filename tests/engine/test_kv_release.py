"""recroute.kv_release: per-stage KV groups give deferred tokens' pages back to vLLM's
block pool. Same tokens as the oracle (and so as kv_release off), pages really released,
and every block back in the pool at the end."""

from __future__ import annotations

import pytest

from tests.helpers import (
    CONFIGS,
    REQUESTS,
    ROUTED_IDEFICS3,
    generate,
    make_llm,
    oracle,
    shutdown,
)

pytestmark = pytest.mark.engine


def _released(name: str = "recroute:kv_blocks_released_total") -> float:
    from prometheus_client import REGISTRY

    return sum(s.value for fam in REGISTRY.collect() for s in fam.samples if s.name == name)


AFTER_FORWARD = "recroute:kv_blocks_released_after_forward_total"


@pytest.mark.parametrize("name", ["pdrop-reroute", "pdrop-remove", "off"])
@pytest.mark.parametrize("engine", ["release"], indirect=True)
def test_kv_release_matches_oracle(engine, hf_model, tiny_idefics3, name):
    before = _released()
    outs = generate(engine, tiny_idefics3, [CONFIGS[name]] * len(REQUESTS))
    for spec, out in zip(REQUESTS, outs, strict=True):
        _, expected = oracle(hf_model, tiny_idefics3, spec, CONFIGS[name])
        assert list(out.outputs[0].token_ids) == expected, (name, spec)
    from vllm import SamplingParams

    engine.generate(["x"], SamplingParams(max_tokens=1), use_tqdm=False)  # flush stats
    if name == "off":
        assert _released() == before
    else:
        assert _released() > before  # pages of deferred tokens went back to the pool


@pytest.mark.parametrize("engine", ["release"], indirect=True)
def test_compacted_allocation_from_the_first_step(engine, tiny_idefics3):
    """Token granularity: the scheduler's plan is exact, so every saved page is one never
    allocated (no full-length transient, no release after the forward); block granularity
    plans a floor and the worker's report releases the rest after the forward."""
    from vllm import SamplingParams

    def flush():
        engine.generate(["x"], SamplingParams(max_tokens=1), use_tqdm=False)

    released, after = _released(), _released(AFTER_FORWARD)
    generate(engine, tiny_idefics3, [CONFIGS["pdrop-reroute"]] * len(REQUESTS))
    flush()
    assert _released() > released  # guard: pages were saved
    assert _released(AFTER_FORWARD) == after  # ... all of them before any allocation
    released, after = _released(), _released(AFTER_FORWARD)
    block = {"mode": "reroute", "granularity": "block"}  # server block_size 16
    generate(engine, tiny_idefics3, [block] * len(REQUESTS))
    flush()
    assert _released() > released
    assert _released(AFTER_FORWARD) >= after  # floor: may or may not need a release


@pytest.mark.parametrize("engine", ["release"], indirect=True)
def test_all_blocks_return_to_the_pool(engine, tiny_idefics3):
    from vllm import SamplingParams

    generate(engine, tiny_idefics3, [CONFIGS["pdrop-reroute"]] * len(REQUESTS))
    engine.generate(["x"], SamplingParams(max_tokens=1), use_tqdm=False)
    usage = {m.name: m for m in engine.get_metrics()}["vllm:kv_cache_usage_perc"]
    assert usage.value == 0.0


@pytest.mark.parametrize("engine", ["release"], indirect=True)
def test_mixed_run_with_aborts_returns_every_block(engine, tiny_idefics3):
    """Planned (compacted) allocations of routed, unrouted and text requests, two of them
    aborted mid-run (one still waiting or prefilling, one decoding): usage back to 0."""
    from vllm import SamplingParams

    from tests.helpers import request_inputs, xargs

    core = engine.llm_engine
    cfgs = [
        CONFIGS["pdrop-reroute"],
        CONFIGS["off"],
        CONFIGS["pdrop-remove"],
        CONFIGS["pdrop-reroute"],
    ]
    for i, cfg in enumerate(cfgs):
        prompt, images = request_inputs(str(tiny_idefics3), REQUESTS[i % len(REQUESTS)])
        params = SamplingParams(max_tokens=40, ignore_eos=True, extra_args=xargs(cfg))
        core.add_request(
            f"mix{i}", {"prompt": prompt, "multi_modal_data": {"image": images}}, params
        )
    core.add_request("text", "a text-only prompt " * 8, SamplingParams(max_tokens=20))
    for _ in range(3):
        core.step()
    usage = {m.name: m for m in engine.get_metrics()}["vllm:kv_cache_usage_perc"]
    assert usage.value > 0  # guard: blocks are held mid-run
    core.abort_request(["mix0", "mix3"])
    while core.has_unfinished_requests():
        core.step()
    engine.generate(["x"], SamplingParams(max_tokens=1), use_tqdm=False)
    usage = {m.name: m for m in engine.get_metrics()}["vllm:kv_cache_usage_perc"]
    assert usage.value == 0.0


@pytest.mark.parametrize("engine", ["release"], indirect=True)
def test_schedule_override_refused_with_kv_release(engine, tiny_idefics3):
    from vllm.exceptions import VLLMValidationError

    with pytest.raises(VLLMValidationError, match=r"recroute_schedule: fixed on this server"):
        generate(engine, tiny_idefics3, [CONFIGS["fastv-reroute"]] * len(REQUESTS))


def test_released_pages_reused_under_pressure_stay_correct(tiny_idefics3, hf_model):
    """A KV budget too small for all requests at full length: released pages are handed to
    other requests (and preemption may happen) while the routed ones keep decoding."""
    from vllm import SamplingParams

    from reference.oracle import oracle_generate
    from tests.helpers import chat_prompt, hf_inputs
    from vllm_recroute.config import RoutingConfig
    from vllm_recroute.tiny import make_test_image

    cfg = {"mode": "reroute", "schedule": "pdrop", "kv_release": True}
    llm = make_llm(
        tiny_idefics3, routed_arch=ROUTED_IDEFICS3, recroute=cfg, max_model_len=256,
        block_size=32, kv_cache_memory_bytes=16 * 32 * 4096, disable_log_stats=False,
    )  # fmt: skip
    questions = ["where?", "what color is the big one?", "count them", "left or right?"]
    prompts = [
        {"prompt": chat_prompt(str(tiny_idefics3), q),
         "multi_modal_data": {"image": [make_test_image(20 + i, size=128)]}}
        for i, q in enumerate(questions)
    ]  # fmt: skip
    try:
        before = _released()
        outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True),
                            use_tqdm=False)  # fmt: skip
        llm.generate(["x"], SamplingParams(max_tokens=1), use_tqdm=False)
        usage = {m.name: m for m in llm.get_metrics()}["vllm:kv_cache_usage_perc"].value
        released = _released() - before
    finally:
        shutdown(llm)
    oracle_cfg = RoutingConfig.from_dict({"mode": "reroute", "schedule": "pdrop"})
    for p, out in zip(prompts, outs, strict=True):
        inputs = hf_inputs(str(tiny_idefics3), p["prompt"], p["multi_modal_data"]["image"])
        assert list(out.outputs[0].token_ids) == oracle_generate(hf_model, inputs, oracle_cfg, 40)
    assert released > 0
    assert usage == 0.0
