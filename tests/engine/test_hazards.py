"""The contract's hazards (docs/architecture.md, "Contract hazards"), each on its own
engine: chunked prefill, preemption, and the second text backbone (Gemma, through
PaliGemma). Prefix caching is refused at startup
(tests/integration/test_engine_config.py); shared-image/different-question requests are in
tests/helpers.REQUESTS and match the oracle in test_routing_oracle.py."""

from __future__ import annotations

import pytest
import torch

from reference.oracle import oracle_generate
from tests.helpers import (
    CONFIGS,
    ROUTED_IDEFICS3,
    ROUTED_PALIGEMMA,
    generate,
    hf_inputs,
    make_llm,
    oracle,
    route_counters,
    runtime_of,
    shutdown,
)
from vllm_recroute.config import RoutingConfig
from vllm_recroute.tiny import make_test_image

pytestmark = pytest.mark.engine


def test_chunked_prompt_falls_back_to_unrouted(tiny_idefics3, hf_model):
    # 64-token steps are shorter than every prompt's span from its image on (80 visual
    # tokens), so no chunk alignment helps (sched/): question-conditioned scores cannot be
    # computed, and each request must run exactly like the unrouted model. Spans that fit a
    # step are routed: tests/engine/test_chunked_routing.py.
    llm = make_llm(
        tiny_idefics3,
        routed_arch=ROUTED_IDEFICS3,
        recroute={"mode": "reroute", "schedule": "pdrop"},
        enable_chunked_prefill=True,
        max_num_batched_tokens=64,
    )
    try:
        outs = generate(llm, tiny_idefics3, [CONFIGS["pdrop-reroute"]] * 3)
        counters = route_counters(llm)
    finally:
        shutdown(llm)
    from tests.helpers import REQUESTS

    for spec, out in zip(REQUESTS, outs, strict=True):
        _, unrouted = oracle(hf_model, tiny_idefics3, spec, CONFIGS["off"])
        assert list(out.outputs[0].token_ids) == unrouted
    assert counters["chunked_fallbacks"] == 3
    assert counters["routed_requests"] == 0


def test_preempted_requests_recompute_the_same_routing(tiny_idefics3, hf_model):
    # 12 KV blocks of 32 tokens: three ~100-token prompts fit, their 60-token answers do
    # not, so vLLM preempts and later recomputes requests from scratch.
    from vllm import SamplingParams

    from tests.helpers import chat_prompt

    llm = make_llm(
        tiny_idefics3,
        routed_arch=ROUTED_IDEFICS3,
        # parked tier on (no re-routing) with a pool of about two units: parking drops most
        # units (never an error), and preemption must free the pool like an abort
        recroute={"mode": "reroute", "schedule": "pdrop", "parked_bytes": 40_000},
        max_model_len=256,
        kv_cache_memory_bytes=12 * 32 * 4096,
        block_size=32,
        disable_log_stats=False,
    )
    questions = ["where is it?", "what color is the big one on the left?", "count them"]
    prompts, images = [], []
    for i, q in enumerate(questions):
        images.append([make_test_image(10 + i, size=128)])
        prompts.append({"prompt": chat_prompt(str(tiny_idefics3), q), "multi_modal_data": {}})
        prompts[-1]["multi_modal_data"]["image"] = images[-1]
    params = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)
    try:
        outs = llm.generate(prompts, params, use_tqdm=False)
        metrics = {m.name: m for m in llm.get_metrics()}
        counters = route_counters(llm)
        llm.generate(["x"], SamplingParams(max_tokens=1), use_tqdm=False)  # delivers finishes
        pool = llm.collective_rpc(_parked_pool)
    finally:
        shutdown(llm)
    assert metrics["vllm:num_preemptions"].value > 0, "workload did not preempt"
    cfg = RoutingConfig.from_dict({"mode": "reroute", "schedule": "pdrop"})
    for prompt, imgs, out in zip(prompts, images, outs, strict=True):
        inputs = hf_inputs(str(tiny_idefics3), prompt["prompt"], imgs)
        expected = oracle_generate(hf_model, inputs, cfg, 60)
        assert list(out.outputs[0].token_ids) == expected
    # every preempted request was routed again on recompute
    assert counters["routed_requests"] >= 3 + 1
    [(entries, used, parks, drops, freed)] = pool
    assert (entries, used) == (0, 0)  # preempted and finished requests' units all freed
    assert parks > 0 and drops > 0 and freed > 0


def _parked_pool(worker):
    pool = runtime_of(worker).tier.pool
    return len(pool), pool.used_bytes, pool.parks, pool.drops, pool.discards


@pytest.fixture(scope="module")
def paligemma_llm(tiny_paligemma):
    llm = make_llm(tiny_paligemma, routed_arch=ROUTED_PALIGEMMA, recroute={"mode": "reroute"})
    yield llm
    shutdown(llm)


PALI_REQUESTS = [(3, "what is in the picture?"), (4, "where is the red square please"), (3, "no")]


@pytest.mark.parametrize(
    "name", ["off", "fastv-remove", "pdrop-reroute", "custom-reroute-question"]
)
def test_paligemma_matches_oracle(paligemma_llm, tiny_paligemma, name):
    from transformers import AutoModelForImageTextToText
    from vllm import SamplingParams

    hf = AutoModelForImageTextToText.from_pretrained(str(tiny_paligemma), dtype=torch.float32)
    hf.eval()
    cfg = CONFIGS[name]
    prompts = [
        {"prompt": q, "multi_modal_data": {"image": make_test_image(seed, size=96)}}
        for seed, q in PALI_REQUESTS
    ]
    xargs = {f"recroute_{k}": v for k, v in cfg.items()}
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, extra_args=xargs)
    outs = paligemma_llm.generate(prompts, params, use_tqdm=False)
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(str(tiny_paligemma))
    for (seed, q), out in zip(PALI_REQUESTS, outs, strict=True):
        inputs = dict(
            proc(text=["<image>" + q], images=[make_test_image(seed, size=96)], return_tensors="pt")
        )
        assert out.prompt_token_ids == inputs["input_ids"][0].tolist()
        expected = oracle_generate(hf, inputs, RoutingConfig.from_dict(cfg), 6)
        assert list(out.outputs[0].token_ids) == expected, (name, q)
