"""Conversation affinity for kept turns behind a router (`make test-scale`).

Two `vllm-recroute serve` replicas with kept turns, behind nginx hashing the
`X-Session-Id` header (deploy/affinity/nginx.conf's upstream, pointed at loopback ports).
Every conversation's second turn must land on the replica that kept its first turn and
load it (recroute:turn_loads_total); a guard sends the same conversations without the
header through a round-robin upstream, where some second turns miss their replica.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import requests

from tests.e2e.helpers import free_port, image_data_url, serve_process
from vllm_recroute.tiny import make_test_image

pytestmark = pytest.mark.scale

ROOT = Path(__file__).resolve().parents[2]
ROUTING = {
    "schedule": "pdrop",
    "parked_bytes": 32 << 20,
    "reroute_every": 2,
    "turn_cache_bytes": 32 << 20,
}
FLAGS = ["--max-model-len", "1024", "--kv-cache-memory-bytes", str(64 << 20)]
CONVERSATIONS = 8


def _nginx_conf(ports: list[int], listen: int, hashed: bool) -> str:
    conf = (ROOT / "deploy" / "affinity" / "nginx.conf").read_text()
    servers = "".join(f"        server 127.0.0.1:{p};\n" for p in ports)
    upstream = ("        hash $http_x_session_id consistent;\n" if hashed else "") + servers
    conf = re.sub(
        r"(upstream recroute \{\n).*?(    \})", rf"\g<1>{upstream}\g<2>", conf, flags=re.S
    )
    conf = conf.replace("listen 8000;", f"listen 127.0.0.1:{listen};")
    return conf.replace("worker_processes 1;", "worker_processes 1;\ndaemon off;\npid nginx.pid;")


@pytest.fixture(scope="module")
def replicas(tiny_idefics3, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("affinity")
    with (
        serve_process(tiny_idefics3, tmp / "a.log", ROUTING, FLAGS) as a,
        serve_process(tiny_idefics3, tmp / "b.log", ROUTING, FLAGS) as b,
    ):
        yield [a, b], tmp


def _router(replicas, hashed: bool):
    servers, tmp = replicas
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(nginx).exists():
        raise RuntimeError("nginx is needed (apt-get install nginx-light; make test-scale does)")
    port = free_port()
    ports = [int(s["base"].rsplit(":", 1)[1]) for s in servers]
    conf = tmp / f"nginx-{port}.conf"
    conf.write_text(_nginx_conf(ports, port, hashed))
    proc = subprocess.Popen([nginx, "-p", str(tmp), "-c", str(conf), "-e", "stderr"])
    for _ in range(50):
        try:
            requests.get(f"http://127.0.0.1:{port}/health", timeout=1)
            break
        except requests.ConnectionError:
            time.sleep(0.1)
    return proc, f"http://127.0.0.1:{port}"


def _turn_loads(server) -> float:
    text = requests.get(server["base"] + "/metrics", timeout=10).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("recroute:turn_loads_total")
    )


def _conversations(base: str, header: bool) -> None:
    for c in range(CONVERSATIONS):
        headers = {"X-Session-Id": f"conversation-{c}"} if header else {}
        url = image_data_url(make_test_image(c + 1, size=128))
        history = [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": url}},
                    {"type": "text", "text": "what is in the picture?"},
                ],
            }
        ]
        for question in (None, "and which one is the largest?"):
            if question:
                history.append({"role": "user", "content": question})
            body = {"model": "tiny", "messages": history, "max_tokens": 6, "temperature": 0}
            r = requests.post(
                base + "/v1/chat/completions", json=body, headers=headers, timeout=120
            )
            r.raise_for_status()
            history.append(
                {"role": "assistant", "content": r.json()["choices"][0]["message"]["content"]}
            )
        time.sleep(0.2)  # the kept turn is saved in the step after turn 1 finished


def _loads(replicas) -> float:
    return sum(_turn_loads(s) for s in replicas[0])


def test_every_second_turn_loads_on_the_replica_that_kept_the_first(replicas):
    proc, base = _router(replicas, hashed=True)
    try:
        before = _loads(replicas)
        _conversations(base, header=True)
        assert _loads(replicas) - before == CONVERSATIONS
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_guard_round_robin_without_affinity_misses_kept_turns(replicas):
    proc, base = _router(replicas, hashed=False)
    try:
        before = _loads(replicas)
        _conversations(base, header=False)
        assert _loads(replicas) - before < CONVERSATIONS
    finally:
        proc.terminate()
        proc.wait(timeout=10)
