"""Shared fixtures. Engines are expensive (~45 s each on CPU): one per kind per session."""

from __future__ import annotations

import gc
import os

import pytest

os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tests read worker-side routing counters with LLM.collective_rpc(callable).
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")

ROUTED_IDEFICS3 = "RecrouteIdefics3ForConditionalGeneration"
ROUTED_PALIGEMMA = "RecroutePaliGemmaForConditionalGeneration"


@pytest.fixture(scope="session")
def tiny_idefics3():
    from vllm_recroute.tiny_models import cached_tiny_model

    return cached_tiny_model("idefics3")


@pytest.fixture(scope="session")
def tiny_paligemma():
    from vllm_recroute.tiny_models import cached_tiny_model

    return cached_tiny_model("paligemma")


def make_llm(model, *, routed_arch: str | None, recroute: dict | None = None, **kwargs):
    from vllm import LLM

    args = dict(
        model=str(model),
        dtype="float32",
        max_model_len=1024,
        kv_cache_memory_bytes=64 << 20,
        max_num_seqs=8,
        seed=0,
        enforce_eager=True,
        limit_mm_per_prompt={"image": 2},
    )
    if routed_arch:
        args["hf_overrides"] = {"architectures": [routed_arch]}
        args["additional_config"] = {"recroute": recroute or {}}
    args.update(kwargs)
    return LLM(**args)


def shutdown(llm) -> None:
    engine = getattr(llm, "llm_engine", None)
    core = getattr(engine, "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        core.shutdown()
    del llm
    gc.collect()


@pytest.fixture(scope="session")
def routed_llm(tiny_idefics3):
    """Routed Idefics3 engine; routing config per request (vllm_xargs / extra_args)."""
    llm = make_llm(
        tiny_idefics3,
        routed_arch=ROUTED_IDEFICS3,
        recroute={"mode": "reroute"},
        disable_log_stats=False,  # Prometheus stat logger on: tests/engine/test_metrics.py
    )
    yield llm
    shutdown(llm)


@pytest.fixture(scope="session")
def plain_llm(tiny_idefics3):
    """Unmodified vLLM (registry architecture), the reference for keep=1.0."""
    llm = make_llm(tiny_idefics3, routed_arch=None)
    yield llm
    shutdown(llm)


def route_counters(llm) -> dict:
    """Worker-side routing totals of a routed engine (metrics/accounting.py layout), with
    `routed_requests` summed over mode/schedule and the mapping kept as `routed_by`."""

    def read(worker):
        import copy

        return copy.deepcopy(worker.model_runner.model.recroute.store.totals)

    totals = llm.collective_rpc(read)[0]
    totals["routed_by"] = totals["routed_requests"]
    totals["routed_requests"] = sum(totals["routed_by"].values())
    return totals
