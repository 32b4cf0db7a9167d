"""Every architecture the README lists as running here, served the README's way: its
tiny checkpoint, `vllm-recroute serve DIR --routing pdrop` plus the flags its published
checkpoint needs (`--trust-remote-code` where config and processors are remote code) and
nothing else, answers an image chat with a 200.

vLLM's memory profiling feeds each model its largest dummy inputs at startup (a video
clip for Keye-VL and MiniCPM-V), so this is where a processor that handles less than
the published one fails. One server at a time, stopped after its request."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.e2e.helpers import messages, post_chat, serve_process
from vllm_recroute.cli import serve_command
from vllm_recroute.tiny import cached_tiny_model

pytestmark = pytest.mark.e2e

ARCHS = ("idefics3", "paligemma", "keye", "phi3v", "minicpmv")
# The harness's own flags only (serve_process adds port, host, model name, dtype): a
# small KV cache (the launcher's CPU default is 1 GiB). Not --enforce-eager: on CPU,
# vLLM runs the profiling pass with the dummy inputs only to warm up compilation.
HARNESS_FLAGS = ["--kv-cache-memory-bytes", str(64 << 20)]
# vLLM's largest dummy input for these is a video (its log line names the modality)
PROFILED_WITH_VIDEO = ("keye", "minicpmv")


def readme_flags(model: Path) -> list[str]:
    """The flags after DIR in the README's command (`vllm-recroute serve DIR ...`)."""
    command = serve_command(model).split()
    return command[command.index(str(model)) + 1 :]


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_model_serves_the_readme_way(arch, tmp_path):
    model = cached_tiny_model(arch)
    flags = readme_flags(model)
    assert ("--trust-remote-code" in flags) == (arch in ("keye", "phi3v", "minicpmv"))
    start = time.monotonic()
    # routing None: serve_process adds no --routing of its own, the README's is in `flags`
    with serve_process(model, tmp_path / "server.log", None, flags + HARNESS_FLAGS) as server:
        started = time.monotonic() - start
        response = post_chat(server["base"], {"messages": messages()})
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["message"]["content"] is not None
    if arch in PROFILED_WITH_VIDEO:  # the startup path this test is for was taken
        assert "video items of the maximum feature size" in (tmp_path / "server.log").read_text()
    print(f"{arch}: up in {started:.0f} s, {time.monotonic() - start:.0f} s in all")
