"""Soak: a few hundred mixed requests against the soak server (kv_release, parked tier,
kept turns, a KV cache too small for the load, loopback only), bounded in count and time.

The mix: plain and per-request-routed chats, n = 3 sampling, streams read to the end,
streams whose client disconnects after the first chunk, two-turn chats with the history
re-sent, long answers (decode growth is what preempts), and every bad input of
tests/e2e/helpers.py:bad_inputs plus an image over the pixel budget. Afterwards: every
good request succeeded, every bad one got a 4xx with a message, vLLM preempted, KV usage,
running/waiting requests and the parked pool are back to 0, the turn store is within its
bytes, and fixed probes answer as they did before the load.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest
import requests

from tests.e2e.conftest import SOAK_MAX_MODEL_LEN, SOAK_ROUTING
from tests.e2e.helpers import (
    bad_inputs,
    error_message,
    image_content,
    image_data_url,
    png_url,
    post_chat,
)
from vllm_recroute.tiny import make_test_image

pytestmark = pytest.mark.e2e

NUM_REQUESTS = 300
CONCURRENCY = 24
DEADLINE_S = 110  # the whole load; the test fails past it rather than hang CI
REQUEST_TIMEOUT_S = 60

# Valid on the soak server (kv_release fixes the schedule, request_min_keep is 0.1).
OPTIONS = [
    {"recroute_keep": 0.3},
    {"recroute_mode": "off"},
    {"recroute_mode": "remove"},
    {"recroute_avg_visual_tokens": 40},
    {"recroute_scorer": "key_norm"},
    {"recroute_reroute_every": 1, "recroute_score_query": "question"},
]
# kind -> weight in the mix
MIX = {
    "plain": 5,
    "options": 4,
    "n3": 2,
    "stream": 2,
    "disconnect": 2,
    "two_turns": 3,
    "long": 3,
    "bad": 3,
}
# Most tokens a request of each kind generates (disconnect: if it were never aborted).
MAX_GENERATED = {
    "plain": 8,
    "options": 8,
    "n3": 3 * 8,
    "stream": 16,
    "disconnect": 200,
    "two_turns": 2 * 6,
    "long": 96,
    "bad": 0,
}
QUESTIONS = ["what color is the circle?", "how many shapes are there?", "is there a square?"]


@dataclass
class Outcome:
    kind: str
    ok: bool
    detail: str = ""


def _image(rng: random.Random) -> str:
    return image_data_url(make_test_image(rng.randrange(1, 6), size=rng.choice([96, 128])))


def _messages(rng: random.Random) -> list[dict]:
    return [{"role": "user", "content": image_content(_image(rng), rng.choice(QUESTIONS))}]


def _good(r: requests.Response, n: int = 1) -> Outcome | None:
    """None when ``r`` is a complete chat answer with ``n`` choices."""
    if r.status_code != 200:
        return Outcome("failed", False, f"{r.status_code} {r.text[:200]}")
    body = r.json()
    if len(body["choices"]) != n or body["usage"]["completion_tokens"] < n:
        return Outcome("failed", False, f"incomplete: {str(body)[:200]}")
    return None


def _chat(base: str, rng: random.Random, kind: str) -> Outcome:
    body: dict = {"messages": _messages(rng), "max_tokens": 8}
    if kind == "options":
        body["vllm_xargs"] = rng.choice(OPTIONS)
    elif kind == "n3":
        body.update(n=3, temperature=0.8, seed=rng.randrange(1000))
    elif kind == "long":  # decode growth past the free blocks is what preempts
        body.update(max_tokens=MAX_GENERATED["long"], ignore_eos=True)
    failed = _good(post_chat(base, body, timeout=REQUEST_TIMEOUT_S), body.get("n", 1))
    return failed or Outcome(kind, True)


def _stream(base: str, rng: random.Random, kind: str) -> Outcome:
    body = {"model": "tiny", "messages": _messages(rng), "max_tokens": 16, "stream": True}
    if kind == "disconnect":  # long enough to be surely running when the client leaves
        body.update(max_tokens=MAX_GENERATED["disconnect"], ignore_eos=True)
    with requests.post(
        base + "/v1/chat/completions", json=body, stream=True, timeout=REQUEST_TIMEOUT_S
    ) as r:
        if r.status_code != 200:
            return Outcome(kind, False, f"{r.status_code} {r.text[:200]}")
        lines = (line for line in r.iter_lines() if line)
        if kind == "disconnect":
            next(lines)  # the first chunk, then the client goes away mid-stream
            return Outcome(kind, True)
        done = any(line == b"data: [DONE]" for line in lines)
    return Outcome(kind, done, "" if done else "stream ended without [DONE]")


def _two_turns(base: str, rng: random.Random, kind: str) -> Outcome:
    history = _messages(rng)
    first = post_chat(base, {"messages": history, "max_tokens": 6}, timeout=REQUEST_TIMEOUT_S)
    if (failed := _good(first)) is not None:
        return failed
    answer = first.json()["choices"][0]["message"]["content"]
    history += [
        {"role": "assistant", "content": answer},
        {"role": "user", "content": "and which one is the largest?"},
    ]
    second = post_chat(base, {"messages": history, "max_tokens": 6}, timeout=REQUEST_TIMEOUT_S)
    return _good(second) or Outcome(kind, True)


def _bad(base: str, rng: random.Random, kind: str, cases: dict) -> Outcome:
    name = rng.choice(sorted(cases))
    body, words = cases[name]
    r = post_chat(base, body, timeout=REQUEST_TIMEOUT_S)
    ok = 400 <= r.status_code < 500 and words in error_message(r)
    return Outcome(f"bad: {name}", ok, "" if ok else f"{r.status_code} {r.text[:200]}")


def _one(base: str, seed: int, cases: dict) -> Outcome:
    rng = random.Random(seed)
    kind = rng.choices(list(MIX), weights=list(MIX.values()))[0]
    try:
        if kind in ("stream", "disconnect"):
            return _stream(base, rng, kind)
        if kind == "two_turns":
            return _two_turns(base, rng, kind)
        if kind == "bad":
            return _bad(base, rng, kind, cases)
        return _chat(base, rng, kind)
    except requests.RequestException as exc:
        return Outcome(kind, False, repr(exc))


# ------------------------------------------------------------------ server state


def _metrics(base: str) -> dict[str, float]:
    """Sum over label sets of every sample on /metrics (names without labels)."""
    out: dict[str, float] = {}
    for line in requests.get(base + "/metrics", timeout=10).text.splitlines():
        if line and not line.startswith("#"):
            name = line.split("{", 1)[0].split(" ", 1)[0]
            out[name] = out.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


IDLE_GAUGES = (
    "vllm:kv_cache_usage_perc",
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
    "recroute:parked_pool_blocks",
)


def _settled(base: str, timeout_s: float = 40) -> dict[str, float]:
    """Metrics once the idle gauges read 0. Gauges move with engine steps and the worker
    learns of finished (and aborted) requests a step later, so a one-token text request
    drives a step between reads."""
    deadline = time.time() + timeout_s
    while True:
        post_chat(base, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1})
        time.sleep(0.5)
        metrics = _metrics(base)
        if all(metrics.get(g, 0.0) == 0.0 for g in IDLE_GAUGES) or time.time() > deadline:
            return metrics


PROBES = [
    (image_data_url(make_test_image(1, size=128)), "what color is the circle?", None),
    (image_data_url(make_test_image(2, size=96)), "how many shapes are there?", None),
    (image_data_url(make_test_image(3, size=128)), "is there a square?", {"recroute_keep": 0.3}),
    (png_url(200, 100), "what is in the picture?", {"recroute_mode": "off"}),
]


def _probe_answers(base: str, salt: str) -> list[str]:
    """Greedy answers of the fixed probes, one at a time. A fresh cache_salt per round:
    nothing comes from the prefix cache or a kept turn, so rounds compute alike."""
    answers = []
    for url, question, xargs in PROBES:
        body: dict = {
            "messages": [{"role": "user", "content": image_content(url, question)}],
            "max_tokens": 8,
            "cache_salt": salt,
        }
        if xargs:
            body["vllm_xargs"] = xargs
        r = post_chat(base, body)
        assert r.status_code == 200, r.text[:300]
        answers.append(r.json()["choices"][0]["message"]["content"])
    return answers


def _turn_store(base: str) -> dict:
    stats = requests.get(base + "/v1/recroute/stats", timeout=10).json()
    return stats["turns"]


def test_soak(soak_server):
    base = soak_server["base"]
    before = _probe_answers(base, "probe-before")
    start_metrics = _metrics(base)
    cases = bad_inputs(SOAK_MAX_MODEL_LEN)
    cases["image over the pixel budget"] = (
        {"messages": [{"role": "user", "content": image_content(png_url(1200, 1000))}]},
        "maximum of",
    )
    start = time.time()
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        futures = [pool.submit(_one, base, seed, cases) for seed in range(NUM_REQUESTS)]
        outcomes = [f.result(timeout=max(1.0, DEADLINE_S - (time.time() - start))) for f in futures]
    elapsed = time.time() - start
    failed = [o for o in outcomes if not o.ok]
    kinds = Counter(o.kind.split(":")[0] for o in outcomes)
    assert not failed, (len(failed), failed[:5])
    assert elapsed < DEADLINE_S and set(kinds) == set(MIX), (elapsed, kinds)

    after = _settled(base)
    assert after["vllm:num_preemptions_total"] > start_metrics["vllm:num_preemptions_total"]
    # aborted mid-stream: a disconnected request generated a few tokens, not its 200
    # (vLLM counts no aborts in request_success_total; the settle requests add < 100)
    generated = (
        after["vllm:generation_tokens_total"] - start_metrics["vllm:generation_tokens_total"]
    )
    bound = sum(MAX_GENERATED[k] * n for k, n in kinds.items() if k != "disconnect")
    assert generated < bound + 100 + 50 * kinds["disconnect"], (generated, bound, kinds)
    assert {g: after.get(g) for g in IDLE_GAUGES} == dict.fromkeys(IDLE_GAUGES, 0.0)
    turns = _turn_store(base)
    assert turns["loaded"] > 0 and turns["saved"] > 0
    assert 0 < turns["store_bytes"] <= SOAK_ROUTING["turn_cache_bytes"]
    assert after["recroute:turn_store_bytes"] == turns["store_bytes"]
    assert requests.get(base + "/health", timeout=10).status_code == 200
    assert _probe_answers(base, "probe-after") == before
