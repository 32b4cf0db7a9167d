"""Chunked prefill on, routed (sched/, docs/architecture.md "Chunked prefill"): vLLM's
chunked prefill stays on with a 128-token step; a routed prompt is chunked before its first
image and takes the rest in one step, so it is routed (oracle-equal) and not a fallback.

One engine for the module, the default ``chunked_prefill: routed``. Each step's scheduled
tokens per request are recorded in the worker (``_record_steps``), so every test also shows
that its prompts really were chunked.
"""

from __future__ import annotations

import pytest

from reference.oracle import oracle_generate
from tests.helpers import (
    CONFIGS,
    MAX_TOKENS,
    ROUTED_IDEFICS3,
    chat_prompt,
    hf_inputs,
    make_llm,
    route_counters,
    shutdown,
    xargs,
)
from vllm_recroute.config import RoutingConfig
from vllm_recroute.tiny import make_test_image

pytestmark = pytest.mark.engine

BUDGET = 128
# 222 tokens: 118 of text before the image, image and question after it (span ~104)
BEFORE = "please read this long note first " * 6
ROUTED = CONFIGS["pdrop-reroute"]


def _chunked_engine(model_dir, recroute: dict, **kwargs):
    llm = make_llm(
        model_dir,
        routed_arch=ROUTED_IDEFICS3,
        recroute=recroute,
        enable_chunked_prefill=True,
        max_num_batched_tokens=BUDGET,
        **kwargs,
    )
    llm.collective_rpc(_record_steps)
    return llm


@pytest.fixture(scope="module")
def chunked_llm(tiny_idefics3):
    llm = _chunked_engine(tiny_idefics3, {"mode": "reroute"})
    yield llm
    shutdown(llm)


def _record_steps(worker) -> None:
    """Worker side: remember each step's scheduled tokens per request."""
    runner = worker.model_runner
    inner = runner.execute_model
    runner.recorded_steps = []

    def execute_model(scheduler_output, *args, **kwargs):
        runner.recorded_steps.append(dict(scheduler_output.num_scheduled_tokens))
        return inner(scheduler_output, *args, **kwargs)

    runner.execute_model = execute_model


def _take_steps(worker) -> list[dict[str, int]]:
    steps = list(worker.model_runner.recorded_steps)
    worker.model_runner.recorded_steps.clear()
    return steps


def _prompt(model_dir, question: str, seeds: tuple[int, ...], before: str = ""):
    images = [make_test_image(s, size=128) for s in seeds]
    return chat_prompt(str(model_dir), question, len(images), before), images


def _run(llm, model_dir, prompts, cfgs) -> tuple[list, list[dict[str, int]], dict]:
    """Generate ``prompts`` ((text, images); no images: text only) with routing ``cfgs``:
    (outputs, prefill chunks per request in order, counter deltas)."""
    from vllm import SamplingParams

    before = route_counters(llm)
    inputs = [
        {"prompt": p, "multi_modal_data": {"image": imgs}} if imgs else {"prompt": p}
        for p, imgs in prompts
    ]
    params = [
        SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, extra_args=xargs(c))
        for c in cfgs
    ]
    outs = llm.generate(inputs, params, use_tqdm=False)
    [steps] = llm.collective_rpc(_take_steps)
    after = route_counters(llm)
    delta = {k: after[k] - before[k] for k in ("routed_requests", "chunked_fallbacks")}
    chunks = [_prefill_chunks(steps, out) for out in outs]
    return outs, chunks, delta


def _prefill_chunks(steps: list[dict[str, int]], out) -> list[int]:
    """The request's scheduled tokens per step until its prompt is done."""
    chunks, total = [], 0
    for step in steps:
        # the engine's id is the output's plus a random suffix ("0" -> "0-97ab2a40")
        n = sum(v for k, v in step.items() if k.rsplit("-", 1)[0] == out.request_id)
        if n and total < len(out.prompt_token_ids):
            chunks.append(n)
            total += n
    return chunks


