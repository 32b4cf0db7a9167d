"""Engines and reference models shared by the engine tests.

``engine`` is the one engine factory: parametrize it indirectly with a kind from ENGINES
(``@pytest.mark.parametrize("engine", ["parked"], indirect=True)``). Module-scoped, so an
engine lives for the tests of one module and kind (one engine reports
``vllm:kv_cache_usage_perc`` at a time).
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers import PARKING, ROUTED_IDEFICS3, TURNS, make_llm, shutdown

PDROP = {"mode": "reroute", "schedule": "pdrop"}
RELEASE = {**PDROP, "kv_release": True}

# kind -> (the routed engine's recroute config, other engine arguments); every engine is
# the tiny Idefics3 with 32-token blocks and stats on.
ENGINES: dict[str, tuple[dict, dict]] = {
    "release": (RELEASE, {}),
    "parked": ({**PDROP, **PARKING}, {}),
    # the fallback: re-routing decode steps run eager through the routed layers
    "parked-eager-reroute": ({**PDROP, **PARKING, "reroute_path": "eager"}, {}),
    # at most one unit a stage swaps at a re-route
    "parked-capped": ({**PDROP, **PARKING, "reroute_max_swaps": 1}, {}),
    # kv_release keeps prefix caching: routed stages cache text only
    "parked-released": ({**RELEASE, **PARKING}, {"enable_prefix_caching": True}),
    "turns": ({**PDROP, **TURNS}, {}),
    "turns-released": ({**RELEASE, **TURNS}, {}),
    # tensor parallelism through gloo: one worker per core (auto-binding wants a NUMA node
    # per worker); the parked tier, re-routing and kept turns on, per-request options on
    "tp2": ({**PDROP, **TURNS}, {"tensor_parallel_size": 2}),
    "tp2-release": ({**RELEASE, **PARKING}, {"tensor_parallel_size": 2}),
}
TP_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}


@pytest.fixture(scope="module")
def engine(request, tiny_idefics3):
    recroute, kwargs = ENGINES[request.param]
    env = TP_ENV if kwargs.get("tensor_parallel_size", 1) > 1 else {}
    with pytest.MonkeyPatch.context() as mp:  # workers inherit it at start-up only
        for key, value in env.items():
            mp.setenv(key, value)
        llm = make_llm(
            tiny_idefics3,
            routed_arch=ROUTED_IDEFICS3,
            recroute=recroute,
            block_size=32,
            disable_log_stats=False,
            **kwargs,
        )
    yield llm
    shutdown(llm)


@pytest.fixture(scope="session")
def hf_model(tiny_idefics3):
    """The tiny Idefics3 in transformers (default attention), for references."""
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(str(tiny_idefics3), dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def hf_eager(tiny_idefics3):
    """The same with eager attention (the routing oracle's reference)."""
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(
        str(tiny_idefics3), torch_dtype=torch.float32, attn_implementation="eager"
    )
    return model.eval()
