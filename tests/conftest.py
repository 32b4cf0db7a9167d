"""Shared fixtures. Engines are expensive (about 20 s to start in processes of their own, 4 s
in this one: tests/in_process.py): one per kind per session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tests read worker-side routing counters with LLM.collective_rpc(callable).
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")

from tests.helpers import ROUTED_IDEFICS3, make_llm, shutdown


@pytest.fixture(scope="session")
def tiny_idefics3():
    from vllm_recroute.tiny import cached_tiny_model

    return cached_tiny_model("idefics3")


@pytest.fixture(scope="session")
def tiny_paligemma():
    from vllm_recroute.tiny import cached_tiny_model

    return cached_tiny_model("paligemma")


@pytest.fixture(scope="session")
def routed_llm(tiny_idefics3):
    """Routed Idefics3 engine; routing config per request (vllm_xargs / extra_args)."""
    # Session-wide engines run in processes of their own (tests/in_process.py): module
    # engines started beside them run in this one.
    llm = make_llm(
        tiny_idefics3,
        routed_arch=ROUTED_IDEFICS3,
        recroute={"mode": "reroute"},
        in_process=False,
        disable_log_stats=False,  # Prometheus stat logger on: tests/engine/test_metrics.py
    )
    yield llm
    shutdown(llm)


@pytest.fixture(scope="session")
def plain_llm(tiny_idefics3):
    """Unmodified vLLM (registry architecture), the reference for keep=1.0."""
    llm = make_llm(tiny_idefics3, routed_arch=None, in_process=False)
    yield llm
    shutdown(llm)
