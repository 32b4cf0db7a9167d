"""The vLLM routed path takes the oracle's tokens, for every mode and schedule, batched."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import REQUESTS, hf_inputs, request_inputs
from tests.oracle import oracle_generate
from vllm_recroute.config import RoutingConfig

pytestmark = pytest.mark.engine

MAX_TOKENS = 6

CONFIGS = {
    "off": {"mode": "off"},
    "fastv-reroute": {"mode": "reroute", "schedule": "fastv", "keep": 0.5},
    "fastv-remove": {"mode": "remove", "schedule": "fastv", "keep": 0.5},
    "pdrop-reroute": {"mode": "reroute", "schedule": "pdrop"},
    "pdrop-remove": {"mode": "remove", "schedule": "pdrop"},
    "pdrop-reroute-keynorm-block": {
        "mode": "reroute",
        "schedule": "pdrop",
        "scorer": "key_norm",
        "granularity": "block",
        "block_reduce": "mean",
    },
    "custom-reroute-question": {
        "mode": "reroute",
        "schedule": "custom",
        "custom": [[1, 0.25], [2, 0.75]],
        "score_query": "question",
    },
    "custom-remove-question": {
        "mode": "remove",
        "schedule": "custom",
        "custom": [[1, 0.25], [2, 0.75]],
        "score_query": "question",
    },
    "pdrop-avg-tokens": {"mode": "reroute", "schedule": "pdrop", "avg_visual_tokens": 30},
}


def _xargs(cfg: dict) -> dict:
    return {f"recroute_{k}": v for k, v in cfg.items()}


@pytest.fixture(scope="module")
def hf_model(tiny_idefics3):
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(
        str(tiny_idefics3), torch_dtype=torch.float32, attn_implementation="eager"
    )
    return model.eval()


def _generate(llm, model_dir, cfgs: list[dict]):
    from vllm import SamplingParams

    prompts, params = [], []
    for spec, cfg in zip(REQUESTS, cfgs, strict=True):
        prompt, images = request_inputs(str(model_dir), spec)
        prompts.append({"prompt": prompt, "multi_modal_data": {"image": images}})
        params.append(
            SamplingParams(
                temperature=0,
                max_tokens=MAX_TOKENS,
                ignore_eos=True,
                logprobs=1,
                extra_args=_xargs(cfg),
            )
        )
    return llm.generate(prompts, params, use_tqdm=False)


def _oracle(hf_model, model_dir, spec, cfg: dict) -> tuple[list[int], list[int]]:
    prompt, images = request_inputs(str(model_dir), spec)
    inputs = hf_inputs(str(model_dir), prompt, images)
    tokens = oracle_generate(hf_model, inputs, RoutingConfig.from_dict(cfg), MAX_TOKENS)
    return inputs["input_ids"][0].tolist(), tokens


@pytest.mark.parametrize("name", list(CONFIGS))
def test_batch_matches_oracle(routed_llm, hf_model, tiny_idefics3, name):
    cfg = CONFIGS[name]
    outputs = _generate(routed_llm, tiny_idefics3, [cfg] * len(REQUESTS))
    for spec, out in zip(REQUESTS, outputs, strict=True):
        prompt_ids, expected = _oracle(hf_model, tiny_idefics3, spec, cfg)
        assert out.prompt_token_ids == prompt_ids
        assert list(out.outputs[0].token_ids) == expected, (name, spec)


def test_mixed_batch_matches_oracle(routed_llm, hf_model, tiny_idefics3):
    cfgs = [CONFIGS["pdrop-remove"], CONFIGS["off"], CONFIGS["custom-reroute-question"]]
    outputs = _generate(routed_llm, tiny_idefics3, cfgs)
    for spec, cfg, out in zip(REQUESTS, cfgs, outputs, strict=True):
        _, expected = _oracle(hf_model, tiny_idefics3, spec, cfg)
        assert list(out.outputs[0].token_ids) == expected, (cfg, spec)


def _logprobs(out) -> list[float]:
    return [next(iter(lp.values())).logprob for lp in out.outputs[0].logprobs]


def test_remove_differs_from_reroute_when_tokens_come_back(routed_llm, tiny_idefics3):
    # Stage 2 keeps more than stage 1: reroute brings deferred tokens back, remove cannot.
    rer = _generate(routed_llm, tiny_idefics3, [CONFIGS["custom-reroute-question"]] * 3)
    rem = _generate(routed_llm, tiny_idefics3, [CONFIGS["custom-remove-question"]] * 3)
    for a, b in zip(rer, rem, strict=True):
        assert _logprobs(a) != pytest.approx(_logprobs(b), abs=1e-4)


def test_finished_requests_leave_no_routing_state(routed_llm, tiny_idefics3):
    from tests.conftest import route_counters

    before = route_counters(routed_llm)["routed_requests"]
    _generate(routed_llm, tiny_idefics3, [CONFIGS["pdrop-reroute"]] * 3)
    assert route_counters(routed_llm)["routed_requests"] == before + 3

    def stored(worker):
        return len(worker.model_runner.model.recroute.store)

    # vLLM reports finished ids with the next step; run one more (text-only) request.
    from vllm import SamplingParams

    routed_llm.generate(["hello"], SamplingParams(max_tokens=2), use_tqdm=False)
    assert routed_llm.collective_rpc(stored) == [0]


def test_aborted_requests_leave_no_routing_state(routed_llm, tiny_idefics3):
    from vllm import SamplingParams

    engine = routed_llm.llm_engine
    prompt, images = request_inputs(str(tiny_idefics3), REQUESTS[0])
    params = SamplingParams(
        max_tokens=200, ignore_eos=True, extra_args=_xargs(CONFIGS["pdrop-reroute"])
    )
    engine.add_request(
        "abort-me", {"prompt": prompt, "multi_modal_data": {"image": images}}, params
    )
    for _ in range(4):  # prefill (routed) and a few decode steps
        engine.step()

    def stored(worker):
        return sorted(worker.model_runner.model.recroute.store._states)

    # state exists mid-request (vLLM suffixes the external id internally)
    [[held]] = routed_llm.collective_rpc(stored)
    assert held.startswith("abort-me")
    engine.abort_request(["abort-me"])
    routed_llm.generate(["hello"], SamplingParams(max_tokens=2), use_tqdm=False)
    assert routed_llm.collective_rpc(stored) == [[]]
