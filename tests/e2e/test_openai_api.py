"""`vllm-recroute serve` through the official openai client: images, streaming, routing
on, per-request options and their 400s, and an engine that survives bad input."""

from __future__ import annotations

import openai
import pytest

from tests.e2e.helpers import chat

pytestmark = pytest.mark.e2e


def test_chat_completion_with_image_non_streaming(client):
    out = chat(client)
    assert out.choices[0].message.content is not None
    assert out.usage.completion_tokens == 8
    assert out.usage.prompt_tokens > 80  # 80 visual tokens + text


def test_streaming_gives_the_same_text(client):
    whole = chat(client).choices[0].message.content
    stream = chat(client, stream=True)
    parts = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert "".join(parts) == whole


def _token_logprobs(out) -> list[float]:
    return [t.logprob for t in out.choices[0].logprobs.content]


def test_routing_is_on_and_per_request_options_apply(client):
    routed = chat(client, logprobs=True)  # server default: pdrop
    full = chat(client, {"recroute_keep": 1.0}, logprobs=True)
    off = chat(client, {"recroute_mode": "off"}, logprobs=True)
    assert _token_logprobs(full) == pytest.approx(_token_logprobs(off), abs=1e-4)
    assert _token_logprobs(routed) != pytest.approx(_token_logprobs(off), abs=1e-4)


@pytest.mark.parametrize(
    ("xargs", "words"),
    [
        ({"recroute_keep": 2}, "recroute.keep"),
        ({"recroute_mode": "sometimes"}, "recroute.mode"),
        ({"recroute_kep": 0.5}, "vllm_xargs.recroute_kep"),
        ({"recroute_custom": "[[1, 0.5"}, "vllm_xargs.recroute_custom"),
        ({"recroute_keep": 0.05}, "vllm_xargs.recroute_keep: got 0.05; this server's minimum"),
    ],
)
def test_bad_per_request_option_is_400_naming_the_field(client, xargs, words):
    with pytest.raises(openai.BadRequestError) as info:
        chat(client, xargs)
    assert words in str(info.value)


def test_malformed_image_is_400_and_engine_keeps_serving(client):
    bad = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAAnotapng"}},
                {"type": "text", "text": "what?"},
            ],
        }
    ]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=bad, max_tokens=4)
    assert chat(client).usage.completion_tokens == 8


def test_api_key_required(server):
    import requests

    r = requests.get(server["base"] + "/v1/models", timeout=10)
    assert r.status_code == 401
