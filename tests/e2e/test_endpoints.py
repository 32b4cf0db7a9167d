"""Plugin endpoints and /metrics on the served model: auth, config, stats = metrics."""

from __future__ import annotations

import time

import pytest
import requests

from tests.e2e.helpers import API_KEY, chat, messages

pytestmark = pytest.mark.e2e

AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.mark.parametrize("path", ["/v1/recroute/config", "/v1/recroute/stats"])
def test_plugin_endpoints_require_the_api_key(server, path):
    assert requests.get(server["base"] + path, timeout=10).status_code == 401
    bad = {"Authorization": "Bearer wrong"}
    assert requests.get(server["base"] + path, headers=bad, timeout=10).status_code == 401
    assert requests.get(server["base"] + path, headers=AUTH, timeout=10).status_code == 200


def test_config_endpoint_shows_effective_routing(server):
    body = requests.get(server["base"] + "/v1/recroute/config", headers=AUTH, timeout=10).json()
    assert body["routing"]["schedule"] == "pdrop" and body["routing"]["mode"] == "reroute"
    assert body["architecture"] == "RecrouteIdefics3ForConditionalGeneration"
    assert body["num_layers"] == 4
    assert body["stages"] == [
        {"start": 1, "end": 2, "keep": 0.5},
        {"start": 2, "end": 3, "keep": 0.25},
        {"start": 3, "end": 4, "keep": 0.125},
    ]
    assert "recroute_keep" in body["per_request_options"]


def _metric_values(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("recroute:"):
            name = line.split("{", 1)[0]
            out[name] = out.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def _stats(server) -> dict:
    return requests.get(server["base"] + "/v1/recroute/stats", headers=AUTH, timeout=10).json()


def _settled_stats(server) -> dict:
    """Stats once the engine is idle: the worker learns of finished requests (and frees
    their parked units) in a step after the response, so wait until two reads agree."""
    prev = _stats(server)
    for _ in range(40):
        time.sleep(0.25)
        cur = _stats(server)
        if cur == prev:
            return cur
        prev = cur
    raise AssertionError("recroute stats did not settle")


def test_stats_count_routed_requests_and_match_metrics(server, client):
    before = _stats(server)
    chat(client)  # server default: pdrop, 80 visual tokens
    chat(client, {"recroute_schedule": "fastv", "recroute_mode": "remove"})
    chat(client, {"recroute_mode": "off"})
    chat(client)  # a later step flushes the last step's stats
    after = _settled_stats(server)
    assert after["routed_requests"] - before["routed_requests"] == 3
    by = after["routed_requests_by_mode_schedule"]
    assert (
        by.get("remove/fastv", 0)
        - before["routed_requests_by_mode_schedule"].get("remove/fastv", 0)
        == 1
    )
    assert after["visual_tokens"] - before["visual_tokens"] == 3 * 80
    assert 0 < after["visual_token_retention"] < 1
    metrics = _metric_values(requests.get(server["base"] + "/metrics", timeout=10).text)
    assert metrics["recroute:visual_tokens_total"] == after["visual_tokens"]
    assert metrics["recroute:routed_requests_total"] == after["routed_requests"]
    assert metrics["recroute:kv_bytes_saved_total"] == after["kv_bytes_saved"]
    # the session server parks deferred K/V (parked_bytes) and re-routes every 2 steps
    parked = after["parked"]
    assert parked["parked_blocks"] > before["parked"]["parked_blocks"]
    assert metrics["recroute:parked_blocks_total"] == parked["parked_blocks"]
    assert metrics["recroute:restored_blocks_total"] == parked["restored_blocks"]
    assert metrics["recroute:parked_blocks_freed_total"] == parked["freed_blocks"]
    assert metrics["recroute:parked_pool_bytes"] == parked["pool_bytes"]
    assert parked["dropped_blocks"] == 0 and parked["pool_blocks"] >= 0


def test_a_second_chat_turn_loads_the_first_turns_image(server, client):
    """Turn 2 of a conversation (the history re-sent, as OpenAI clients do) loads turn 1's
    stage KV instead of re-encoding and recomputing the image; counted on both endpoints."""
    question = "how many shapes are there in this picture?"
    first = client.chat.completions.create(
        model="tiny", messages=messages(3, question), max_tokens=6, temperature=0
    )
    before = _settled_stats(server)["turns"]
    history = [
        *messages(3, question),
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "and which one is the largest?"},
    ]
    second = client.chat.completions.create(
        model="tiny", messages=history, max_tokens=6, temperature=0
    )
    assert second.choices[0].message.content is not None
    after = _settled_stats(server)["turns"]
    assert after["loaded"] - before["loaded"] == 1
    # at least turn 1's prompt came back: its 80 visual tokens and the question
    assert after["loaded_tokens"] - before["loaded_tokens"] >= first.usage.prompt_tokens
    assert 0 < after["store_bytes"] <= 32 << 20 and after["store_entries"] >= 1
    metrics = _metric_values(requests.get(server["base"] + "/metrics", timeout=10).text)
    assert metrics["recroute:turn_loads_total"] == after["loaded"]
    assert metrics["recroute:turn_loaded_tokens_total"] == after["loaded_tokens"]
    assert metrics["recroute:turn_store_bytes"] == after["store_bytes"]
