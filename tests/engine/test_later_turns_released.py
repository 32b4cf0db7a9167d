"""Later-turn restore with kv_release: per-stage KV groups, deferred pages returned to
vLLM's pool, prefix caching on. The loaded turn gets compacted blocks in every routed
stage group (kv/manager.py). Same checks as test_later_turns.py, on this engine (its own
module, so only one engine reports `vllm:kv_cache_usage_perc` at a time)."""

from __future__ import annotations

import pytest

from tests.conftest import ROUTED_IDEFICS3, make_llm, shutdown
from tests.engine.test_later_turns import (
    TURNS,
    check_later_turns_match_the_reference,
    hf_model,  # noqa: F401 (fixture)
    test_a_later_turn_that_respells_the_answer_loads_the_prompt,  # noqa: F401
    test_kept_turns_hold_no_pages_and_stay_within_the_store,  # noqa: F401
)

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def turn_llm(tiny_idefics3):
    llm = make_llm(
        tiny_idefics3,
        routed_arch=ROUTED_IDEFICS3,
        recroute={"mode": "reroute", "schedule": "pdrop", "kv_release": True, **TURNS},
        block_size=32,
        disable_log_stats=False,
    )
    yield llm
    shutdown(llm)


def test_later_turn_loads_the_image_and_matches_the_reference(turn_llm, hf_model, tiny_idefics3):  # noqa: F811
    # router points are the server's with kv_release: the server's schedule only
    check_later_turns_match_the_reference(turn_llm, hf_model, tiny_idefics3, "pdrop-reroute")
