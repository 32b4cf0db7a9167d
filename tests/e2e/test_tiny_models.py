"""Every architecture the README lists as running here, served the README's way: its
tiny checkpoint, `vllm-recroute serve DIR --routing pdrop` plus the flags its published
checkpoint needs (`--trust-remote-code` where config and processors are remote code) and
nothing else, answers an image chat with a 200.

vLLM's memory profiling feeds each model its largest dummy inputs at startup (a video
clip for Keye-VL and MiniCPM-V), so this is where a processor that handles less than
the published one fails. The remote-code architectures (Keye-VL, Phi-3-V, MiniCPM-V)
are served this way by tests/engine/test_architectures.py, whose HTTP tests run on that
server (one start per architecture instead of two); the rest start here, one server at a
time, stopped after its request."""

from __future__ import annotations

import time

import pytest

from tests.e2e.helpers import README_HARNESS_FLAGS, messages, post_chat, readme_flags, serve_process
from vllm_recroute.tiny import cached_tiny_model

pytestmark = pytest.mark.e2e

ARCHS = ("idefics3", "paligemma")


def test_every_architecture_that_runs_here_is_served_the_readme_way():
    """The guard: this file and test_architectures.py together start every architecture of
    the tiny registry (the README's list of what runs here), none twice."""
    from tests.engine.test_architectures import ARCHS as SERVED_THERE
    from vllm_recroute.tiny import ARCHS as REGISTRY

    assert sorted([*ARCHS, *SERVED_THERE]) == sorted(REGISTRY)


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_model_serves_the_readme_way(arch, tmp_path):
    model = cached_tiny_model(arch)
    flags = readme_flags(model)
    assert "--trust-remote-code" not in flags  # native to vLLM and transformers
    start = time.monotonic()
    # routing None: serve_process adds no --routing of its own, the README's is in `flags`
    with serve_process(
        model, tmp_path / "server.log", None, flags + README_HARNESS_FLAGS
    ) as server:
        started = time.monotonic() - start
        response = post_chat(server["base"], {"messages": messages()})
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["message"]["content"] is not None
    print(f"{arch}: up in {started:.0f} s, {time.monotonic() - start:.0f} s in all")
