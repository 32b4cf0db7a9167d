"""The session's `vllm-recroute serve` processes (started together), driven through the
official openai client."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.helpers import API_KEY, Launch

# pdrop with the parked tier on (32 MiB host pool, re-routing every 2 decode steps) and
# later-turn restore (32 MiB of kept turns)
ROUTING = {
    "schedule": "pdrop",
    "request_min_keep": 0.1,
    "parked_bytes": 32 << 20,
    "reroute_every": 2,
    "turn_cache_bytes": 32 << 20,
}


# The soak server (tests/e2e/test_soak.py): kv_release, the parked tier and kept turns
# on a KV cache of 1024 tokens (4 MiB: eight 110-token requests do not fit, so requests
# queue and running ones get preempted), a turn store that must evict, a pixel budget
# (vLLM's VLLM_MAX_IMAGE_PIXELS, one megapixel) and no --api-key.
SOAK_ROUTING = {
    "schedule": "pdrop",
    "request_min_keep": 0.1,
    "kv_release": True,
    "parked_bytes": 8 << 20,
    "reroute_every": 2,
    "turn_cache_bytes": 4 << 20,
}
SOAK_MAX_IMAGE_PIXELS = 1_000_000
SOAK_MAX_MODEL_LEN = 512


def _server_spec(model, tmp_path_factory) -> tuple:
    log = Path(tmp_path_factory.mktemp("server")) / "server.log"
    flags = [
        "--api-key", API_KEY, "--max-model-len", "1024",
        "--kv-cache-memory-bytes", str(64 << 20), "--max-num-seqs", "8",
    ]  # fmt: skip
    return model, log, ROUTING, flags


def _soak_spec(model, tmp_path_factory) -> tuple:
    log = Path(tmp_path_factory.mktemp("soak-server")) / "server.log"
    flags = [
        "--max-model-len", str(SOAK_MAX_MODEL_LEN),
        "--kv-cache-memory-bytes", str(4 << 20), "--max-num-seqs", "8",
    ]  # fmt: skip
    env = {"VLLM_LOGGING_LEVEL": "INFO", "VLLM_MAX_IMAGE_PIXELS": str(SOAK_MAX_IMAGE_PIXELS)}
    return model, log, SOAK_ROUTING, flags, env


def _dp_spec(model, tmp_path_factory) -> tuple:
    """--data-parallel-size 2: two engines (one core each) behind one API server, with the
    default routing (no --routing: kv_release and the parked tier on)."""
    log = Path(tmp_path_factory.mktemp("dp-server")) / "server.log"
    flags = [
        "--data-parallel-size", "2", "--max-model-len", "1024", "--block-size", "32",
        "--kv-cache-memory-bytes", str(64 << 20), "--max-num-seqs", "8",
        # eager: this server is about per-engine counting, and two engines compiling at
        # once on two cores cost CI a minute (the session and soak servers run compiled)
        "--enforce-eager",
    ]  # fmt: skip
    env = {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}  # one NUMA-free binding per engine
    return model, log, None, flags, env


SESSION_SERVERS = {"server": _server_spec, "soak_server": _soak_spec, "dp_server": _dp_spec}


@pytest.fixture(scope="session")
def _session_servers(request, tiny_idefics3, tmp_path_factory):
    """Every session server this run's tests use, started together when the first is
    needed: their startups (imports, compilation) overlap instead of adding up."""
    used = {name for item in request.session.items for name in item.fixturenames}
    launched = {
        name: Launch(*spec(tiny_idefics3, tmp_path_factory))
        for name, spec in SESSION_SERVERS.items()
        if name in used
    }
    yield launched
    for server in launched.values():
        server.stop()


@pytest.fixture(scope="session")
def server(_session_servers):
    return _session_servers["server"].ready()


@pytest.fixture(scope="session")
def soak_server(_session_servers):
    return _session_servers["soak_server"].ready()


@pytest.fixture(scope="session")
def dp_server(_session_servers):
    return _session_servers["dp_server"].ready()


@pytest.fixture(scope="session")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server["base"] + "/v1", api_key=API_KEY, max_retries=0)
