"""recroute:* Prometheus counters equal the worker's own routing accounting and what the
routing policy says a known workload must do."""

from __future__ import annotations

import pytest

from tests.helpers import CONFIGS, generate, route_counters
from vllm_recroute.routing import num_keep

pytestmark = pytest.mark.engine


def _prom() -> dict[tuple[str, tuple], float]:
    from prometheus_client import REGISTRY

    out = {}
    for family in REGISTRY.collect():
        for sample in family.samples:
            if sample.name.startswith("recroute:") and sample.name.endswith("_total"):
                labels = tuple(
                    sorted((k, v) for k, v in sample.labels.items() if k != "model_name")
                )
                out[(sample.name, labels)] = sample.value
    return out


def _delta(after: dict, before: dict) -> dict:
    return {k: v - before.get(k, 0.0) for k, v in after.items() if v - before.get(k, 0.0)}


def test_metrics_equal_worker_accounting_for_known_workload(routed_llm, tiny_idefics3):
    prom0, work0 = _prom(), route_counters(routed_llm)
    cfgs = [CONFIGS["pdrop-reroute"], CONFIGS["fastv-remove"], CONFIGS["off"]]
    generate(routed_llm, tiny_idefics3, cfgs)
    # one more step so the last step's stats are surely flushed to the front end
    from vllm import SamplingParams

    routed_llm.generate(["x"], SamplingParams(max_tokens=1), use_tqdm=False)
    prom, work = _delta(_prom(), prom0), route_counters(routed_llm)

    eng = (("engine", "0"),)
    # Known workload: 2 routed prompts of 80 visual tokens (the 'off' one is not routed).
    v = 80
    assert (
        prom[("recroute:routed_requests_total", (*eng, ("mode", "reroute"), ("schedule", "pdrop")))]
        == 1
    )
    assert (
        prom[("recroute:routed_requests_total", (*eng, ("mode", "remove"), ("schedule", "fastv")))]
        == 1
    )
    assert prom[("recroute:visual_tokens_total", eng)] == 2 * v
    assert prom[("recroute:visual_token_layers_total", eng)] == 2 * v * 4
    # tiny model: 4 layers. pdrop -> stages (1,2,.5) (2,3,.25) (3,4,.125); fastv -> (1,4,.5)
    pdrop_active = [num_keep(k, v) for k in (0.5, 0.25, 0.125)]
    fastv_active = num_keep(0.5, v)
    expected_deferred = sum(v - a for a in pdrop_active) + 3 * (v - fastv_active)
    assert prom[("recroute:deferred_visual_token_layers_total", eng)] == expected_deferred
    assert prom[("recroute:stage_visual_tokens_total", (*eng, ("stage", "1")))] == 2 * v
    assert prom[("recroute:stage_active_visual_tokens_total", (*eng, ("stage", "1")))] == (
        pdrop_active[0] + fastv_active
    )
    assert (
        prom[("recroute:stage_active_visual_tokens_total", (*eng, ("stage", "3")))]
        == (pdrop_active[2])
    )
    # ... and every exported counter equals the worker's own totals (deltas)
    for key in ("visual_tokens", "deferred_visual_token_layers", "decoder_flops_saved",
                "kv_bytes_saved"):  # fmt: skip
        assert prom[(f"recroute:{key}_total", eng)] == work[key] - work0[key]
    assert work["routed_requests"] - work0["routed_requests"] == 2
    # FLOPs/KV estimates: per deferred token-layer, 2 x layer weights and K+V bytes (fp32)
    assert prom[("recroute:kv_bytes_saved_total", eng)] == expected_deferred * 2 * 128 * 4
