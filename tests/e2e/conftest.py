"""One `vllm-recroute serve` process per session, driven through the official openai client."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from tests.e2e.helpers import API_KEY, free_port

STARTUP_TIMEOUT_S = 300


# pdrop with the parked tier on (32 MiB host pool, re-routing every 2 decode steps) and
# later-turn restore (32 MiB of kept turns)
ROUTING = {
    "schedule": "pdrop",
    "request_min_keep": 0.1,
    "parked_bytes": 32 << 20,
    "reroute_every": 2,
    "turn_cache_bytes": 32 << 20,
}


@pytest.fixture(scope="session")
def server(tiny_idefics3, tmp_path_factory):
    port = free_port()
    log = Path(tmp_path_factory.mktemp("server")) / "server.log"
    cmd = [
        sys.executable, "-m", "vllm_recroute.cli", "serve", str(tiny_idefics3),
        "--routing", json.dumps(ROUTING),
        "--port", str(port), "--host", "127.0.0.1",
        "--api-key", API_KEY,
        "--served-model-name", "tiny",
        "--dtype", "float32", "--max-model-len", "1024",
        "--kv-cache-memory-bytes", str(64 << 20), "--max-num-seqs", "8",
    ]  # fmt: skip
    env = dict(os.environ, VLLM_LOGGING_LEVEL="INFO")
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + STARTUP_TIMEOUT_S
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited {proc.returncode}:\n{log.read_text()[-4000:]}")
            try:
                if requests.get(base + "/health", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.time() > deadline:
                raise RuntimeError(
                    f"server not up in {STARTUP_TIMEOUT_S}s:\n{log.read_text()[-4000:]}"
                )
            time.sleep(1)
        yield {"base": base, "log": log, "proc": proc}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="session")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server["base"] + "/v1", api_key=API_KEY, max_retries=0)
