"""A routed prompt's ledger delta: its keys are named once beside the Ledger
(metrics/accounting.py) and each is a metric of names.py."""

from __future__ import annotations

from vllm_recroute.metrics.accounting import (
    MAPPINGS,
    ROUTED_PROMPT_KEYS,
    SCALARS,
    Ledger,
    routed_prompt_delta,
)


def test_every_routed_prompt_key_is_a_metric():
    assert set(ROUTED_PROMPT_KEYS) <= set(SCALARS) | set(MAPPINGS)


def test_a_routed_prompt_delta():
    # 10 visual tokens, 6 layers; stages of 2 and 1 layers deferring 4 and 7 tokens
    delta = routed_prompt_delta("reroute/pdrop", 10, 6, [2, 1], [4, 7], (100, 8), [2], 64)
    assert set(delta) <= set(ROUTED_PROMPT_KEYS)
    assert delta == {
        "routed_requests": {"reroute/pdrop": 1},
        "visual_tokens": 10,
        "visual_token_layers": 60,
        "deferred_visual_token_layers": 15,
        "decoder_flops_saved": 1500,
        "kv_bytes_saved": 120,
        "stage_visual_tokens": {"1": 10, "2": 10},
        "stage_active_visual_tokens": {"1": 6, "2": 3},
        "stage_returned_visual_tokens": {"2": 2},
        "routing_extra_flops": 64,
    }
    ledger = Ledger()
    ledger.record(delta)
    assert ledger.totals["deferred_visual_token_layers"] == 15
