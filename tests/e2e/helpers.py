"""Helpers of the HTTP tests: the server's API key, free ports, image messages, chats."""

from __future__ import annotations

import base64
import io
import socket

from vllm_recroute.tiny_models import make_test_image

API_KEY = "test-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def image_data_url(img) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def messages(seed: int = 1, question: str = "what is in the picture?") -> list[dict]:
    url = image_data_url(make_test_image(seed, size=128))
    return [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": url}},
                {"type": "text", "text": question},
            ],
        }
    ]


def chat(client, xargs: dict | None = None, **kw):
    extra = {"ignore_eos": True}
    if xargs:
        extra["vllm_xargs"] = xargs
    return client.chat.completions.create(
        model="tiny", messages=messages(), max_tokens=8, temperature=0, extra_body=extra, **kw
    )
