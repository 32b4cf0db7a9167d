"""`vllm-recroute serve --data-parallel-size 2` with the default routing: two engines
behind one API server; every recroute:* series carries its engine's label and counts that
engine's requests only, /v1/recroute/stats reports each engine separately, and the
default's savings are on (deferred pages back to vLLM's pool, units parked)."""

from __future__ import annotations

import re

import pytest
import requests

from tests.e2e.helpers import messages

pytestmark = pytest.mark.e2e

N = 12


def _series(text: str, name: str) -> dict[str, float]:
    """engine label -> value of the series ``name`` (summed over its other labels)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(name + "{"):
            engine = re.search(r'engine="(\d+)"', line).group(1)
            out[engine] = out.get(engine, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def test_each_engine_counts_its_own_routed_requests(dp_server):
    from openai import OpenAI

    client = OpenAI(base_url=dp_server["base"] + "/v1", api_key="EMPTY", max_retries=0)
    for i in range(N):
        client.chat.completions.create(
            model="tiny", messages=messages(seed=i % 3 + 1), max_tokens=4, temperature=0
        )
    text = requests.get(dp_server["base"] + "/metrics", timeout=10).text
    routed = _series(text, "recroute:routed_requests_total")
    finished = _series(text, "vllm:request_success_total")
    assert set(routed) == {"0", "1"}  # one series per engine
    assert sum(routed.values()) == N
    assert routed == finished  # each engine routed exactly the requests it served
    # the default routing saves KV: pages released and units parked, on both engines
    assert set(_series(text, "recroute:kv_blocks_released_total")) == {"0", "1"}
    assert all(v > 0 for v in _series(text, "recroute:kv_blocks_released_total").values())
    assert sum(_series(text, "recroute:parked_blocks_total").values()) > 0
    stats = requests.get(dp_server["base"] + "/v1/recroute/stats", timeout=10).json()
    per_engine = stats["per_engine"]
    assert {e: sum(d["routed_requests"].values()) for e, d in per_engine.items()} == {
        e: int(v) for e, v in routed.items()
    }