def _oracle(hf_model, model_dir, prompt, images, cfg: dict) -> list[int]:
    inputs = hf_inputs(str(model_dir), prompt, images)
    return oracle_generate(hf_model, inputs, RoutingConfig.from_dict(cfg), MAX_TOKENS)


def test_chunked_routed_prompt_matches_the_oracle_and_is_routed(
    chunked_llm, tiny_idefics3, hf_model
):
    prompt, images = _prompt(tiny_idefics3, "what is in the picture?", (1,), BEFORE)
    outs, [chunks], delta = _run(chunked_llm, tiny_idefics3, [(prompt, images)], [ROUTED])
    n = len(outs[0].prompt_token_ids)
    assert n > BUDGET  # the prompt cannot go in one step
    assert len(chunks) == 2 and sum(chunks) == n  # chunked, before the image only
    assert n - chunks[0] <= BUDGET
    assert list(outs[0].outputs[0].token_ids) == _oracle(
        hf_model, tiny_idefics3, prompt, images, ROUTED
    )
    assert delta == {"routed_requests": 1, "chunked_fallbacks": 0}


def test_chunked_routed_prompt_with_kv_release_and_prefix_caching(tiny_idefics3, hf_model):
    """Per-stage KV groups: the text chunk is cached KV before the first image (like a
    prefix-cache hit), the span's deferred pages are released after the routed step."""
    llm = _chunked_engine(
        tiny_idefics3, {**ROUTED, "kv_release": True}, block_size=32, enable_prefix_caching=True
    )
    try:
        prompt, images = _prompt(tiny_idefics3, "what is in the picture?", (1,), BEFORE)
        outs, [chunks], delta = _run(llm, tiny_idefics3, [(prompt, images)], [ROUTED])
    finally:
        shutdown(llm)
    assert len(chunks) == 2
    assert list(outs[0].outputs[0].token_ids) == _oracle(
        hf_model, tiny_idefics3, prompt, images, ROUTED
    )
    assert delta == {"routed_requests": 1, "chunked_fallbacks": 0}


def test_span_larger_than_a_step_falls_back_unrouted(chunked_llm, tiny_idefics3, hf_model):
    # two images: ~190 tokens from the first image on, more than a 128-token step
    prompt, images = _prompt(tiny_idefics3, "describe them", (1, 2))
    outs, [chunks], delta = _run(chunked_llm, tiny_idefics3, [(prompt, images)], [ROUTED])
    assert len(chunks) > 1
    assert list(outs[0].outputs[0].token_ids) == _oracle(
        hf_model, tiny_idefics3, prompt, images, CONFIGS["off"]
    )
    assert delta == {"routed_requests": 0, "chunked_fallbacks": 1}


def test_mixed_batch_text_chunks_routed_prompts_route(chunked_llm, tiny_idefics3, hf_model):
    text = chat_prompt(str(tiny_idefics3), "count the words in this note " * 30, 0)
    long_routed = _prompt(tiny_idefics3, "where is the red square?", (3,), BEFORE)
    short_routed = _prompt(tiny_idefics3, "what color is it?", (2,))
    prompts = [(text, []), long_routed, short_routed]
    outs, chunks, delta = _run(chunked_llm, tiny_idefics3, prompts, [ROUTED] * 3)
    assert len(outs[0].prompt_token_ids) > 2 * BUDGET
    assert len(chunks[0]) >= 3  # text only: vLLM's chunks, as without routing
    assert len(chunks[1]) >= 2  # chunked before its image
    for (prompt, images), out in zip(prompts[1:], outs[1:], strict=True):
        assert list(out.outputs[0].token_ids) == _oracle(
            hf_model, tiny_idefics3, prompt, images, ROUTED
        )
    assert delta == {"routed_requests": 2, "chunked_fallbacks": 0}
