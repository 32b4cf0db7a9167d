"""Every architecture the README lists as running here, served the README's way: its
tiny checkpoint, `vllm-recroute serve DIR --routing pdrop` plus the flags its published
checkpoint needs (`--trust-remote-code` where config and processors are remote code) and
nothing else, answers an image chat with a 200.

vLLM's memory profiling feeds each model its largest dummy inputs at startup (a video
clip for Keye-VL and MiniCPM-V), so this is where a processor that handles less than
the published one fails. The remote-code architectures (Keye-VL, Phi-3-V, MiniCPM-V)
are served this way by tests/engine/test_architectures.py, whose HTTP tests run on that
server (one start per architecture instead of two); the rest start here, both at once (their
startups overlap on the cores), stopped at the end of the module."""

from __future__ import annotations

import time

import pytest

from tests.e2e.helpers import README_HARNESS_FLAGS, Launch, messages, post_chat, readme_flags
from vllm_recroute.tiny import cached_tiny_model

pytestmark = pytest.mark.e2e

ARCHS = ("idefics3", "paligemma")


def test_every_architecture_that_runs_here_is_served_the_readme_way():
    """The guard: this file and test_architectures.py together start every architecture of
    the tiny registry (the README's list of what runs here), none twice."""
    from tests.engine.test_architectures import ARCHS as SERVED_THERE
    from vllm_recroute.tiny import ARCHS as REGISTRY

    assert sorted([*ARCHS, *SERVED_THERE]) == sorted(REGISTRY)


@pytest.fixture(scope="module")
def readme_servers(tmp_path_factory):
    """Each architecture of ARCHS served the README's way, all started before any is waited
    for. routing None: no --routing of the harness's own, the README's is in its flags."""
    launched = {}
    for arch in ARCHS:
        model = cached_tiny_model(arch)
        log = tmp_path_factory.mktemp(f"readme-{arch}") / "server.log"
        launched[arch] = (
            time.monotonic(),
            Launch(model, log, None, readme_flags(model) + README_HARNESS_FLAGS),
        )
    yield launched
    for _, server in launched.values():
        server.stop()


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_model_serves_the_readme_way(arch, readme_servers):
    assert "--trust-remote-code" not in readme_flags(cached_tiny_model(arch))  # native ones
    start, launch = readme_servers[arch]
    server = launch.ready()
    started = time.monotonic() - start
    response = post_chat(server["base"], {"messages": messages()})
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] is not None
    print(f"{arch}: up in {started:.0f} s after its launch")
