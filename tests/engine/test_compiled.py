"""A routed engine under vLLM's default compilation takes the oracle's tokens.

vLLM CPU compiles by default (``CompilationMode.DYNAMO_TRACE_ONCE``, inductor): the text
model is traced once, with the layer wrappers traced as plain layers. A step whose routing
moves rows runs eager (``skip_compiled``); every other step, the decode steps of routed
requests included, runs the compiled graph with compacted attention installed before it
(worker/decoder.py, "Compilation").
"""

from __future__ import annotations

import pytest

from tests.helpers import (
    CONFIGS,
    MAX_TOKENS,
    PARKING,
    REQUESTS,
    ROUTED_IDEFICS3,
    generate,
    make_llm,
    oracle,
    shutdown,
)

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def compiled_llm(tiny_idefics3):
    # reroute_every 0: the parked tier parks, but decode steps never re-route, so every
    # decode step can take the compiled path (the re-routing one is eager: tested below)
    llm = make_llm(
        tiny_idefics3,
        routed_arch=ROUTED_IDEFICS3,
        recroute={"mode": "reroute", **PARKING, "reroute_every": 0},
        enforce_eager=False,  # vLLM's default compilation
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
    }


def _view(llm) -> dict:
    [view] = llm.collective_rpc(_worker_view)
    return view


def test_engine_runs_compiled(compiled_llm):
    view = _view(compiled_llm)
    # guard: the engine really compiled its text model (not eager, not skipped)
    assert view["mode"] == "DYNAMO_TRACE_ONCE"
    assert view["compiled"] is True


@pytest.mark.parametrize("name", ["fastv-reroute", "fastv-remove", "pdrop-reroute", "pdrop-remove"])
def test_compiled_batch_matches_oracle(compiled_llm, hf_eager, tiny_idefics3, name):
    cfg = CONFIGS[name]
    before = _view(compiled_llm)["forwards"]
    outputs = generate(compiled_llm, tiny_idefics3, [cfg] * len(REQUESTS))
    for spec, out in zip(REQUESTS, outputs, strict=True):
        _, expected = oracle(hf_eager, tiny_idefics3, spec, cfg)
        assert list(out.outputs[0].token_ids) == expected, (name, spec)
    after = _view(compiled_llm)["forwards"]
    # one eager forward for the routed prefill; the decode steps of the routed requests
    # (their stages hold fewer tokens) are the compiled forward with compacted attention
    assert after.get("eager", 0) - before.get("eager", 0) >= 1
    assert after.get("installed", 0) - before.get("installed", 0) >= MAX_TOKENS - 1


def test_compiled_mixed_batch_matches_oracle(compiled_llm, hf_eager, tiny_idefics3):
    cfgs = [CONFIGS["pdrop-remove"], CONFIGS["off"], CONFIGS["custom-reroute-question"]]
    outputs = generate(compiled_llm, tiny_idefics3, cfgs)
    for spec, cfg, out in zip(REQUESTS, cfgs, outputs, strict=True):
        _, expected = oracle(hf_eager, tiny_idefics3, spec, cfg)
        assert list(out.outputs[0].token_ids) == expected, (cfg, spec)


def test_compiled_equals_eager_with_decode_rerouting(tiny_idefics3):
    """Re-routing decode steps (parked tier, reroute_every 1) go eager; the tokens equal
    an eager engine's, and the compiled one did run compiled forwards."""
    cfg = {"mode": "reroute", "schedule": "pdrop", **PARKING, "reroute_every": 2}
    results = {}
    for eager in (True, False):
        llm = make_llm(
            tiny_idefics3, routed_arch=ROUTED_IDEFICS3, recroute=cfg, enforce_eager=eager
        )
        try:
            outputs = generate(llm, tiny_idefics3, [{}] * len(REQUESTS))
            results[eager] = [list(o.outputs[0].token_ids) for o in outputs]
            if not eager:
                forwards = _view(llm)["forwards"]
        finally:
            shutdown(llm)
    assert results[False] == results[True]
    # guard: both paths ran: re-routing decode steps eager, the others compiled
    assert forwards.get("installed", 0) >= 1 and forwards.get("eager", 0) >= 2
