"""Every bad input is a client error: HTTP 400 with a message, raised in the API server
before any engine work, and the engine keeps serving (patch P8,
vllm_recroute/server/media.py, for the media vLLM itself answers with 500 or 501)."""

from __future__ import annotations

import pytest

from tests.e2e.conftest import SOAK_MAX_IMAGE_PIXELS
from tests.e2e.helpers import (
    API_KEY,
    bad_inputs,
    chat,
    error_message,
    image_content,
    png_url,
    post_chat,
)

pytestmark = pytest.mark.e2e

AUTH = {"Authorization": f"Bearer {API_KEY}"}
CASES = bad_inputs(max_model_len=1024)  # the session server's context


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_400_with_the_message(server, name):
    body, words = CASES[name]
    r = post_chat(server["base"], body, AUTH)
    assert r.status_code == 400, (name, r.status_code, r.text[:300])
    assert words in error_message(r), (name, r.text[:300])


def test_the_engine_still_serves_after_bad_inputs(server, client):
    for body, _ in CASES.values():
        post_chat(server["base"], body, AUTH)
    assert chat(client).usage.completion_tokens == 8


def test_an_image_over_the_operators_pixel_budget_is_400(soak_server):
    """VLLM_MAX_IMAGE_PIXELS (one megapixel on the soak server) bounds decoded image
    memory per request; it is read from the image header, before decoding."""
    over = image_content(png_url(1001, 1000))
    r = post_chat(soak_server["base"], {"messages": [{"role": "user", "content": over}]})
    assert r.status_code == 400 and f"maximum of {SOAK_MAX_IMAGE_PIXELS} pixels" in r.text
    within = image_content(png_url(1000, 1000))
    r = post_chat(soak_server["base"], {"messages": [{"role": "user", "content": within}]})
    assert r.status_code == 200, r.text[:300]
